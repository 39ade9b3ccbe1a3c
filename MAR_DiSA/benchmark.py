"""DiSA's speed-up on MAR-B/L/H, measured side by side in one run (random weights: the cost does not depend on them).

For each model size, three settings (``sampler=`` presets), each generating and decoding one batch of
class-conditional images with CFG (the official evaluation's timed region, :class:`mar_disa.engine_mar.MARGenerator`):

* ``original``: 256 AR steps, 100 diffusion steps at every AR step (MAR's published setting);
* ``fixed``: 64 AR steps, 50 diffusion steps at every AR step (MAR's faster setting);
* ``DiSA``: 64 AR steps, diffusion steps annealed linearly 50 -> 5 (MAR_DiSA's README setting, 950 clip).

They run interleaved (:mod:`disa.benchmark`: warm-up untimed, device synchronised, ``--repeats`` rounds) and it
prints, per size, seconds per image (median and range), images/s, NFE per image (sequential diffusion-head
evaluations), TFLOP per image, the fraction of the peak matmul throughput, peak memory and the paired speed-ups,
then the FLOP-based expectation for the official settings computed from the schedules alone (no run). FLOPs are
counted from the architecture and the schedule that actually ran (:func:`mar_flops_per_image`, checked against
``torch.utils.flop_counter`` in the tests) plus the VAE decode counted once with the flop counter::

    python -m mar_disa.benchmark                                    # official settings and batch sizes (a GPU)
    python -m mar_disa.benchmark --models mar_base --ar_divisor 32 --threads 1 --warmup 0 --batch_size 1  # a CPU
    python -m mar_disa.benchmark --models mar_base --compare precision=fp32 precision=bf16 --set sampler=DiSA
    python -m mar_disa.benchmark --models mar_base --compare fast=off fast=on       # before/after the cached condition

``--ar_divisor D`` divides every AR step count by D (the diffusion step counts stay): the settings are then smaller
than the official ones, and their names say so. ``--compare A B`` times two ``key=value`` overrides of the base
setting (knobs ``sampler``, ``precision``, ``attention``, ``fast``, ``compile``; ``--help`` lists them) instead of
the three presets.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from disa.benchmark import (
    Knob,
    Knobs,
    MemoryProbe,
    Setting,
    Timing,
    add_arguments,
    attention_backend,
    CompiledHead,
    attention_knob,
    compile_knob,
    compute_dtype,
    configurations,
    count_flops,
    machine_line,
    precision_knob,
    report,
    resolve_device,
    time_interleaved,
)
from disa.cli import int_at_least
from disa.evaluation import image_seed
from disa.vae import AutoencoderKL
from mar_disa.engine_mar import MARGenerator, autocast
from mar_disa.main_mar import ModelConfig, SamplerConfig, build_model
from mar_disa.models.diffloss import DiffLoss
from mar_disa.models.mar import MAR, MAR_MODELS, SampleStats, compile_head, mask_schedule

__all__ = [
    "HEADS",
    "FAST_KNOB",
    "EVAL_BSZ",
    "KNOBS",
    "BenchSetting",
    "official_settings",
    "expected_schedule",
    "mar_flops_per_image",
    "sampler_head",
    "use_sampler",
    "benchmark_model",
    "main",
]

# The diffusion heads of the released checkpoints (depth, width): the factories do not set them.
HEADS: dict[str, tuple[int, int]] = {"mar_base": (6, 1024), "mar_large": (8, 1280), "mar_huge": (12, 1536)}
_LABELS = {"mar_base": "MAR-B", "mar_large": "MAR-L", "mar_huge": "MAR-H"}
CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.3}  # the DiSA README's guidance scales
EVAL_BSZ = {"mar_base": 256, "mar_large": 256, "mar_huge": 128}  # the DiSA README's --eval_bsz
# The diffusion head's own switch (DiffLoss.cache_condition), shared with Harmon's benchmark (same head).
FAST_KNOB = Knob("fast", "on", "on = the head embeds its condition once per AR step; off = at every diffusion step, "
                 "as upstream (same samples)", ("on", "off"))
KNOBS = Knobs((
    Knob("sampler", "DiSA", "original = 256 AR / 100 steps, fixed = 64 AR / 50 steps, DiSA = 64 AR / 50->5 "
         "(AR steps divided by --ar_divisor)", ("original", "fixed", "DiSA")),
    precision_knob(),
    attention_knob(),
    FAST_KNOB,
    compile_knob(),
))  # fmt: skip


@dataclass(frozen=True)
class BenchSetting:
    """One sampler configuration: ``num_iter`` AR steps; ``diff_sampler`` ``default`` (``upper`` steps at every AR
    step) or ``DiSA`` (``upper`` annealed to ``lower``, linear); ``precision`` (None: the benchmark's), the
    ``attention`` backend (:data:`disa.benchmark.ATTENTION`) it runs under, whether the head caches its condition
    (``fast``) and how the head runs (``compile``: :func:`disa.benchmark.compile_knob`)."""

    name: str
    num_iter: int
    diff_sampler: str
    upper: int
    lower: int
    precision: str | None = None
    attention: str = "sdpa"
    fast: bool = True
    compile: str = "off"

    def sampler(self, cfg: float) -> SamplerConfig:
        return SamplerConfig(num_iter=self.num_iter, cfg=cfg, diff_sampler=self.diff_sampler,
                             diff_upper_steps=self.upper, diff_lower_steps=self.lower)  # fmt: skip


def official_settings(ar_divisor: int = 1) -> list[BenchSetting]:
    """Original 256 AR / 100 steps, 64 AR / 50 steps fixed, 64 AR / DiSA 50 -> 5 (the ``sampler`` knob's values
    ``original``, ``fixed``, ``DiSA`` in this order); AR steps divided by ``ar_divisor`` (which must divide 64 and
    leave at least 2 AR steps, which DiSA's schedule needs)."""
    if ar_divisor < 1 or 64 % ar_divisor or 64 // ar_divisor < 2:
        raise ValueError(f"ar_divisor must divide 64 and leave >= 2 AR steps (1, 2, 4, 8, 16, 32), got {ar_divisor}")
    long, short = 256 // ar_divisor, 64 // ar_divisor
    return [
        BenchSetting(f"original {long} AR / 100 steps", long, "default", 100, 100),
        BenchSetting(f"{short} AR / 50 steps fixed", short, "default", 50, 50),
        BenchSetting(f"{short} AR / DiSA 50->5", short, "DiSA", 50, 5),
    ]


def expected_schedule(head: DiffLoss, seq_len: int, num_iter: int) -> tuple[list[int], list[int]]:
    """``(tokens per AR step, head calls per AR step)`` that ``sample_tokens`` will run, from the schedules alone."""
    masked_before, tokens, calls = seq_len, [], []
    for k, masked_after in enumerate(mask_schedule(seq_len, num_iter)):
        n = masked_before if k == num_iter - 1 else masked_before - masked_after
        steps = head.steps_for(k, num_iter)
        per_token = steps if head.sampler.startswith("DPM") else head.diffusion_for(steps).num_timesteps
        tokens.append(n)
        calls.append(per_token if n > 0 else 0)
        masked_before = masked_after
    return tokens, calls


def mar_flops_per_image(model: MAR, tokens_per_step: Sequence[int], head_calls_per_step: Sequence[int],
                        guided: bool) -> float:  # fmt: skip
    """Matmul FLOPs (2 per multiply-add) of one image's ``sample_tokens``, both CFG halves (``specs/mar.md`` §7).

    Per AR step and row: ``z_proj`` on every position, the encoder blocks on ``buffer + known`` tokens
    (``12 d^2`` MACs per token and ``2 d n^2`` for attention), ``decoder_embed``, the decoder blocks on all
    ``buffer + seq_len`` positions; per predicted token and head call, every Linear of the diffusion MLP except
    ``cond_embed``, which runs once per AR step when the head caches the condition (``DiffLoss.cache_condition``,
    the default) and once per call otherwise. Norms,
    activations and embeddings lookups are not counted (as ``torch.utils.flop_counter`` does not count them).
    """
    rows = 2 if guided else 1
    enc_d, dec_d = model.z_proj.out_features, model.decoder_embed.out_features
    enc_depth, dec_depth = len(model.encoder_blocks), len(model.decoder_blocks)
    seq, buffer, channels = model.seq_len, model.buffer_size, model.token_embed_dim
    net = model.diffloss.net
    w, z_dim = net.model_channels, net.cond_embed.in_features
    head_macs = (
        net.time_embed.frequency_embedding_size * w + w * w  # timestep MLP
        + channels * w  # input_proj
        + net.num_res_blocks * 5 * w * w  # per ResBlock: MLP 2 w^2, AdaLN 3 w^2
        + 2 * w * w + w * net.out_channels  # final AdaLN and output
    )  # fmt: skip
    macs, known = 0, 0
    n_dec = buffer + seq
    for n, calls in zip(tokens_per_step, head_calls_per_step):
        n_enc = buffer + known
        macs += rows * (
            seq * channels * enc_d  # z_proj projects every position
            + enc_depth * (12 * enc_d**2 * n_enc + 2 * enc_d * n_enc**2)
            + n_enc * enc_d * dec_d  # decoder_embed
            + dec_depth * (12 * dec_d**2 * n_dec + 2 * dec_d * n_dec**2)
        )
        cond_evals = (1 if model.diffloss.cache_condition else calls) if calls else 0
        macs += rows * n * (calls * head_macs + cond_evals * z_dim * w)  # cond_embed: z is fixed within a step
        known += n
    return 2.0 * macs


def sampler_head(model: MAR, setting: BenchSetting) -> DiffLoss:
    """A diffusion head that samples as ``setting`` says (its step schedule and ``fast``), sharing the network of
    ``model``'s current head (one set of weights serves every setting; building MAR-H three times would triple the
    memory)."""
    net = model.diffloss.net
    with torch.device("meta"):  # the throw-away MLP costs nothing; the schedule tables live on the host anyway
        head = DiffLoss(target_channels=model.token_embed_dim, z_channels=net.cond_embed.in_features,
                        depth=net.num_res_blocks, width=net.model_channels, diff_upper_steps=setting.upper,
                        diff_lower_steps=setting.lower, diff_sampler=setting.diff_sampler)  # fmt: skip
    head.net = net
    head.cache_condition = setting.fast
    return head


def use_sampler(model: MAR, setting: BenchSetting) -> None:
    """Give ``model`` the head of :func:`sampler_head`."""
    model.diffloss = sampler_head(model, setting)


def _math_attention_flops(fn) -> float:  # type: ignore[no-untyped-def]
    # The CPU's fused attention kernel is invisible to the flop counter; the math kernel is made of countable bmm.
    with attention_backend("math"):
        return count_flops(fn)


def benchmark_model(
    model: MAR,
    vae: AutoencoderKL,
    settings: Sequence[BenchSetting],
    *,
    cfg: float,
    batch_size: int,
    device: torch.device,
    precision: str,
    warmup: int,
    repeats: int,
    memory: MemoryProbe | None = None,
    flops: bool = True,
) -> list[Timing]:
    """Time ``settings`` interleaved on ``model`` (class-balanced labels, per-image seeds as the evaluation uses;
    :func:`disa.benchmark.time_interleaved`) and attach the FLOPs of what ran: :func:`mar_flops_per_image` from the
    setting's last ``sample_tokens`` statistics plus the VAE decode. A setting's own ``precision`` / ``attention``
    override ``precision`` / the default attention; its ``compile`` value swaps the shared head network's forward
    (:class:`disa.benchmark.CompiledHead`, compiled once per value)."""
    labels = torch.arange(batch_size) % model.num_classes  # (B,)
    seeds = [image_seed(0, i, batch_size) for i in range(batch_size)]
    latent = model.img_size // model.vae_stride
    z = torch.zeros(batch_size, vae.embed_dim, latent, latent, device=device)  # (B, E, h, w)
    vae_flops: dict[str, float] = {}
    stats: dict[str, SampleStats] = {}
    heads = [sampler_head(model, setting) for setting in settings]
    compiled = CompiledHead(model.diffloss.net, lambda graphs: compile_head(model, cuda_graphs=graphs))
    timed = []
    for setting, head in zip(settings, heads):
        setting_precision = setting.precision or precision
        if flops and setting_precision not in vae_flops:
            with torch.no_grad(), autocast(device, setting_precision):
                vae_flops[setting_precision] = _math_attention_flops(lambda: vae.decode(z))
        generator = MARGenerator(model, vae, num_iter=setting.num_iter, cfg=cfg, precision=setting_precision)

        def generate(generator: MARGenerator = generator, head: DiffLoss = head, setting: BenchSetting = setting) -> float:
            model.diffloss = head  # the settings share one model; each brings its own step schedule
            with attention_backend(setting.attention), compiled.use(setting.compile):
                nfe = float(sum(generator.generate(labels, seeds).nfe_per_ar_step))
            assert model.last_sample_stats is not None  # set by every sample_tokens call
            stats[setting.name] = model.last_sample_stats
            return nfe

        timed.append(Setting(setting.name, generate, batch_size, compute_dtype(setting_precision, device)))
    results = time_interleaved(timed, device, warmup=warmup, repeats=repeats, memory=memory)
    if not flops:
        return results
    out = []
    for setting, head, timing in zip(settings, heads, results):
        s = stats[setting.name]
        model.diffloss = head  # the formula reads the head's cache_condition
        per_image = mar_flops_per_image(model, s.tokens_per_step, s.head_calls_per_step, s.guided)
        out.append(replace(timing, flops_per_batch=per_image * batch_size + vae_flops[setting.precision or precision]))
    return out


def expected_table(names: Sequence[str], settings: Sequence[BenchSetting]) -> str:
    """NFE and FLOPs per image of ``settings`` on the full-size ``names``, from the schedules alone (no run; CFG on,
    VAE decode excluded); ratios relative to the first setting."""
    rows = []
    for name in names:
        depth, width = HEADS[name]
        with torch.device("meta"):  # only shapes are read
            model = build_model(ModelConfig(model=name, diffloss_d=depth, diffloss_w=width), settings[0].sampler(1.0))
        for setting in settings:
            use_sampler(model, setting)
            tokens, calls = expected_schedule(model.diffloss, model.seq_len, setting.num_iter)
            flops = mar_flops_per_image(model, tokens, calls, guided=True) / 1e12
            rows.append((f"{_LABELS[name]} {setting.name}", sum(calls), flops))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'setting':<{width}}  {'NFE/img':>8}  {'TFLOP/img':>9}  {'NFE ratio':>9}  {'FLOP ratio':>10}"]
    for i, (name, nfe, tflops) in enumerate(rows):
        base = rows[i - i % len(settings)]
        lines.append(f"{name:<{width}}  {nfe:8d}  {tflops:9.4g}  {base[1] / nfe:8.2f}x  {base[2] / tflops:9.2f}x")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mar_disa.benchmark",
        description="Time per image, NFE, FLOPs and memory of the original MAR sampler, fixed 50 steps and DiSA "
        "50->5 on MAR-B/L/H (real sizes, random weights), interleaved in one run.",
    )
    p.add_argument("--models", nargs="*", choices=list(MAR_MODELS), default=list(MAR_MODELS),
                   help="sizes to time (the FLOP-based expectation is printed for all three)")
    p.add_argument("--ar_divisor", type=int_at_least(1), default=1,
                   help="divide every AR step count by this (CPU runs; 1 = the official settings)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random weights")
    add_arguments(p, KNOBS, batch_size=None, batch_note="the official --eval_bsz, 256 for MAR-B/L, 128 for MAR-H")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        presets = official_settings(args.ar_divisor)
    except ValueError as err:
        parser.error(str(err))
    by_sampler = dict(zip(KNOBS.knobs[0].choices or (), presets))
    device = resolve_device(args.device)
    configs = configurations(parser, KNOBS, args, [(p.name, {"sampler": key}) for key, p in by_sampler.items()],
                             device=device)  # fmt: skip
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = [replace(by_sampler[v["sampler"]], name=name, precision=v["precision"], attention=v["attention"],
                        fast=v["fast"] == "on", compile=v["compile"]) for name, v in configs]  # fmt: skip
    reduced = "" if args.ar_divisor == 1 else f"; AR steps divided by {args.ar_divisor}"
    print(f"MAR benchmark on {machine_line(device)}, random weights, CFG on, warmup {args.warmup}, "
          f"repeats {args.repeats} (interleaved){reduced}", flush=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    vae = AutoencoderKL(with_encoder=False).to(device).eval()
    memory, peaks = MemoryProbe(device), {}
    for name in args.models:
        depth, width = HEADS[name]
        batch_size = args.batch_size or EVAL_BSZ[name]
        with device:
            model = build_model(ModelConfig(model=name, diffloss_d=depth, diffloss_w=width),
                                presets[0].sampler(CFG[name])).eval()  # fmt: skip
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\n{_LABELS[name]} ({name}, diffusion head {depth}x{width}, {params:.0f}M parameters), cfg {CFG[name]}, "
              f"batch {batch_size}", flush=True)
        results = benchmark_model(model, vae, settings, cfg=CFG[name], batch_size=batch_size, device=device,
                                  precision="fp16", warmup=args.warmup, repeats=args.repeats, memory=memory,
                                  flops=not args.no_flops)  # fmt: skip
        print(report(results, device, peak=not args.no_peak, memory=memory, peak_cache=peaks))
        print("(time and TFLOP/img include the VAE decode; NFE = sequential diffusion-head evaluations per image)",
              flush=True)
        del model
    print("\nexpected at the official settings, from the schedules (no run; CFG on, VAE decode excluded):")
    print(expected_table(list(MAR_MODELS), official_settings(1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
