"""Run under ``torchrun`` (gloo, CPU) by tests/test_metrics.py: disa.metrics on every rank, each rank's results to
``<out>/rank<r>.json``. Uses the cheap test extractor: what is checked is the sharding and the reductions."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

import metrics_helpers
from disa.metrics import MetricsConfig, compute_metrics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--reference_images", type=Path, required=True)
    p.add_argument("--fid_stats", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dist.init_process_group("gloo", init_method="env://")
    common = dict(extractor=metrics_helpers.PIXEL_PROJ, reference_images=args.reference_images, device="cpu",
                  batch_size=16, num_workers=0, kid_subset_size=40, kid_subsets=20)
    with_stats = compute_metrics(args.samples, MetricsConfig(fid_stats=args.fid_stats, kid=True, prc=True, **common))
    with_folder = compute_metrics(args.samples, MetricsConfig(isc=False, **common))
    out = {"world_size": dist.get_world_size(), "stats_file": with_stats, "folder": with_folder}
    if dist.get_rank() == 0:  # the official habit: metrics on rank 0 only; must not wait for the other ranks
        out["rank0_alone"] = compute_metrics(args.samples, MetricsConfig(isc=False, distributed=False, **common))
    dist.barrier()
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
