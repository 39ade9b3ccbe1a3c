"""Speed–quality trade-off plot (time per image vs FID/FD, the paper's figure) from results.json files.

    python scripts/plot_tradeoff.py "original=out/a" "DiSA 50->5=out/b" --metric FID --out tradeoff.png

Each argument is ``LABEL=PATH`` or ``PATH``. Runs whose labels share a prefix before ``:`` (e.g.
``MAR-B:original``, ``MAR-B:DiSA``) are drawn as one connected series.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (CI, clusters)
import matplotlib.pyplot as plt  # noqa: E402

from disa.results import RunSummary, load_runs, metric_keys  # noqa: E402


def plot(runs: list[RunSummary], metric: str | None, out: Path) -> Path:
    keys = metric_keys(runs)
    if metric is None:
        if not keys:
            raise ValueError("no run has metrics; evaluate with metrics first")
        metric = keys[0]
    usable = [r for r in runs if r.sec_per_image is not None and metric in r.metrics]
    if not usable:
        raise ValueError(f"no run has both a timing and the metric {metric!r} (available: {', '.join(keys) or 'none'})")
    series: dict[str, list[RunSummary]] = {}
    for r in usable:
        series.setdefault(r.label.split(":")[0] if ":" in r.label else "", []).append(r)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, members in series.items():
        members = sorted(members, key=lambda r: r.sec_per_image)
        xs, ys = [r.sec_per_image for r in members], [r.metrics[metric] for r in members]
        ax.plot(xs, ys, marker="o", label=name or None, linestyle="-" if name else "none")
        for r, x, y in zip(members, xs, ys):
            ax.annotate(r.label.split(":")[-1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("seconds per image (rank 0)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH or PATH (results.json or its folder)")
    p.add_argument("--metric", default=None, help="metric key on the y axis (default: the first one found)")
    p.add_argument("--out", type=Path, default=Path("tradeoff.png"))
    args = p.parse_args(argv)
    try:
        print(plot(load_runs(args.runs), args.metric, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_tradeoff.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
