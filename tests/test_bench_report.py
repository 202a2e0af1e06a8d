"""The CPU-testable parts of the benchmark tooling: bench/gpu_report.py's rows, speed-ups, table and files;
bench/plot.py; bench/conftest.py's recording and JSON hook, collection of bench_*.py, and its refusal to
time the Triton interpreter."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name, filename):
    spec = importlib.util.spec_from_file_location(name, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return _load("gpu_report", "gpu_report.py")


def _bench(group, param, median, **extra):
    return {"group": group, "name": f"test_x[{param}]", "params": {"provider": param},
            "stats": {"median": median, "iqr": median / 10, "rounds": 7}, "extra_info": dict(extra)}


def fake_pytest_benchmark_json():
    """As pytest-benchmark writes it, with the three benches' different key names."""
    fbf = "fbf fwd_bwd fbf2 256x512 bf16 nchw"
    abn = "abn-cuda-layer1-bf16-channels_last"
    step = "train_step resnet101 b2 crop876 bf16 cuda"
    return {
        "machine_info": {"copy_bandwidth_gbps": 3000.0},
        "benchmarks": [
            _bench(fbf, "reference", 3e-3, provider="reference", gb_per_s=400.0, peak_bytes=3 * 2 ** 20),
            _bench(fbf, "compiled_reference", 2e-3, provider="compiled_reference", gb_per_s=600.0),
            _bench(fbf, "fast", 1e-3, provider="fast", gb_per_s=1200.0, peak_mem_bytes=2 ** 20),   # an older file's name
            _bench(abn, "bn_act", 4e-3, gbps=150.0, peak_bytes=5 * 2 ** 20),     # provider only in params
            _bench(abn, "reference", 8e-3, gbps=75.0),
            _bench(abn, "fast", 2e-3, gbps=300.0, pct_of_bandwidth=10.0),        # kept as recorded
            _bench(step, "reference", 0.5, provider="reference", images_per_s=4.0),
            _bench(step, "fast", 0.25, provider="fast", images_per_s=8.0),
        ],
    }


def _results(report):
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc123def456", "date": "2026-11-25 21:00 UTC",
            "copy_bandwidth_gbps": 3000.0, "matmul_bf16_tflops": 700.0, "torch": "2.11", "triton": "3.6",
            "stages": [{"name": "build", "status": "ok", "seconds": 95.0, "detail": "TORCH_CUDA_ARCH_LIST=9.0"}]}
    return report.build_results([fake_pytest_benchmark_json()], meta)


def test_rows_speedups_and_bandwidth(report):
    rows = {(r["group"].split()[0].split("-")[0], r["provider"]): r for r in _results(report)["rows"]}
    fast = rows[("fbf", "fast")]
    assert fast["vs_reference"] == pytest.approx(3.0)
    assert fast["vs_compiled_reference"] == pytest.approx(2.0)
    assert fast["pct_of_bandwidth"] == pytest.approx(40.0)       # 1200 / 3000
    assert fast["peak_bytes"] == 2 ** 20
    assert rows[("fbf", "reference")]["vs_reference"] == pytest.approx(1.0)
    assert rows[("abn", "bn_act")]["gb_per_s"] == 150.0          # the "gbps" key
    assert rows[("abn", "bn_act")]["peak_bytes"] == 5 * 2 ** 20
    assert rows[("abn", "bn_act")]["vs_reference"] == pytest.approx(2.0)
    assert rows[("abn", "bn_act")]["vs_compiled_reference"] is None   # no compiled reference in that group
    assert rows[("abn", "fast")]["pct_of_bandwidth"] == 10.0
    assert rows[("train_step", "fast")]["images_per_s"] == 8.0
    assert rows[("train_step", "fast")]["vs_reference"] == pytest.approx(2.0)
    assert rows[("train_step", "fast")]["gb_per_s"] is None


def test_markdown_table_and_files(report, tmp_path):
    results = _results(report)
    table = report.markdown_table(results)
    assert "NVIDIA H100 80GB HBM3" in table and "abc123def456" in table and "3,000 GB/s" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| fbf fwd_bwd") and "| fast |" in ln)
    assert [c.strip() for c in line.strip("|").split("|")] == [
        "fbf fwd_bwd fbf2 256x512 bf16 nchw", "fast", "1.000", "1,200", "40%", "1", "", "3.00", "2.00", ""]
    assert "| build | ok | 95 | TORCH_CUDA_ARCH_LIST=9.0 |" in table
    json_path, md_path = report.write_results(results, tmp_path)
    assert json_path.name == "nvidia-h100-80gb-hbm3-abc123def456.json"
    assert md_path.read_text().strip() == table
    back = json.loads(json_path.read_text())
    assert len(back["rows"]) == 8 and back["copy_bandwidth_gbps"] == 3000.0


def test_a_second_run_completes_the_file(report, tmp_path):
    first = _results(report)
    report.write_results(first, tmp_path)
    step = "train_step resnet101 b2 crop876 bf16 cuda"
    second = report.build_results(
        [{"benchmarks": [_bench(step, "compiled_reference", 0.4, provider="compiled_reference"),
                         _bench(step, "fast", 0.2, provider="fast")]}],
        {"gpu": first["gpu"], "commit": first["commit"], "copy_bandwidth_gbps": None,
         "stages": [{"name": "train_step_compiled_reference", "status": "ok", "seconds": 100.0}]})
    json_path, _ = report.write_results(second, tmp_path)
    back = json.loads(json_path.read_text())
    rows = {(r["group"], r["provider"]): r for r in back["rows"]}
    assert len(rows) == 9 and back["copy_bandwidth_gbps"] == 3000.0          # kept from the first run
    assert rows[(step, "fast")]["median_s"] == 0.2                            # replaced by the second
    assert rows[(step, "fast")]["vs_reference"] == pytest.approx(2.5)        # 0.5 (first run) / 0.2
    assert rows[(step, "fast")]["vs_compiled_reference"] == pytest.approx(2.0)
    assert [st["name"] for st in back["stages"]] == ["build", "train_step_compiled_reference"]


def test_rewriting_the_same_results_changes_nothing_and_notes_are_listed(report, tmp_path):
    # gpu_report rewrites its file after every stage: merging a run's results into themselves is a no-op
    results = dict(_results(report), notes=["assembled from the stage logs of a run cut short"])
    json_path, md_path = report.write_results(json.loads(json.dumps(results)), tmp_path)
    once = json_path.read_text()
    report.write_results(json.loads(json.dumps(results)), tmp_path)
    assert json_path.read_text() == once
    assert "- assembled from the stage logs of a run cut short" in md_path.read_text()


def test_kernel_profile_pipeline_and_its_table(report, tmp_path):
    # bench/profile_kernels.py on tiny CPU cases (the GPU cases need CUDA): rows, files, and the
    # results table of gpu_report lists them under the benchmarks
    profile = _load("profile_kernels", "profile_kernels.py")
    assert profile.main(["--smoke", "--iters", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernel_profile.json").read_text())["rows"]
    assert {(r["case"], r["provider"]) for r in rows} == {("fbf tiny", "reference"), ("ohem tiny", "reference"),
                                                          ("abn tiny", "bn_act"), ("abn tiny", "fast")}
    for r in rows:
        assert r["wall_ms"] > 0 and r["host_ms"] > 0 and r["launches"] > 0 and r["kernels"], r
    table = report.markdown_table(dict(_results(report), kernel_profile=rows))
    assert "Where the time goes" in table and "| abn tiny | fast |" in table
    assert table.index("Where the time goes") < table.index("| stage | status |")


def test_pytest_counts_from_summary_or_progress(report):
    assert report.pytest_counts("..s\n3 failed, 40 passed, 2 skipped in 81.20s (0:01:21)\n") == \
        {"failed": 3, "passed": 40, "skipped": 2}
    assert report.pytest_counts("=== 1 error, 2 passed in 3.1s ===") == {"error": 1, "passed": 2}
    cut_short = "tests/ops/test_fbf.py::x\n....F.s..  [ 12%]\n..E.\n"     # killed by the time limit
    assert report.pytest_counts(cut_short) == {"passed": 10, "failed": 1, "error": 1, "skipped": 1, "xfailed": 0}
    assert report.cuda_arch_list((9, 0)) == "9.0" and report.cuda_arch_list([8, 9]) == "8.9"


def test_run_stage_status_and_time_limit(report, tmp_path):
    ok = report.run_stage([sys.executable, "-c", "print('3 passed in 0.1s')"], 30, dict(os.environ), tmp_path / "a.log")
    assert ok["status"] == "ok" and ok["rc"] == 0 and ok["counts"] == {"passed": 3}
    bad = report.run_stage([sys.executable, "-c", "raise SystemExit(1)"], 30, dict(os.environ), tmp_path / "b.log")
    assert bad["status"] == "failed" and bad["rc"] == 1
    # the child's own child must go too: the stage runs in a session of its own
    slow = report.run_stage(["bash", "-c", "sleep 30 & wait"], 1, dict(os.environ), tmp_path / "c.log")
    assert slow["status"] == "timed out" and slow["rc"] is None and slow["seconds"] < 10


def test_plot_writes_a_png(report, tmp_path):
    plot = _load("plot", "plot.py")
    json_path, _ = report.write_results(_results(report), tmp_path)
    png = plot.plot_results(json_path)
    assert png == json_path.with_suffix(".png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no benchmark rows"):
        plot.plot_results(empty)


def test_conftest_records_and_adds_bandwidth_share():
    conf = _load("bench_conftest", "conftest.py")
    bench = SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(median=0.01)), extra_info={})
    info = conf.Perf(conf.torch.device("cpu")).record(bench, bytes_moved=5 * 10 ** 8, peak_bytes=123, provider="fast")
    assert bench.extra_info is not None and info["gb_per_s"] == pytest.approx(50.0)
    assert info["median_ms"] == pytest.approx(10.0) and info["peak_bytes"] == 123 and info["provider"] == "fast"
    assert "pct_of_bandwidth" not in info                      # no GPU, no measured bandwidth
    out = {"machine_info": {"copy_bandwidth_gbps": 2000.0},
           "benchmarks": [{"extra_info": {"gbps": 500.0}}, {"extra_info": {"gb_per_s": 1000.0}}, {"extra_info": {}}]}
    conf.pytest_benchmark_update_json(None, None, out)
    assert [b["extra_info"].get("pct_of_bandwidth") for b in out["benchmarks"]] == [25.0, 50.0, None]


def _pytest_bench(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_pytest_bench_collects_bench_files_and_refuses_the_interpreter():
    out = _pytest_bench("--collect-only", "-q")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for item in ("bench/bench_train_step.py::test_train_step[reference_eager-nchw]", "bench/bench_fbf.py::test_copy_bandwidth",
                 "bench/bench_inplace_abn.py::test_cpu_fwd_bwd"):
        assert item in out.stdout
    named = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_train_step.py", "--collect-only", "-q",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert named.stdout.count("test_train_step[reference_eager-nchw]") == 1     # a named file is not collected twice
    refused = _pytest_bench("--collect-only", "-q", TRITON_INTERPRET="1")
    assert refused.returncode != 0 and "TRITON_INTERPRET" in refused.stdout + refused.stderr


def test_train_step_speedups_compare_within_a_mode_and_against_the_floor(report):
    step = "train_step resnet101 b2 crop876 bf16 cuda channels_last"
    benches = [_bench(step, p, m, provider=p) for p, m in (
        ("reference_eager", 0.08), ("fast_eager", 0.064), ("floor_eager", 0.05),
        ("reference_compiled", 0.06), ("fast_compiled", 0.05), ("fast_cudagraphs", 0.045),
        ("floor_cudagraphs", 0.04))]
    meta = {"gpu": "NVIDIA H200", "commit": "abc", "date": "today", "stages": []}
    rows = {r["provider"]: r for r in report.build_results([{"benchmarks": benches}], meta)["rows"]}
    assert rows["fast_eager"]["vs_reference"] == pytest.approx(0.08 / 0.064)
    assert rows["fast_compiled"]["vs_reference"] == pytest.approx(0.06 / 0.05)      # same mode
    assert rows["fast_cudagraphs"]["vs_reference"] is None                          # no reference_cudagraphs
    assert rows["fast_cudagraphs"]["vs_compiled_reference"] == pytest.approx(0.06 / 0.045)
    assert rows["fast_cudagraphs"]["vs_floor"] == pytest.approx(0.045 / 0.04)
    assert rows["fast_eager"]["vs_floor"] == pytest.approx(0.064 / 0.05)
    assert "/ floor" in report.markdown_table(report.build_results([{"benchmarks": benches}], meta))
