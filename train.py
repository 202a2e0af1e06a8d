#!/usr/bin/env python
"""Train IFBFNet: a thin command line over ``ifbf_fast.engine.trainer`` (``python train.py --help``).

    python train.py                                  # the synthetic city on the CPU (built-in default)
    python train.py --config configs/ifbfnet_r101_cityscapes.yaml --data /data/cityscapes --gpus 2 --compile
"""

import sys

from ifbf_fast.engine.trainer import main

if __name__ == "__main__":
    sys.exit(main())
