"""Command-line options of train.py: grouped argparse, YAML files for defaults, validation.

Precedence, lowest first: the paper's recipe (the argparse defaults, docs/DESIGN.md section 3), then the
YAML file given with ``--config`` (or, when neither ``--config`` nor ``--data`` is given, the built-in
``configs/cpu_default.yaml``, which trains on the synthetic city), then the command line. ``--help``
shows the defaults of that same invocation (``python train.py --help``: the CPU default;
``python train.py --data DIR --help``: the paper's recipe) and says which apply.

Everything that can be checked without doing work is checked here, with one-line messages and exit
code 2 (argparse's ``error``): every float must be finite, numbers must lie in their meaningful range,
and a YAML value goes through the same type and choice checks as the command line (an integer option
refuses ``64.5`` and ``true``, a switch refuses ``"no"``, a list option takes a list, or a scalar as a
one-element list). What needs the data, the model or a checkpoint is checked by
``ifbf_fast.engine.preflight`` before the first step.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Optional, Sequence

import yaml

from ifbf_fast.ops import IMPLS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CPU_DEFAULT = os.path.join(CONFIG_DIR, "cpu_default.yaml")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("inplace_abn_sync", "inplace_abn", "abn", "bn")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


NUM_TRAIN_IDS = 19        # Cityscapes' train ids (ifbf_fast.data.labels.NUM_CLASSES); the synthetic city has them too
ABN_FAMILY = ("inplace_abn_sync", "inplace_abn", "abn")   # one affine (|w| + eps) and one state_dict


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(text: str) -> int:
    """argparse type of ``--gpu-memory``: ``11GiB``, ``80GB``, ``24000MiB``, ``1.5TiB`` -> bytes
    (GB = 10^9, GiB = 2^30; a unit is required, so that ``24`` is not read as 24 bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]i?b)\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 11GiB, 80GB or 24000MiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 2 ** 20:
        raise argparse.ArgumentTypeError(f"expected a GPU memory of at least 1MiB, got {text!r}")
    return int(value)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (``--lr nan`` would poison the weights
    at the first step and fail steps later, blaming the data)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_or_none(text: str) -> Optional[float]:
    """argparse type: ``none``/``null``/``off`` or a finite float."""
    return None if text.lower() in ("none", "null", "off") else finite_float(text)


_float_or_none = float_or_none     # the older name


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to options that take a value and have a default; not to switches (whose
    default is the opposite of what the switch does, so "--no-aspp (default: True)" read as if the
    ablation were on) and not to options without a default (whose help says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``train.py: error: MESSAGE`` and exit code 2, without the
    23-line usage block in front (``--help`` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train.py",
        description="Train IFBFNet (Sensors 2021) on Cityscapes, or on the built-in synthetic city when "
                    "no --data is given.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="YAML", help="YAML file of option defaults (keys = option names "
                   "with underscores), e.g. configs/ifbfnet_r101_cityscapes.yaml")

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="Cityscapes root (leftImg8bit/ and gtFine/) or your own data in "
                   "the folder layout (classes.yaml, images/, masks/, splits/; README 'Your own data'); omitted: "
                   "generate the synthetic city into --synthetic-dir and train the CPU default")
    g.add_argument("--synthetic-dir", metavar="DIR", default=os.path.join(".cache", "synthetic_city"),
                   help="where the synthetic city is generated (reused when already complete)")
    g.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="data loader: NVIDIA DALI (GPU operators on a GPU, CPU operators otherwise) or the "
                        "torch/OpenCV reference loader; auto = dali where it is installed")
    g.add_argument("--crop-size", type=int, default=876, help="square training crop (pixels)")
    g.add_argument("--scales", type=finite_float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                   help="random scale factors")
    g.add_argument("--batch-size", type=int, default=4, help="images per process (per GPU)")
    g.add_argument("--workers", type=int, default=4, help="loader worker processes per process")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES, default="resnet101", help="ResNet backbone")
    g.add_argument("--output-stride", type=int, choices=(8, 16), default=16,
                   help="backbone output stride (dilated last stages)")
    g.add_argument("--num-classes", type=int, default=None,
                   help=f"classes predicted; must be the dataset's: when omitted, taken from its class table "
                        f"({NUM_TRAIN_IDS} for Cityscapes and the synthetic city, the classes listed in DIR/classes.yaml "
                        f"for the folder layout)")
    g.add_argument("--spatial-channels", type=int, default=128, help="spatial stream width (paper Table 3)")
    g.add_argument("--norm", choices=NORMS, default="inplace_abn_sync",
                   help="norm-activation layers: InPlace-ABN-Sync (paper), InPlace-ABN, the reference ABN, "
                        "or BatchNorm2d + LeakyReLU")
    for name, what in (("aspp", "ASPP (a 1x1 conv 2048->256 instead)"), ("skip", "the low-level skip connection"),
                       ("fbf", "feature balanced fusion (plain concatenation instead)"),
                       ("spatial", "the spatial stream"), ("aux", "the auxiliary head and its loss")):
        g.add_argument(f"--no-{name}", dest=name, action="store_false",
                       help=f"ablation: build the network without {what}; default: with it")
    g.add_argument("--pretrained", metavar="PATH", help="local torchvision ImageNet ResNet state_dict file; "
                   "default: none, the backbone starts from random weights")

    g = p.add_argument_group("optimisation (paper section 4.1)")
    g.add_argument("--lr", type=finite_float, default=0.01, help="base learning rate of SGD (> 0)")
    g.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum, in [0, 1)")
    g.add_argument("--weight-decay", type=finite_float, default=5e-4, help="SGD weight decay (>= 0)")
    g.add_argument("--poly-power", type=finite_float, default=0.9,
                   help="power of the poly learning-rate decay (>= 0)")
    g.add_argument("--iters", type=int, default=81000, help="optimizer steps")
    g.add_argument("--warmup-iters", type=int, default=1000, help="linear warm-up steps")
    g.add_argument("--lr-mult", type=finite_float, default=10.0,
                   help="learning-rate multiplier of the aux head and FBFs")
    g.add_argument("--aux-weight", type=finite_float, default=0.4, help="lambda of eq. 8 (>= 0)")
    g.add_argument("--keep-ratio", type=finite_float, default=0.75,
                   help="OHEM: fraction of valid pixels kept (eq. 7), in (0, 1]")
    g.add_argument("--ohem-thresh", type=float_or_none, default=None,
                   help="OHEM: also keep every pixel with p(true class) below this, in (0, 1] (paper: 0.7); "
                        "default: none (off)")

    g = p.add_argument_group("runtime")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs to use (one process each); 0 = CPU; default: 1 if CUDA is available else 0")
    g.add_argument("--procs", type=int, default=1, help="with --gpus 0: CPU processes over gloo")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the loss together (one graph: forward, loss, backward)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile; reduce-overhead captures the step in CUDA graphs")
    g.add_argument("--impl", choices=IMPLS, default=None,
                   help="fused-op implementation; default: the IFBF_IMPL environment variable, else auto")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision; auto = bf16 where the GPU supports it, fp16 otherwise, off on CPU")
    g.add_argument("--memory-format", choices=("auto", "channels_last", "nchw"), default="auto",
                   help="activation layout; auto = channels_last on CUDA (what the fused kernels and cuDNN "
                        "are fastest in), NCHW on the CPU")
    g.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last",
                   help="same as --memory-format channels_last")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the sample order and the augmentation (>= 0)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss")

    g = p.add_argument_group("memory plan (ifbf_fast.plan)")
    g.add_argument("--plan", action="store_true",
                   help="print the predicted peak GPU memory of one training step and the largest batch and "
                        "crop that fit, then exit")
    g.add_argument("--gpu-memory", type=parse_memory, default=None, metavar="SIZE",
                   help="plan against this much GPU memory (11GiB, 80GB, 24000MiB); default: the GPU's own")
    g.add_argument("--no-plan-check", dest="plan_check", action="store_false",
                   help="start even when the predicted peak memory does not fit the GPU")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=4000, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-scales", type=finite_float, nargs="+", default=[1.0],
                   help="test-time scales of the periodic validation (averaged)")
    g.add_argument("--eval-flip", action="store_true", help="also average the flipped image in validation")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=os.path.join("runs", "ifbfnet"),
                   help="checkpoints, resolved arguments and logs")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="resume from a checkpoint; without CKPT: the newest one in --out that loads")
    g.add_argument("--ckpt-every", type=int, default=2000,
                   help="write a checkpoint every N steps (0: only at evaluations and the end)")
    g.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints kept (best.pt is extra)")
    g.add_argument("--log-every", type=int, default=10, help="log the losses every N steps")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="plain log lines instead of a progress bar")
    return p


# --- YAML: the same type checks as the command line ---------------------------------------------

class ConfigValueError(ValueError):
    """A YAML value of the wrong type or outside the option's choices (the message is one line)."""


def _primary_actions(parser: argparse.ArgumentParser) -> dict:
    """dest -> the action whose type and choices a YAML value must satisfy: for ``memory_format`` the
    ``--memory-format`` option, not its ``--channels-last`` alias."""
    actions = {}
    for a in parser._actions:
        if a.dest in ("help", "config"):
            continue
        if a.dest not in actions or (actions[a.dest].nargs == 0 and a.nargs != 0):
            actions[a.dest] = a
    return actions


def _yaml_scalar(action: argparse.Action, value):
    """One YAML value converted like the command-line text would be, or ``ConfigValueError``."""
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(f"expected an integer, got {value!r}")
    elif kind in (finite_float, float_or_none, float):
        if kind is float_or_none and (value is None or (isinstance(value, str) and value.lower() in
                                                        ("none", "null", "off"))):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigValueError(f"expected a finite number, got {value!r}")
    elif not isinstance(value, str):
        hint = ' (YAML reads off/on/no/yes as booleans: quote the word, e.g. amp: "off")' \
            if isinstance(value, bool) else ""
        raise ConfigValueError(f"expected a string, got {value!r}{hint}")
    if action.choices is not None and value not in action.choices:
        raise ConfigValueError(f"{value!r} is not one of {list(action.choices)}")
    return value


def yaml_value(action: argparse.Action, value):
    """A YAML value for ``action``, type-checked: switches take YAML booleans only (``aux: "no"`` is a
    non-empty string, which Python would read as true), options that take a list take a list or a
    scalar (as a one-element list), the others a single value; ``null`` only where the default is none."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigValueError(f"expected true or false (a YAML boolean), got {value!r}")
        if action.const is not None and not isinstance(action.const, bool):   # a store_const alias
            raise ConfigValueError("set the option it is an alias of instead")
        return value
    if value is None:
        if action.default is None or action.type is float_or_none:
            return None
        raise ConfigValueError("null is not allowed here")
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise ConfigValueError("expected at least one value, got an empty list")
        return [_yaml_scalar(action, v) for v in items]
    if isinstance(value, (list, dict)):
        raise ConfigValueError(f"expected a single value, got {type(value).__name__} {value!r}")
    return _yaml_scalar(action, value)


def _load_yaml(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        parser.error(f"--config {path}: no such file")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--config {path}: cannot read it ({exc})")
    except yaml.YAMLError as exc:
        parser.error(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    actions = _primary_actions(parser)
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {unknown}")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = yaml_value(actions[key], value)
        except ConfigValueError as exc:
            parser.error(f"--config {path}: {key}: {exc}")
    return checked


def _pre_parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``--config`` and ``--data`` alone, before the full parse (which may be ``--help``: it must show
    the defaults the YAML file sets)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--data")
    return pre.parse_known_args(argv)[0]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate; exits with a one-line message and code 2 (argparse's ``error``) on bad input."""
    parser = build_parser()
    pre = _pre_parse(argv)
    config = pre.config if pre.config else (None if pre.data else CPU_DEFAULT)
    if config:
        parser.set_defaults(**_load_yaml(parser, config))
    if config == CPU_DEFAULT:
        which = (f"the built-in CPU default {os.path.relpath(CPU_DEFAULT, os.path.dirname(CONFIG_DIR))} over "
                 f"the paper's recipe, since neither --config nor --data is given")
    elif config:
        which = f"those of --config {config} over the paper's recipe"
    else:
        which = "the paper's recipe (--data given, no --config)"
    parser.epilog = f"Defaults shown: {which}."
    args = parser.parse_args(argv)
    args.config_used = config
    validate(parser, args)
    return args


# --- checks that need no work -------------------------------------------------------------------

def world_size_of(args: argparse.Namespace) -> int:
    """Processes the run will have: torchrun's WORLD_SIZE, --gpus N, or --procs N (before any start)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["WORLD_SIZE"]))
    return args.gpus if args.gpus else args.procs


def _check_batch_and_crop(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Training normalises every feature map over the batch, which needs more than one value per
    channel: ASPP's image-pooling branch normalises a 1x1 map (so at least 2 images per norm group),
    the deepest map is ceil(crop / output stride) pixels square. InPlace-ABN-Sync's group is every
    process; the other norms normalise within a process."""
    group = args.batch_size * (world_size_of(args) if args.norm == "inplace_abn_sync" else 1)
    os_ = args.output_stride
    side = -(-args.crop_size // os_)
    if group >= 2:
        return
    if args.aspp:
        parser.error(f"--batch-size {args.batch_size}: ASPP's image-pooling branch normalises a 1x1 map over "
                     f"the batch, so training needs at least 2 images per norm layer (here 1 with --norm "
                     f"{args.norm}); use --batch-size 2 or more (or --no-aspp with --crop-size {os_ + 1} or more)")
    if side * side < 2:
        parser.error(f"--crop-size {args.crop_size} with --batch-size {args.batch_size}: the deepest feature map "
                     f"(1/{os_} of the crop) is {side}x{side}, one value per channel for its norm layer; the "
                     f"minimum at output stride {os_} is --crop-size {os_ + 1} (or use --batch-size 2 or more)")


def resolve_classes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.classes``: the dataset's class table as plain values (``ClassTable.to_dict``: recorded in
    every checkpoint, so evaluate, predict and TensorBoard name and colour the classes as the data
    does), and ``args.num_classes`` from it when not given. The table is the folder layout's
    ``DIR/classes.yaml`` when there is one, else Cityscapes' (also the synthetic city's). A bad
    classes.yaml is bad data: one line and exit code 1; a --num-classes the table contradicts, a
    usage error (exit 2)."""
    from ifbf_fast.data import CITYSCAPES, ClassTableError, class_table_of

    table = CITYSCAPES
    if args.data is not None:
        try:
            table = class_table_of(args.data)
        except ClassTableError as exc:
            parser.exit(1, f"{parser.prog}: error: {exc}\n")
    args.classes = table.to_dict()
    if args.num_classes is None:
        args.num_classes = table.num_classes
    elif args.num_classes > 0 and args.num_classes != table.num_classes:
        if table.layout == "cityscapes":
            parser.error(f"--num-classes {args.num_classes}: the labels are Cityscapes train ids (the synthetic "
                         f"city's too), {NUM_TRAIN_IDS} classes; only --num-classes {NUM_TRAIN_IDS} is valid")
        parser.error(f"--num-classes {args.num_classes}: {table.source} lists {table.num_classes} classes; omit "
                     f"--num-classes (it follows the class table) or give {table.num_classes}")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no work: paths exist, numbers are finite and in range."""
    def err(option: str, rule: str) -> None:
        parser.error(f"--{option.replace('_', '-')} {rule}; got {getattr(args, option)}")

    if args.data is not None and not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: no such directory (expected a Cityscapes root with "
                     f"leftImg8bit/ and gtFine/, or the folder layout with classes.yaml)")
    if args.pretrained is not None and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained {args.pretrained}: no such file (expected a torchvision ResNet "
                     f"state_dict saved with torch.save)")
    # YAML values are checked as they are read; this catches a value set by other means (a Namespace
    # built by hand, set_defaults) before it poisons the weights.
    for action in _primary_actions(parser).values():
        if action.type in (finite_float, float_or_none):
            value = getattr(args, action.dest)
            for v in (value if isinstance(value, list) else [value]):
                if v is not None and not math.isfinite(v):
                    err(action.dest, "must be a finite number")
    resolve_classes(parser, args)
    for name in ("crop_size", "batch_size", "iters", "num_classes", "spatial_channels", "log_every",
                 "max_nonfinite"):
        if getattr(args, name) is None or getattr(args, name) <= 0:
            err(name, "must be > 0")
    for name in ("warmup_iters", "workers", "eval_every", "ckpt_every", "keep_last", "seed"):
        if getattr(args, name) < 0:
            err(name, "must be >= 0")
    if args.warmup_iters >= args.iters:
        parser.error(f"--warmup-iters ({args.warmup_iters}) must be smaller than --iters ({args.iters})")
    for name, ok, rule in (("lr", args.lr > 0, "must be > 0"), ("lr_mult", args.lr_mult > 0, "must be > 0"),
                           ("momentum", 0 <= args.momentum < 1, "must be in [0, 1)"),
                           ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
                           ("poly_power", args.poly_power >= 0, "must be >= 0"),
                           ("aux_weight", args.aux_weight >= 0, "must be >= 0"),
                           ("keep_ratio", 0 < args.keep_ratio <= 1, "must be in (0, 1]"),
                           ("ohem_thresh", args.ohem_thresh is None or 0 < args.ohem_thresh <= 1,
                            "must be in (0, 1] or none"),
                           ("scales", all(s > 0 for s in args.scales), "must be positive"),
                           ("eval_scales", all(s > 0 for s in args.eval_scales), "must be positive")):
        if not ok:
            err(name, rule)
    if args.gpus is not None and args.gpus < 0:
        err("gpus", "must be >= 0")
    if args.procs < 1:
        err("procs", "must be >= 1")
    if args.gpus and args.procs != 1:
        parser.error("--procs is for CPU runs (--gpus 0); with GPUs there is one process per GPU")
    _check_batch_and_crop(parser, args)


def to_dict(args: argparse.Namespace) -> dict:
    """The resolved arguments as plain values (saved next to the checkpoints and inside them)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def model_meta(args: argparse.Namespace) -> dict:
    """What must match for a checkpoint to load into this run's model. (The norm family is checked
    on resume by ``ifbf_fast.engine.preflight``: its state_dict keys are the same for every norm, but
    the affine is not.)"""
    return {k: getattr(args, k) for k in ("backbone", "num_classes", "output_stride", "spatial_channels",
                                          "aspp", "skip", "fbf", "spatial", "aux")}


def norm_family(norm: str) -> str:
    """``"abn"`` for InPlace-ABN(-Sync) and the reference ABN (affine ``|w| + eps``), ``"bn"`` for
    BatchNorm2d + LeakyReLU (affine ``w``): a checkpoint moves only within a family."""
    return "abn" if norm in ABN_FAMILY else "bn"


def dump_yaml(args: argparse.Namespace, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(args), f, sort_keys=True)

