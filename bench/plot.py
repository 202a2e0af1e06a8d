"""Draw a results file of bench/gpu_report.py as a PNG chart (measuring, storing and plotting are separate steps).

    python bench/plot.py bench/results/nvidia-h100-80gb-hbm3-<commit>.json          # writes the .png beside it
    python bench/plot.py results.json -o chart.png

Left: each case's speed-up over its reference (reference median / provider median; 1 = as fast, the
dashed line). Right: the achieved share of the card's measured copy bandwidth where the run measured
it (GPU), else GB/s (CPU runs). One bar per provider, grouped by case.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ("bn_act", "reference", "compiled_reference", "fast", "compiled_fast", "fast_unfused", "fast_fused")


def _by_case(rows: List[Dict], key: str) -> "OrderedDict[str, Dict[str, float]]":
    cases: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for r in sorted(rows, key=lambda r: r["group"]):
        if r.get(key) is not None:
            cases.setdefault(r["group"], {})[r["provider"]] = float(r[key])
    return cases


def _providers(cases: "OrderedDict[str, Dict[str, float]]") -> List[str]:
    providers = [p for p in PROVIDER_ORDER if any(p in v for v in cases.values())]
    return providers + sorted({p for v in cases.values() for p in v} - set(providers))


def _bars(ax, cases: "OrderedDict[str, Dict[str, float]]", xlabel: str, colors: Dict[str, str],
          ref_line: Optional[float] = None) -> None:
    providers = _providers(cases)
    height = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        ys = [c + i * height for c in range(len(cases))]
        vals = [cases[case].get(prov, 0.0) for case in cases]
        ax.barh(ys, vals, height=height, label=prov, color=colors[prov])
    ax.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))])
    ax.set_yticklabels(list(cases), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if ref_line is not None:
        ax.axvline(ref_line, color="k", linestyle="--", linewidth=0.8)
    positive = [v for case in cases.values() for v in case.values() if v > 0]
    if positive and max(positive) / min(positive) > 30:     # speed-ups from 0.1x to 100x: log scale
        ax.set_xscale("log")
    ax.legend(fontsize=7, loc="lower right")


def plot_results(results_path: Path, out_path: Optional[Path] = None) -> Path:
    """Read a results JSON, draw the chart, write it (default: the JSON's path with .png); return the path."""
    results = json.loads(Path(results_path).read_text())
    rows = results.get("rows", [])
    if not rows:
        raise ValueError(f"{results_path}: no benchmark rows to plot")
    speed = _by_case(rows, "vs_reference")
    pct = _by_case(rows, "pct_of_bandwidth")
    right, right_label = (pct, "% of measured copy bandwidth") if pct else (_by_case(rows, "gb_per_s"), "GB/s")
    # one colour per provider in both panels
    everything = _by_case(rows, "median_s")
    colors = {p: f"C{i % 10}" for i, p in enumerate(_providers(everything))}
    n_rows = max(len(speed), len(right), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.2 + 0.45 * n_rows), squeeze=False)
    for ax, data, label, line in ((axes[0][0], speed, "speed-up vs reference (x)", 1.0),
                                  (axes[0][1], right, right_label, 100.0 if pct else None)):
        if data:
            _bars(ax, data, label, colors, line)
        else:
            ax.text(0.5, 0.5, "nothing to show", ha="center", va="center")
            ax.set_axis_off()
    fig.suptitle(f"{results.get('gpu', '?')} @ {results.get('commit', '?')} ({results.get('date', '')})", fontsize=10)
    fig.tight_layout()
    out = Path(out_path) if out_path else Path(results_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot a bench/results JSON as a PNG.")
    p.add_argument("results", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None)
    args = p.parse_args(argv)
    print(plot_results(args.results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
