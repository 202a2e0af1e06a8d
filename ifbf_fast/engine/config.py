"""Command-line options of train.py: grouped argparse, YAML files for defaults, validation.

Precedence, lowest first: the paper's recipe (the argparse defaults, DESIGN section 3), then the
YAML file given with ``--config`` (or, when neither ``--config`` nor ``--data`` is given, the built-in
``configs/cpu_default.yaml``, which trains on the synthetic city), then the command line.
Everything that can be checked without doing work is checked here, with one-line messages.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import yaml

from ifbf_fast.ops import IMPLS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CPU_DEFAULT = os.path.join(CONFIG_DIR, "cpu_default.yaml")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("inplace_abn_sync", "inplace_abn", "abn", "bn")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _float_or_none(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "null", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train IFBFNet (Sensors 2021) on Cityscapes, or on the built-in synthetic city when "
                    "no --data is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="YAML file of option defaults (keys = option names "
                   "with underscores), e.g. configs/ifbfnet_r101_cityscapes.yaml")

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="Cityscapes root (leftImg8bit/ and gtFine/); omitted: "
                   "generate the synthetic city into --synthetic-dir and train the CPU default")
    g.add_argument("--synthetic-dir", metavar="DIR", default=os.path.join(".cache", "synthetic_city"),
                   help="where the synthetic city is generated (reused when already complete)")
    g.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="data loader: NVIDIA DALI (GPU operators on a GPU, CPU operators otherwise) or the "
                        "torch/OpenCV reference loader; auto = dali where it is installed")
    g.add_argument("--crop-size", type=int, default=876, help="square training crop")
    g.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                   help="random scale factors")
    g.add_argument("--batch-size", type=int, default=4, help="images per process (per GPU)")
    g.add_argument("--workers", type=int, default=4, help="loader worker processes per process")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES, default="resnet101")
    g.add_argument("--output-stride", type=int, choices=(8, 16), default=16)
    g.add_argument("--num-classes", type=int, default=19)
    g.add_argument("--spatial-channels", type=int, default=128, help="spatial stream width (paper Table 3)")
    g.add_argument("--norm", choices=NORMS, default="inplace_abn_sync",
                   help="norm-activation layers: InPlace-ABN-Sync (paper), InPlace-ABN, the reference ABN, "
                        "or BatchNorm2d + LeakyReLU")
    for name, what in (("aspp", "ASPP (off: a 1x1 conv 2048->256)"), ("skip", "the low-level skip connection"),
                       ("fbf", "feature balanced fusion (off: plain concatenation)"),
                       ("spatial", "the spatial stream"), ("aux", "the auxiliary head and its loss")):
        g.add_argument(f"--no-{name}", dest=name, action="store_false", help=f"ablation: without {what}")
    g.add_argument("--pretrained", metavar="PATH", help="local torchvision ImageNet ResNet state_dict file")

    g = p.add_argument_group("optimisation (paper section 4.1)")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--iters", type=int, default=81000, help="optimizer steps")
    g.add_argument("--warmup-iters", type=int, default=1000, help="linear warm-up steps")
    g.add_argument("--lr-mult", type=float, default=10.0, help="learning-rate multiplier of the aux head and FBFs")
    g.add_argument("--aux-weight", type=float, default=0.4, help="lambda of eq. 8")
    g.add_argument("--keep-ratio", type=float, default=0.75, help="OHEM: fraction of valid pixels kept (eq. 7)")
    g.add_argument("--ohem-thresh", type=_float_or_none, default=None,
                   help="OHEM: also keep every pixel with p(true class) below this (paper: 0.7); none = off")

    g = p.add_argument_group("runtime")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs to use (one process each); 0 = CPU; default: 1 if CUDA is available else 0")
    g.add_argument("--procs", type=int, default=1, help="with --gpus 0: CPU processes over gloo")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the loss together (one graph: forward, loss, backward)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile; reduce-overhead captures the step in CUDA graphs")
    g.add_argument("--impl", choices=IMPLS, default=None,
                   help="fused-op implementation (default: IFBF_IMPL or auto)")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision; auto = bf16 where the GPU supports it, fp16 otherwise, off on CPU")
    g.add_argument("--memory-format", choices=("auto", "channels_last", "nchw"), default="auto",
                   help="activation layout; auto = channels_last on CUDA (what the fused kernels and cuDNN "
                        "are fastest in), NCHW on the CPU")
    g.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last",
                   help="same as --memory-format channels_last")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=4000, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-scales", type=float, nargs="+", default=[1.0])
    g.add_argument("--eval-flip", action="store_true")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=os.path.join("runs", "ifbfnet"),
                   help="checkpoints, resolved arguments and logs")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="resume from a checkpoint (default: the latest in --out)")
    g.add_argument("--ckpt-every", type=int, default=2000)
    g.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints kept (best.pt is extra)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines, no bar")
    return p


def _load_yaml(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        parser.error(f"--config {path}: no such file")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        parser.error(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in values if k.replace("-", "_") not in known or k == "config")
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {unknown}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate; exits with a one-line message (argparse's ``error``) on bad input."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config = pre.config if pre.config else (None if pre.data else CPU_DEFAULT)
    if config:
        values = _load_yaml(parser, config)
        # YAML values go through the same type/choice checks as the command line.
        for action in parser._actions:
            if action.dest in values and action.choices is not None:
                v = values[action.dest]
                if v not in action.choices:
                    parser.error(f"--config {config}: {action.dest}={v!r} is not one of {list(action.choices)}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config_used = config
    validate(parser, args)
    return args


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no work: paths exist, numbers are in range."""
    if args.data is not None and not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: no such directory (expected a Cityscapes root with "
                     f"leftImg8bit/ and gtFine/)")
    if args.pretrained is not None and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained {args.pretrained}: no such file (expected a torchvision ResNet "
                     f"state_dict saved with torch.save)")
    positive = ("crop_size", "batch_size", "iters", "num_classes", "spatial_channels", "log_every")
    for name in positive:
        if getattr(args, name) is None or getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    for name in ("warmup_iters", "workers", "eval_every", "ckpt_every", "keep_last"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")
    if args.warmup_iters >= args.iters:
        parser.error(f"--warmup-iters ({args.warmup_iters}) must be smaller than --iters ({args.iters})")
    if not 0 < args.keep_ratio <= 1:
        parser.error(f"--keep-ratio must be in (0, 1]; got {args.keep_ratio}")
    if args.ohem_thresh is not None and not 0 < args.ohem_thresh <= 1:
        parser.error(f"--ohem-thresh must be in (0, 1] or none; got {args.ohem_thresh}")
    if any(s <= 0 for s in args.scales) or any(s <= 0 for s in args.eval_scales):
        parser.error("--scales and --eval-scales must be positive")
    if args.gpus is not None and args.gpus < 0:
        parser.error(f"--gpus must be >= 0; got {args.gpus}")
    if args.procs < 1:
        parser.error(f"--procs must be >= 1; got {args.procs}")
    if args.gpus and args.procs != 1:
        parser.error("--procs is for CPU runs (--gpus 0); with GPUs there is one process per GPU")
    if args.lr <= 0 or args.lr_mult <= 0:
        parser.error("--lr and --lr-mult must be > 0")


def to_dict(args: argparse.Namespace) -> dict:
    """The resolved arguments as plain values (saved next to the checkpoints and inside them)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def model_meta(args: argparse.Namespace) -> dict:
    """What must match for a checkpoint to load into this run's model."""
    return {k: getattr(args, k) for k in ("backbone", "num_classes", "output_stride", "spatial_channels",
                                          "aspp", "skip", "fbf", "spatial", "aux")}


def dump_yaml(args: argparse.Namespace, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(args), f, sort_keys=True)


def args_list(values: dict) -> List[str]:
    """Turn a dict of option values into command-line words (used by tests)."""
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
