"""The tally of the table of bad inputs (tests/engine/test_bad_inputs*.py): every case counts as tried when
it starts, as handled when its one-line message, exit code and "no traceback" checks all passed. Under
pytest-xdist each worker counts its own rows and tests/conftest.py adds them up in the controller."""

BAD_INPUTS = {"tried": 0, "handled": 0}
