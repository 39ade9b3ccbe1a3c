"""Transformer pieces shared by FlowAR's AR transformer and its flow head (spec flowar_xar.md §1.1–1.2, §2.5).

Module and parameter names follow the official checkpoints: ``attn.qkv``, ``attn.proj``, ``attn.rope.freqs``,
``mlp.fc1_g/fc1_x/fc2`` (timm's ``SwiGLU``), ``ada_lin``; weightless norms have no keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from disa.layers import RMSNorm, geglu_mlp, maybe_checkpoint, mlp_hidden_features, modulate

from .rope import GridRotaryEmbedding

__all__ = [
    "modulate",
    "maybe_checkpoint",
    "RMSNorm",
    "mlp_hidden_features",
    "geglu_mlp",
    "KVCache",
    "Attention",
    "CrossAttention",
    "AdaLNBlock",
]


@dataclass(eq=False)
class KVCache:
    """Rotated keys and values of the tokens one attention layer has seen so far (the earlier scales).

    One instance per layer and per sampling call; FlowAR's AR pass at scale k appends scale k and attends over
    everything cached. Shapes ``(R, heads, tokens, head_dim)``.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this chunk and return all cached keys and values."""
        if self.keys is not None and self.keys.shape[0] != k.shape[0]:
            raise ValueError(f"KV cache holds {self.keys.shape[0]} rows, the new tokens have {k.shape[0]}")
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        return self.keys, self.values


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on q and k and an optional KV cache.

    ``F.scaled_dot_product_attention`` with its default 1/sqrt(head_dim) scale; q, k, v are the three thirds of
    ``qkv``'s output, each head-major.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = GridRotaryEmbedding(self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        *,
        sides: Sequence[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (R, N, C) -> (R, N, C). ``sides``: RoPE grid sides of the N tokens (see :class:`GridRotaryEmbedding`);
        ``attn_mask``: additive float mask broadcastable to (R, heads, N, cached + N); ``cache``: this layer's KV
        cache, extended by the N tokens before attending."""
        rows, n, dim = x.shape
        q, k, v = self.qkv(x).view(rows, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (R, H, N, hd)
        q, k = self.rope(q, sides), self.rope(k, sides)
        if cache is not None:
            k, v = cache.extend(k, v)  # (R, H, cached + N, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )  # (R, H, N, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(rows, n, dim)))


class CrossAttention(nn.Module):
    """Queries from the tokens, keys/values from an equally long condition sequence; RoPE on q and k (same grid).

    ``kv`` maps the condition width to ``2 * dim``: keys first, then values, each head-major. No qkv biases.
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.rope = GridRotaryEmbedding(self.head_dim)

    def keys_values(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values ``(R, H, N, hd)`` of the condition ``(R, N, C_cond)``; they depend on the
        condition only, so a flow solve computes them once and passes them to every step (``kv=``)."""
        rows, n, _ = cond.shape
        k, v = self.kv(cond).view(rows, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (R, H, N, hd)
        return self.rope(k), v

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None, *, kv: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (R, N, C), cond (R, N, C_cond) -> (R, N, C); or ``kv`` from :meth:`keys_values` in place of ``cond``."""
        rows, n, dim = x.shape
        k, v = self.keys_values(cond) if kv is None else kv  # (R, H, N, hd) each
        if k.shape[0] != rows or k.shape[2] != n:
            raise ValueError(
                f"cross-attention needs one condition token per query token, got x {tuple(x.shape)} and "
                f"{k.shape[2]} condition tokens for {k.shape[0]} rows"
            )
        q = self.rope(self.q(x).view(rows, n, self.num_heads, self.head_dim).transpose(1, 2))  # (R, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (R, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(rows, n, dim))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with AdaLN modulation (the FlowAR AR blocks and the v1 flow-head blocks).

    ``(g1, g2, s1, s2, b1, b2) = Linear(SiLU(c))``, in that order, then
    ``h = x + g1 * Attn(RMSNorm(x) (1 + s1) + b1)`` and ``out = h + g2 * MLP(RMSNorm(h) (1 + s2) + b2)``.
    The condition is either one vector per row (R, C), broadcast over the tokens (AR blocks: the class
    embedding), or one per token (R, N, C) (v1 flow blocks: time + AR condition).

    ``ada_lin_sequential``: the AR blocks hold ``ada_lin = Sequential(SiLU, Linear)`` (keys ``ada_lin.1.*``), the v1
    flow blocks a plain ``Linear`` with the SiLU applied in ``forward`` (keys ``ada_lin.*``); same maths.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        qkv_bias: bool,
        ada_lin_sequential: bool,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = RMSNorm(dim, affine=False)
        self.mlp = geglu_mlp(dim, mlp_hidden, drop=proj_drop)
        linear = nn.Linear(dim, 6 * dim)
        self.ada_lin = nn.Sequential(nn.SiLU(), linear) if ada_lin_sequential else linear
        self._silu_in_forward = not ada_lin_sequential

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        sides: Sequence[int] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (R, N, C); cond (R, C) or (R, N, C) -> (R, N, C)."""
        mod = self.ada_lin(F.silu(cond) if self._silu_in_forward else cond)  # (R, [N,] 6C)
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)  # (R, 1, 6C): one modulation per row
        g1, g2, s1, s2, b1, b2 = mod.chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), b1, s1), sides=sides, attn_mask=attn_mask, cache=cache)
        return x + g2 * self.mlp(modulate(self.norm2(x), b2, s2))
