"""Typed Harmon configuration and the model builder.

The official configs (``configs/models/*.py``) are mmengine files of ``dict(type=..., ...)``; ours are plain Python
with the same variable names (``llm_name_or_path``, ``prompt_template``, ``tokenizer``, ``model``) and the same
values, read by :func:`load_config` into the dataclasses below, which validate them. What differs, on purpose:

* ``mar`` names its factory by string (``type="mar_huge"``); ``type="MAR"`` takes explicit sizes (tiny test models);
* the original fixed step count (``num_sampling_steps="100"``) and DiSA's ``diff_upper_steps`` /
  ``diff_lower_steps`` / ``diff_annealing_strategy`` are both accepted (the fork's MAR dropped the former, which broke
  its own unchanged 0.5B config); exactly one of the two must be given;
* ``disa_clip`` (default 950) is the fork's hidden ``min(t, 950)`` clamp of the respaced timesteps, on by default for
  DiSA configs (faithful) and switchable off (``None``); the original Harmon has no clamp;
* ``attn_implementation`` defaults to ``"sdpa"``; the official configs ask for ``"flash_attention_2"``, which needs
  the optional flash-attn package and CUDA; asking for it without flash-attn installed is an error, never a silent
  fallback (sdpa and FA2 compute the same attention);
* ``grad_checkpointing`` is accepted but only acts when gradients are enabled (upstream wrapped inference too).

Config files are executed as Python (as mmengine does): only load files you trust.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import runpy
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from disa.cli import check_int_at_least
from disa.schedules import DISA_CLIP, STRATEGIES
from disa.vae import AutoencoderKL
from mar_disa.models.mar import MAR, MAR_MODELS

from .harmon import Harmon
from .prompts import QWEN_CHAT_TEMPLATE

__all__ = [
    "DTYPES",
    "ATTN_IMPLEMENTATIONS",
    "LLMConfig",
    "MARConfig",
    "VAEConfig",
    "TokenizerConfig",
    "HarmonConfig",
    "load_config",
    "resolve_dtype",
    "check_attn_implementation",
    "build_llm",
    "build_harmon",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# Sizes that type="MAR" takes explicitly (the factories fix them for mar_base / mar_large / mar_huge).
_MAR_ARCH_KEYS = (
    "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth",
    "decoder_num_heads", "mlp_ratio", "norm_eps",
)  # fmt: skip


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``"torch.bfloat16"`` -> ``torch.bfloat16`` (float32, bfloat16, float16)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; allowed: {', '.join(DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def check_attn_implementation(name: str) -> str:
    """Validate an LLM attention backend; ``flash_attention_2`` only when flash-attn is importable."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the optional flash-attn package (pip install "
            "'disa-monorepo[flash]', CUDA only); it is not installed. Use 'sdpa' (the default; same attention)."
        )
    return name


def _from_mapping(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2.5 LLM: where its config/weights live, its dtype and attention backend.

    ``qwen2_config``: explicit ``Qwen2Config`` values, used instead of the ``config.json`` at
    ``pretrained_model_name_or_path`` (tiny test models, offline builds on the meta device).
    """

    pretrained_model_name_or_path: str
    torch_dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    qwen2_config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pretrained_model_name_or_path, str) or not self.pretrained_model_name_or_path:
            raise ValueError("llm.pretrained_model_name_or_path must be a non-empty string (hub id or directory)")
        object.__setattr__(self, "torch_dtype", str(resolve_dtype(self.torch_dtype)).removeprefix("torch."))
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown llm.attn_implementation {self.attn_implementation!r}; "
                f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}"
            )


@dataclass(frozen=True)
class MARConfig:
    """The MAR part (encoder, decoder, diffusion head) and the head's diffusion steps.

    Steps: ``num_sampling_steps`` (original Harmon: that many respaced DDPM steps at every AR step, top timestep
    999) **or** ``diff_upper_steps`` / ``diff_lower_steps`` / ``diff_annealing_strategy`` (DiSA: the count anneals
    from upper at the first AR step to lower at the last, timesteps clamped at ``disa_clip``).
    """

    type: str = "mar_huge"
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64
    diffloss_d: int = 12
    diffloss_w: int = 1536
    num_sampling_steps: str | None = None
    diff_upper_steps: int | None = None
    diff_lower_steps: int | None = None
    diff_annealing_strategy: str = "linear"
    disa_clip: int | None = DISA_CLIP
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False
    architecture: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        allowed = (*MAR_MODELS, "MAR")
        if self.type not in allowed:
            raise ValueError(f"unknown mar type {self.type!r}; allowed: {', '.join(allowed)}")
        if (self.type == "MAR") != (self.architecture is not None):
            raise ValueError(
                f"mar type 'MAR' needs its sizes ({', '.join(_MAR_ARCH_KEYS)}); the factories "
                f"({', '.join(MAR_MODELS)}) take none"
            )
        if self.architecture is not None and set(self.architecture) != set(_MAR_ARCH_KEYS):
            raise ValueError(
                f"mar type 'MAR' needs exactly the sizes {list(_MAR_ARCH_KEYS)}, got {sorted(self.architecture)}"
            )
        disa = self.diff_upper_steps is not None or self.diff_lower_steps is not None
        if (self.num_sampling_steps is not None) == disa:
            raise ValueError(
                "the mar config must set either num_sampling_steps (original Harmon, e.g. '100') or "
                "diff_upper_steps and diff_lower_steps (DiSA), not both and not neither"
            )
        if self.num_sampling_steps is not None:
            text = str(self.num_sampling_steps).strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(
                    f"num_sampling_steps must be a positive step count such as '100', got {self.num_sampling_steps!r}"
                )
        else:
            for name in ("diff_upper_steps", "diff_lower_steps"):
                check_int_at_least(f"mar.{name}", getattr(self, name))
            if self.diff_lower_steps > self.diff_upper_steps:
                raise ValueError(
                    f"diff_lower_steps ({self.diff_lower_steps}) must be <= diff_upper_steps ({self.diff_upper_steps})"
                )
            if self.diff_annealing_strategy not in STRATEGIES:
                raise ValueError(
                    f"unknown diff_annealing_strategy {self.diff_annealing_strategy!r}; "
                    f"allowed: {', '.join(STRATEGIES)}"
                )
        if self.disa_clip is not None:
            check_int_at_least("mar.disa_clip (a timestep, or None for no clamp)", self.disa_clip)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MARConfig":
        data = dict(data)
        if data.get("type") == "MAR" and "architecture" not in data:
            data["architecture"] = {k: data.pop(k) for k in _MAR_ARCH_KEYS if k in data}
        return _from_mapping(cls, data, "mar")

    @property
    def is_disa(self) -> bool:
        return self.num_sampling_steps is None

    def head_kwargs(self) -> dict[str, Any]:
        """The step options of MAR's head (:class:`~mar_disa.models.diffloss.DiffLoss` and ``MAR`` take the same
        names) for this config: the original fixed count or DiSA's annealing."""
        if self.is_disa:
            return dict(
                diff_sampler="DiSA", diff_upper_steps=self.diff_upper_steps, diff_lower_steps=self.diff_lower_steps,
                diff_annealing_strategy=self.diff_annealing_strategy, disa_clip=self.disa_clip,
                train_clip=self.disa_clip,  # the fork's clamp also shortens its training diffusion
            )  # fmt: skip
        steps = int(str(self.num_sampling_steps).strip())
        # MAR's "default" sampler: `steps` respaced steps at every AR step, no clamp (top timestep 999).
        return dict(diff_sampler="default", diff_upper_steps=steps, diff_lower_steps=steps, train_clip=None)

    def build(self) -> MAR:
        """The MAR with its head configured for this step setting (random weights)."""
        kwargs: dict[str, Any] = dict(
            img_size=self.img_size, vae_stride=self.vae_stride, patch_size=self.patch_size,
            vae_embed_dim=self.vae_embed_dim, mask_ratio_min=self.mask_ratio_min,
            label_drop_prob=self.label_drop_prob, class_num=self.class_num, attn_dropout=self.attn_dropout,
            proj_dropout=self.proj_dropout, buffer_size=self.buffer_size, diffloss_d=self.diffloss_d,
            diffloss_w=self.diffloss_w, diffusion_batch_mul=self.diffusion_batch_mul,
            grad_checkpointing=self.grad_checkpointing, **self.head_kwargs(),
        )  # fmt: skip
        if self.type == "MAR":
            arch = dict(self.architecture or {})
            eps = arch.pop("norm_eps")
            return MAR(**arch, norm_layer=partial(nn.LayerNorm, eps=eps), **kwargs)
        return MAR_MODELS[self.type](**kwargs)


@dataclass(frozen=True)
class VAEConfig:
    """The KL-16 autoencoder (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``) and its checkpoint.

    ``with_encoder=False`` builds only ``post_quant_conv`` and the decoder (all that text-to-image uses).
    ``ckpt_path`` is relative to the working directory, as upstream (``checkpoints/kl16.ckpt`` from
    ``Harmon_DiSA/``).
    """

    embed_dim: int = 16
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    ch: int = 128
    num_res_blocks: int = 2
    ckpt_path: str | None = "checkpoints/kl16.ckpt"
    with_encoder: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("embed_dim", "ch", "num_res_blocks"):
            check_int_at_least(f"vae.{name}", getattr(self, name))
        if not self.ch_mult or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.ch_mult):
            raise ValueError(f"vae.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult!r}")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(embed_dim=self.embed_dim, ch_mult=self.ch_mult, ch=self.ch, num_res_blocks=self.num_res_blocks)

    def build(self) -> AutoencoderKL:
        return AutoencoderKL(**self.model_kwargs, with_encoder=self.with_encoder)


@dataclass(frozen=True)
class TokenizerConfig:
    """``AutoTokenizer.from_pretrained`` arguments. Upstream also passes ``trust_remote_code=True``, which the
    Qwen2.5 tokenizer does not need; it stays off unless a config asks for it."""

    pretrained_model_name_or_path: str
    padding_side: Literal["right"] = "right"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.padding_side != "right":
            raise ValueError(
                f"tokenizer.padding_side must be 'right' (Harmon's position ids assume right padding), got "
                f"{self.padding_side!r}"
            )


@dataclass(frozen=True)
class HarmonConfig:
    """One Harmon model: LLM, MAR, VAE, the latent scale, tokenizer and prompt template."""

    llm: LLMConfig
    mar: MARConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_scale: float = 0.2325
    tokenizer: TokenizerConfig | None = None
    prompt_template: Mapping[str, Any] = field(default_factory=lambda: dict(QWEN_CHAT_TEMPLATE))

    def __post_init__(self) -> None:
        if not (isinstance(self.vae_scale, (int, float)) and self.vae_scale > 0 and math.isfinite(self.vae_scale)):
            raise ValueError(f"vae_scale must be a finite number > 0, got {self.vae_scale!r}")
        if "{input}" not in str(self.prompt_template.get("INSTRUCTION", "")):
            raise ValueError("prompt_template['INSTRUCTION'] must contain '{input}'")

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> "HarmonConfig":
        """From a config file's ``model`` dict (the official keys; ``type`` entries may name the classes)."""
        data = dict(model)
        data.pop("type", None)
        unknown = sorted(set(data) - {"llm", "mar", "vae", "vae_scale", "tokenizer", "prompt_template"})
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; allowed: llm, mar, vae, vae_scale, tokenizer, prompt_template"
            )
        for key in ("llm", "mar"):
            if key not in data:
                raise ValueError(f"the model config needs a '{key}' entry")
        llm = {k: v for k, v in dict(data["llm"]).items() if k != "type"}
        vae = {k: v for k, v in dict(data.get("vae", {})).items() if k != "type"}
        tokenizer = data.get("tokenizer")
        return cls(
            llm=_from_mapping(LLMConfig, llm, "llm"),
            mar=MARConfig.from_dict(data["mar"]),
            vae=_from_mapping(VAEConfig, vae, "vae"),
            vae_scale=data.get("vae_scale", 0.2325),
            tokenizer=None
            if tokenizer is None
            else _from_mapping(TokenizerConfig, {k: v for k, v in dict(tokenizer).items() if k != "type"}, "tokenizer"),
            prompt_template=dict(data.get("prompt_template", QWEN_CHAT_TEMPLATE)),
        )

    def replace(self, **changes: Any) -> "HarmonConfig":
        """A copy with top-level fields replaced; nested: ``cfg.replace(mar=dataclasses.replace(cfg.mar, ...))``."""
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike[str]) -> HarmonConfig:
    """Execute a config file (plain Python, e.g. ``configs/models/qwen2_5_1_5b_kl16_mar_h_disa_50_5.py``) and read
    its ``model`` dict into a validated :class:`HarmonConfig`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r} (the configs live in Harmon_DiSA/configs/models/)")
    namespace = runpy.run_path(path)
    if not isinstance(namespace.get("model"), Mapping):
        raise ValueError(f"config file {path!r} defines no 'model' dict")
    try:
        return HarmonConfig.from_dict(namespace["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid config {path!r}: {err}") from err


def build_llm(cfg: LLMConfig, llm_config: Any | None = None) -> nn.Module:
    """A randomly initialised ``Qwen2ForCausalLM`` from ``llm_config`` (a ``PretrainedConfig``), else from
    ``cfg.qwen2_config``, else from the ``config.json`` at ``cfg.pretrained_model_name_or_path``.

    Weights come from the Harmon checkpoint afterwards (it holds every ``llm.*`` tensor), so the Qwen weights
    themselves are never read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    attn = check_attn_implementation(cfg.attn_implementation)
    if llm_config is None:
        if cfg.qwen2_config is not None:
            llm_config = Qwen2Config(**dict(cfg.qwen2_config))
        else:
            llm_config = AutoConfig.from_pretrained(cfg.pretrained_model_name_or_path)
    return AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn)


def build_harmon(cfg: HarmonConfig, *, llm_config: Any | None = None, tokenizer: Any | None = None) -> Harmon:
    """The Harmon of ``cfg`` with random weights, in float32 (works under ``with torch.device("meta")``).

    ``llm_config`` overrides where the LLM architecture comes from (see :func:`build_llm`). Loading weights, the
    tokenizer and the dtype cast are :func:`harmon_disa.src.models.loading.load_harmon`'s job.
    """
    return Harmon(
        llm=build_llm(cfg.llm, llm_config),
        mar=cfg.mar.build(),
        vae=cfg.vae.build(),
        vae_scale=cfg.vae_scale,
        tokenizer=tokenizer,
        prompt_template=cfg.prompt_template,
    )
