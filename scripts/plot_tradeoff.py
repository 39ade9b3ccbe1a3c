"""Speed–quality trade-off plot (time per image vs FID/FD, the paper's figure) from results.json files.

    python scripts/plot_tradeoff.py "original=out/a" "DiSA 50->5=out/b" --metric FID --out tradeoff.png

Each argument is ``LABEL=PATH`` or ``PATH``. Runs whose labels share a prefix before ``:`` (e.g.
``MAR-B:original``, ``MAR-B:DiSA``) are drawn as one connected series.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from disa.results import load_runs, plot_tradeoff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH or PATH (results.json or its folder)")
    p.add_argument("--metric", default=None, help="metric key on the y axis (default: the first one found)")
    p.add_argument("--out", type=Path, default=Path("tradeoff.png"))
    args = p.parse_args(argv)
    try:
        print(plot_tradeoff(load_runs(args.runs), args.metric, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_tradeoff.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
