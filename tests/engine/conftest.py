"""Fixtures of the engine tests: the tally of the table of bad inputs (tests/engine/test_bad_inputs*.py),
printed at the end of the session (tests/conftest.py). The synthetic city and the checkpoints are tests/conftest.py's."""

import pytest

from tests._tally import BAD_INPUTS


@pytest.fixture
def tally():
    """A row of the table of bad inputs: tried when it starts; ``tally(True)`` at its end marks it handled."""
    BAD_INPUTS["tried"] += 1
    done = []
    yield done.append
    if done:
        BAD_INPUTS["handled"] += 1
