"""Main demo: DiSA against the original sampler on the shipped Fashion-MNIST MAR, end to end, on the CPU.

Samples the embedded model (``MAR_DiSA/assets/fashion_mnist_mar_tiny.pth``, trained here with ``main_mar.py``; model
card in ``MAR_DiSA/assets/MODEL_CARD.md``) three ways, the same labels and per-image seeds for all, and scores each
set against Fashion-MNIST test images with EfficientNet-Lite0 features (FD_EffNet-Lite0, precision, recall; the
reference features are extracted once and cached):

* ``original`` — MAR's sampler as released: ``--upper`` steps at every AR step, starting at t = 999;
* ``fixed`` — the same step count with MAR_DiSA's 950 clip (its DiSA sampler with upper = lower): the baseline
  DiSA is measured against, because this small head breaks when started at t = 999 (see the model card);
* ``DiSA`` — ``--upper`` annealed to ``--lower`` (950 clip, as MAR_DiSA).

Writes to ``--out``:

* ``original.png``, ``fixed.png``, ``DiSA.png`` — one row per class (T-shirt/top, ... Ankle boot), 10 samples each;
* ``results.json`` — every number of the table, the settings and the environment;
* ``tradeoff.png`` — time per image vs FD_EffNet-Lite0;

and prints the table::

    python scripts/demo.py                     # or `make demo`; ~3 minutes on 2 CPU cores
    python scripts/demo.py --num_images 2000 --lower 10 --out outputs/demo_big
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from disa.checkpoints import CheckpointError
from disa.results import RunSummary, plot_tradeoff
from disa.schedules import STRATEGIES
from mar_disa.main_mar import SamplerConfig
from mar_disa.testbed import (
    REFERENCE_IMAGES,
    SHIPPED_CHECKPOINT,
    balanced_labels,
    class_grid,
    load_testbed_model,
    reference_features,
    sample_images,
    score,
)

FD = "FD_EffNet-Lite0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT, help="testbed checkpoint")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for grids, results.json, plot")
    p.add_argument("--num_images", type=int, default=500, help="images per sampler (a multiple of 10, >= 100)")
    p.add_argument("--batch_size", type=int, default=250, help="images per generation batch")
    p.add_argument("--num_iter", type=int, default=16, help="AR steps (49 tokens)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--temperature", type=float, default=1.0, help="noise scale of the ancestral sampler")
    p.add_argument("--upper", type=int, default=50, help="the original sampler's steps / DiSA's first AR step")
    p.add_argument("--lower", type=int, default=5, help="DiSA's steps at the last AR step")
    p.add_argument("--strategy", choices=STRATEGIES, default="linear", help="DiSA's annealing strategy")
    p.add_argument("--seed", type=int, default=0, help="base seed (image k uses seed * num_images + k)")
    p.add_argument("--reference_images", type=int, default=REFERENCE_IMAGES, help="Fashion-MNIST test images")
    p.add_argument("--cache_dir", type=Path, default=None, help="reference-feature cache (default ~/.cache/disa)")
    p.add_argument("--no_metrics", action="store_true", help="only sample and time (no feature extraction)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.num_images < 100 or args.num_images % 10:
        p.error(f"--num_images must be a multiple of 10 and >= 100 (10 per class for the grids), got {args.num_images}")
    if args.batch_size < 1 or args.threads is not None and args.threads < 1:
        p.error("--batch_size and --threads must be >= 1")
    if not 1 <= args.lower <= args.upper:
        p.error(f"need 1 <= --lower <= --upper, got --lower {args.lower} --upper {args.upper}")
    if not 1 <= args.num_iter <= 49:
        p.error(f"--num_iter must be in [1, 49] (the model has 49 tokens), got {args.num_iter}")
    if not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist (the shipped one is {SHIPPED_CHECKPOINT})")
    return args


def samplers(args: argparse.Namespace) -> dict[str, SamplerConfig]:
    common = {"num_iter": args.num_iter, "cfg": args.cfg, "temperature": args.temperature,
              "diff_upper_steps": args.upper}
    return {
        "original": SamplerConfig(diff_sampler="default", **common),
        "fixed": SamplerConfig(diff_sampler="DiSA", diff_lower_steps=args.upper, **common),
        "DiSA": SamplerConfig(diff_sampler="DiSA", diff_lower_steps=args.lower,
                              diff_annealing_strategy=args.strategy, **common),
    }  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'sampler':<10} {'AR steps':>8} {'steps/token':>11} {'NFE/img':>8} {'ms/img':>8} {FD:>16} {'precision':>9} " \
           f"{'recall':>7}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["metrics"] or {}
        cells = [f"{m[k]:.{d}f}" if k in m else "-" for k, d in ((FD, 2), (f"precision_{FD[3:]}", 3),
                                                                    (f"recall_{FD[3:]}", 3))]  # fmt: skip
        lines.append(f"{r['sampler']:<10} {r['ar_steps']:>8} {r['steps_per_token']:>11.2f} {r['nfe_per_image']:>8.0f} "
                     f"{1000 * r['sec_per_image']:>8.1f} {cells[0]:>16} {cells[1]:>9} {cells[2]:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        reference = None if args.no_metrics else reference_features(args.cache_dir, num_images=args.reference_images)
        labels, seeds = balanced_labels(args.num_images, args.seed)
        rows = []
        for name, sampler in samplers(args).items():
            model = load_testbed_model(args.checkpoint, sampler=sampler)
            run = sample_images(model, labels, seeds, num_iter=args.num_iter, cfg=args.cfg,
                                temperature=args.temperature, batch_size=args.batch_size)  # fmt: skip
            grid = args.out / f"{name}.png"
            class_grid(run.images, run.labels).save(grid)
            rows.append({"sampler": name, "config": asdict(sampler), "ar_steps": args.num_iter,
                         "steps_per_token": run.steps_per_token, "nfe_per_image": run.nfe_per_image,
                         "nfe_per_ar_step": list(run.nfe_per_ar_step), "tokens_per_ar_step": list(run.tokens_per_ar_step),
                         "sec_per_image": run.sec_per_image, "grid": str(grid),
                         "metrics": None if reference is None else score(run.images, reference)})  # fmt: skip
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 1
    speedup = rows[1]["sec_per_image"] / rows[2]["sec_per_image"]  # DiSA against the same sampler without annealing
    results = {"rows": rows, "speedup": speedup, "num_images": args.num_images, "seed": args.seed,
               "checkpoint": str(args.checkpoint), "reference_images": args.reference_images,
               "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.machine(), "python": platform.python_version()}}  # fmt: skip
    results_path = args.out / "results.json"
    results_path.write_text(json.dumps(results, indent=2))
    print(format_table(rows))
    print(f"\nDiSA {args.upper}->{args.lower} ({args.strategy}) speed-up over {args.upper} fixed steps: {speedup:.2f}x; "
          f"over the original sampler: {rows[0]['sec_per_image'] / rows[2]['sec_per_image']:.2f}x "
          f"(CPU, {torch.get_num_threads()} threads, {args.num_images} images each, measured in this run)")
    if reference is not None:
        fd = [r["metrics"][FD] for r in rows]
        print(f"{FD}: original {fd[0]:.2f}, fixed {fd[1]:.2f}, DiSA {fd[2]:.2f} (DiSA - fixed: {fd[2] - fd[1]:+.2f})")
        runs = [RunSummary(label=f"sampler:{r['sampler']}", path=results_path, sec_per_image=r["sec_per_image"],
                           images_per_second=None, nfe_per_image=r["nfe_per_image"], num_images=args.num_images,
                           world_size=1, metrics=r["metrics"]) for r in rows]  # fmt: skip
        print(f"plot: {plot_tradeoff(runs, FD, args.out / 'tradeoff.png', xlabel='seconds per image (CPU)')}")
    print(f"grids: {', '.join(r['grid'] for r in rows)}\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
