"""Time per image and NFE of FlowAR-S/L/H, original sampler against DiSA, side by side in one run.

    python -m flowar_disa.benchmark                          # S, L, H at full size, batch 1, CUDA if available
    python scripts/benchmark.py flowar --sizes small --num_scales 3

Real model sizes with random weights (the arithmetic does not depend on the values) and a random full-size KL-16
decoder. Each size runs the official README settings: the original sampler (``--num_step`` 25 for S/L, 50 for H)
and DiSA (25 -> 15 for S/L, 50 -> 15 for H) with the README's cfg and guidance, through the same
:class:`~flowar_disa.engine_flowar.FlowARGenerator` as the evaluation (sampling + VAE decode, the span the official
code times). :func:`measure` times the settings in interleaved rounds with :mod:`disa.benchmark`'s timer (device
synchronised, warm-up untimed), counts their FLOPs with ``torch.utils.flop_counter`` and prints the measured speed-up
next to the FLOP ratio (:func:`disa.benchmark.format_table`).

``--num_scales K`` (not the official model) keeps the network sizes but generates only the first K scales
(img_size = 16 * 2^(K-1)), for machines where the full 256 px run is too slow (the CPU figures in the README). DiSA's
schedule then anneals over K scales (T = K - 1), so the ratios differ from the 5-scale ones.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from disa.benchmark import Measurement, Setting, count_flops, format_table, time_batches
from disa.vae import AutoencoderKL
from flowar_disa.engine_flowar import PRECISIONS, FlowARGenerator, ModelConfig, SamplerConfig, configure_backends

__all__ = ["SizeSpec", "SIZES", "settings_for", "measure", "main"]


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
                 precision: str) -> tuple[list[Setting], list[str]]:
    """The original and DiSA settings of one size (sharing one randomly initialised model and decoder), and a line
    per setting with its flow-head calls per scale."""
    stride = 16
    model_cfg = ModelConfig(model=spec.model, img_size=stride * 2 ** (num_scales - 1), vae_stride=stride,
                            diffloss_d=spec.diffloss_d, diffloss_w=spec.diffloss_w)
    with torch.device(device):
        model = model_cfg.build().eval()
        vae = AutoencoderKL(with_encoder=False).eval()
    labels = torch.arange(batch_size) * 97 % 1000  # (B,) arbitrary classes
    seeds = list(range(batch_size))
    samplers = {
        f"original {spec.original_steps} steps": SamplerConfig(num_step=spec.original_steps, cfg=spec.cfg,
                                                                guidance=spec.guidance),
        f"DiSA {spec.disa_steps[0]}->{spec.disa_steps[1]}": SamplerConfig(*spec.disa_steps, cfg=spec.cfg,
                                                                            guidance=spec.guidance),
    }
    settings, notes = [], []
    for name, sampler in samplers.items():
        generator = FlowARGenerator(model, vae, sampler, device=device, precision=precision)

        def generate(generator: FlowARGenerator = generator) -> float:
            out = generator.generate(labels, seeds)
            return float(sum(out.nfe_per_ar_step))  # sequential flow-head calls per image

        settings.append(Setting(name, generate, batch_size))
        notes.append(f"  {name}: flow-head calls per scale {list(generator.nfe_per_ar_step)}")
    return settings, notes


def measure(settings: Sequence[Setting], device: torch.device, *, rounds: int, warmup: int, repeats: int,
            flops: bool) -> list[Measurement]:
    """Like :func:`disa.benchmark.run_settings`, but in ``rounds`` interleaved rounds (A B, B A, A B, ...) keeping
    each setting's fastest round: on a shared machine a slow spell then hits both settings alike instead of whichever
    ran during it (the minimum is the usual estimator under noise, as ``timeit`` uses). One warm-up before the
    first round; FLOPs counted once per setting."""
    best = {s.name: float("inf") for s in settings}
    nfe = {s.name: 0.0 for s in settings}
    for r in range(rounds):
        for s in (settings if r % 2 == 0 else list(reversed(settings))):
            seconds, nfe[s.name] = time_batches(s.generate, device, warmup=warmup if r == 0 else 0, repeats=repeats)
            best[s.name] = min(best[s.name], seconds)
    return [
        Measurement(s.name, best[s.name] / s.batch_size, nfe[s.name],
                    count_flops(s.generate) / s.batch_size / 1e12 if flops else None)
        for s in settings
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowar_disa.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="models to time")
    p.add_argument("--batch_size", type=int, default=1, help="images per batch")
    p.add_argument("--num_scales", type=int, default=5, choices=range(1, 6), metavar="{1..5}",
                   help="scales to generate (5 = the real 256 px model; fewer for slow machines)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="fp16 = the official autocast on CUDA (fp32 on the CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before timing each setting")
    p.add_argument("--repeats", type=int, default=1, help="timed batches per setting and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved timing rounds; the fastest round of each setting is reported")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count (one batch less per setting)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.batch_size, args.repeats, args.rounds, args.threads or 1) < 1 or args.warmup < 0:
        _parser().error("need --batch_size, --repeats, --rounds, --threads >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    logging.basicConfig(level=logging.WARNING)
    configure_backends(device)
    side = 2 ** (args.num_scales - 1)
    # CPU timings depend on what else runs: print the machine's load next to them.
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    print(f"FlowAR benchmark on {device} ({torch.get_num_threads()} threads on the CPU{load}), precision "
          f"{args.precision}, batch {args.batch_size}, {args.num_scales} scales (latent {side}x{side}, {16 * side} px)"
          + ("" if args.num_scales == 5 else " -- reduced: the real model generates 5 scales"), flush=True)
    for size in args.sizes:
        spec = SIZES[size]
        settings, notes = settings_for(spec, args.num_scales, args.batch_size, device, args.precision)
        results = measure(settings, device, rounds=args.rounds, warmup=args.warmup, repeats=args.repeats,
                          flops=not args.no_flops)
        print(f"\n{spec.label} ({spec.model}, flow head {spec.diffloss_d}x{spec.diffloss_w}, cfg {spec.cfg}, "
              f"guidance {spec.guidance}); time covers sampling + VAE decode")
        print(format_table(results))
        print("\n".join(notes), flush=True)
        if hasattr(os, "getloadavg"):
            print(f"  (load average now {os.getloadavg()[0]:.1f})", flush=True)
        del settings
    return 0


if __name__ == "__main__":
    sys.exit(main())
