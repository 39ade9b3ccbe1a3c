"""FlowAR's evaluation and training plumbing behind ``eval.py`` and ``main_flowar.py`` (upstream ``engine.py``).

Evaluation: :class:`FlowARGenerator` is FlowAR as the shared loop (:func:`disa.evaluation.run_evaluation`) sees it
— per-image noise (:class:`disa.noise.PerImageNoise`), ``sample_tokens`` then the KL-16 decode under the official
fp16 autocast, uint8 images and the flow-head calls of every AR step (scale). :func:`evaluate` wires it to the loop:
official folder names (:meth:`SamplerConfig.folder_name`), class-balanced labels, metrics on every rank.

Training: the official recipe (``specs/flowar_xar.md`` §2.6, §10) on :mod:`mar_disa.engine_mar`'s generic pieces —
per-iteration lr schedule, AdamW (0.9, 0.95) without weight decay on 1-D parameters and biases, gradient clipping,
EMA after every step, checkpoints ``{model, model_ema, optimizer, epoch, scaler, args}`` — with FlowAR's own
choices: the loss in fp32 (upstream disables autocast in the forward), ImageNet augmentation resize x1.125 + random
crop + flip, VAE posterior samples x 0.2325 as targets.

Model sizes: the factories ``flowar_small/large/huge`` fix the AR transformer; the flow head comes from
``--diffloss_d/--diffloss_w`` exactly as upstream (whose defaults 12 / 1536 only fit FlowAR-H, so the official
commands pass them per size). :class:`ModelConfig` adds optional ``embed_dim`` / ``depth`` / ``num_heads`` overrides
of the AR transformer (both encoder and decoder) for tiny test models and research variants; with none of them the
factory builds exactly the official architecture.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from disa.checkpoints import CheckpointError, load_checkpoint, load_state_dict_strict
from disa.cli import UsageError, check_int_at_least
from disa.distributed import configure_cuda_backends as configure_backends
from disa.evaluation import (
    ClassBalancedLabels,
    EvalConfig,
    GeneratedBatch,
    metrics_hook,
    run_evaluation,
)
from disa.noise import PerImageNoise
from disa.vae import AutoencoderKL, to_uint8, tokens_to_latent
from flowar_disa.models import FlowAR, flowar_huge, flowar_large, flowar_small
from mar_disa.engine_mar import PRECISIONS, autocast

__all__ = [
    "MODELS",
    "PRECISIONS",
    "UsageError",
    "scales_for",
    "ModelConfig",
    "SamplerConfig",
    "FlowARGenerator",
    "describe_checkpoint",
    "load_flowar_weights",
    "configure_backends",
    "evaluate",
    "train_transform",
    "build_train_dataset",
]

MODELS: dict[str, Callable[..., FlowAR]] = {
    "flowar_small": flowar_small,
    "flowar_large": flowar_large,
    "flowar_huge": flowar_huge,
}
# The official flow-head sizes per model, for error hints (the factories default to them; the CLI does not).
_OFFICIAL_HEADS = {"flowar_small": (2, 1024), "flowar_large": (12, 1024), "flowar_huge": (12, 1536)}


def scales_for(img_size: int, vae_stride: int) -> tuple[int, ...]:
    """Token-grid sides of FlowAR's AR steps for a square latent of side ``img_size / vae_stride``: every scale
    doubles the previous one, ``(1, 2, 4, 8, 16)`` for 256 px with the KL-16 VAE (the official, fixed list)."""
    if img_size % vae_stride:
        raise ValueError(f"img_size ({img_size}) must be a multiple of vae_stride ({vae_stride})")
    side = img_size // vae_stride
    if side & (side - 1):
        raise ValueError(
            f"img_size / vae_stride = {side} must be a power of two (FlowAR's scales double from 1 up to the latent "
            f"side: 256 / 16 gives 1, 2, 4, 8, 16)"
        )
    return tuple(2**k for k in range(side.bit_length()))


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelConfig:
    """The model-building flags of ``eval.py`` / ``main_flowar.py`` (official names and defaults).

    ``diffloss_d/diffloss_w`` are passed to the factory as upstream does (12 / 1536 = FlowAR-H's head; FlowAR-S
    needs 2 / 1024 and FlowAR-L 12 / 1024). ``use_checkpoint=None`` keeps the factory's choice (on for H).
    ``embed_dim`` / ``depth`` / ``num_heads`` (not official) override the AR transformer's width, depth (encoder and
    decoder each) and heads; ``None`` keeps the ``model``'s. ``scale`` is derived from ``img_size / vae_stride``.
    """

    model: str = "flowar_large"
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 0
    diffloss_d: int = 12
    diffloss_w: int = 1536
    use_checkpoint: bool | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                check_int_at_least(name, getattr(self, name))
        scales_for(self.img_size, self.vae_stride)
        # The model's own validation of every field, overrides included: a shape-only (meta) build costs no memory
        # and well under a second even for FlowAR-H, so bad sizes fail at parse time, not after loading data.
        with torch.device("meta"):
            self.build()

    def _common_kwargs(self) -> dict[str, Any]:
        return dict(
            img_size=self.img_size, vae_stride=self.vae_stride, patch_size=self.patch_size,
            vae_embed_dim=self.vae_embed_dim, label_drop_prob=self.label_drop_prob, class_num=self.class_num,
            attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout, buffer_size=self.buffer_size,
            diffloss_d=self.diffloss_d, diffloss_w=self.diffloss_w, scale=scales_for(self.img_size, self.vae_stride),
        )

    @property
    def overridden(self) -> dict[str, int]:
        """The AR-transformer overrides as FlowAR constructor arguments (empty for the official sizes)."""
        out: dict[str, int] = {}
        for flag, names in (("embed_dim", ("encoder_embed_dim", "decoder_embed_dim")),
                            ("depth", ("encoder_depth", "decoder_depth")),
                            ("num_heads", ("encoder_num_heads", "decoder_num_heads"))):
            value = getattr(self, flag)
            if value is not None:
                out.update(dict.fromkeys(names, value))
        return out

    def build(self) -> FlowAR:
        """The model, randomly initialised on the current default device."""
        kwargs = self._common_kwargs()
        if self.use_checkpoint is not None:
            kwargs["use_checkpoint"] = self.use_checkpoint
        factory = MODELS[self.model]
        if not self.overridden:
            return factory(**kwargs)
        # The factories fix the AR sizes as keyword arguments, so an override cannot go through them: read the
        # factory's full configuration off a shape-only (meta) instance and replace the overridden fields.
        with torch.device("meta"):
            reference = factory(**kwargs)
        return FlowAR(**{**dataclasses.asdict(reference.config), **self.overridden})

    def official_head_hint(self) -> str:
        d, w = _OFFICIAL_HEADS[self.model]
        return f"the released {self.model} uses --diffloss_d {d} --diffloss_w {w}"


@dataclass(frozen=True)
class SamplerConfig:
    """How ``sample_tokens`` is called.

    DiSA (default): ``flow_upper_steps`` at the first scale annealed linearly to ``flow_lower_steps`` at the last
    (official defaults 50 -> 15). Original FlowAR: ``num_step`` at every scale (``--num_step``; the DiSA fork dropped
    the flag). ``cfg`` is the guidance scale at the last scale (ramped from 1 at the first), applied only for
    ``t <= guidance``. ``official_grid=False`` replaces the official time grid (uniform only at 50 steps, odd counts
    losing a step) by N uniform Euler steps; ``heun=True`` runs Heun's method — neither is official, and both change
    the folder name so that such images never mix with official ones.
    """

    flow_upper_steps: int = 50
    flow_lower_steps: int = 15
    num_step: int | None = None
    cfg: float = 1.0
    guidance: float = 0.9
    official_grid: bool = True
    heun: bool = False

    def __post_init__(self) -> None:
        check_int_at_least("flow_upper_steps", self.flow_upper_steps)
        check_int_at_least("flow_lower_steps", self.flow_lower_steps)
        if self.num_step is not None:
            check_int_at_least("num_step", self.num_step)
        if self.flow_lower_steps > self.flow_upper_steps:
            raise ValueError(
                f"flow_lower_steps ({self.flow_lower_steps}) must be <= flow_upper_steps ({self.flow_upper_steps}): "
                "DiSA anneals from the upper count at the first scale down to the lower one at the last"
            )
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0 (1.0 = no guidance), got {self.cfg}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance (CFG applies for t <= guidance) must be a finite number >= 0, "
                             f"got {self.guidance}")

    @property
    def original(self) -> bool:
        """True for the original FlowAR sampler (the same step count at every scale)."""
        return self.num_step is not None

    def sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`FlowAR.sample_tokens` / :meth:`FlowAR.nfe_per_ar_step`."""
        return dict(flow_upper_steps=self.flow_upper_steps, flow_lower_steps=self.flow_lower_steps,
                    num_steps=self.num_step, official_grid=self.official_grid, heun=self.heun)

    def folder_name(self, num_images: int, *, evaluate: bool, cfg: float | None = None) -> str:
        """The official sample-folder name: ``steps{U}-to-{L}-cfg{cfg}-image{N}`` (FlowAR_DiSA) or, for the original
        sampler, ``ariter{num_step}cfg{cfg}-image{N}`` (original FlowAR), plus ``_evaluate`` with ``--evaluate``.
        ``cfg`` formats like upstream's ``str(float)`` (``4.2``, ``1.0``); non-official options add a suffix."""
        cfg = self.cfg if cfg is None else cfg
        if self.original:
            name = f"ariter{self.num_step}cfg{float(cfg)}-image{num_images}"
        else:
            name = f"steps{self.flow_upper_steps}-to-{self.flow_lower_steps}-cfg{float(cfg)}-image{num_images}"
        name += ("" if self.official_grid else "-uniformgrid") + ("-heun" if self.heun else "")
        return name + ("_evaluate" if evaluate else "")


# ---------------------------------------------------------------------------------------------- generation


class FlowARGenerator:
    """FlowAR + the KL-16 decoder as a :class:`disa.evaluation.ImageGenerator`.

    ``generate(labels, seeds)``: image b's initial noise at every scale comes from ``seeds[b]`` alone (both its
    CFG rows, conditional first), so an image does not depend on its batch, rank or resume point. Upstream draws one
    ``(2B, n^2, 16)`` tensor per scale from the CPU generator seeded ``seed + rank`` instead.
    ``precision``: ``fp16`` = the official ``torch.cuda.amp.autocast()`` (fp16 on CUDA; fp32 elsewhere), ``bf16``
    (any device), ``fp32``. The sampler state stays float64 in every case, as upstream.
    ``fast_paths=False`` recomputes the flow head's condition at every flow step and decides the guidance interval
    on the host, as upstream does (the same samples, bit for bit; the reference for before/after benchmarks).
    """

    def __init__(
        self,
        model: FlowAR,
        vae: AutoencoderKL,
        sampler: SamplerConfig,
        *,
        device: torch.device | str,
        precision: str = "fp16",
        fast_paths: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        self.model, self.vae, self.sampler = model, vae, sampler
        self.device, self.precision, self.fast_paths = torch.device(device), precision, fast_paths
        self.nfe_per_ar_step = tuple(model.nfe_per_ar_step(**sampler.sample_kwargs()))

    def sample_latents(self, labels: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Latent tokens (B, 16, h, w) (times 0.2325) for ``labels`` (B,), noise from ``seeds``."""
        s = self.sampler
        with autocast(self.device, self.precision):
            return self.model.sample_tokens(
                s.flow_upper_steps, s.flow_lower_steps, s.guidance, s.cfg, labels.to(self.device),
                num_steps=s.num_step, noise=PerImageNoise(seeds), official_grid=s.official_grid, heun=s.heun,
                cache_condition=self.fast_paths, sync_free_guidance=self.fast_paths,
            )

    def generate(self, conditions: torch.Tensor, seeds: Sequence[int]) -> GeneratedBatch:
        tokens = self.sample_latents(conditions, seeds)  # (B, 16, h, w)
        with autocast(self.device, self.precision):
            images = self.vae.decode(tokens_to_latent(tokens))  # (B, 3, H, W) in [-1, 1]
        return GeneratedBatch(images=to_uint8(images), nfe_per_ar_step=self.nfe_per_ar_step)


# ---------------------------------------------------------------------------------------------- weights


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> str:
    """What a FlowAR state dict holds, in CLI terms (AR width and depth, flow-head depth x width and type)."""

    def depth(prefix: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    parts = []
    if "class_emb.weight" in state:
        rows, width = state["class_emb.weight"].shape
        parts.append(f"AR width {width}, {depth('encoder_blocks')} + {depth('decoder_blocks')} blocks, "
                     f"{rows - 1} classes")
    if "flownet.input_proj.weight" in state:
        head = "v2 (cross-attention, as L/H)" if any(".crossattn." in k for k in state) else "v1 (as S)"
        parts.append(f"flow head {depth('flownet.res_blocks')} x {state['flownet.input_proj.weight'].shape[0]} "
                     f"(--diffloss_d x --diffloss_w), type {head}")
    return "; ".join(parts) or "no FlowAR keys"


def load_flowar_weights(model: FlowAR, path: str | os.PathLike[str], model_config: ModelConfig) -> Path:
    """Load ``path`` into ``model`` strictly: a flat state dict (the released FlowAR-*.pth) or a training
    checkpoint, whose EMA weights are taken (``model_ema``, as the official evaluation generates with them).

    Raises :class:`CheckpointError` (missing file, unreadable file, any missing / unexpected / mis-shaped key, or
    stored ``mask`` / ``rope.freqs`` buffers that differ from the ones this configuration computes), with a hint at
    the size flags when the file is another FlowAR size. Never leaves random weights in place silently.
    """
    file = Path(path)
    state = load_checkpoint(file)
    try:
        load_state_dict_strict(model, state, what=f"checkpoint {os.fspath(file)!r}")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}\n  The file holds: {describe_checkpoint(state)}.\n  This model ({model_config.model} with "
            f"--diffloss_d {model_config.diffloss_d} --diffloss_w {model_config.diffloss_w}) expects: "
            f"{describe_checkpoint(model.state_dict())}; {model_config.official_head_hint()}."
        ) from None
    try:
        model.check_buffers()
    except ValueError as err:
        raise CheckpointError(f"checkpoint {os.fspath(file)!r}: {err}") from None
    return file


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    generator: FlowARGenerator,
    config: EvalConfig,
    labels: ClassBalancedLabels,
    *,
    model_config: Mapping[str, Any],
    metrics: Any | None = None,
) -> dict[str, Any]:
    """Generate ``config.num_images`` images for ``labels`` into ``config.sample_dir`` through the shared loop, then
    the metrics; returns the results dict (also ``results.json`` in the folder).

    ``metrics``: a :class:`disa.metrics.MetricsConfig`, checked on rank 0 before any image is generated (so a missing
    statistics file fails in seconds, not after the run), or ``None`` for no metrics. ``model_config``: everything
    the images depend on (a resume with other values is refused). Raises :class:`EvaluationError` for bad input.
    """
    metrics_fn = metrics_hook(metrics)
    generator.model.eval()
    return run_evaluation(generator, config, conditions=labels, model_config=model_config, metrics_fn=metrics_fn,
                          device=generator.device)


# ---------------------------------------------------------------------------------------------- training


def train_transform(img_size: int) -> Callable[[Any], torch.Tensor]:
    """The official augmentation (DiT / ADM): resize the short side to 1.125 x img_size, random crop, horizontal
    flip, to [-1, 1]. Upstream hard-codes 256 (identical at the official img_size)."""
    import torchvision.transforms as T

    return T.Compose([
        T.Resize(int(img_size * 1.125)),
        T.RandomCrop((img_size, img_size)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def build_train_dataset(data_path: str | os.PathLike[str], img_size: int, class_num: int) -> Any:
    """``ImageFolder(<data_path>/train)`` with :func:`train_transform` (upstream reads images, not cached latents).
    Raises :class:`UsageError` when the folder is missing or has more classes than ``class_num``."""
    import torchvision.datasets as datasets

    root = Path(data_path) / "train"
    if not root.is_dir():
        raise UsageError(
            f"training images not found: {os.fspath(root)!r} is not a folder (--data_path must hold train/<class>/"
            "<images>, the ImageNet layout)"
        )
    try:
        dataset = datasets.ImageFolder(os.fspath(root), transform=train_transform(img_size))
    except (FileNotFoundError, RuntimeError) as err:  # torchvision: no class folders / no images
        raise UsageError(f"cannot read training images in {os.fspath(root)!r}: {err}") from None
    if len(dataset.classes) > class_num:
        raise UsageError(
            f"{os.fspath(root)!r} has {len(dataset.classes)} class folders but --class_num is {class_num}"
        )
    return dataset
