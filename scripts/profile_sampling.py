"""Where sampling time goes, per family: transformer passes, the diffusion/flow head loop, VAE decode, the rest of
the sampler, host overhead and host synchronisations, from one ``torch.profiler`` run.

    python scripts/profile_sampling.py mar                   # MAR-B, DiSA 50->5, 8 AR steps, batch 1, on the CPU
    python scripts/profile_sampling.py all --device cuda     # every family on a GPU
    python scripts/profile_sampling.py xar --steps 50 15     # xAR-B at its official flow steps

Real model sizes with random weights, run through the same generators as the evaluation (:mod:`disa.benchmark`'s
families). The sizes and step counts that a CPU cannot afford are reduced, and every output line says how (``--ar``
and ``--steps`` change them). The model's parts are wrapped in ``record_function`` regions without touching its code
(each wrapped method becomes an instance attribute for the run). After one untimed warm-up call, one profiled call
gives, as fractions of its wall time:

* each region's share (inclusive: everything under it);
* "other sampler work": the wall time outside every region (token bookkeeping, CFG mixing, noise, the sampler's
  element-wise updates and their host overhead);
* "host overhead": wall time not covered by any top-level torch operator, in and out of regions (Python, module
  calls, dispatch between kernels; on a GPU this also holds the time the host waits);
* host syncs: ``aten::_local_scalar_dense`` calls (what ``.item()``, ``int(tensor)``, ``bool(tensor)`` run; each
  waits for the device) and ``aten::item`` calls, per image.

On a shared machine the absolute times move with the load; the fractions are the reliable part.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from disa.benchmark import machine_line, resolve_device
from disa.distributed import synchronize
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

FAMILIES = ("mar", "flowar", "xar", "harmon")
REGION = "region: "


@dataclass
class Target:
    """One family's profiled call: ``run()`` generates one batch; ``regions`` maps a region name to the
    ``(object, method name)`` pairs timed under it; ``setting`` says what runs and what was reduced."""

    run: Callable[[], Any]
    regions: dict[str, list[tuple[Any, str]]]
    setting: str
    batch_size: int


@contextlib.contextmanager
def regions(spec: dict[str, list[tuple[Any, str]]]) -> Iterator[None]:
    """Run every listed method under ``record_function(REGION + name)``, restoring them afterwards."""
    patched = []

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(REGION + name):
                return fn(*args, **kwargs)

        return wrapped

    try:
        for name, places in spec.items():
            for obj, attr in places:
                had_own = attr in vars(obj)
                patched.append((obj, attr, had_own, vars(obj).get(attr)))
                setattr(obj, attr, wrap(name, getattr(obj, attr)))
        yield
    finally:
        for obj, attr, had_own, own in reversed(patched):
            if had_own:
                setattr(obj, attr, own)
            else:
                delattr(obj, attr)


# ---------------------------------------------------------------------------------------------- families


def mar_target(device: torch.device, ar: int | None, steps: Sequence[int] | None, batch: int) -> Target:
    from disa.evaluation import image_seed
    from disa.vae import AutoencoderKL
    from mar_disa.benchmark import CFG, HEADS
    from mar_disa.engine_mar import MARGenerator
    from mar_disa.main_mar import ModelConfig, SamplerConfig, build_model

    num_iter, (upper, lower) = ar or 8, steps or (50, 5)
    with device:
        model = build_model(ModelConfig(model="mar_base", diffloss_d=HEADS["mar_base"][0],
                                        diffloss_w=HEADS["mar_base"][1]),
                            SamplerConfig(num_iter=num_iter, cfg=CFG["mar_base"], diff_sampler="DiSA",
                                          diff_upper_steps=upper, diff_lower_steps=lower)).eval()  # fmt: skip
        vae = AutoencoderKL(with_encoder=False).eval()
    generator = MARGenerator(model, vae, num_iter=num_iter, cfg=CFG["mar_base"], precision="fp16")
    labels, seeds = torch.arange(batch) % 1000, [image_seed(0, i, batch) for i in range(batch)]
    return Target(
        lambda: generator.generate(labels, seeds),
        {"transformer (MAE encoder + decoder)": [(model, "forward_mae_encoder"), (model, "forward_mae_decoder")],
         "diffusion head MLP": [(model.diffloss.net, "forward")],
         "VAE decode": [(vae, "decode")]},
        f"MAR-B (real size, head 6x1024), DiSA {upper}->{lower}, cfg 2.9, {num_iter} AR steps "
        f"(official: 64), batch {batch}",
        batch,
    )  # fmt: skip


def flowar_target(device: torch.device, ar: int | None, steps: Sequence[int] | None, batch: int) -> Target:
    from disa.vae import AutoencoderKL
    from flowar_disa.benchmark import SIZES
    from flowar_disa.engine_flowar import (
        FlowARGenerator,
        ModelConfig,
        SamplerConfig,
        configure_backends,
    )

    spec, scales = SIZES["small"], ar or 3
    upper, lower = steps or spec.disa_steps
    configure_backends(device)
    with device:
        model = ModelConfig(model=spec.model, img_size=16 * 2 ** (scales - 1), vae_stride=16,
                            diffloss_d=spec.diffloss_d, diffloss_w=spec.diffloss_w).build().eval()  # fmt: skip
        vae = AutoencoderKL(with_encoder=False).eval()
    generator = FlowARGenerator(model, vae, SamplerConfig(upper, lower, cfg=spec.cfg, guidance=spec.guidance),
                                device=device, precision="fp16")  # fmt: skip
    labels, seeds = torch.arange(batch, device=device) * 97 % 1000, list(range(batch))
    return Target(
        lambda: generator.generate(labels, seeds),
        {"transformer (MAE encoder + decoder)": [(model, "forward_mae_encoder"), (model, "forward_mae_decoder")],
         "flow head (flownet)": [(model.flownet, "forward")],
         "VAE decode": [(vae, "decode")]},
        f"FlowAR-S (real size, head {spec.diffloss_d}x{spec.diffloss_w}), DiSA {upper}->{lower}, cfg {spec.cfg}, "
        f"{scales} scales = {16 * 2 ** (scales - 1)} px (official: 5 scales, 256 px), batch {batch}",
        batch,
    )  # fmt: skip


def xar_target(device: torch.device, ar: int | None, steps: Sequence[int] | None, batch: int) -> Target:
    from disa.vae import AutoencoderKL
    from xar_disa.benchmark import README_CFG
    from xar_disa.engine_xar import ModelConfig, SamplerConfig, XARGenerator

    if ar is not None:
        raise SystemExit("xar: the number of cells (AR steps) is fixed by the model (4); use --steps")
    upper, lower = steps or (10, 3)
    with device:
        model = ModelConfig(model="xar_base").build().eval()
        vae = AutoencoderKL(with_encoder=False).eval()
    sampler = SamplerConfig(flow_upper_steps=upper, flow_lower_steps=lower, cfg=README_CFG["xar_base"])
    generator = XARGenerator(model, vae, sampler, device=device, precision="fp16")
    labels, seeds = torch.arange(batch, device=device) % 1000, list(range(batch))

    def run() -> Any:
        with torch.no_grad():
            return generator.generate(labels, seeds)

    return Target(
        run,
        {"xAR network: encoder (every flow step)": [(model, "forward_mae_encoder")],
         "xAR network: decoder (every flow step)": [(model, "forward_mae_decoder")],
         "VAE decode": [(vae, "decode")]},
        f"xAR-B (real size), DiSA {upper}->{lower} flow steps per cell (official: 50->15), 4 cells, cfg "
        f"{README_CFG['xar_base']}, batch {batch}",
        batch,
    )  # fmt: skip


def harmon_target(device: torch.device, ar: int | None, steps: Sequence[int] | None, batch: int) -> Target:
    from harmon_disa.scripts import benchmark as harmon_bench

    if steps is not None:
        raise SystemExit("harmon: the head's steps come from the shipped configs (DiSA 50->5 here); use --ar")
    num_iter, side = ar or 4, 16  # 256 px
    torch.manual_seed(0)
    model = harmon_bench.build_model("0.5b", None, device, torch.float32)
    model.mar.diffloss = harmon_bench.head_for(model, harmon_bench.SETTINGS["disa_50_5"])
    rows = 2 * batch
    ids = torch.randint(0, 151643, (rows, 24), device=device)
    mask = torch.ones(rows, 24, dtype=torch.bool, device=device)

    def run() -> Any:
        with torch.no_grad():
            return model.sample(ids, mask, num_iter=num_iter, cfg=3.0, image_shape=(side, side))

    return Target(
        run,
        {"LLM (Qwen2.5-0.5B)": [(model.llm.model, "forward")],
         "MAE encoder + decoder": [(model.mar, "forward_mae_encoder"), (model.mar, "forward_mae_decoder")],
         "diffusion head MLP": [(model.mar.diffloss.net, "forward")],
         "VAE decode": [(model.vae, "decode")]},
        f"Harmon-0.5B (real size, MAR-B head), DiSA 50->5, cfg 3.0, 256 px, {num_iter} AR steps (official: 512 px, "
        f"64 AR steps), 24 prompt tokens, batch {batch}",
        batch,
    )  # fmt: skip


TARGETS = {"mar": mar_target, "flowar": flowar_target, "xar": xar_target, "harmon": harmon_target}


# ---------------------------------------------------------------------------------------------- analysis


def _is_op(e: FunctionEvent) -> bool:
    return not e.name.startswith(REGION) and not e.name.startswith("ProfilerStep")


def _top_level_ops(events: Sequence[FunctionEvent]) -> list[FunctionEvent]:
    """Operators whose parent chain holds no other operator (only regions): their times do not overlap."""
    out = []
    for e in events:
        if not _is_op(e):
            continue
        parent = e.cpu_parent
        while parent is not None and not _is_op(parent):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


def breakdown(events: Sequence[FunctionEvent], wall_us: float, batch: int) -> list[tuple[str, float, str]]:
    """Rows ``(what, fraction of wall time, note)``."""
    rows = []
    inside = 0.0
    names = sorted({e.name for e in events if e.name.startswith(REGION)})
    top = _top_level_ops(events)
    for name in names:
        spans = [e for e in events if e.name == name and not _nested_in_same(e)]
        total = sum(e.cpu_time_total for e in spans)
        inside += total
        rows.append((name.removeprefix(REGION), total / wall_us, f"{len(spans) / batch:.0f} calls/img"))
    rows.append(("other sampler work (outside the regions)", max(wall_us - inside, 0.0) / wall_us, ""))
    op_time = sum(e.cpu_time_total for e in top)
    rows.append(("host overhead (no torch operator running)", max(wall_us - op_time, 0.0) / wall_us,
                 f"{len(top) / batch:.0f} top-level ops/img"))  # fmt: skip
    syncs = sum(e.name == "aten::_local_scalar_dense" for e in events)
    items = sum(e.name == "aten::item" for e in events)
    rows.append(("host syncs", float("nan"), f"{syncs / batch:.0f} aten::_local_scalar_dense/img, "
                 f"{items / batch:.0f} aten::item/img"))  # fmt: skip
    return rows


def _nested_in_same(e: FunctionEvent) -> bool:
    parent = e.cpu_parent
    while parent is not None:
        if parent.name == e.name:
            return True
        parent = parent.cpu_parent
    return False


def profile_family(family: str, device: torch.device, ar: int | None, steps: Sequence[int] | None,
                   batch: int) -> str:  # fmt: skip
    target = TARGETS[family](device, ar, steps, batch)
    target.run()  # warm-up: allocator, lazily built tables, kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with regions(target.regions):
        synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            target.run()
            synchronize(device)
            wall = time.perf_counter() - start
    events = list(prof.events())
    lines = [f"## {family}: {target.setting}", f"profiled wall time {wall:.2f} s on {machine_line(device)}", "",
             "| part | share of wall time | note |", "|---|---:|---|"]  # fmt: skip
    for what, fraction, note in breakdown(events, wall * 1e6, target.batch_size):
        share = "" if math.isnan(fraction) else f"{100 * fraction:.1f}%"  # NaN: a count, not a share
        lines.append(f"| {what} | {share} | {note} |")
    top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:8]
    lines += ["", "top operators by self CPU time: " + ", ".join(
        f"{a.key} {100 * a.self_cpu_time_total / (wall * 1e6):.1f}%" for a in top)]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=(*FAMILIES, "all"))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--ar", type=int, default=None,
                        help="AR steps (MAR, Harmon) or scales (FlowAR) instead of the reduced defaults (8, 4, 3)")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("UPPER", "LOWER"),
                        help="DiSA head steps (MAR 50 5, FlowAR 25 15, xAR 10 3 by default)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1) or (args.ar is not None and args.ar < 2):
        parser.error("--batch_size and --threads must be >= 1, --ar >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for family in FAMILIES if args.family == "all" else (args.family,):
        print(profile_family(family, device, args.ar, args.steps, args.batch_size), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
