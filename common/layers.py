"""Network building blocks shared by several model families (one implementation each).

Module and parameter names follow the official checkpoints, so models built from these load them strictly:

* :class:`TimestepEmbedder` — DiT-style sinusoidal time embedding + MLP (``mlp.0``, ``mlp.2``): MAR's and Harmon's
  diffusion heads, FlowAR's flow head, xAR;
* :class:`RMSNorm` — computed in float32 (FlowAR, xAR); ``affine=False`` has no state-dict keys;
* :func:`geglu_mlp`, :func:`mlp_hidden_features` — timm's ``SwiGLU`` built with exact GELU (``fc1_g``, ``fc1_x``,
  ``fc2``), the MLP of the FlowAR/xAR AdaLN blocks;
* :func:`modulate`, :func:`maybe_checkpoint` — AdaLN modulation and optional activation checkpointing;
* :func:`compile_forward`, :func:`uncompile_forward` — opt-in ``torch.compile`` (optionally with CUDA graphs) of
  one module's forward in place, for the per-token heads that run thousands of small sequential calls;
  :func:`add_compile_arguments` / :func:`compile_request` — the ``--compile_head`` / ``--cuda_graphs`` flags every
  family's evaluation CLI offers for it.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn as nn
from timm.layers import SwiGLU
from torch.utils.checkpoint import checkpoint

__all__ = [
    "modulate",
    "maybe_checkpoint",
    "compile_forward",
    "uncompile_forward",
    "add_compile_arguments",
    "compile_request",
    "TimestepEmbedder",
    "RMSNorm",
    "mlp_hidden_features",
    "geglu_mlp",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation ``x (1 + scale) + shift`` (shift and scale broadcast against x)."""
    return x * (1 + scale) + shift


def maybe_checkpoint(enabled: bool, module: nn.Module, *args: Any) -> torch.Tensor:
    """``module(*args)``, with activation checkpointing when ``enabled`` and gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def compile_forward(
    module: nn.Module, *, mode: str | None = None, dynamic: bool | None = None, cuda_graphs: bool = False
) -> nn.Module:
    """Replace ``module.forward`` by a ``torch.compile``-d version, in place; returns ``module``.

    The parameters, buffers and ``state_dict`` keys are untouched (``torch.compile(module)`` would wrap them in
    ``_orig_mod.``), so checkpoints load as before; :func:`uncompile_forward` restores the eager forward. Results
    equal the eager ones to floating-point rounding (fused kernels may reorder operations; see
    ``tests/test_fast_paths.py`` for the measured difference). ``mode`` / ``dynamic``: as ``torch.compile``.

    ``cuda_graphs=True`` (CUDA only): ``mode="reduce-overhead"``, which replays the head's kernels from CUDA graphs
    (one graph per input shape: MAR's row count changes with the AR step, so the first batch records a few of
    them). Every call starts a new graph step and returns a copy, because a replay overwrites the previous output.
    """
    if cuda_graphs:
        devices = {p.device.type for p in module.parameters()}
        if devices != {"cuda"}:
            raise ValueError(f"cuda_graphs=True needs the module on a CUDA device, its parameters are on {devices}")
        if mode not in (None, "reduce-overhead"):
            raise ValueError(f"cuda_graphs=True uses mode='reduce-overhead', got mode={mode!r}")
        mode = "reduce-overhead"
    uncompile_forward(module)
    compiled = torch.compile(module.forward, mode=mode, dynamic=dynamic)
    if cuda_graphs:

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args, **kwargs).clone()

        module.forward = forward  # type: ignore[method-assign]
    else:
        module.forward = compiled  # type: ignore[method-assign]
    return module


def uncompile_forward(module: nn.Module) -> nn.Module:
    """Undo :func:`compile_forward` (no-op for a module that was not compiled); returns ``module``."""
    module.__dict__.pop("forward", None)
    return module


def add_compile_arguments(group: argparse._ActionsContainer) -> None:
    """``--compile_head`` and ``--cuda_graphs``: the opt-in fast paths of the per-token head (not official flags)."""
    group.add_argument("--compile_head", action="store_true",
                       help="torch.compile the per-token head (speed only; samples equal to float rounding)")
    group.add_argument("--cuda_graphs", action="store_true",
                       help="also replay the compiled head from CUDA graphs (CUDA only; implies --compile_head)")


def compile_request(args: argparse.Namespace, device: torch.device | str) -> tuple[bool, bool]:
    """``(compile, cuda_graphs)`` from :func:`add_compile_arguments`' flags for a run on ``device``; ``ValueError``
    when CUDA graphs are asked for elsewhere than on a CUDA device."""
    device = torch.device(device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda_graphs needs a CUDA device (CUDA graphs replay CUDA kernels), the run is on "
                         f"{device}; drop --cuda_graphs or use --device cuda")
    return bool(args.compile_head or args.cuda_graphs), bool(args.cuda_graphs)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar time per row (cosine half first), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        # Sinusoid frequencies per device, computed there once (on the device itself, so the values are those the
        # per-call computation gives on it) instead of four small kernels in every head evaluation.
        self._freqs: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def frequencies(dim: int, device: torch.device | str | None = None, max_period: float = 10000.0) -> torch.Tensor:
        """``f_i = max_period^(-i / (dim/2))``, float32 ``(dim // 2,)``."""
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)

    @staticmethod
    def timestep_embedding(
        t: torch.Tensor, dim: int, max_period: float = 10000.0, *, freqs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i / (dim/2))``; ``t`` (R,) int or float -> (R, dim).

        ``freqs``: precomputed :meth:`frequencies` (same values; saves recomputing them)."""
        if freqs is None:
            freqs = TimestepEmbedder.frequencies(dim, t.device, max_period)
        args = t[:, None].float() * freqs[None]  # (R, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (R, 2 half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freqs=self._cached_frequencies(t.device))
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (R, W)

    def _cached_frequencies(self, device: torch.device) -> torch.Tensor | None:
        """The cached :meth:`frequencies` for ``device``; None under ``torch.compile``, which traces (and folds)
        them instead: the cache's bookkeeping would break the graph."""
        if torch.compiler.is_compiling():
            return None
        freqs = self._freqs.get(device)
        if freqs is None:
            with torch.inference_mode(False):  # a plain tensor, usable later outside inference mode too
                freqs = self._freqs[device] = self.frequencies(self.frequency_embedding_size, device)
        return freqs


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps)`` in float32, cast back to the input dtype, times an optional ``weight``.

    ``affine=False`` builds the weightless norms of the AdaLN blocks (no state_dict keys).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else y * self.weight


def mlp_hidden_features(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the gated MLP: 2/3 of ``dim * mlp_ratio`` (768 -> 2048, 1024 -> 2730, 1536 -> 4096)."""
    # Evaluated left to right: 2/3 * 6144 would round to 4095.99... and floor to 4095 for FlowAR-H.
    return int(dim * mlp_ratio * 2 / 3)


def geglu_mlp(dim: int, hidden: int, drop: float = 0.0) -> SwiGLU:
    """timm's ``SwiGLU`` built with exact-erf GELU, as the official models build it: really a GeGLU,
    ``fc2(GELU(fc1_g(x)) * fc1_x(x))``."""
    return SwiGLU(in_features=dim, hidden_features=hidden, act_layer=nn.GELU, drop=drop)
