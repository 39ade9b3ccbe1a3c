"""Cache the VAE latents of ImageNet's training set for MAR training (``main_mar.py --use_cached``).

Upstream's flags and layout: every image of ``<data_path>/train`` (ADM center crop to ``--img_size``, no random
flip) is encoded together with its horizontal mirror, and the raw encoder moments ``(2 * vae_embed_dim, h, w)`` are
saved as ``moments`` and ``moments_flip`` in ``<cached_path>/<class folder>/<file name>.npz``::

    cd MAR_DiSA && torchrun --nproc_per_node=8 main_cache.py --img_size 256 \\
        --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 \\
        --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}
    torchrun --nproc_per_node=8 -m mar_disa.main_cache ...       # the same, from anywhere

Differences from upstream, none of which changes a cached value: rank r encodes files r, r + world, ... without the
``DistributedSampler`` padding that made two ranks write the same file at once; each file is written under a
temporary name and renamed, so a file in the cache is always complete; files already cached are skipped, so an
interrupted run resumes (``--overwrite`` re-encodes everything).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from disa.checkpoints import CheckpointError, exit_on_error
from disa.cli import int_at_least
from disa.distributed import (
    DistributedContext,
    RankFailedError,
    all_reduce,
    init_distributed,
    run_on_main,
    shutdown_distributed,
)
from mar_disa.engine_mar import ImageFolderWithFilename, cache_file, cache_latents, image_transform
from mar_disa.main_mar import (
    DataError,
    KL16_STRIDE,
    add_distributed_arguments,
    check_distributed_arguments,
    load_vae_from_args,
    resolve_device,
)

__all__ = ["build_parser", "parse_args", "cache_dataset", "main"]

logger = logging.getLogger("mar_disa.main_cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main_cache.py",
        description="Encode ImageNet's training images (and their mirror images) with the KL-16 VAE for "
        "main_mar.py --use_cached. Upstream flags keep their names and defaults; run under torchrun for several "
        "processes.",
        epilog="Already cached files are skipped (an interrupted run resumes); each file appears complete or not at "
        "all; ranks never write the same file (no DistributedSampler padding).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch_size", type=int_at_least(1), default=128, help="images per batch and process")
    p.add_argument("--img_size", type=int_at_least(1), default=256, help="center-crop size")
    p.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="KL-16 VAE checkpoint (with encoder)")
    p.add_argument("--vae_embed_dim", type=int_at_least(1), default=16, help="VAE latent channels")
    p.add_argument("--vae_ch", type=int_at_least(1), default=128,
                   help="not official: base width of the KL-16 VAE (kl16.ckpt: 128; tiny test VAEs use less)")
    p.add_argument("--data_path", default="./data/imagenet", help="ImageNet root; <data_path>/train is encoded")
    p.add_argument("--device", default="cuda",
                   help="cuda (falls back to the CPU with a warning when no GPU is visible), cpu, mps, cuda:N")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="torch/numpy seed + rank (encoding draws nothing)")
    p.add_argument("--num_workers", type=int_at_least(0), default=10, help="data-loading workers")
    p.add_argument("--pin_mem", action="store_true", help="pin data-loader memory (CUDA)")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin memory")
    p.set_defaults(pin_mem=True)
    add_distributed_arguments(p)
    p.add_argument("--cached_path", default="", help="output folder of the cache (required)")
    p.add_argument("--overwrite", action="store_true", help="re-encode files that are already cached")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_distributed_arguments(parser, args)
    if not args.cached_path:
        parser.error("--cached_path is required: the folder to write the latents to")
    if args.img_size % KL16_STRIDE:
        parser.error(f"--img_size {args.img_size} is not a multiple of the VAE's downsampling factor {KL16_STRIDE}")
    return args


def cache_dataset(args: argparse.Namespace, ctx: DistributedContext) -> tuple[int, int]:
    """Encode this rank's share of the files not cached yet; returns ``(written here, already cached)``."""
    root = Path(args.data_path) / "train"
    if not root.is_dir():
        raise DataError(f"training images not found: {str(root)!r} is not a folder of class folders (--data_path)")
    dataset = ImageFolderWithFilename(str(root), transform=image_transform(args.img_size, random_flip=False))

    def pending() -> list[int]:  # decided once, on rank 0, before anyone writes
        return [i for i in range(len(dataset))
                if args.overwrite or not cache_file(args.cached_path, dataset.relative_name(i)).is_file()]  # fmt: skip

    todo = run_on_main(pending)
    mine = todo[ctx.rank :: ctx.world_size]
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, shuffle=False, drop_last=False,
                        num_workers=args.num_workers, pin_memory=args.pin_mem and ctx.device.type == "cuda")
    vae = load_vae_from_args(args, ctx.device, decoder_only=False)
    written = cache_latents(vae, loader, args.cached_path, ctx.device)
    return written, len(dataset) - len(todo)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    ctx = init_distributed(device=resolve_device(args.device))
    try:
        with exit_on_error(CheckpointError, RankFailedError, DataError, prog="main_cache.py"):
            seed = args.seed + ctx.rank
            torch.manual_seed(seed)
            np.random.seed(seed)
            written, skipped = cache_dataset(args, ctx)
            total = int(all_reduce(torch.tensor([written], dtype=torch.int64)).item())
            if ctx.is_main:
                print(f"cached {total} image(s) to {args.cached_path} ({skipped} already there)")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
