"""Host microseconds of the fused ops with Triton's real launch path, on a machine without a GPU.

    python bench/launch_host.py                     # table on stdout
    python bench/launch_host.py --json out.json     # and the figures as JSON

The host benches of bench_fbf.py / bench_ohem_ce.py stub ``JITFunction.run`` as a whole, so they cannot
see what a Triton launch costs the host before the driver call: argument binding, specialisation, the
cache lookup, launch metadata and the C launcher. This script keeps all of it. The kernels are compiled
for sm_90 and launched on CPU tensors through Triton's own ``CudaLauncher`` over the stand-in libcuda of
``ifbf_fast/utils/fake_cuda.py``, whose ``cuLaunchKernelEx`` does nothing. Only the driver call itself
is missing, the same few µs for every launch path. On a GPU machine the script refuses (use
bench/gpu_report.py there).

Each case runs, interleaved in one process and on one thread, with two launch paths:

* ``triton``: every launch through ``JITFunction.run`` (``kernels/_launch.py`` switched off);
* ``bound``: the package's planned launches, bound once per plan and pointer properties, then straight
  to Triton's C launcher (the default).

The cases:

* ``launchers``: the kernels' host launchers alone, forward then backward (``kernels.fbf.fwd``/``bwd``,
  ``ohem_ce_fwd``/``ohem_ce_bwd``);
* ``public``: the public op as a training step calls it, forward and ``torch.autograd.grad`` (checks,
  the implementation switch, the C++ autograd node, the engine);
* ``public x8 / 8``: eight calls in one graph and one backward, per call: what one more op adds to a
  training step, whose single backward pays the engine's set-up once.

Figures are the minimum over samples, the usual estimator of host cost. They vary by about 1.4x from
run to run on a shared 2-core machine, but the two paths are always timed in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)


# The "public xN / N" cases: N calls in one autograd graph and one backward, per call. A training step
# runs the engine once for the whole network; a lone torch.autograd.grad pays its set-up (argument
# checks, the graph task, 30-40 µs on the development CPU) for one op, which the "public" case includes.
IN_GRAPH = 8


def _time_paths(fn, paths: dict, rounds: int) -> dict:
    """Minimum µs of one call of ``fn`` under each path's context, the paths alternating call by call
    (a 2-core VM's speed drifts within seconds: interleaving keeps the comparison fair)."""
    best = {name: float("inf") for name in paths}
    for _ in range(rounds):
        for name, enter in paths.items():
            with enter():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t * 1e6 for name, t in best.items()}


def _cases(torch, ops, kfbf, kohem, kup):
    n, ch, cl, h, w = 2, 16, 8, 48, 48
    torch.manual_seed(0)
    cases = {}
    for layout in ("nchw", "channels_last"):
        high, low = torch.randn(n, ch, h, w), torch.randn(n, cl, h, w)
        if layout == "channels_last":
            high, low = (t.contiguous(memory_format=torch.channels_last) for t in (high, low))
        weight, bias = torch.randn(ch + cl, ch + cl, 1, 1), torch.randn(ch + cl)
        grad = torch.randn(n, ch + cl, h, w)

        def launchers(high=high, low=low, weight=weight, bias=bias, grad=grad):
            out, stats, plans = kfbf.fwd(high, low, weight, bias, True)
            return kfbf.bwd(grad, high, low, weight, stats, None, bias.dtype, plans)

        inputs = [t.clone().requires_grad_() for t in (high, low, weight, bias)]

        def public(inputs=inputs, grad=grad):
            return torch.autograd.grad(ops.fbf(*inputs), inputs, grad)

        many = [[t.clone().requires_grad_() for t in (high, low, weight, bias)] for _ in range(IN_GRAPH)]

        def in_graph(many=many, grad=grad):
            outs = [ops.fbf(*inp) for inp in many]
            return torch.autograd.grad(outs, [t for inp in many for t in inp], [grad] * len(outs))

        cases[f"fbf {layout} fp32 launchers"] = launchers
        cases[f"fbf {layout} fp32 public"] = public
        cases[f"fbf {layout} fp32 public x{IN_GRAPH} / {IN_GRAPH}"] = (in_graph, IN_GRAPH)

    shape = (2, 19, 64, 64)
    for variant in ("plain", "fused"):
        nn, c, hh, ww = shape
        lshape = (nn, c, hh // 4, ww // 4) if variant == "fused" else shape
        logits = (torch.randn(lshape) * 3).to(torch.bfloat16)
        target = torch.randint(0, c, (nn, hh, ww), dtype=torch.uint8)
        fwd, bwd = ((kup.ohem_ce_up_fwd, kup.ohem_ce_up_bwd) if variant == "fused"
                    else (kohem.ohem_ce_fwd, kohem.ohem_ce_bwd))
        one = torch.ones((), dtype=torch.float32)

        def launchers(logits=logits, target=target, fwd=fwd, bwd=bwd, one=one):
            loss, losses, state, _bad = fwd(logits, target, 0.75, -1.0, 255)
            return bwd(one, logits, target, losses, state)

        leaf = logits.clone().requires_grad_()
        op = ops.ohem_cross_entropy_upsampled if variant == "fused" else ops.ohem_cross_entropy

        def public(leaf=leaf, target=target, op=op):
            return torch.autograd.grad(op(leaf, target, 0.75, None), [leaf])

        leaves = [logits.clone().requires_grad_() for _ in range(IN_GRAPH)]

        def in_graph(leaves=leaves, target=target, op=op):
            total = sum(op(leaf, target, 0.75, None) for leaf in leaves)
            return torch.autograd.grad(total, leaves)

        cases[f"ohem_ce {variant} bf16 launchers"] = launchers
        cases[f"ohem_ce {variant} bf16 public"] = public
        cases[f"ohem_ce {variant} bf16 public x{IN_GRAPH} / {IN_GRAPH}"] = (in_graph, IN_GRAPH)
    return cases


def measure(rounds: int = 150, per_round: int = 1) -> dict:
    import torch
    if torch.cuda.is_available():
        raise SystemExit("launch_host.py: a GPU is present; time the real launches with bench/gpu_report.py")
    from ifbf_fast.utils.fake_cuda import fake_cuda

    torch.set_num_threads(1)
    from ifbf_fast.utils.launches import stub_triton

    with fake_cuda() as fake:
        from ifbf_fast import ops
        from ifbf_fast.kernels import _launch, fbf as kfbf, ohem_ce as kohem, ohem_ce_upsampled as kup
        # The availability probes accept CPU tensors only under the interpreter: here they go to the
        # compiled kernels and the stand-in driver instead.
        kfbf.INTERPRETER = kohem.INTERPRETER = True
        cases = _cases(torch, ops, kfbf, kohem, kup)
        results = {}

        @contextlib.contextmanager
        def path(bound: bool):
            _launch.set_enabled(bound)
            try:
                yield
            finally:
                _launch.set_enabled(True)

        paths = {"triton": lambda: path(False), "bound": lambda: path(True), "stubbed": stub_triton}
        with ops.use_impl("fast"):
            for name, fn in cases.items():
                fn, calls = fn if isinstance(fn, tuple) else (fn, 1)
                launched = fake.launches
                fn()                                  # compiles (once), plans, binds
                per_call = (fake.launches - launched) // calls
                for _ in range(3):
                    fn()
                times = _time_paths(fn, paths, rounds)
                results[name] = {"launches": per_call, **{f"{k}_us": v / calls for k, v in times.items()}}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--rounds", type=int, default=150, help="samples per path (default 150)")
    args = parser.parse_args(argv)
    results = measure(rounds=max(args.rounds, 3))
    print(f"{'case':40s} {'launches':>8s} {'triton us':>10s} {'bound us':>10s} {'saved us':>9s} {'stubbed us':>11s}")
    for name, r in results.items():
        print(f"{name:40s} {r['launches']:8d} {r['triton_us']:10.1f} {r['bound_us']:10.1f} "
              f"{r['triton_us'] - r['bound_us']:9.1f} {r['stubbed_us']:11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
