"""Command-line words from option values, for the tests that drive train.py's ``parse_args``/``main``."""
from typing import List


def args_list(values: dict) -> List[str]:
    """``{"crop_size": 64, "flip": True, "scales": [1.0]}`` -> ``["--crop-size", "64", "--flip",
    "--scales", "1.0"]``: a switch is written when true, a list as its values after the flag."""
    words: List[str] = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                words.append(flag)
        elif isinstance(v, (list, tuple)):
            words += [flag] + [str(x) for x in v]
        else:
            words += [flag, str(v)]
    return words
