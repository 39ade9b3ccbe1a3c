"""Time per image and diffusion-MLP counts of Harmon: the original 100-step sampler against DiSA 100/50/25 -> 5.

    python scripts/benchmark.py                                  # Harmon-1.5B, 512 px, 64 AR steps (a GPU)
    python scripts/benchmark.py --size 0.5b --image_size 256 --num_iter 16 --device cpu   # a CPU-sized run

Real-size modules with **random weights** (timing does not depend on the weights; nothing is downloaded: the LLM
architecture is Qwen2.5's published config unless ``--llm_path`` gives a directory). One model is built; the four
settings share its weights and differ only in the diffusion head's step schedule (the shipped configs
``qwen2_5_1_5b_kl16_mar_h.py`` and ``..._disa_{100,50,25}_5.py``; for 0.5B the same head settings). Each setting
generates ``--batch_size`` images (with their CFG rows) after one untimed warm-up call, ``--repeats`` times; the
printed time is the best repeat divided by the batch size. Counts are measured (forward hooks), not computed:
sequential MLP calls per batch, and MLP token evaluations per image (x2 rows under CFG). With ``--num_iter`` or
``--image_size`` below the defaults the ratios are not the paper's setting: the script says so in its output.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from disa.distributed import synchronize
from harmon_disa.src.models import Harmon, build_harmon, load_config
from mar_disa.models.diffloss import DiffLoss

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
SETTINGS = {
    "original 100": "qwen2_5_1_5b_kl16_mar_h.py",
    "DiSA 100->5": "qwen2_5_1_5b_kl16_mar_h_disa_100_5.py",
    "DiSA 50->5": "qwen2_5_1_5b_kl16_mar_h_disa_50_5.py",
    "DiSA 25->5": "qwen2_5_1_5b_kl16_mar_h_disa_25_5.py",
}
BASE = {"1.5b": "qwen2_5_1_5b_kl16_mar_h.py", "0.5b": "qwen2_5_0_5b_kl16_mar_b.py"}
# Published config.json values of Qwen/Qwen2.5-{0.5B,1.5B}-Instruct that shape the weights (the rest is default).
QWEN2_5 = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}  # fmt: skip
QWEN2_5_SHARED = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, hidden_act="silu")  # fmt: skip


def build_model(size: str, llm_path: str | None, device: torch.device, dtype: torch.dtype) -> Harmon:
    from transformers import AutoConfig, Qwen2Config

    cfg = load_config(CONFIGS / BASE[size])
    llm_config = AutoConfig.from_pretrained(llm_path) if llm_path else Qwen2Config(**QWEN2_5[size], **QWEN2_5_SHARED)
    with torch.device(device):
        model = build_harmon(cfg, llm_config=llm_config)
    return model.to(dtype).eval()


def use_head(model: Harmon, config_file: str) -> None:
    """Give ``model`` the head step schedule of ``config_file``, keeping the head's weights."""
    mar_cfg = load_config(CONFIGS / config_file).mar
    net = model.mar.diffloss.net
    with torch.device("meta"):  # the new head's own (unused) network costs nothing
        head = DiffLoss(target_channels=net.in_channels, z_channels=net.cond_embed.in_features,
                        depth=net.num_res_blocks, width=net.model_channels, **mar_cfg.head_kwargs())  # fmt: skip
    head.net = net
    model.mar.diffloss = head


def run(model: Harmon, args: argparse.Namespace, device: torch.device, num_iter: int) -> float:
    rows = 2 * args.batch_size  # [cond; uncond]
    ids = torch.randint(0, 151643, (rows, args.prompt_len), device=device)
    mask = torch.ones(rows, args.prompt_len, dtype=torch.bool, device=device)
    side = args.image_size // 16
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.sample(ids, mask, num_iter=num_iter, cfg=3.0, image_shape=(side, side))
    synchronize(device)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(BASE), default="1.5b")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--num_iter", type=int, default=64, help="AR steps (64 in the paper's setting)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per call (plus as many CFG rows)")
    parser.add_argument("--prompt_len", type=int, default=24, help="prompt tokens (random ids)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA (as upstream), float32 on the CPU")  # fmt: skip
    parser.add_argument("--llm_path", default=None, help="a Qwen2.5 directory for the LLM config (optional)")
    args = parser.parse_args(argv)
    if args.image_size % 16 or min(args.image_size, args.num_iter, args.batch_size, args.repeats, args.prompt_len) < 1:
        parser.error("--image_size must be a positive multiple of 16; counts must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    torch.manual_seed(0)
    model = build_model(args.size, args.llm_path, device, dtype)
    print(f"Harmon-{args.size.upper()} (random weights), {args.image_size}px, {args.num_iter} AR steps, cfg 3.0, "
          f"batch {args.batch_size}, {device} {str(dtype).removeprefix('torch.')}")  # fmt: skip
    if (args.image_size, args.num_iter) != (512, 64):
        print("note: reduced setting (paper: 512px, 64 AR steps); the DiSA schedules anneal over the AR steps given")
    run(model, args, device, num_iter=2)  # warm-up: allocator, kernels, lazily built tables

    results = []
    for name, config_file in SETTINGS.items():
        use_head(model, config_file)
        times = [run(model, args, device, args.num_iter) for _ in range(args.repeats)]
        stats = model.last_sample_stats
        results.append((name, min(times) / args.batch_size, stats.head_calls, stats.token_evals_per_image))
    base_time, base_calls, base_tokens = results[0][1:]
    header = ("setting", "s/image", "speed-up", "MLP calls", "ratio", "MLP tokens/img", "ratio")
    print("{:<14} {:>9} {:>8} {:>10} {:>6} {:>15} {:>6}".format(*header))
    for name, seconds, calls, tokens in results:
        print(f"{name:<14} {seconds:9.3f} {base_time / seconds:7.2f}x {calls:10d} {base_calls / calls:5.2f}x "
              f"{tokens:15d} {base_tokens / tokens:5.2f}x")  # fmt: skip
    print("MLP calls: sequential diffusion-MLP evaluations per batch; MLP tokens/img: tokens x steps per image, "
          "one CFG branch (x2 rows evaluated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
