"""FlowAR's per-scale flow head, ``SimpleTransformerAdaLN`` (the ``flownet.*`` keys; spec flowar_xar.md §2.5).

A small transformer over the ``n x n`` tokens of one scale that predicts the flow velocity ``v = eps - x0`` from the
noisy tokens ``x_t``, the time ``t`` and the AR transformer's output ``z`` for that scale. Two block types exist in
the released checkpoints:

* **v1** (FlowAR-S, ``cross=False``): one per-token AdaLN modulation from ``SiLU(tau + c)`` drives self-attention
  and MLP (:class:`~.layers.AdaLNBlock`);
* **v2** (FlowAR-L/H, ``cross=True``): self-attention modulated by time only, an ungated cross-attention to ``z``,
  and an MLP modulated per token by ``SiLU(c + tau)`` (:class:`FlowBlockV2`).

``tau`` is the DiT time embedding of the integer ``floor(1000 t)`` computed in float32 (:func:`disa.flow.flow_t_index`),
``c = cond_embed(z)``. Attention is full (bidirectional) over the scale's tokens, ``width / 64`` heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from disa.flow import flow_t_index
# One implementation of the DiT time embedding (sinusoid, cos first, then Linear-SiLU-Linear; keys mlp.0 / mlp.2).
from disa.layers import TimestepEmbedder

from .layers import (
    AdaLNBlock,
    Attention,
    CrossAttention,
    RMSNorm,
    geglu_mlp,
    maybe_checkpoint,
    mlp_hidden_features,
    modulate,
)

__all__ = ["FLOW_HEAD_DIM", "FlowCondition", "FlowBlockV1", "FlowBlockV2", "FinalLayer", "SimpleTransformerAdaLN"]

KeysValues = tuple[torch.Tensor, torch.Tensor]

FLOW_HEAD_DIM = 64  # the flow head uses width // 64 heads


class FlowBlockV1(AdaLNBlock):
    """The FlowAR-S flow block: :class:`AdaLNBlock` with a per-token condition ``tau + c`` (z unused)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__(dim, num_heads, mlp_hidden, qkv_bias=False, ada_lin_sequential=False)

    def forward(  # type: ignore[override]  (the flow-block interface: z and kv are unused by v1)
        self, h: torch.Tensor, tau: torch.Tensor, c: torch.Tensor, z: torch.Tensor, kv: KeysValues | None = None
    ) -> torch.Tensor:
        """h (R, N, W); tau (R, 1, W); c (R, N, W) -> (R, N, W)."""
        return super().forward(h, tau + c)


class FlowBlockV2(nn.Module):
    """The FlowAR-L/H flow block: time-only AdaLN self-attention, cross-attention to z, per-token AdaLN MLP.

    ``(g1, s1, b1) = ada_lin_attn(SiLU(tau))`` (shared by all tokens), ``(g2, s2, b2) = ada_lin_mlp(SiLU(c + tau))``:

        h <- h + g1 * SelfAttn(RMSNorm(h) (1 + s1) + b1)
        h <- h + CrossAttn(q: norm2_1(h), k/v: norm2_2(z))      # no gate; z is the raw AR output, not c
        h <- h + g2 * MLP(RMSNorm(h) (1 + s2) + b2)
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        # Registration order = the official state_dict order (attn, crossattn, norm2_1, norm2_2, mlp, ada_lin_*).
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.crossattn = CrossAttention(dim, cond_dim, num_heads)
        self.norm2_1 = RMSNorm(dim)
        self.norm2_2 = RMSNorm(cond_dim)
        self.norm3 = RMSNorm(dim, affine=False)
        self.mlp = geglu_mlp(dim, mlp_hidden)
        self.ada_lin_attn = nn.Linear(dim, 3 * dim)
        self.ada_lin_mlp = nn.Linear(dim, 3 * dim)

    def cross_keys_values(self, z: torch.Tensor) -> KeysValues:
        """The cross-attention's rotated keys and values for the AR output ``z`` (R, N, D)."""
        return self.crossattn.keys_values(self.norm2_2(z))

    def forward(
        self, h: torch.Tensor, tau: torch.Tensor, c: torch.Tensor, z: torch.Tensor, kv: KeysValues | None = None
    ) -> torch.Tensor:
        """h (R, N, W); tau (R, 1, W); c (R, N, W); z (R, N, D) -> (R, N, W). ``kv``: :meth:`cross_keys_values`
        of ``z``, when precomputed."""
        g1, s1, b1 = self.ada_lin_attn(F.silu(tau)).chunk(3, dim=-1)  # (R, 1, W) each
        g2, s2, b2 = self.ada_lin_mlp(F.silu(c + tau)).chunk(3, dim=-1)  # (R, N, W) each
        h = h + g1 * self.attn(modulate(self.norm1(h), b1, s1))
        h = h + self.crossattn(self.norm2_1(h), None if kv is not None else self.norm2_2(z), kv=kv)
        return h + g2 * self.mlp(modulate(self.norm3(h), b2, s2))


@dataclass(frozen=True)
class FlowCondition:
    """What the flow head derives from the AR output ``z`` alone, computed once per flow solve.

    ``z`` is fixed while a scale's tokens are integrated, so ``c = cond_embed(z)`` (R, N, W) and the v2 blocks'
    cross-attention keys/values (``kv[i]``, (R, H, N, hd) each; None for v1 blocks) are the same at every step.
    Passing them to :meth:`SimpleTransformerAdaLN.forward` gives bit-identical velocities with less work.
    """

    z: torch.Tensor
    c: torch.Tensor
    kv: tuple[KeysValues | None, ...]


class FinalLayer(nn.Module):
    """``linear(RMSNorm(h) (1 + scale) + shift)`` with ``(shift, scale) = adaLN_modulation(c + tau)`` (shift first)."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim, affine=False)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # (R, N, W) each
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleTransformerAdaLN(nn.Module):
    """The velocity network ``(x_t (R, N, C), t (R,), z (R, N, D)) -> v (R, N, C)`` over one scale's N = n^2 tokens."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        z_channels: int,
        num_res_blocks: int,
        *,
        cross: bool = False,
        mlp_ratio: float = 4.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if model_channels < FLOW_HEAD_DIM:
            raise ValueError(
                f"flow head width must be >= {FLOW_HEAD_DIM} (it uses width // 64 heads), got {model_channels}"
            )
        if num_res_blocks < 1:
            raise ValueError(f"flow head depth must be >= 1, got {num_res_blocks}")
        self.in_channels = in_channels
        self.cross = cross
        self.use_checkpoint = use_checkpoint
        num_heads = model_channels // FLOW_HEAD_DIM
        hidden = mlp_hidden_features(model_channels, mlp_ratio)

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(
            [
                FlowBlockV2(model_channels, z_channels, num_heads, hidden)
                if cross
                else FlowBlockV1(model_channels, num_heads, hidden)
                for _ in range(num_res_blocks)
            ]
        )
        self.final_layer = FinalLayer(model_channels, out_channels)

    def prepare_condition(self, z: torch.Tensor) -> FlowCondition:
        """Everything the velocity depends on through ``z`` (R, N, D) only; see :class:`FlowCondition`."""
        kv = tuple(block.cross_keys_values(z) if isinstance(block, FlowBlockV2) else None for block in self.res_blocks)
        return FlowCondition(z, self.cond_embed(z), kv)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, *, condition: FlowCondition | None = None
    ) -> torch.Tensor:
        """x (R, N, C) noisy tokens; t (R,) times in [0, 1] (t = 1 is noise); z (R, N, D) AR output -> (R, N, C).

        The time embedding gets ``floor(1000 t)`` computed in float32, as the official head does with the float32
        times its sampler passes (computing it in float64 moves the index on many grid points).
        ``condition``: :meth:`prepare_condition` of this ``z``, to skip recomputing it at every flow step.
        """
        if condition is not None and condition.z is not z:
            raise ValueError("condition was prepared for another z (call prepare_condition(z) for this one)")
        if x.dim() != 3 or z.dim() != 3 or x.shape[:2] != z.shape[:2] or t.shape != x.shape[:1]:
            raise ValueError(
                f"flow head expects x (R, N, C), t (R,), z (R, N, D); got x {tuple(x.shape)}, t {tuple(t.shape)}, "
                f"z {tuple(z.shape)}"
            )
        tau = self.time_embed(flow_t_index(t)).unsqueeze(1)  # (R, 1, W)
        c = self.cond_embed(z) if condition is None else condition.c  # (R, N, W)
        kvs = (None,) * len(self.res_blocks) if condition is None else condition.kv
        h = self.input_proj(x)  # (R, N, W)
        for block, kv in zip(self.res_blocks, kvs):
            h = maybe_checkpoint(self.use_checkpoint, block, h, tau, c, z, kv)
        return self.final_layer(h, c + tau)  # (R, N, C)
