"""Fixtures of the engine tests: the tally of the table of bad inputs (tests/engine/test_bad_inputs*.py),
printed at the end of the session. The synthetic city and the checkpoints are tests/conftest.py's."""

import pytest

#: filled by tests/engine/test_bad_inputs*.py (the ``tally`` fixture): every case counts as tried when
#: it starts, as handled when its one-line message, exit code and "no traceback" checks all passed
BAD_INPUTS = {"tried": 0, "handled": 0}


@pytest.fixture
def tally():
    """A row of the table of bad inputs: tried when it starts; ``tally(True)`` at its end marks it handled."""
    BAD_INPUTS["tried"] += 1
    done = []
    yield done.append
    if done:
        BAD_INPUTS["handled"] += 1


def pytest_terminal_summary(terminalreporter):
    if BAD_INPUTS["tried"]:
        terminalreporter.write_line(f"bad inputs: {BAD_INPUTS['tried']} tried, {BAD_INPUTS['handled']} handled")
