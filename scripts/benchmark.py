"""Speed benchmarks, one per family: ``python scripts/benchmark.py {mar,flowar,xar,harmon} [family options]``.

Each family's benchmark module (:data:`MODULES`) times the original and the DiSA settings side by side in one run (real
model sizes, random weights) and prints time per image, NFE and FLOP-based expected ratios; ``--help`` after the
family name lists its options.
"""
from __future__ import annotations

import runpy
import sys

# family -> module holding its benchmark (Harmon keeps the upstream scripts/ layout)
MODULES = {
    "mar": "mar_disa.benchmark",
    "flowar": "flowar_disa.benchmark",
    "xar": "xar_disa.benchmark",
    "harmon": "harmon_disa.scripts.benchmark",
}
FAMILIES = tuple(MODULES)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: benchmark.py {{{','.join(FAMILIES)}}} [options]  (got {sys.argv[1:2] or 'nothing'})")
    family = sys.argv.pop(1)
    sys.argv[0] = f"benchmark.py {family}"
    runpy.run_module(MODULES[family], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
