"""The one-command GPU report (docs/DESIGN.md section 7): build, test, measure, write, print.

    python bench/gpu_report.py                  # on a GPU machine, from the repository root; < 10 minutes on one H100
    python bench/gpu_report.py --skip-build --skip-tests --only train_step_compiled_reference \
        train_step_cudagraphs_reference      # a second command on the same warm machine: what did not fit

In one run, each stage in its own process with a time limit taken from one overall budget:

1. build ``ifbf_fast._C`` with ``pip install --no-build-isolation -e .`` and ``TORCH_CUDA_ARCH_LIST`` set
   to the present card's compute capability (only that one: the build is on the clock);
2. the GPU tests: ``IFBF_TEST_GPU=1 pytest tests/ops -q`` (compiled kernels on CUDA tensors);
3. the card's yardsticks: copy bandwidth (bench/conftest.py) and the bf16 matmul rate;
4. the benches (``pytest --benchmark-only --benchmark-json``), a selection of shapes (``STAGES``) in
   priority order, and ``bench/profile_kernels.py`` (per-kernel device time, launches and host time of
   the fast ops: why the benches' numbers are what they are); a stage that no longer fits the budget is
   skipped and listed as such;
5. ``bench/results/<gpu>-<commit>.json`` (every result, the yardsticks, the build and test outcome,
   the stages) and ``<gpu>-<commit>.md``, and the markdown table printed last. A later run for the
   same card and commit is merged into the file (its rows and stages replace those of the same name).

Measured on an H200 (2026-11-26, torch 2.11, triton 3.6): build 36 s, GPU tests 91 s (8 pytest-xdist
workers), yardsticks about 10 s, the op benches and the eager train steps 110 s, the two compiled train
steps (a full R101 compilation each) 146 s: about 7 minutes of the 560 s budget. The compiled train steps
come last and are skipped when the budget is spent (the stage table says so): run them with the second
command above. The results file is rewritten after every stage, so a run stopped by the machine's time
limit keeps what it measured.

Commit the two result files; on a lent machine whose files come back only from ``$OUT``, run
``python bench/gpu_report.py --out $OUT`` and copy them into bench/results/ here. ``bench/plot.py
<results.json>`` draws them. Without CUDA the script
still runs the CPU benches (build and GPU tests skipped), which checks the pipeline.
DALI is not installed on the GPU machines and they have no internet: to bench the DALI loader, bring
the ``nvidia-dali-cuda130`` wheel along and ``pip install`` it first (the DALI bench skips without it).
The lent machines of this workplace take at most 64 MiB of files per call and the wheel is 190 MiB, so
the DALI GPU pipeline has not been benched or run on a GPU there. cityscapesscripts (pure Python, 0.5 MiB)
must travel as a wheel: ``pip install --no-deps --target`` it and put that folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT / "bench") not in sys.path:          # profile_kernels (markdown of the kernel_profile stage)
    sys.path.insert(0, str(ROOT / "bench"))
# name, bench file, -k selection on a GPU, -k selection on the CPU (None: GPU only), time cap (s).
# Priority order: the eager train steps and the ops first, the compiled train steps (two full-model
# compilations) last. The selections keep the network's main shapes in bf16 (the training precision).
STAGES: List[tuple] = [
    # eager R101 steps in the default layout: reference, fast and the floor (what the fused ops still cost)
    ("train_step_eager", "bench/bench_train_step.py", "eager and channels_last", "eager and nchw", 150),
    # not a pytest stage: per-op wall, host and device time and launches (host-bound or device-bound?)
    ("kernel_profile", "bench/profile_kernels.py", "", None, 90),
    ("ohem_ce", "bench/bench_ohem_ce.py", "test_ohem_ce and fwd_bwd and bf16 and topk", None, 60),
    ("fbf", "bench/bench_fbf.py", "copy_bandwidth or (fwd_bwd and fbf2 and bf16)", None, 120),
    ("inplace_abn", "bench/bench_inplace_abn.py", "gpu and bf16 and (layer1 or layer3)", "cpu", 90),
    ("ohem_ce_upsampled", "bench/bench_ohem_ce.py", "upsampled and fwd_bwd and bf16", None, 60),
    # one stage per full-model compilation, so that one that overruns its cap costs only its own result
    ("train_step_compiled_fast", "bench/bench_train_step.py", "fast_compiled and channels_last", None, 180),
    ("train_step_cudagraphs_fast", "bench/bench_train_step.py", "fast_cudagraphs and channels_last", None, 180),
    ("train_step_compiled_reference", "bench/bench_train_step.py", "reference_compiled and channels_last", None, 180),
    ("train_step_cudagraphs_reference", "bench/bench_train_step.py", "reference_cudagraphs and channels_last",
     None, 180),
    ("train_step_cudagraphs_floor", "bench/bench_train_step.py", "floor_cudagraphs and channels_last", None, 180),
    ("train_step_eager_nchw", "bench/bench_train_step.py", "eager and nchw", None, 150),
    ("data", "bench/bench_data.py", "", "", 60),
]
BENCH_OPTS = ["--benchmark-only", "--benchmark-max-time=0.25", "--benchmark-min-rounds=5",
              "--benchmark-disable-gc", "-q", "-p", "no:cacheprovider"]
RESERVE_S = 10          # kept back for writing the results


# --- running the stages -------------------------------------------------------------------------------

def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)          # benches and GPU tests time compiled kernels
    env.update(extra)
    return env


def run_stage(cmd: Sequence[str], timeout: float, env: Dict[str, str], log: Path) -> Dict[str, object]:
    """Run ``cmd`` in the repository root with a time limit; output to ``log``. Returns rc/seconds/status."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        # A session of its own, so that a time-out also ends the children (compiler workers, nvcc).
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else ("nothing selected" if rc == 5 else "failed")   # 5: pytest collected nothing
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timed out"
    text = log.read_text(errors="replace")
    return {"cmd": " ".join(cmd), "rc": rc, "status": status, "seconds": round(time.monotonic() - t0, 1),
            "counts": pytest_counts(text), "log_tail": text[-1500:]}


def pytest_counts(text: str) -> Dict[str, int]:
    """Passed/failed/... counts of a pytest run: from its summary line, or (a run cut short by a time
    limit) from the progress characters of ``-q`` output."""
    counts: Dict[str, int] = {}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in [\d.]+s", ln)]
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary[-1]):
            counts["error" if what.startswith("error") else what] = int(n)
        return counts
    for row in re.findall(r"^([.FEsxX]+)(?:\s+\[\s*\d+%\])?\s*$", text, flags=re.M):
        for ch, key in ((".", "passed"), ("F", "failed"), ("E", "error"), ("s", "skipped"), ("x", "xfailed")):
            counts[key] = counts.get(key, 0) + row.count(ch)
    return counts


def cuda_arch_list(capability: Sequence[int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for one card: (9, 0) -> "9.0"."""
    return f"{capability[0]}.{capability[1]}"


def _probe_gpu() -> Optional[Dict[str, object]]:
    code = ("import json, torch\n"
            "print(json.dumps(None if not torch.cuda.is_available() else {'name': torch.cuda.get_device_name(),"
            " 'capability': list(torch.cuda.get_device_capability()), 'torch': torch.__version__}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


YARDSTICK_CODE = """
import json, sys
sys.path.insert(0, "bench")
import torch, triton
from conftest import copy_bandwidth_gbps, matmul_tflops
try:
    from ifbf_fast.ops import _ext
    abn_cuda = _ext.has_cuda_kernels()
except ImportError as exc:
    abn_cuda = f"ifbf_fast._C not importable: {exc}"
print(json.dumps({"copy_bandwidth_gbps": copy_bandwidth_gbps(), "matmul_bf16_tflops": matmul_tflops(),
                  "torch": torch.__version__, "triton": triton.__version__, "abn_cuda_kernels": abn_cuda}))
"""


def git_commit() -> str:
    """The checkout's short commit (``-dirty`` when tracked files differ); ``IFBF_COMMIT`` where the copy
    has no git history (a lent machine receives the working tree without ``.git``)."""
    if os.environ.get("IFBF_COMMIT"):
        return os.environ["IFBF_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if dirty else "")


# --- results: rows, table, files ------------------------------------------------------------------------

def _first(d: Dict, *keys):
    return next((d[k] for k in keys if d.get(k) is not None), None)


def collect_rows(bench_json: Dict, bandwidth_gbps: Optional[float] = None) -> List[Dict[str, object]]:
    """Flatten a pytest-benchmark JSON into one row per result. The benches record GB/s as ``gb_per_s`` and
    peak memory as ``peak_bytes``; ``gbps`` and ``peak_mem_bytes`` are read too, the names of files written
    before (bench/results/nvidia-h200-ba7a6d620556.json keeps them)."""
    rows = []
    for b in bench_json.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b["stats"]
        provider = _first(info, "provider") or (b.get("params") or {}).get("provider") or b["name"]
        gbps = _first(info, "gb_per_s", "gbps")
        pct = _first(info, "pct_of_bandwidth")
        if pct is None and gbps is not None and bandwidth_gbps:
            pct = 100.0 * gbps / bandwidth_gbps
        rows.append({"group": b.get("group") or b["name"], "name": b["name"], "provider": provider,
                     "median_s": stats["median"], "iqr_s": stats.get("iqr"), "rounds": stats.get("rounds"),
                     "gb_per_s": gbps, "pct_of_bandwidth": pct,
                     "peak_bytes": _first(info, "peak_bytes", "peak_mem_bytes"),
                     "images_per_s": info.get("images_per_s"), "extra_info": info})
    return rows


STEP_MODES = ("eager", "compiled", "cudagraphs")


def add_speedups(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per group: ``vs_reference`` and ``vs_compiled_reference`` = that provider's median / this row's.

    Train-step providers are ``<impl>_<mode>`` (bench_train_step.py): there the reference is the one of
    the same mode (``reference_<mode>``), the compiled reference ``reference_compiled``, and
    ``vs_floor`` = this row's median / ``floor_<mode>``'s (how far above the floor).
    """
    medians = {(r["group"], r["provider"]): r["median_s"] for r in rows}
    for r in rows:
        impl, _, mode = str(r["provider"]).rpartition("_")
        stepwise = mode in STEP_MODES and impl
        bases = ((("vs_reference", f"reference_{mode}"), ("vs_compiled_reference", "reference_compiled"))
                 if stepwise else (("vs_reference", "reference"), ("vs_compiled_reference", "compiled_reference")))
        for key, base in bases:
            m = medians.get((r["group"], base))
            r[key] = m / r["median_s"] if m and r["median_s"] else None
        floor = medians.get((r["group"], f"floor_{mode}")) if stepwise else None
        r["vs_floor"] = r["median_s"] / floor if floor and r["median_s"] else None
    return rows


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "" if v is None else format(v, spec) + suffix


def markdown_table(results: Dict[str, object]) -> str:
    rows = results["rows"]
    head = [f"**{results['gpu']}**, commit `{results['commit']}`, {results['date']}: "
            f"copy bandwidth {_fmt(results.get('copy_bandwidth_gbps'), ',.0f', ' GB/s') or 'n/a'}, "
            f"bf16 matmul {_fmt(results.get('matmul_bf16_tflops'), ',.0f', ' TFLOP/s') or 'n/a'}, "
            f"torch {results.get('torch', '?')}, triton {results.get('triton', '?')}, "
            f"ABN CUDA kernels built: {results.get('abn_cuda_kernels', '?')}", ""]
    head += [f"- {n}" for n in results.get("notes", [])] + ([""] if results.get("notes") else [])
    lines = ["| case | provider | median ms | GB/s | % of bw | peak MiB | img/s | x vs ref | x vs compiled ref "
             "| / floor |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: r["group"]):
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2 ** 20
        lines.append(f"| {r['group']} | {r['provider']} | {r['median_s'] * 1e3:,.3f} | {_fmt(r['gb_per_s'], ',.0f')} | "
                     f"{_fmt(r['pct_of_bandwidth'], '.0f', '%')} | {_fmt(peak, ',.0f')} | "
                     f"{_fmt(r['images_per_s'], ',.2f')} | {_fmt(r['vs_reference'], '.2f')} | "
                     f"{_fmt(r['vs_compiled_reference'], '.2f')} | {_fmt(r.get('vs_floor'), '.2f')} |")
    stages = ["", "| stage | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    for s in results.get("stages", []):
        stages.append(f"| {s['name']} | {s['status']} | {_fmt(s.get('seconds'), '.0f')} | {s.get('detail', '')} |")
    profile = []
    if results.get("kernel_profile"):
        from profile_kernels import markdown as profile_markdown
        profile = ["", "Where the time goes (bench/profile_kernels.py: per forward+backward call; host ms = "
                   "time until the call returns, the GPU still running):", "",
                   profile_markdown(results["kernel_profile"])]
    return "\n".join(head + lines + profile + stages)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def merge_results(old: Dict[str, object], new: Dict[str, object]) -> Dict[str, object]:
    """``new`` plus what only ``old`` has: its rows of other (case, provider) pairs and its stages of other
    names (a second run with ``--only`` completes the first one's file instead of replacing it)."""
    keys = {(r["group"], r["provider"]) for r in new["rows"]}
    rows = [dict(r) for r in old.get("rows", []) if (r["group"], r["provider"]) not in keys] + list(new["rows"])
    names = {st["name"] for st in new.get("stages", [])}
    stages = [st for st in old.get("stages", []) if st["name"] not in names] + list(new.get("stages", []))
    merged = {k: v for k, v in old.items() if v is not None}
    merged.update({k: v for k, v in new.items() if v is not None})
    return dict(merged, rows=add_speedups(rows), stages=stages)


def write_results(results: Dict[str, object], out_dir: Path = RESULTS, merge: bool = True) -> tuple:
    """Write ``<gpu>-<commit>.json`` and ``.md`` into ``out_dir`` (merged into an earlier file of the same
    card and commit, see :func:`merge_results`; merging the same results again changes nothing, so a run
    rewrites the file after every stage); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(results['gpu'])}-{results['commit']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    if merge and json_path.exists():
        results.update(merge_results(json.loads(json_path.read_text()), results))
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown_table(results) + "\n")
    return json_path, md_path


def build_results(bench_jsons: List[Dict], meta: Dict[str, object]) -> Dict[str, object]:
    rows: List[Dict[str, object]] = []
    for bj in bench_jsons:
        rows.extend(collect_rows(bj, meta.get("copy_bandwidth_gbps")))
    return dict(meta, rows=add_speedups(rows))


# --- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build, test and benchmark on a GPU; write bench/results/.")
    p.add_argument("--budget", type=float, default=560, help="overall seconds (the machine allows 600 per command)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--only", nargs="+", help="run only these bench stages (names in STAGES)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--logs", type=Path, help="keep every stage's log here (default: a temporary folder)")
    p.add_argument("--test-workers", type=int, default=8,
                   help="pytest-xdist workers for the GPU tests (most of their time is Triton compiling "
                        "on the host; 0: one process; ignored without pytest-xdist)")
    p.add_argument("--no-merge", action="store_true", help="replace an earlier results file of this card and commit")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget

    def left() -> float:
        return deadline - time.monotonic() - RESERVE_S

    gpu = _probe_gpu()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="ifbf_gpu_report_"))
    logs.mkdir(parents=True, exist_ok=True)
    stages: List[Dict[str, object]] = []
    meta: Dict[str, object] = {"gpu": gpu["name"] if gpu else "cpu", "commit": git_commit(),
                               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "python": sys.version.split()[0]}

    def note(name, res, detail=""):
        res = dict(res, name=name, detail=detail or res.get("detail", ""))
        stages.append(res)
        print(f"[gpu_report] {name}: {res['status']} ({res.get('seconds', 0)} s) {res['detail']}", flush=True)
        return res

    if gpu and not args.skip_build:
        arch = cuda_arch_list(gpu["capability"])
        env = _env(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 8))
        res = run_stage([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                        min(240, left()), env, logs / "build.log")
        if res["status"] == "failed":     # e.g. an offline pip that wants something: build in place instead
            res = run_stage([sys.executable, "setup.py", "build_ext", "--inplace"], min(240, left()), env,
                            logs / "build_inplace.log")
            res["detail"] = "pip failed; setup.py build_ext --inplace"
        note("build", res, f"TORCH_CUDA_ARCH_LIST={arch} {res.get('detail', '')}".strip())
    else:
        note("build", {"status": "skipped", "seconds": 0}, "no CUDA" if not gpu else "--skip-build")
    if gpu and not args.skip_tests:
        workers = args.test_workers if importlib.util.find_spec("xdist") else 0
        res = run_stage([sys.executable, "-m", "pytest", "tests/ops", "-q", "-p", "no:cacheprovider",
                         *(["-n", str(workers)] if workers > 0 else [])],
                        min(180, left()), _env(IFBF_TEST_GPU="1"), logs / "tests.log")
        note("gpu_tests", res, ", ".join(f"{v} {k}" for k, v in res["counts"].items()))
    else:
        note("gpu_tests", {"status": "skipped", "seconds": 0}, "no CUDA" if not gpu else "--skip-tests")

    out = subprocess.run([sys.executable, "-c", YARDSTICK_CODE], cwd=ROOT, capture_output=True, text=True,
                         env=_env(), timeout=max(5.0, min(60, left())))
    if out.returncode == 0:
        meta.update(json.loads(out.stdout.strip().splitlines()[-1]))
    note("yardsticks", {"status": "ok" if out.returncode == 0 else "failed", "seconds": None},
         (f"{meta.get('copy_bandwidth_gbps') or 0:,.0f} GB/s copy, {meta.get('matmul_bf16_tflops') or 0:,.0f} "
          f"TFLOP/s bf16" if gpu else "n/a without CUDA") if out.returncode == 0 else out.stderr[-300:])

    bench_jsons = []
    for name, path, k_gpu, k_cpu, cap in STAGES:
        if args.only and name not in args.only:
            continue
        selection = k_gpu if gpu else k_cpu
        if selection is None:
            note(name, {"status": "skipped", "seconds": 0}, "needs CUDA")
            continue
        if not (ROOT / path).exists():
            note(name, {"status": "skipped", "seconds": 0}, f"{path} not in this checkout")
            continue
        pytest_args = [path] + (["-k", selection] if selection else [])
        budget = min(cap, left())
        if budget < 30:
            note(name, {"status": "skipped", "seconds": 0}, f"time budget ({left():.0f} s left)")
            continue
        if path.endswith("profile_kernels.py"):
            res = run_stage([sys.executable, path, "--out", str(logs)], budget, _env(), logs / f"{name}.log")
            profile = logs / "kernel_profile.json"
            if profile.exists():
                meta["kernel_profile"] = json.loads(profile.read_text())["rows"]
            note(name, res, f"{len(meta.get('kernel_profile', []))} rows")
            write_results(build_results(bench_jsons, dict(meta, stages=stages)), args.out, merge=not args.no_merge)
            continue
        json_path = logs / f"{name}.json"
        res = run_stage([sys.executable, "-m", "pytest", *pytest_args, *BENCH_OPTS, f"--benchmark-json={json_path}"],
                        budget, _env(), logs / f"{name}.log")
        detail = ", ".join(f"{v} {k}" for k, v in res["counts"].items())
        if json_path.exists() and json_path.stat().st_size:   # pytest-benchmark leaves it empty when all skip
            try:
                bench_jsons.append(json.loads(json_path.read_text()))
            except json.JSONDecodeError as exc:               # a stage killed while writing it
                detail += f"; unreadable {json_path.name}: {exc}"
        note(name, res, detail)
        # Written after every stage: a run stopped by the machine's time limit keeps what it measured.
        write_results(build_results(bench_jsons, dict(meta, stages=stages)), args.out, merge=not args.no_merge)

    results = build_results(bench_jsons, dict(meta, stages=stages))
    json_path, md_path = write_results(results, args.out, merge=not args.no_merge)
    print(f"\n[gpu_report] wrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path} "
          f"and {md_path.name}; logs in {logs}\n")
    print(markdown_table(results))
    return 0 if all(s["status"] in ("ok", "skipped", "nothing selected") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
