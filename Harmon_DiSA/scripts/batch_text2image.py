"""Images for a file of prompts, in the folder layout GenEval's evaluator reads, on one or many GPUs (torchrun).

    torchrun --nproc_per_node=8 scripts/batch_text2image.py configs/models/qwen2_5_1_5b_kl16_mar_h_disa_50_5.py \\
        --checkpoint checkpoints/harmon_1.5b.pth --data geneval/prompts/evaluation_metadata.jsonl \\
        --output outputs/geneval_disa_50_5 --batch_size 4 --seed 0

``--data``: GenEval's ``evaluation_metadata.jsonl`` (one JSON object per line) or the upstream script's JSON list;
every entry needs a ``"prompt"``. For entry ``i`` the script writes ``<output>/<i:05d>/samples/<k:04d>.png`` for
the ``grid_size**2`` samples (GenEval: 4 per prompt), ``grid.png``, and last ``metadata.jsonl`` (the entry itself),
which marks the prompt as done. The text is upstream's batch form ``"Generate an image: " + prompt.strip() + "."``,
prompts are right-padded with the tokenizer's pad token, as upstream.

Reproducibility: sample ``k`` of prompt ``i`` has seed ``disa.evaluation.image_seed(seed, i * g^2 + k, N * g^2)``
for its generation order and diffusion noise, and batches are fixed groups of ``--batch_size`` consecutive prompts
handed to the ranks round-robin, so the images do not depend on the number of processes (1 and 2 ranks give
byte-identical files on the CPU) — keep ``--batch_size`` fixed, since the prompt padding of a batch enters the
float rounding. A rerun skips batches whose prompts are all complete and regenerates the others; a folder holding a
different prompt is an error, nothing is overwritten. Upstream (``accelerate launch``) used no seeds, hard-coded 4
unconditional rows per prompt (grid_size 2 only) and wrote ``{i:08d}.jpg`` grids.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from disa.checkpoints import CheckpointError
from disa.cli import int_at_least
from disa.distributed import all_reduce, barrier, init_distributed, shutdown_distributed
from disa.evaluation import image_seed, png_is_valid, shard_batches, write_png
from disa.noise import PerImageNoise
from harmon_disa.scripts.text2image import (
    PATCH,
    add_model_args,
    add_sampling_args,
    check_args,
    load_model,
)
from harmon_disa.src.models import batch_text2image_input, make_grid, to_uint8
from mar_disa.models.mar import orders_from_seeds


def read_prompts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Entries of a ``.jsonl`` (GenEval metadata) or ``.json`` list file; each must be an object with a prompt."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if str(path).endswith(".jsonl"):
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON / JSON lines: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{os.fspath(path)!r} holds no prompts (expected a JSON list or JSON lines of objects)")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{os.fspath(path)!r}: entry {i} has no string 'prompt' field: {entry!r}")
    return entries


def prompt_dir(root: Path, index: int) -> Path:
    return root / f"{index:05d}"


def is_done(root: Path, index: int, entry: dict[str, Any], count: int) -> bool:
    """Whether prompt ``index`` is complete; a folder written for a different prompt raises."""
    folder = prompt_dir(root, index)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return False
    if json.loads(meta.read_text(encoding="utf-8")) != entry:
        raise ValueError(
            f"{folder} holds images of another prompt than entry {index} of --data; use a fresh --output folder"
        )
    return all(png_is_valid(folder / "samples" / f"{k:04d}.png") for k in range(count))


def write_prompt(root: Path, index: int, entry: dict[str, Any], images: np.ndarray, grid_size: int) -> None:
    folder = prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        write_png(folder / "samples" / f"{k:04d}.png", image)
    write_png(folder / "grid.png", make_grid(images, grid_size))
    tmp = folder / ".metadata.jsonl.tmp"
    tmp.write_text(json.dumps(entry) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "metadata.jsonl")  # last: marks the prompt complete


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--data", required=True, help="GenEval evaluation_metadata.jsonl or a JSON list of {prompt}")
    parser.add_argument("--output", required=True, help="output folder (GenEval layout)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=4,
                        help="prompts per batch (x grid_size**2 images)")
    parser.set_defaults(seed=0)  # batch generation is always seeded (per-image seeds)
    args = parser.parse_args(argv)
    check_args(parser, args)
    if not os.path.isfile(args.data):
        parser.error(f"--data file not found: {args.data!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = init_distributed(device=args.device)
    try:
        entries = read_prompts(args.data)
        root = Path(args.output)
        count = args.grid_size**2
        side = args.image_size // PATCH
        chunks = shard_batches(range(len(entries)), args.batch_size, ctx.world_size, ctx.rank)
        pending = [c for c in chunks if not all(is_done(root, i, entries[i], count) for i in c)]
        model, device, _ = load_model(args, ctx.device)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        print(f"batch_text2image.py: error (rank {ctx.rank}): {err}", file=sys.stderr)
        shutdown_distributed()
        return 1

    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    cfg_prompt = args.cfg_prompt if args.cfg != 1.0 else None
    total = len(entries) * count
    written, head_calls, start = 0, 0, time.perf_counter()
    for chunk in pending:
        texts = [batch_text2image_input(entries[i]["prompt"]) for i in chunk for _ in range(count)]
        rows = model.prepare_text_conditions(texts, cfg_prompt, pad_id=pad_id)  # [cond x B; uncond x B]
        seeds = [image_seed(args.seed, i * count + k, total) for i in chunk for k in range(count)]
        with torch.no_grad():
            images = model.sample(
                rows["input_ids"], rows["attention_mask"], num_iter=args.num_iter, cfg=args.cfg,
                cfg_schedule=args.cfg_schedule, temperature=args.temperature, image_shape=(side, side),
                orders=orders_from_seeds(seeds, side * side, device), noise=PerImageNoise(seeds),
            )  # fmt: skip
        pixels = to_uint8(images)  # (B, H, W, 3)
        for j, index in enumerate(chunk):
            write_prompt(root, index, entries[index], pixels[j * count : (j + 1) * count], args.grid_size)
        written += len(chunk)
        head_calls += model.last_sample_stats.head_calls
    elapsed = time.perf_counter() - start

    totals = all_reduce(torch.tensor([written, head_calls, elapsed], dtype=torch.float64), op="sum")
    barrier()
    if ctx.is_main:
        done, calls, seconds = int(totals[0]), int(totals[1]), float(totals[2])
        per_image = f", {seconds / (done * count):.3f}s per image (summed over ranks)" if done else ""
        print(
            f"{root}: generated {done} prompt(s) x {count} image(s) on {ctx.world_size} rank(s) "
            f"({len(entries) - done} already complete){per_image}, {calls} diffusion-head calls"
        )
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
