"""A toy class-conditional generator and the tiny evaluation script that the evaluation tests launch.

The toy has the shape of a real model for the loop's purposes: weights loaded strictly from a checkpoint in the
official MAR layout (EMA selected), three "AR steps" of 4, 3 and 2 noise draws through ``disa.noise.PerImageNoise``
(so the pixels depend on each image's seed), and a per-class colour (so they depend on the label). Only element-wise
arithmetic, so an image is bit-identical whatever batch it is computed in.

    python tests/_toy_eval.py --ckpt toy.pth --sample_dir out/toy --num_images 12 --batch_size 3
    python -m torch.distributed.run --nproc_per_node=2 tests/_toy_eval.py --ckpt toy.pth --sample_dir out/toy2 ...

Test hooks: ``--log_dir`` records the seeds each process generated; ``--stop_after N --stop_rank R --stop_how
{raise,kill}`` makes rank R raise (or SIGKILL itself, like a pre-empted job) once it has generated N images, before
the batch is written; ``--selftest_out`` writes a check of the tensor collectives.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from disa.checkpoints import CheckpointError, exit_on_error, load_checkpoint, load_state_dict_strict
from disa.distributed import (
    RankFailedError,
    all_gather_tensor,
    all_reduce,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    shutdown_distributed,
)
from disa.evaluation import ClassBalancedLabels, EvalConfig, EvaluationError, GeneratedBatch, run_evaluation
from disa.noise import PerImageNoise
from disa.vae import to_uint8

AR_STEPS = (4, 3, 2)  # noise draws per "AR step": the NFE the toy reports


class ToyGenerator(nn.Module):
    def __init__(self, num_classes: int = 4, image_size: int = 8) -> None:
        super().__init__()
        self.image_size = image_size
        self.class_color = nn.Embedding(num_classes, 3)
        self.gain = nn.Parameter(torch.ones(3))
        self.log_path: Path | None = None
        self.stop_after: int | None = None
        self.stop_how: Literal["raise", "kill"] = "raise"
        self.generated = 0

    def generate(self, conditions: torch.Tensor, seeds: Sequence[int]) -> GeneratedBatch:
        b, s = len(seeds), self.image_size
        noise = PerImageNoise(seeds)
        x = torch.zeros(b, 3, s, s)
        for draws in AR_STEPS:
            for _ in range(draws):
                x = 0.8 * x + 0.6 * noise((b, 3, s, s), dtype=torch.float32, device="cpu")  # (B, 3, s, s)
        color = self.class_color(conditions)  # (B, 3)
        x = 0.4 * self.gain.view(1, 3, 1, 1) * x + color.view(b, 3, 1, 1)
        self.generated += b
        if self.stop_after is not None and self.generated >= self.stop_after:
            if self.stop_how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"toy crash after {self.generated} images")
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.writelines(f"{seed}\n" for seed in seeds)
        return GeneratedBatch(images=to_uint8(x), nfe_per_ar_step=AR_STEPS)


def pixel_sums(folder: Path) -> dict[str, int]:
    """A metric in the shape the real ones take: every rank reads a share of the images, results are reduced."""
    rank, world = get_rank(), get_world_size()
    files = sorted(folder.glob("*.png"))[rank::world]
    sums = torch.tensor([int(np.asarray(Image.open(f), dtype=np.int64).sum()) for f in files], dtype=torch.int64)
    every = all_gather_tensor(sums)  # (N,)
    total = all_reduce(sums.sum().reshape(1))  # (1,)
    return {"num_images": int(every.numel()), "pixel_sum": int(total.item()), "max_image_sum": int(every.max())}


def collective_selftest() -> dict[str, list[float]]:
    """Uneven all_gather_tensor (rank r contributes r + 1 rows), float64 all_reduce, and a barrier."""
    barrier()
    rank = get_rank()
    rows = torch.full((rank + 1, 2), float(rank), dtype=torch.float64)  # (rank + 1, 2)
    gathered = all_gather_tensor(rows)
    summed = all_reduce(torch.tensor([0.5 + rank], dtype=torch.float64), op="sum")
    return {"gathered": gathered[:, 0].tolist(), "summed": summed.tolist()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="toy evaluation run for the tests")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--sample_dir", type=Path, required=True)
    p.add_argument("--num_images", type=int, default=12)
    p.add_argument("--num_classes", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", action="store_true")
    p.add_argument("--log_dir", type=Path)
    p.add_argument("--stop_after", type=int)
    p.add_argument("--stop_rank", type=int, default=0)
    p.add_argument("--stop_how", choices=("raise", "kill"), default="raise")
    p.add_argument("--selftest_out", type=Path)
    args = p.parse_args(argv)

    ctx = init_distributed(device="cpu")
    with exit_on_error(CheckpointError, EvaluationError, RankFailedError, ValueError):
        model = ToyGenerator(num_classes=args.num_classes)
        load_state_dict_strict(model, load_checkpoint(args.ckpt), what=f"checkpoint {str(args.ckpt)!r}")
        if args.log_dir is not None:
            model.log_path = args.log_dir / f"rank{ctx.rank}-pid{os.getpid()}.log"
        if args.stop_after is not None and ctx.rank == args.stop_rank:
            model.stop_after, model.stop_how = args.stop_after, args.stop_how
        cfg = EvalConfig(
            sample_dir=args.sample_dir, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
            save_npz=args.npz, progress=False,
        )
        run_evaluation(
            model, cfg, conditions=ClassBalancedLabels(args.num_images, args.num_classes),
            model_config={"model": "toy", "num_classes": args.num_classes}, metrics_fn=pixel_sums, device=ctx.device,
        )
        if args.selftest_out is not None:
            check = collective_selftest()
            if ctx.is_main:
                args.selftest_out.write_text(json.dumps(check))
    shutdown_distributed()


if __name__ == "__main__":
    main()
