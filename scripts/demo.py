"""Main demo: DiSA vs the original sampler, end to end on a tiny model, on the CPU in seconds.

Until the embedded Fashion-MNIST model ships (its own issue), this runs the real sampling path of a MAR-style
per-token diffusion head with **seeded random weights**: every AR step samples its tokens with the DiffLoss head
(the original sampler: ``upper`` steps at every AR step; DiSA: ``upper`` annealed to ``lower``), the token grid is
decoded by a tiny KL VAE, and PNG grids are written. The images are not meaningful (nothing is trained); the
timing, the number of network evaluations and the plumbing are real.

    python scripts/demo.py [--out outputs/demo] [--num-images 8] [--num-iter 16] [--upper 50] [--lower 5]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disa.noise import TorchNoise
from disa.schedules import STRATEGIES
from disa.vae import AutoencoderKL, to_uint8, tokens_to_latent
from mar_disa.models.diffloss import DiffLoss

TOKEN_CHANNELS, COND_CHANNELS, GRID = 16, 64, 4  # 4x4 tokens of 16 channels -> 16x16 px through a x4 VAE


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for the PNG grids")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--num-iter", type=int, default=16, help="AR steps (tokens are revealed in a random order)")
    p.add_argument("--upper", type=int, default=50, help="diffusion steps of the original sampler / DiSA's first")
    p.add_argument("--lower", type=int, default=5, help="DiSA's diffusion steps at the last AR step")
    p.add_argument("--strategy", choices=STRATEGIES, default="linear")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.num_images < 1 or not 1 <= args.num_iter <= GRID * GRID:
        p.error(f"need --num-images >= 1 and 1 <= --num-iter <= {GRID * GRID}")
    if not 1 <= args.lower <= args.upper:
        p.error(f"need 1 <= --lower <= --upper, got lower={args.lower}, upper={args.upper}")
    return args


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded small random weights everywhere (the official init zeroes the head's output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / max(1, p.shape[-1]) ** 0.5)


def generate(head: DiffLoss, cond: torch.Tensor, order: torch.Tensor, num_iter: int, seed: int) -> tuple[torch.Tensor, int]:
    """Fill the (B, N, C) token grid over ``num_iter`` AR steps; returns tokens and sequential head calls."""
    b, n, _ = cond.shape
    tokens = torch.zeros(b, n, TOKEN_CHANNELS)
    noise, calls = TorchNoise(torch.Generator().manual_seed(seed)), 0
    bounds = np.linspace(0, n, num_iter + 1).round().astype(int)  # tokens revealed per AR step
    for k in range(num_iter):
        positions = order[:, bounds[k] : bounds[k + 1]]  # (B, n_k)
        z = torch.gather(cond, 1, positions[..., None].expand(-1, -1, COND_CHANNELS)).reshape(-1, COND_CHANNELS)
        sampled = head.sample(z, temperature=1.0, step=k, ar_num_iter=num_iter, noise=noise)  # (B n_k, C)
        tokens.scatter_(1, positions[..., None].expand(-1, -1, TOKEN_CHANNELS), sampled.view(b, -1, TOKEN_CHANNELS))
        calls += len(head.diffusion_for(head.steps_for(k, num_iter)).timestep_map)
    return tokens, calls


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    n = GRID * GRID
    cond = torch.randn(args.num_images, n, COND_CHANNELS)  # stands in for the MAR decoder output z
    order = torch.stack([torch.randperm(n) for _ in range(args.num_images)])  # (B, N) generation orders
    vae = AutoencoderKL(embed_dim=TOKEN_CHANNELS, ch_mult=(1, 1, 2), ch=32, num_res_blocks=1, resolution=16,
                        with_encoder=False).eval()
    randomise(vae, args.seed + 1)

    heads = {
        "original": DiffLoss(TOKEN_CHANNELS, COND_CHANNELS, 2, 128, args.upper, args.upper, diff_sampler="default"),
        "DiSA": DiffLoss(TOKEN_CHANNELS, COND_CHANNELS, 2, 128, args.upper, args.lower,
                         diff_annealing_strategy=args.strategy, diff_sampler="DiSA"),
    }
    for head in heads.values():
        randomise(head, args.seed + 2)  # the same weights for both samplers
        head.eval()
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"{args.num_images} images, {n} tokens each, {args.num_iter} AR steps, "
          f"original: {args.upper} steps/AR step, DiSA: {args.strategy} {args.upper}->{args.lower}")
    seconds = {}
    for name, head in heads.items():
        generate(head, cond[:1], order[:1], args.num_iter, args.seed)  # warm-up (not timed)
        start = time.perf_counter()
        tokens, calls = generate(head, cond, order, args.num_iter, args.seed)
        with torch.no_grad():
            latent = tokens_to_latent(tokens.transpose(1, 2).reshape(-1, TOKEN_CHANNELS, GRID, GRID))
            images = to_uint8(vae.decode(latent))  # (B, H, W, 3)
        seconds[name] = time.perf_counter() - start
        grid = np.concatenate(list(images), axis=1)  # the images side by side
        path = args.out / f"{name}.png"
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
        print(f"{name:>8}: {seconds[name] / args.num_images * 1e3:7.1f} ms/image, "
              f"{calls} sequential head calls per batch -> {path}")
    print(f"DiSA speed-up over the original sampler: {seconds['original'] / seconds['DiSA']:.2f}x")


if __name__ == "__main__":
    main()
