"""Side-by-side speed of the original xAR sampler and DiSA, for the real xAR-B/L/H sizes (random weights).

    python -m xar_disa.benchmark                                   # official settings and batch size, all sizes
    python -m xar_disa.benchmark --models xar_base --original_steps 8 10 --flow_upper_steps 10 \\
        --flow_lower_steps 3 --warmup 0 --batch_size 1             # a CPU-sized run (5x fewer flow steps)
    python -m xar_disa.benchmark --models xar_base --compare precision=fp32 precision=bf16

For every model in ``--models`` it times one batch per setting (sampling + KL-16 decode, what the official
evaluation times), interleaved with :mod:`disa.benchmark` (warm-up untimed, device synchronised, ``--repeats``
rounds), and prints seconds per image with its spread, images/s, network evaluations (NFE) per image, FLOPs per
image, the fraction of the peak matmul throughput, peak memory and the paired speed-ups relative to the first row.
Defaults: the README settings — xAR-B originally 40 flow steps per cell (and 50, the baseline of DiSA's "1.6x"),
xAR-L/H 50, DiSA 50 -> 15 (50, 38, 26, 15 evaluations) — at the README's cfg. ``--compare A B`` times two
``key=value`` overrides instead (knobs ``sampler`` — ``original`` is the first of ``--original_steps`` —,
``precision``, ``attention``; ``--help`` lists them).

It then prints the FLOP-based expected ratios at the official settings for xAR-B/L/H. FLOPs are counted by
``torch.utils.flop_counter`` on a shape-only (meta) model driven through the sampler's own call protocol
(:class:`xar_disa.models.sampler.CellVelocity`: 128 tokens on the first evaluation of cells 1-3, 64 otherwise, CFG
rows doubled), so no full-size run is needed for them; element-wise work is not counted (:func:`sampling_flops`).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Sequence

import torch
from disa.benchmark import (
    Knob,
    Knobs,
    MemoryProbe,
    Setting,
    add_arguments,
    attention_backend,
    attention_knob,
    compute_dtype,
    configurations,
    count_flops,
    machine_line,
    precision_knob,
    report,
    resolve_device,
    time_interleaved,
)
from disa.vae import AutoencoderKL
from xar_disa.engine_xar import MODELS, ModelConfig, SamplerConfig, XARGenerator
from xar_disa.models.sampler import CellVelocity, first_eval_path
from xar_disa.models.xar import xAR

__all__ = ["README_CFG", "README_ORIGINAL_STEPS", "EVAL_BSZ", "KNOBS", "sampling_flops", "decode_flops",
           "settings_for", "main"]  # fmt: skip

EVAL_BSZ = 256  # the DiSA README's --eval_bsz
KNOBS = Knobs((
    Knob("sampler", "DiSA", "original = the first of --original_steps at every cell; DiSA = --flow_upper_steps -> "
         "--flow_lower_steps", ("original", "DiSA")),
    precision_knob(),
    attention_knob(),
))  # fmt: skip

# Guidance scales and original flow-step counts of the official README commands.
README_CFG = {"xar_base": 2.7, "xar_large": 2.3, "xar_huge": 2.2}
README_ORIGINAL_STEPS = {"xar_base": (40, 50), "xar_large": (50,), "xar_huge": (50,)}
LATENT_SHAPE = (16, 16, 16)  # (C, h, w) of a 256 px image under the KL-16 VAE


def sampling_flops(
    model: xAR, sampler: SamplerConfig, batch_size: int, *, memo: dict[int, list[tuple[float, float]]] | None = None
) -> float:
    """FLOPs of ``model.sample_tokens`` for ``batch_size`` images under ``sampler`` (any device; use a meta model:
    the CPU's fused attention kernel is invisible to the flop counter, while on meta attention decomposes into the
    matmuls it costs).

    Every network evaluation goes through :class:`CellVelocity` as ``sample_tokens`` makes it (context and mask on
    a cell's first evaluation, which rewrites the KV cache). The later evaluations of a cell repeat the same shapes
    over a read-only cache, so one is counted and multiplied; the sampler's element-wise update is not counted.
    ``memo`` (one dict per model) keeps each cell's (first, later) cost, which do not depend on the step counts, and
    reuses them for every plan without the official 2-step path.
    """
    plans = sampler.plan(model)
    regular = not any(first_eval_path(1, p.num_steps, sampler.official_short_grids) for p in plans)
    if regular and memo is not None and batch_size in memo:
        return sum(first + (p.num_steps - 1) * later for p, (first, later) in zip(plans, memo[batch_size]))
    device = model.mask.device
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    cell = torch.zeros(batch_size, model.cell_len, model.vae_embed_dim, device=device)  # (B, L, C)
    rows = torch.cat([cell, cell])  # (2B, L, C): every evaluation runs the doubled batch
    t = torch.ones((), dtype=torch.float64, device=device)
    total, costs = 0.0, []
    model.reset_cache()
    try:
        for plan in plans:
            end = model.cell_len * (plan.ar_step + 1)
            net = CellVelocity(
                model.sample_inference, labels, plan.ar_step, context=cell if plan.ar_step else None,
                mask=model.mask[:, :, :end, :end], num_steps=plan.num_steps, null_label=model.num_classes,
                official_short_grid=sampler.official_short_grids,
            )
            first, later, n_first = 0.0, 0.0, 0
            for i in range(plan.num_steps):
                if first_eval_path(i, plan.num_steps, sampler.official_short_grids):
                    first += count_flops(lambda: net(rows, t))
                    n_first += 1
                elif i == n_first:  # the cell's first read-only evaluation; the others repeat it
                    later = count_flops(lambda: net(rows, t))
            total += first + (plan.num_steps - n_first) * later
            costs.append((first, later))
    finally:
        model.reset_cache()
    if regular and memo is not None:
        memo[batch_size] = costs
    return total


def decode_flops(vae: AutoencoderKL, batch_size: int) -> float:
    """FLOPs of decoding ``batch_size`` latents (any device, meta included)."""
    z = torch.zeros(batch_size, *LATENT_SHAPE, device=vae.post_quant_conv.weight.device)  # (B, C, h, w)
    return count_flops(lambda: vae.decode(z))


def settings_for(name: str, original_steps: Sequence[int], upper: int, lower: int,
                 cfg: float) -> list[tuple[str, SamplerConfig]]:
    """(row name, sampler) for the original settings, then DiSA."""
    rows = [(f"{name} original {n} steps", SamplerConfig(num_steps=n, cfg=cfg)) for n in original_steps]
    rows.append((f"{name} DiSA {upper}->{lower}",
                 SamplerConfig(flow_upper_steps=upper, flow_lower_steps=lower, cfg=cfg)))
    return rows


def _meta_models() -> tuple[dict[str, xAR], AutoencoderKL]:
    models = {name: ModelConfig(model=name).probe() for name in MODELS}
    with torch.device("meta"):
        vae = AutoencoderKL(with_encoder=False)
    return models, vae


def expected_ratios_table() -> str:
    """FLOPs per image (sampling + decode) at the official settings, relative to each model's first row."""
    models, vae = _meta_models()
    decode = decode_flops(vae, 1)
    blocks = []
    for name in MODELS:
        rows, memo = [], {}
        for label, sampler in settings_for(name, README_ORIGINAL_STEPS[name], 50, 15, README_CFG[name]):
            sample = sampling_flops(models[name], sampler, 1, memo=memo)
            rows.append((label, sum(sampler.nfe_per_ar_step(models[name])), sample, sample + decode))
        base = rows[0]
        lines = [f"{'setting':<28} {'NFE':>4} {'TFLOP sampling':>14} {'+ decode':>9} {'ratio':>6} "
                 f"{'(sampling only)':>15}"]
        for label, nfe, sample, total in rows:
            lines.append(f"{label:<28} {nfe:>4} {sample / 1e12:>14.3f} {total / 1e12:>9.3f} "
                         f"{base[3] / total:>5.2f}x {base[2] / sample:>14.2f}x")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _load() -> str:
    """The machine's load averages: CPU timings mean little when other jobs share the cores."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    return "load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xar_disa.benchmark",
        description="Time per image, NFE, FLOPs and memory of the original xAR sampler vs DiSA, real sizes, random "
        "weights, interleaved in one run.",
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="sizes to time")
    p.add_argument("--original_steps", nargs="+", type=int, default=None,
                   help="original flow steps per cell (default: the README's, 40 and 50 for xAR-B, 50 for L/H)")
    p.add_argument("--flow_upper_steps", type=int, default=50, help="DiSA: first cell (default: 50)")
    p.add_argument("--flow_lower_steps", type=int, default=15, help="DiSA: last cell (default: 15)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the README's per size)")
    p.add_argument("--no_vae", action="store_true", help="time sampling only (no KL-16 decode)")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed (default: 0)")
    add_arguments(p, KNOBS, batch_size=EVAL_BSZ, batch_note=f"{EVAL_BSZ}, the DiSA README's --eval_bsz")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        plans = {name: settings_for(name, args.original_steps or README_ORIGINAL_STEPS[name],
                                    args.flow_upper_steps, args.flow_lower_steps,
                                    README_CFG[name] if args.cfg is None else args.cfg) for name in args.models}
        meta_models, meta_vae = _meta_models()
        for name, rows in plans.items():
            for _, sampler in rows:
                sampler.plan(meta_models[name])  # refuse bad step counts before building anything large
    except ValueError as err:
        parser.error(str(err))

    print(f"xAR sampler benchmark on {machine_line(device)}, batch {args.batch_size}, "
          f"{'sampling + KL-16 decode' if not args.no_vae else 'sampling only'}, random weights, warmup "
          f"{args.warmup}, repeats {args.repeats} (interleaved); {_load()}", flush=True)
    decode = 0.0 if args.no_vae else decode_flops(meta_vae, args.batch_size)
    vae = None if args.no_vae else AutoencoderKL(with_encoder=False).to(device).eval()
    labels = torch.arange(args.batch_size, device=device) % 1000
    seeds = list(range(args.batch_size))
    memory, peaks = MemoryProbe(device), {}
    for name, rows in plans.items():
        samplers = {"original": rows[0][1], "DiSA": rows[-1][1]}
        presets = [(label, {"sampler": "original"}) for label, _ in rows[:-1]] + [(rows[-1][0], {"sampler": "DiSA"})]
        configs = configurations(parser, KNOBS, args, presets)
        chosen = [(label, dict(rows)[label] if not args.compare else samplers[v["sampler"]], v)
                  for label, v in configs]  # fmt: skip
        torch.manual_seed(args.seed)
        model = ModelConfig(model=name).build().to(device).eval()
        settings, flops, memo = [], [], {}
        for label, sampler, values in chosen:
            gen = XARGenerator(model, vae, sampler, device=device, precision=values["precision"])

            def run(gen: XARGenerator = gen, attention: str = values["attention"]) -> float:
                with torch.no_grad(), attention_backend(attention):
                    if vae is None:
                        gen.sample_latents(labels, seeds)
                    else:
                        gen.generate(labels, seeds)
                return float(sum(gen.nfe_per_ar_step))

            settings.append(Setting(label, run, args.batch_size, compute_dtype(values["precision"], device)))
            if not args.no_flops:
                flops.append(sampling_flops(meta_models[name], sampler, args.batch_size, memo=memo) + decode)
        results = time_interleaved(settings, device, warmup=args.warmup, repeats=args.repeats, memory=memory)
        if flops:
            results = [replace(r, flops_per_batch=f) for r, f in zip(results, flops)]
        print(f"\n{name} (measured on {device}; FLOPs counted for the same settings)")
        print(report(results, device, peak=not args.no_peak, memory=memory, peak_cache=peaks), flush=True)
        del model
    print(f"timing done; {_load()}")
    print("\nFLOP-based expected ratios at the official settings (sampling + decode; last column sampling only):")
    print(expected_ratios_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
