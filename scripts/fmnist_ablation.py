"""The ablation DiSA's reviewers asked for, on the shipped Fashion-MNIST MAR: upper/lower step counts and annealing
strategies, against the original sampler at matched NFE, scored with FD_EffNet-Lite0 and timed in one run.

Settings (``--num_iter`` AR steps each, the same labels and per-image seeds for all):

* DiSA, linear: 50->1, 50->5, 50->10, 25->5; DiSA 50->5 with cosine, two-stage and constant (= 5 steps at every
  AR step, with DiSA's 950 clip);
* ``fixed``: DiSA's sampler and 950 clip without annealing, at ``--upper`` steps and at the NFE-matched step count of
  every DiSA setting (the baseline at matched NFE; this small head breaks when started at t = 999, see the model card);
* ``original``: MAR's released sampler (starts at t = 999) at ``--upper`` steps;
* ``real``: held-out Fashion-MNIST test images (not the reference ones) scored the same way: the FD floor at this
  sample size.

Writes ``results.json``, ``table.md`` and ``frontier.png`` (time per image vs FD) to ``--out``::

    python scripts/fmnist_ablation.py                       # ~15 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from disa.fashion_mnist import load_fashion_mnist
from disa.results import RunSummary, plot_tradeoff
from disa.schedules import respaced_timesteps, step_schedule
from mar_disa.main_mar import SamplerConfig
from mar_disa.testbed import (
    REFERENCE_IMAGES,
    SHIPPED_CHECKPOINT,
    balanced_labels,
    load_testbed_model,
    reference_features,
    sample_images,
    score,
)

FD, PRECISION, RECALL = "FD_EffNet-Lite0", "precision_EffNet-Lite0", "recall_EffNet-Lite0"


@dataclass(frozen=True)
class Setting:
    sampler: str  # "DiSA", "fixed" (DiSA's sampler with upper = lower: same clip, no annealing) or "original"
    upper: int
    lower: int
    strategy: str = "linear"

    @property
    def label(self) -> str:
        """``series:point`` for the plot: one series per sampler/strategy."""
        if self.sampler in ("original", "fixed"):
            return f"{self.sampler}:{self.upper}"
        return f"DiSA {self.strategy}:{self.upper}->{self.lower}"

    def config(self, num_iter: int, cfg: float) -> SamplerConfig:
        if self.sampler == "original":
            return SamplerConfig(num_iter=num_iter, cfg=cfg, diff_sampler="default", diff_upper_steps=self.upper)
        if self.sampler == "fixed":
            return SamplerConfig(num_iter=num_iter, cfg=cfg, diff_sampler="DiSA", diff_upper_steps=self.upper,
                                 diff_lower_steps=self.upper)  # fmt: skip
        return SamplerConfig(num_iter=num_iter, cfg=cfg, diff_sampler="DiSA", diff_upper_steps=self.upper,
                             diff_lower_steps=self.lower, diff_annealing_strategy=self.strategy)  # fmt: skip


DISA_SETTINGS = (
    Setting("DiSA", 50, 5), Setting("DiSA", 50, 1), Setting("DiSA", 50, 10), Setting("DiSA", 25, 5),
    Setting("DiSA", 50, 5, "cosine"), Setting("DiSA", 50, 5, "two-stage"), Setting("DiSA", 50, 5, "constant"),
)


def matched_fixed(setting: Setting, num_iter: int) -> Setting:
    """A fixed step count (DiSA's sampler and clip, no annealing) with about the DiSA setting's head evaluations per
    AR step (the nominal count whose clipped respacing runs closest to the DiSA setting's mean, at least 1).

    Counted as they run: DiSA's 950 clip drops the top timestep of some step counts (50 steps run 48)."""
    clip = setting.config(num_iter, 1.0).disa_clip
    runs = [len(respaced_timesteps(str(n), clip=clip)) for n in step_schedule(num_iter, setting.upper, setting.lower,
                                                                               setting.strategy)]  # fmt: skip
    target = sum(runs) / num_iter
    nominal = min(range(1, setting.upper + 1), key=lambda n: abs(len(respaced_timesteps(str(n), clip=clip)) - target))
    return Setting("fixed", nominal, nominal)


def all_settings(num_iter: int, upper: int) -> list[Setting]:
    fixed = {upper} | {matched_fixed(s, num_iter).upper for s in DISA_SETTINGS}
    return [*DISA_SETTINGS, *(Setting("fixed", n, n) for n in sorted(fixed, reverse=True)),
            Setting("original", upper, upper)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    p.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    p.add_argument("--num_images", type=int, default=500, help="images per setting (a multiple of 10)")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--num_iter", type=int, default=16, help="AR steps")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--upper", type=int, default=50, help="steps of the full original sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference_images", type=int, default=REFERENCE_IMAGES)
    p.add_argument("--cache_dir", type=Path, default=None, help="reference-feature cache (default ~/.cache/disa)")
    p.add_argument("--only", nargs="*", default=None, metavar="LABEL",
                   help="run only these settings (labels as in the table, e.g. 'fixed:50')")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.num_images < 10 or args.num_images % 10:
        p.error(f"--num_images must be a positive multiple of 10, got {args.num_images}")
    if not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    if args.num_images > 10_000 - args.reference_images:
        p.error(f"--num_images + --reference_images must be <= 10000 (the held-out 'real' row uses test images "
                f"after the reference ones), got {args.num_images} + {args.reference_images}")
    known = [s.label for s in all_settings(args.num_iter, args.upper)]
    unknown = [x for x in args.only or [] if x not in known]
    if unknown:
        p.error(f"--only: unknown setting(s) {unknown}; allowed: {known}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    reference = reference_features(args.cache_dir, num_images=args.reference_images)
    test_images, _ = load_fashion_mnist("test")
    held_out = test_images[args.reference_images : args.reference_images + args.num_images]  # (N, 28, 28)
    rows: list[dict[str, Any]] = [{"label": "real (held-out test images)", "metrics": score(
        np.repeat(held_out[..., None], 3, axis=-1), reference)}]  # fmt: skip
    labels, seeds = balanced_labels(args.num_images, args.seed)
    for setting in all_settings(args.num_iter, args.upper):
        if args.only and setting.label not in args.only:
            continue
        model = load_testbed_model(args.checkpoint, sampler=setting.config(args.num_iter, args.cfg))
        run = sample_images(model, labels, seeds, num_iter=args.num_iter, cfg=args.cfg, batch_size=args.batch_size)
        rows.append({"label": setting.label, "setting": asdict(setting), "nfe_per_image": run.nfe_per_image,
                     "steps_per_token": run.steps_per_token, "sec_per_image": run.sec_per_image,
                     "metrics": score(run.images, reference)})  # fmt: skip
        print(f"{setting.label:<24} NFE {run.nfe_per_image:5.0f}  {1000 * run.sec_per_image:7.1f} ms/img  "
              f"{FD} {rows[-1]['metrics'][FD]:.2f}", flush=True)
    path = args.out / "results.json"
    path.write_text(json.dumps({"rows": rows, "num_images": args.num_images, "num_iter": args.num_iter,
                                "cfg": args.cfg, "seed": args.seed, "reference_images": args.reference_images,
                                "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=2))
    lines = [f"| setting | NFE/img | steps/token | ms/img | {FD} | precision | recall |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        timing = (f"{r['nfe_per_image']:.0f} | {r['steps_per_token']:.1f} | {1000 * r['sec_per_image']:.1f}"
                  if "sec_per_image" in r else "- | - | -")
        lines.append(f"| {r['label']} | {timing} | {m[FD]:.2f} | {m[PRECISION]:.3f} | {m[RECALL]:.3f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    runs = [RunSummary(label=r["label"], path=path, sec_per_image=r["sec_per_image"], images_per_second=None,
                       nfe_per_image=r["nfe_per_image"], num_images=args.num_images, world_size=1,
                       metrics=r["metrics"]) for r in rows if "sec_per_image" in r]  # fmt: skip
    if runs:
        print(f"plot: {plot_tradeoff(runs, FD, args.out / 'frontier.png', xlabel='seconds per image (CPU)')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
