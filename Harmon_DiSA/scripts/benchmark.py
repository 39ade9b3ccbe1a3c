"""Time per image and diffusion-MLP counts of Harmon: the original 100-step sampler against DiSA 100/50/25 -> 5.

    python scripts/benchmark.py                                  # Harmon-1.5B, 512 px, 64 AR steps, batch 4 (a GPU)
    python scripts/benchmark.py --size 0.5b --image_size 256 --num_iter 16 --batch_size 1 --device cpu  # a CPU
    python scripts/benchmark.py --size 0.5b --compare precision=fp32 precision=bf16 --set sampler=disa_50_5

Real-size modules with **random weights** (timing does not depend on the weights; nothing is downloaded: the LLM
architecture is Qwen2.5's published config unless ``--llm_path`` gives a directory). One model is built; the four
settings (``sampler=`` presets ``original``, ``disa_100_5``, ``disa_50_5``, ``disa_25_5``: the shipped configs
``qwen2_5_1_5b_kl16_mar_h.py`` and ``..._disa_{100,50,25}_5.py``; for 0.5B the same head settings) share its weights
and differ only in the diffusion head's step schedule. :mod:`disa.benchmark` times them interleaved (warm-up
untimed, device synchronised, ``--repeats`` rounds) and prints seconds per image with its spread, images/s, NFE
(sequential diffusion-MLP calls per batch, measured with forward hooks), FLOPs (``torch.utils.flop_counter``, math
attention), the fraction of the peak matmul throughput, peak memory and the paired speed-ups, then the MLP token
evaluations per image. ``--compare A B`` times two ``key=value`` overrides instead (knobs ``sampler``,
``precision`` — the weights' dtype; a second copy of the model is made for it —, ``attention``, ``fast`` — the
head's cached condition, as in MAR —, ``compile`` — ``torch.compile`` of the head MLP). With
``--num_iter`` or ``--image_size`` below the defaults the ratios are not the paper's setting: the script says so.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from disa.benchmark import (
    CompiledHead,
    Knob,
    Knobs,
    MemoryProbe,
    Setting,
    add_arguments,
    attention_backend,
    attention_knob,
    compile_knob,
    configurations,
    count_flops,
    machine_line,
    report,
    resolve_device,
    time_interleaved,
)
from harmon_disa.src.models import Harmon, build_harmon, load_config
from harmon_disa.src.models.harmon import compile_head
from mar_disa.benchmark import FAST_KNOB
from mar_disa.models.diffloss import DiffLoss

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
SETTINGS = {
    "original": "qwen2_5_1_5b_kl16_mar_h.py",
    "disa_100_5": "qwen2_5_1_5b_kl16_mar_h_disa_100_5.py",
    "disa_50_5": "qwen2_5_1_5b_kl16_mar_h_disa_50_5.py",
    "disa_25_5": "qwen2_5_1_5b_kl16_mar_h_disa_25_5.py",
}
LABELS = {"original": "original 100", "disa_100_5": "DiSA 100->5", "disa_50_5": "DiSA 50->5",
          "disa_25_5": "DiSA 25->5"}  # fmt: skip
BATCH = 4  # text2image.py's --grid_size 2 (and batch_text2image.py's --batch_size 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KNOBS = Knobs((
    Knob("sampler", "disa_50_5", "the diffusion head's schedule of the shipped config of that name", tuple(SETTINGS)),
    Knob("precision", "auto", "dtype of the weights; auto = bf16 on CUDA (as upstream), fp32 on the CPU",
         ("auto", *DTYPES)),
    attention_knob(),
    FAST_KNOB,
    compile_knob(),
))  # fmt: skip
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


def head_for(model: Harmon, config_file: str) -> DiffLoss:
    """A head with the step schedule of ``config_file`` sharing ``model``'s head network."""
    mar_cfg = load_config(CONFIGS / config_file).mar
    net = model.mar.diffloss.net
    with torch.device("meta"):  # the new head's own (unused) network costs nothing
        head = DiffLoss(target_channels=net.in_channels, z_channels=net.cond_embed.in_features,
                        depth=net.num_res_blocks, width=net.model_channels, **mar_cfg.head_kwargs())  # fmt: skip
    head.net = net
    return head


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(BASE), default="1.5b")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--num_iter", type=int, default=64, help="AR steps (64 in the paper's setting)")
    parser.add_argument("--prompt_len", type=int, default=24, help="prompt tokens (random ids)")
    parser.add_argument("--llm_path", default=None, help="a Qwen2.5 directory for the LLM config (optional)")
    add_arguments(parser, KNOBS, batch_size=BATCH, batch_note=f"{BATCH}, text2image.py's 2x2 grid")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.image_size % 16 or min(args.image_size, args.num_iter, args.prompt_len) < 1:
        parser.error("--image_size must be a positive multiple of 16; --num_iter and --prompt_len must be >= 1")
    device = resolve_device(args.device)
    configs = configurations(parser, KNOBS, args, [(LABELS[k], {"sampler": k}) for k in SETTINGS], device=device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    auto = "bf16" if device.type == "cuda" else "fp32"
    models: dict[str, Harmon] = {}
    for _, values in configs:
        precision = auto if values["precision"] == "auto" else values["precision"]
        if precision not in models:
            # One set of random weights: a second precision is a cast copy of the first model.
            models[precision] = (copy.deepcopy(next(iter(models.values()))) if models else
                                 build_model(args.size, args.llm_path, device, torch.float32)).to(DTYPES[precision])
    print(f"Harmon-{args.size.upper()} (random weights), {args.image_size}px, {args.num_iter} AR steps, cfg 3.0, "
          f"batch {args.batch_size}, on {machine_line(device)}, warmup {args.warmup}, repeats {args.repeats} "
          "(interleaved)", flush=True)  # fmt: skip
    if (args.image_size, args.num_iter) != (512, 64):
        print("note: reduced setting (paper: 512px, 64 AR steps); the DiSA schedules anneal over the AR steps given")

    rows = 2 * args.batch_size  # [cond; uncond]
    vocab = min(151643, next(iter(models.values())).llm.config.vocab_size)  # Qwen2.5's text tokens (no specials)
    ids = torch.randint(0, vocab, (rows, args.prompt_len), device=device)
    mask = torch.ones(rows, args.prompt_len, dtype=torch.bool, device=device)
    side = args.image_size // 16
    compiled = {precision: CompiledHead(m.mar.diffloss.net, lambda graphs, m=m: compile_head(m, cuda_graphs=graphs))
                for precision, m in models.items()}  # fmt: skip
    settings, counters, tokens = [], [], {}
    for name, values in configs:
        precision = auto if values["precision"] == "auto" else values["precision"]
        model = models[precision]
        head = head_for(model, SETTINGS[values["sampler"]])
        head.cache_condition = values["fast"] == "on"

        def generate(model: Harmon = model, head: DiffLoss = head, attention: str = values["attention"],
                     name: str = name, compiled: CompiledHead = compiled[precision],
                     compile: str = values["compile"]) -> float:  # fmt: skip
            model.mar.diffloss = head
            with torch.no_grad(), attention_backend(attention), compiled.use(compile):
                model.sample(ids, mask, num_iter=args.num_iter, cfg=3.0, image_shape=(side, side))
            stats = model.last_sample_stats
            assert stats is not None  # set by every sample call
            tokens[name] = stats.token_evals_per_image
            return float(stats.head_calls)

        def flops(generate=generate) -> float:  # type: ignore[no-untyped-def]
            with attention_backend("math"):  # eager: compiling does not change the FLOPs
                return count_flops(lambda: generate(compile="off"))

        settings.append(Setting(name, generate, args.batch_size, DTYPES[precision]))
        counters.append(flops)
    memory = MemoryProbe(device)
    results = time_interleaved(settings, device, warmup=args.warmup, repeats=args.repeats, memory=memory)
    if not args.no_flops:
        results = [replace(r, flops_per_batch=count()) for r, count in zip(results, counters)]
    print(report(results, device, peak=not args.no_peak, memory=memory))
    print("NFE: sequential diffusion-MLP calls per batch (both CFG rows in each call); MLP token evaluations per "
          "image, one CFG branch: " + ", ".join(f"{name} {tokens[name]}" for name, _ in configs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
