"""Fixtures of the engine tests: a tiny synthetic city built once per session, and the tally of the
table of bad inputs (tests/engine/test_bad_inputs.py), printed at the end of the session."""

import pytest

#: filled by test_bad_inputs.py: every case counts as tried when it starts, as handled when its one-line
#: message, exit code and "no traceback" checks all passed
BAD_INPUTS = {"tried": 0, "handled": 0}


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """8 train and 2 val street scenes of 64x128 (read-only: copy it before planting problems)."""
    from ifbf_fast.data import generate_city
    return generate_city(str(tmp_path_factory.mktemp("tiny_city")), n_train=8, n_val=2, height=64, width=128,
                         seed=3)


@pytest.fixture
def bad_input_tally():
    return BAD_INPUTS


def pytest_terminal_summary(terminalreporter):
    if BAD_INPUTS["tried"]:
        terminalreporter.write_line(f"bad inputs: {BAD_INPUTS['tried']} tried, {BAD_INPUTS['handled']} handled")
