"""Speed benchmarks, one per family: ``python scripts/benchmark.py {mar,flowar,xar,harmon} [family options]``.

Each family's benchmark module (:data:`MODULES`) times the original and the DiSA settings interleaved in one run
(real model sizes, random weights) with :mod:`disa.benchmark` and prints time per image with its spread, images/s,
NFE, FLOPs, the fraction of the device's peak matmul throughput, peak memory and the paired speed-ups; ``--compare A
B`` times two ``key=value`` overrides of the family's setting instead (``--compare precision=fp32 precision=bf16``,
``--compare sampler=original sampler=DiSA``, ``--compare attention=math attention=sdpa``). ``--help`` after the
family name lists its options and knobs.
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
        print(f"usage: benchmark.py {{{','.join(FAMILIES)}}} [options]  (got {sys.argv[1:2] or 'nothing'}; "
              "'benchmark.py FAMILY --help' lists a family's options)", file=sys.stderr)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    family = sys.argv.pop(1)
    sys.argv[0] = f"benchmark.py {family}"
    runpy.run_module(MODULES[family], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
