"""Markdown table (the paper's layout: quality, NFE, time per image, speed-up) from a set of results.json files.

    python scripts/reproduce_tables.py "MAR-B original=out/mar_b_orig" "MAR-B DiSA=out/mar_b_disa" [--baseline 0]

Each argument is ``LABEL=PATH`` or ``PATH`` (a results.json or the sample folder holding it). Speed-ups are
relative to the ``--baseline`` row (index, default the first) and use rank 0's seconds per image.
"""
from __future__ import annotations

import argparse
import sys

from disa.results import RunSummary, load_runs, metric_keys


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(runs: list[RunSummary], baseline: int = 0) -> str:
    if not 0 <= baseline < len(runs):
        raise ValueError(f"--baseline must index one of the {len(runs)} runs, got {baseline}")
    keys = metric_keys(runs)
    base = runs[baseline].sec_per_image
    header = ["run", *keys, "NFE/img", "s/img", "img/s (all ranks)", "speed-up", "images"]
    rows = [header, ["---"] * len(header)]
    for r in runs:
        speedup = base / r.sec_per_image if base and r.sec_per_image else None
        rows.append([
            r.label,
            *[_fmt(r.metrics.get(k), ".3f") for k in keys],
            _fmt(r.nfe_per_image, ".0f"),
            _fmt(r.sec_per_image, ".4f"),
            _fmt(r.images_per_second, ".2f"),
            "–" if speedup is None else f"{speedup:.2f}x",
            f"{r.num_images} ({r.world_size} rank{'s' if r.world_size > 1 else ''})",
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH or PATH (results.json or its folder)")
    p.add_argument("--baseline", type=int, default=0, help="row index the speed-ups are relative to (default 0)")
    args = p.parse_args(argv)
    try:
        print(markdown_table(load_runs(args.runs), args.baseline))
    except (FileNotFoundError, ValueError) as err:
        print(f"reproduce_tables.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
