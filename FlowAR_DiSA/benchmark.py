"""Time per image and NFE of FlowAR-S/L/H, original sampler against DiSA, side by side in one run.

    python -m flowar_disa.benchmark                          # S, L, H at full size, batch 256, CUDA if available
    python scripts/benchmark.py flowar --sizes small --num_scales 3 --batch_size 1
    python scripts/benchmark.py flowar --sizes small --compare attention=math attention=sdpa
    python scripts/benchmark.py flowar --sizes small --num_scales 3 --compare fast=off fast=on   # before/after

Real model sizes with random weights (the arithmetic does not depend on the values) and a random full-size KL-16
decoder. Each size runs the official README settings (``sampler=`` presets): the original sampler (``--num_step``
25 for S/L, 50 for H) and DiSA (25 -> 15 for S/L, 50 -> 15 for H) with the README's cfg and guidance, through the
same :class:`~flowar_disa.engine_flowar.FlowARGenerator` as the evaluation (sampling + VAE decode, the span the
official code times). :mod:`disa.benchmark` times them interleaved (warm-up untimed, device synchronised), counts
their FLOPs with ``torch.utils.flop_counter`` (math attention, which the counter sees) and prints seconds per image
with its spread, images/s, NFE, the fraction of the peak matmul throughput, peak memory and the paired speed-up
next to the FLOP ratio. ``--compare A B`` times two ``key=value`` overrides instead (knobs ``sampler``,
``precision``, ``attention``, ``fast``, ``compile``; ``--help`` lists them).

``--num_scales K`` (not the official model) keeps the network sizes but generates only the first K scales
(img_size = 16 * 2^(K-1)), for machines where the full 256 px run is too slow (the CPU figures in the README). DiSA's
schedule then anneals over K scales (T = K - 1), so the ratios differ from the 5-scale ones.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

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
from flowar_disa.engine_flowar import (
    FlowARGenerator,
    ModelConfig,
    SamplerConfig,
    configure_backends,
)
from flowar_disa.models.flowar import compile_head

__all__ = ["SizeSpec", "SIZES", "EVAL_BSZ", "KNOBS", "settings_for", "preset_names", "main"]

EVAL_BSZ = 256  # the DiSA README's --eval_bsz
KNOBS = Knobs((
    Knob("sampler", "DiSA", "original = the README's --num_step at every scale; DiSA = its upper -> lower steps",
         ("original", "DiSA")),
    precision_knob(),
    attention_knob(),
    Knob("fast", "on", "on = condition cached per scale and guidance decided on the device; off = recomputed at every "
         "flow step and decided on the host, as upstream (same samples)", ("on", "off")),
    compile_knob(),
))  # fmt: skip


@dataclass(frozen=True)
class SizeSpec:
    """One released model and its official evaluation settings (DiSA README; original FlowAR README)."""

    label: str
    model: str
    diffloss_d: int
    diffloss_w: int
    cfg: float
    guidance: float
    original_steps: int
    disa_steps: tuple[int, int]


SIZES = {
    "small": SizeSpec("FlowAR-S", "flowar_small", 2, 1024, 4.2, 0.9, 25, (25, 15)),
    "large": SizeSpec("FlowAR-L", "flowar_large", 12, 1024, 2.4, 0.9, 25, (25, 15)),
    "huge": SizeSpec("FlowAR-H", "flowar_huge", 12, 1536, 2.4, 0.7, 50, (50, 15)),
}


def settings_for(spec: SizeSpec, num_scales: int, batch_size: int, device: torch.device,
                 configs: Sequence[tuple[str, Mapping[str, Any]]]
                 ) -> tuple[list[Setting], list[str], list[Callable[[], float]]]:
    """The settings of ``configs`` (name, knob values) for one size, sharing one randomly initialised model and
    decoder; a line per setting with its flow-head calls per scale; and a callable per setting that counts its FLOPs
    (math attention, so that the counter sees it)."""
    stride = 16
    model_cfg = ModelConfig(model=spec.model, img_size=stride * 2 ** (num_scales - 1), vae_stride=stride,
                            diffloss_d=spec.diffloss_d, diffloss_w=spec.diffloss_w)
    with torch.device(device):
        model = model_cfg.build().eval()
        vae = AutoencoderKL(with_encoder=False).eval()
    labels = torch.arange(batch_size, device=device) * 97 % 1000  # (B,) arbitrary classes
    seeds = list(range(batch_size))
    samplers = {
        "original": SamplerConfig(num_step=spec.original_steps, cfg=spec.cfg, guidance=spec.guidance),
        "DiSA": SamplerConfig(*spec.disa_steps, cfg=spec.cfg, guidance=spec.guidance),
    }
    compiled = CompiledHead(model.flownet, lambda graphs: compile_head(model, cuda_graphs=graphs))
    settings, notes, counters = [], [], []
    for name, values in configs:
        generator = FlowARGenerator(model, vae, samplers[values["sampler"]], device=device,
                                    precision=values["precision"], fast_paths=values["fast"] == "on")

        def generate(generator: FlowARGenerator = generator, attention: str = values["attention"],
                     compile: str = values["compile"]) -> float:  # fmt: skip
            with torch.no_grad(), attention_backend(attention), compiled.use(compile):
                out = generator.generate(labels, seeds)
            return float(sum(out.nfe_per_ar_step))  # sequential flow-head calls per image

        def flops(generator: FlowARGenerator = generator) -> float:  # eager: compiling does not change the FLOPs
            with attention_backend("math"):
                return count_flops(lambda: generator.generate(labels, seeds))

        settings.append(Setting(name, generate, batch_size, compute_dtype(values["precision"], device)))
        notes.append(f"  {name}: flow-head calls per scale {list(generator.nfe_per_ar_step)}")
        counters.append(flops)
    return settings, notes, counters


def preset_names(spec: SizeSpec) -> list[tuple[str, dict[str, str]]]:
    """The default rows: the original sampler, then DiSA, named by their step counts."""
    return [(f"original {spec.original_steps} steps", {"sampler": "original"}),
            (f"DiSA {spec.disa_steps[0]}->{spec.disa_steps[1]}", {"sampler": "DiSA"})]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowar_disa.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="models to time")
    p.add_argument("--num_scales", type=int, default=5, choices=range(1, 6), metavar="{1..5}",
                   help="scales to generate (5 = the real 256 px model; fewer for slow machines)")
    add_arguments(p, KNOBS, batch_size=EVAL_BSZ, batch_note=f"{EVAL_BSZ}, the DiSA README's --eval_bsz")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    base = KNOBS.defaults()
    device = resolve_device(args.device)
    # Validate overrides once, before building anything large.
    configurations(parser, KNOBS, args, preset_names(SIZES[args.sizes[0]]), base, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    configure_backends(device)
    side = 2 ** (args.num_scales - 1)
    print(f"FlowAR benchmark on {machine_line(device)}, batch {args.batch_size}, {args.num_scales} scales (latent "
          f"{side}x{side}, {16 * side} px)" + ("" if args.num_scales == 5 else " -- reduced: the real model generates "
          "5 scales") + f", warmup {args.warmup}, repeats {args.repeats} (interleaved)", flush=True)  # fmt: skip
    memory, peaks = MemoryProbe(device), {}
    for size in args.sizes:
        spec = SIZES[size]
        configs = configurations(parser, KNOBS, args, preset_names(spec), base)
        settings, notes, counters = settings_for(spec, args.num_scales, args.batch_size, device, configs)
        results = time_interleaved(settings, device, warmup=args.warmup, repeats=args.repeats, memory=memory)
        if not args.no_flops:
            results = [replace(r, flops_per_batch=count()) for r, count in zip(results, counters)]
        print(f"\n{spec.label} ({spec.model}, flow head {spec.diffloss_d}x{spec.diffloss_w}, cfg {spec.cfg}, "
              f"guidance {spec.guidance}); time covers sampling + VAE decode")
        print(report(results, device, peak=not args.no_peak, memory=memory, peak_cache=peaks))
        print("\n".join(notes), flush=True)
        if hasattr(os, "getloadavg"):
            print(f"  (load average now {os.getloadavg()[0]:.1f})", flush=True)
        del settings
    return 0


if __name__ == "__main__":
    sys.exit(main())
