"""Fixtures of the op tests: ``poison`` (tests/ops/_compare.py ``poisoned``) for every test of a module
that asks for it with ``pytestmark = pytest.mark.usefixtures("poison")``."""
import pytest

from ._compare import poisoned


@pytest.fixture
def poison():
    """NaN in every buffer allocated during the test, so that an element a kernel leaves unwritten fails."""
    with poisoned():
        yield
