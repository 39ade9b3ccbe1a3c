"""Text-to-image with Harmon (and DiSA through the config), the official command line.

From ``Harmon_DiSA/`` (the official DiSA README's command; the config picks the sampler)::

    python scripts/text2image.py configs/models/qwen2_5_1_5b_kl16_mar_h_disa_50_5.py \\
        --checkpoint checkpoints/harmon_1.5b.pth --image_size 512 \\
        --prompt 'a dog on the left and a cat on the right.' --output output.jpg

Writes one ``grid_size x grid_size`` grid of images for the prompt (written atomically: an existing file is only
replaced by a complete new one) and prints the path, the time and the diffusion-head call count. Upstream flags:
``config``, ``--checkpoint``, ``--prompt``, ``--cfg_prompt``, ``--cfg``, ``--temperature``, ``--cfg_schedule``,
``--num_iter``, ``--grid_size``, ``--image_size``, ``--output``. Added (defaults keep upstream behaviour):

* ``--seed``: per-image seeds (``disa.evaluation.image_seed``) for the orders and the head's noise, so the grid is
  reproducible (upstream sets no seed);
* ``--device`` (default cuda if available), ``--dtype`` (default ``auto``: the config's bfloat16 on CUDA, float32
  on the CPU, where bfloat16 is slow), ``--attn_implementation`` (default: the config's, ``sdpa``);
* ``--llm_path`` (Qwen2.5-Instruct directory, default the config's hub id), ``--vae_path`` (default the config's);
* ``--no_disa_clip``: turn off the DiSA fork's clamp of the respaced timesteps at 950;
* ``--allow_unexpected_keys``: tolerate extra keys in the checkpoint (never missing or mis-shaped ones);
* ``--random_weights``: run without ``--checkpoint`` (benchmarks); upstream silently ran with random weights then;
* ``--compile_head`` / ``--cuda_graphs``: ``torch.compile`` the diffusion head (optionally replayed from CUDA
  graphs; :func:`harmon_disa.src.models.harmon.compile_head`); speed only, samples equal to float rounding.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from disa.checkpoints import CheckpointError
from disa.cli import finite_float, int_at_least
from disa.evaluation import image_seed
from disa.layers import add_compile_arguments, compile_request
from disa.noise import PerImageNoise
from harmon_disa.src.models import Harmon, load_config, load_harmon, make_grid, text2image_input, to_uint8
from harmon_disa.src.models.config import resolve_dtype
from harmon_disa.src.models.harmon import compile_head
from harmon_disa.src.models.prompts import DEFAULT_CFG_PROMPT
from mar_disa.models.mar import orders_from_seeds

PATCH = 16  # pixels per token: the KL-16 VAE's stride (upstream: image_size // 16)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-loading flags shared by the Harmon scripts."""
    parser.add_argument("config", help="model config, e.g. configs/models/qwen2_5_1_5b_kl16_mar_h_disa_50_5.py")
    parser.add_argument("--checkpoint", default=None, help="Harmon .pth (checkpoints/harmon_1.5b.pth)")
    parser.add_argument("--llm_path", default=None, help="Qwen2.5-Instruct directory or hub id (default: the config's)")
    parser.add_argument("--vae_path", default=None, help="kl16.ckpt (default: the config's vae.ckpt_path)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = the config's (bfloat16) on CUDA, float32 on the CPU")  # fmt: skip
    parser.add_argument("--attn_implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                        help="LLM attention (default: the config's, sdpa); FA2 needs flash-attn")  # fmt: skip
    parser.add_argument("--no_disa_clip", action="store_true",
                        help="DiSA configs: do not clamp the respaced timesteps at 950 (the fork does)")  # fmt: skip
    parser.add_argument("--allow_unexpected_keys", action="store_true",
                        help="tolerate extra checkpoint keys (missing or mis-shaped keys still fail)")  # fmt: skip
    parser.add_argument("--random_weights", action="store_true", help="allow running without --checkpoint")
    add_compile_arguments(parser)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The sampling flags shared by text2image.py and batch_text2image.py (upstream names and defaults)."""
    parser.add_argument("--cfg_prompt", default=DEFAULT_CFG_PROMPT, help="unconditional prompt of CFG")
    parser.add_argument("--cfg", type=finite_float(0), default=3.0, help="guidance scale (1 = no CFG)")
    parser.add_argument("--temperature", type=finite_float(0, inclusive=False), default=1.0)
    parser.add_argument("--cfg_schedule", default="constant", choices=["constant", "linear"])
    parser.add_argument("--num_iter", type=int_at_least(1), default=64, help="AR steps")
    parser.add_argument("--grid_size", type=int_at_least(1), default=2, help="grid_size**2 images per prompt")
    parser.add_argument("--image_size", type=int_at_least(1), default=512, help="pixels, a multiple of 16")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: unseeded, as upstream)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size % PATCH:
        parser.error(f"--image_size must be a multiple of {PATCH} (one token per {PATCH}x{PATCH} pixels), "
                     f"got {args.image_size}")
    if args.checkpoint is None and not args.random_weights:
        parser.error("--checkpoint is required (pass --random_weights to run the random-weight model on purpose)")
    if not os.path.isfile(args.config):
        parser.error(f"config file not found: {args.config!r}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        compile_request(args, requested_device(args))
    except (RuntimeError, ValueError) as err:  # RuntimeError: torch.device() refuses the string
        parser.error(str(err))


def requested_device(args: argparse.Namespace) -> torch.device:
    """``--device``, or CUDA when available and the CPU otherwise."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_device_dtype(args: argparse.Namespace, config_dtype: str) -> tuple[torch.device, torch.dtype]:
    device = requested_device(args)
    if args.dtype != "auto":
        return device, resolve_dtype(args.dtype)
    return device, (resolve_dtype(config_dtype) if device.type == "cuda" else torch.float32)


def load_model(
    args: argparse.Namespace, device: torch.device | None = None
) -> tuple[Harmon, torch.device, torch.dtype]:
    """Load the config and model the flags describe; returns ``(model, device, dtype)``."""
    cfg = load_config(args.config)
    if args.no_disa_clip:
        cfg = cfg.replace(mar=dataclasses.replace(cfg.mar, disa_clip=None))
    dev, dtype = resolve_device_dtype(args, cfg.llm.torch_dtype)
    model = load_harmon(
        cfg, args.checkpoint, llm_path=args.llm_path, vae_path=args.vae_path, device=device or dev, dtype=dtype,
        attn_implementation=args.attn_implementation, strict=not args.allow_unexpected_keys,
    )  # fmt: skip
    compile_now, cuda_graphs = compile_request(args, device or dev)
    if compile_now:
        compile_head(model, cuda_graphs=cuda_graphs)
    return model, device or dev, dtype


def save_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image in the format of the file extension, atomically (temporary file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--prompt", default="a dog on the left and a cat on the right.")
    add_sampling_args(parser)
    parser.add_argument("--output", default="output.jpg", help="grid image to write (.jpg, .png, ...)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, device, dtype = load_model(args)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:  # unreadable or mismatched inputs
        print(f"text2image.py: error: {err}", file=sys.stderr)
        return 1

    count = args.grid_size**2
    side = args.image_size // PATCH
    cond = model.prepare_text_conditions(text2image_input(args.prompt), args.cfg_prompt if args.cfg != 1.0 else None)
    # Upstream repeats the conditional row grid_size**2 times, then the unconditional one.
    halves = cond["input_ids"].shape[0]
    input_ids = cond["input_ids"].repeat_interleave(count, dim=0)  # (H * count, L): [cond x count; uncond x count]
    attention_mask = cond["attention_mask"].repeat_interleave(count, dim=0)
    extra = {}
    if args.seed is not None:
        seeds = [image_seed(args.seed, i, count) for i in range(count)]
        extra = dict(orders=orders_from_seeds(seeds, side * side, device), noise=PerImageNoise(seeds))

    start = time.perf_counter()
    images = model.sample(
        input_ids, attention_mask, num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
        temperature=args.temperature, progress_bar=True, image_shape=(side, side), **extra,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    save_image(args.output, make_grid(to_uint8(images), args.grid_size))
    stats = model.last_sample_stats
    print(
        f"wrote {args.output}: {count} image(s) of {args.image_size}px ({halves * count} rows, {device}, "
        f"{str(dtype).removeprefix('torch.')}) in {elapsed:.2f}s, {stats.head_calls} diffusion-head calls"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
