"""Helpers for tests/test_metrics.py and tests/metrics_dist_worker.py.

* :class:`PixelProjectionExtractor` — a cheap, deterministic torch-fidelity extractor ("test-pixel-proj"): it makes
  pipeline parity tests (our sharded, float64 path against torch-fidelity's own) take milliseconds instead of the
  minutes a real network would take on a 2-core CPU. It measures nothing about image quality.
* :func:`write_pngs` — a folder of numbered PNGs, as the evaluation loop writes them.
* :func:`random_inception_weights` — a state dict file in torch-fidelity's Inception-v3 format with *random*
  weights (batch-norm statistics calibrated on real images so activations do not vanish): it exercises the FID
  code path offline; the numbers it gives are not FID.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

PIXEL_PROJ = "test-pixel-proj"


class PixelProjectionExtractor(FeatureExtractorBase):
    """uint8 (B, 3, H, W) -> 8x8 average-pooled pixels -> fixed random projections: "24" features, "logits" (10)."""

    def __init__(self, name: str, features_list: Sequence[str], **kwargs: Any) -> None:
        super().__init__(name, list(features_list))
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 24, generator=gen) / 8.0)  # (192, 24)
        self.register_buffer("head", torch.randn(24, 10, generator=gen))  # (24, 10)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("24", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "24"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = F.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)  # (B, 192)
        feats = torch.tanh(pooled @ self.proj)  # (B, 24)
        out = {"24": feats, "logits": feats @ self.head}  # logits (B, 10)
        return tuple(out[name] for name in self.features_list)


if PIXEL_PROJ not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(PIXEL_PROJ, PixelProjectionExtractor)


def write_pngs(folder: Path, images: np.ndarray | torch.Tensor) -> Path:
    """Write uint8 images, grayscale (N, H, W) or RGB (N, 3, H, W), as ``folder/00000.png`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(images)
    if arr.ndim == 4:
        arr = arr.transpose(0, 2, 3, 1)  # (N, H, W, 3)
    for i, img in enumerate(arr):
        Image.fromarray(np.ascontiguousarray(img)).save(folder / f"{i:05d}.png")
    return folder


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with the constructor's weight loading skipped (keeps PyTorch's random init)."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return None


def random_inception_weights(path: Path, calibration_images: torch.Tensor) -> Path:
    """Save random Inception-v3 weights in the format ``FeatureExtractorInceptionV3`` loads (strictly).

    Random init makes activations vanish through ~90 layers (every metric would be exactly 0), so the batch-norm
    running statistics are re-estimated from ``calibration_images`` (uint8 (N, 3, H, W)) first.
    """
    empty = path.with_suffix(".empty.pt")
    torch.save({}, empty)
    torch.manual_seed(0)
    net = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
            module.train()
    with torch.no_grad():
        net(calibration_images)
    net.eval()
    torch.save(torch.nn.Module.state_dict(net), path)
    empty.unlink()
    return path
