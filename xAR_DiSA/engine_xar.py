"""xAR's evaluation and training plumbing behind ``eval.py`` and ``main_xar.py`` (upstream ``engine_xar.py``).

Evaluation: :class:`XARGenerator` is xAR as the shared loop (:func:`disa.evaluation.run_evaluation`) sees it —
per-image noise (:class:`disa.noise.PerImageNoise`: every cell's initial noise and every Euler–Maruyama step's noise
of image ``k`` come from its seed alone), ``sample_tokens`` then the KL-16 decode under the official fp16 autocast,
uint8 images, and the network evaluations of every AR step (cell). :func:`evaluate` wires it to the loop: official
folder names (:meth:`SamplerConfig.folder_name`), class-balanced labels (or the null class), metrics on every rank.

Training: the official recipe (``specs/flowar_xar.md`` §3.5, §10) on :mod:`mar_disa.engine_mar`'s generic pieces
(per-iteration lr schedule, :func:`~mar_disa.engine_mar.train_one_epoch` with autocast and loss scaling, EMA after
every step, checkpoints ``{model, model_ema, optimizer, epoch, scaler, args}``) with xAR's own choices: AdamW betas
(0.9, 0.96) (:func:`build_optimizer`), gradient clipping at 1.0, VAE posterior samples x 0.2325 as targets read from
MAR's latent cache (``--use_cached``, the README's) or encoded from ImageNet images (:func:`build_train_dataset`,
MAR's ADM centre crop + flip). The loss itself is ``xAR.forward`` (noisy-context flow
matching, logit-normal times per cell).

Model sizes: the factories ``xar_base/large/huge`` fix the transformer. :class:`ModelConfig` adds optional
``embed_dim`` / ``depth`` / ``num_heads`` overrides (encoder and decoder alike) for tiny test models and research
variants; with none of them the factory builds exactly the official architecture.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torchvision.datasets as datasets
from torch import nn
from torch.utils.data import Dataset

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
from disa.guidance import check_cfg
from disa.noise import PerImageNoise
from disa.vae import AutoencoderKL, to_uint8, tokens_to_latent
from mar_disa.engine_mar import PRECISIONS, CachedFolder, autocast, image_transform, param_groups
from xar_disa.models.xar import CellPlan, xAR, xar_base, xar_huge, xar_large

__all__ = [
    "MODELS",
    "PRECISIONS",
    "ADAMW_BETAS",
    "UsageError",
    "ModelConfig",
    "SamplerConfig",
    "NullLabels",
    "XARGenerator",
    "describe_checkpoint",
    "read_xar_weights",
    "load_xar_weights",
    "configure_backends",
    "evaluate",
    "build_optimizer",
    "build_train_dataset",
]

MODELS: dict[str, Callable[..., xAR]] = {"xar_base": xar_base, "xar_large": xar_large, "xar_huge": xar_huge}
# xAR's training recipe (spec §10); MAR uses (0.9, 0.95).
ADAMW_BETAS = (0.9, 0.96)


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelConfig:
    """The model-building flags of ``eval.py`` / ``main_xar.py`` (official names and defaults).

    ``embed_dim`` / ``depth`` / ``num_heads`` (not official) override the transformer's width, depth (encoder and
    decoder each) and heads; ``None`` keeps the ``model``'s. The MLP ratio stays the factories' 4.
    """

    model: str = "xar_large"
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                check_int_at_least(name, getattr(self, name))
        # The model validates every field itself (layout, dropout, class count, width vs heads). A shape-only
        # (meta) build costs no memory and well under a second even for xAR-H, so bad values fail at parse time.
        self.probe()

    def _common_kwargs(self) -> dict[str, Any]:
        return dict(
            img_size=self.img_size, vae_stride=self.vae_stride, patch_size=self.patch_size,
            vae_embed_dim=self.vae_embed_dim, label_drop_prob=self.label_drop_prob, class_num=self.class_num,
            attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
        )

    @property
    def overridden(self) -> dict[str, int]:
        """The size overrides as xAR constructor arguments (empty for the official sizes)."""
        out: dict[str, int] = {}
        for flag, names in (("embed_dim", ("encoder_embed_dim", "decoder_embed_dim")),
                            ("depth", ("encoder_depth", "decoder_depth")),
                            ("num_heads", ("encoder_num_heads", "decoder_num_heads"))):
            value = getattr(self, flag)
            if value is not None:
                out.update(dict.fromkeys(names, value))
        return out

    def build(self) -> xAR:
        """The model, randomly initialised (official init) on the current default device."""
        factory, kwargs = MODELS[self.model], self._common_kwargs()
        if not self.overridden:
            return factory(**kwargs)
        # The factories fix the sizes as keyword arguments, so an override cannot go through them: read the
        # factory's sizes off a shape-only (meta) instance and replace the overridden ones.
        with torch.device("meta"):
            ref = factory(**kwargs)
        sizes = dict(
            encoder_embed_dim=ref.class_emb.embedding_dim, encoder_depth=len(ref.encoder_blocks),
            encoder_num_heads=ref.encoder_blocks[0].attn.num_heads, decoder_embed_dim=ref.pred.in_features,
            decoder_depth=len(ref.decoder_blocks), decoder_num_heads=ref.decoder_blocks[0].attn.num_heads,
        )
        return xAR(**kwargs, **{**sizes, **self.overridden})

    def probe(self) -> xAR:
        """A shape-only (meta) instance: for validation, sampling plans and FLOP counts without memory."""
        with torch.device("meta"):
            return self.build()

    def describe(self) -> str:
        extra = ", ".join(f"--{k} {v}" for k in ("embed_dim", "depth", "num_heads") if (v := getattr(self, k)))
        return self.model + (f" with {extra}" if extra else "")


@dataclass(frozen=True)
class SamplerConfig:
    """How ``sample_tokens`` is called.

    DiSA (default): ``flow_upper_steps`` flow steps for the first cell annealed linearly to ``flow_lower_steps``
    for the last (official defaults 50 -> 15: 50, 38, 26, 15 network evaluations). Original xAR: ``num_steps`` for
    every cell (``--num_steps``; the DiSA fork dropped the flag). ``cfg``: the guidance scale at the last cell
    (ramped from 1 at the first). ``official_short_grids=False`` fixes the official handling of cells with 2 steps
    (see ``xAR.sample_tokens``); ``unconditional`` samples the null class through ``sample_tokens(label=None)``
    (which crashed upstream). Both are not official and change the folder name.
    """

    flow_upper_steps: int = 50
    flow_lower_steps: int = 15
    num_steps: int | None = None
    cfg: float = 1.0
    official_short_grids: bool = True
    unconditional: bool = False

    def __post_init__(self) -> None:
        check_int_at_least("flow_upper_steps", self.flow_upper_steps)
        check_int_at_least("flow_lower_steps", self.flow_lower_steps)
        if self.num_steps is not None:
            check_int_at_least("num_steps", self.num_steps)
        if self.flow_lower_steps > self.flow_upper_steps:
            raise ValueError(
                f"flow_lower_steps ({self.flow_lower_steps}) must be <= flow_upper_steps ({self.flow_upper_steps}): "
                "DiSA anneals from the upper count at the first cell down to the lower one at the last"
            )
        check_cfg(self.cfg)
        if self.unconditional and self.cfg != 1.0:
            raise ValueError(
                f"unconditional sampling has no class to guide towards: it needs cfg 1.0, got {self.cfg}"
            )

    @property
    def original(self) -> bool:
        """True for the original xAR sampler (the same step count for every cell)."""
        return self.num_steps is not None

    @property
    def steps(self) -> tuple[int, int]:
        """(upper, lower) step counts actually used: ``(N, N)`` for the original sampler."""
        if self.num_steps is not None:
            return self.num_steps, self.num_steps
        return self.flow_upper_steps, self.flow_lower_steps

    def plan(self, model: xAR) -> list[CellPlan]:
        """Per-cell steps, guidance and costs; ValueError for settings the sampler refuses (fewer than 2 steps in a
        cell, or the official 2-step grid in a middle cell, which crashes upstream)."""
        upper, lower = self.steps
        return model.sampling_plan(upper, lower, self.cfg, official_short_grids=self.official_short_grids)

    def nfe_per_ar_step(self, model: xAR) -> tuple[int, ...]:
        return tuple(p.network_evals for p in self.plan(model))

    def folder_name(self, num_images: int, *, num_iter: int, evaluate: bool) -> str:
        """The official sample-folder name: ``step{U}-to-{L}-cfg{cfg}-image{N}`` (xAR_DiSA) or, for the original
        sampler, ``iter{num_iter}-cfg{cfg}-image{N}`` (original xAR, whose ``--num_iter`` only shows up here), plus
        ``_evaluate`` with ``--evaluate``. ``cfg`` formats like upstream's ``str(float)`` (``2.7``, ``1.0``);
        non-official options add a suffix so that such images never mix with official ones."""
        cfg = float(self.cfg)
        if self.original:
            name = f"iter{num_iter}-cfg{cfg}-image{num_images}"
        else:
            name = f"step{self.flow_upper_steps}-to-{self.flow_lower_steps}-cfg{cfg}-image{num_images}"
        name += ("" if self.official_short_grids else "-fixedgrids") + ("-uncond" if self.unconditional else "")
        return name + ("_evaluate" if evaluate else "")


@dataclass(frozen=True)
class NullLabels:
    """Conditions of an unconditional run: no class. (The generator samples ``sample_tokens(label=None)``.)"""

    def __call__(self, ids: Sequence[int]) -> int:
        return len(ids)


# ---------------------------------------------------------------------------------------------- generation


class XARGenerator:
    """xAR + the KL-16 decoder as a :class:`disa.evaluation.ImageGenerator`.

    ``generate(labels, seeds)``: image b's noise (each cell's initial (64, 16) draw and every stochastic step's draw,
    in the official order) comes from ``seeds[b]`` alone, so an image does not depend on its batch, rank or resume
    point. Upstream draws the initial noise from the CPU generator seeded ``seed + rank`` and the step noise from
    the GPU generator instead. ``precision``: ``fp16`` = the official ``torch.cuda.amp.autocast()`` (fp16 on CUDA;
    fp32 elsewhere), ``bf16`` (any device), ``fp32``. The sampler state stays float64 in every case, as upstream.
    """

    def __init__(
        self,
        model: xAR,
        vae: AutoencoderKL,
        sampler: SamplerConfig,
        *,
        device: torch.device | str,
        precision: str = "fp16",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        self.model, self.vae, self.sampler = model, vae, sampler
        self.device, self.precision = torch.device(device), precision
        self.nfe_per_ar_step = sampler.nfe_per_ar_step(model)

    def sample_latents(self, labels: torch.Tensor | None, seeds: Sequence[int]) -> torch.Tensor:
        """Latent tokens (B, 16, h, w) (times 0.2325) for ``labels`` (B,) (ignored when unconditional)."""
        s = self.sampler
        steps = dict(num_steps=s.num_steps) if s.original else dict(
            flow_upper_steps=s.flow_upper_steps, flow_lower_steps=s.flow_lower_steps)
        label = None if s.unconditional or labels is None else labels.to(self.device)
        with autocast(self.device, self.precision):
            return self.model.sample_tokens(
                s.cfg, label, bsz=len(seeds), noise=PerImageNoise(seeds),
                official_short_grids=s.official_short_grids, **steps,
            )

    def generate(self, conditions: torch.Tensor | int, seeds: Sequence[int]) -> GeneratedBatch:
        labels = conditions if isinstance(conditions, torch.Tensor) else None  # NullLabels: an image count
        tokens = self.sample_latents(labels, seeds)  # (B, 16, h, w)
        with autocast(self.device, self.precision):
            images = self.vae.decode(tokens_to_latent(tokens))  # (B, 3, H, W) in [-1, 1]
        return GeneratedBatch(images=to_uint8(images), nfe_per_ar_step=self.nfe_per_ar_step)


# ---------------------------------------------------------------------------------------------- weights


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> str:
    """What an xAR state dict holds, in CLI terms (width, depths, heads' head_dim, classes)."""

    def depth(prefix: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    if "class_emb.weight" not in state:
        return "no xAR keys"
    rows, width = state["class_emb.weight"].shape
    text = f"width {width}, {depth('encoder_blocks')} + {depth('decoder_blocks')} blocks, {rows - 1} classes"
    freqs = state.get("encoder_blocks.0.attn.rope.freqs")
    if freqs is not None:  # head_dim / 4 frequencies per attention
        text += f", head_dim {4 * freqs.numel()}"
    return text


def read_xar_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict to generate with from ``path``: a flat state dict (the released xAR-*.pth), a training
    checkpoint's EMA weights (``model_ema``, what the official evaluation generates with), or those of a training
    folder's ``checkpoint-last.pth``. Raises :class:`CheckpointError` for no path, a missing or an unreadable file."""
    if not os.fspath(path):
        raise CheckpointError(
            "no checkpoint given: pass --resume /path/to/xAR-B.pth (refusing to generate with random weights; "
            "fetch the official files with `python util/download.py`)"
        )
    return load_checkpoint(path)


def load_xar_weights(
    model: xAR,
    path: str | os.PathLike[str],
    model_config: ModelConfig,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Load the weights of ``path`` (:func:`read_xar_weights`; ``state`` if already read) into ``model`` strictly.

    Raises :class:`CheckpointError` (see :func:`read_xar_weights`; any missing / unexpected / mis-shaped key, or
    stored ``mask`` / RoPE buffers that differ from the ones this model computes) with what the file holds against
    what the flags build. Never leaves random weights in place silently.
    """
    state = read_xar_weights(path) if state is None else state
    try:
        load_state_dict_strict(model, state, what=f"checkpoint {os.fspath(path)!r}")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}\n  The file holds: {describe_checkpoint(state)}.\n  --model {model_config.describe()} builds: "
            f"{describe_checkpoint(model.state_dict())}."
        ) from None
    try:
        model.verify_buffers()
    except ValueError as err:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {err}") from None
    return Path(path)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    generator: XARGenerator,
    config: EvalConfig,
    conditions: ClassBalancedLabels | NullLabels,
    *,
    model_config: Mapping[str, Any],
    metrics: Any | None = None,
) -> dict[str, Any]:
    """Generate ``config.num_images`` images into ``config.sample_dir`` through the shared loop, then the metrics;
    returns the results dict (also ``results.json`` in the folder).

    ``metrics``: a :class:`disa.metrics.MetricsConfig`, checked on rank 0 before any image is generated (a missing
    statistics file fails in seconds, not after the run), or ``None`` for no metrics. ``model_config``: everything
    the images depend on (a resume with other values is refused). Raises :class:`EvaluationError` for bad input.
    """
    metrics_fn = metrics_hook(metrics)
    generator.model.eval()
    return run_evaluation(generator, config, conditions=conditions, model_config=model_config,
                          metrics_fn=metrics_fn, device=generator.device)


# ---------------------------------------------------------------------------------------------- training


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.02) -> torch.optim.AdamW:
    """AdamW with xAR's betas (0.9, 0.96) over MAR's parameter groups (no weight decay on 1-D parameters and
    biases)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS)


def build_train_dataset(
    *, use_cached: bool, cached_path: str | os.PathLike[str], data_path: str | os.PathLike[str], img_size: int,
    class_num: int,
) -> Dataset:
    """The training set: MAR's latent cache (``--use_cached --cached_path``, the official recipe:
    :class:`~mar_disa.engine_mar.CachedFolder`, moments of the image or of its mirror at random) or
    ``ImageFolder(<data_path>/train)`` with MAR's ADM centre crop, a random flip and [-1, 1] scaling (encoded on the
    fly). Raises :class:`UsageError` for a missing or empty folder, or more classes than ``class_num``."""
    if use_cached:
        if not os.fspath(cached_path):
            raise UsageError("--use_cached needs --cached_path (the folder written by MAR's main_cache.py)")
        root, what = Path(cached_path), "cached latents (<class>/<name>.npz from MAR's main_cache.py; --cached_path)"
    else:
        root, what = Path(data_path) / "train", "training images (--data_path must hold train/<class>/<images>)"
    if not root.is_dir():
        raise UsageError(f"{what} not found: {os.fspath(root)!r} is not a folder")
    try:
        dataset = CachedFolder(root) if use_cached else datasets.ImageFolder(
            os.fspath(root), transform=image_transform(img_size, random_flip=True))
    except (FileNotFoundError, RuntimeError) as err:  # torchvision: no class folders / no matching files
        raise UsageError(f"cannot read {what} in {os.fspath(root)!r}: {err}") from None
    if len(dataset.classes) > class_num:
        raise UsageError(f"the training set has {len(dataset.classes)} classes but --class_num is {class_num}")
    return dataset
