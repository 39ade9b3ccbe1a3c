"""xAR: next-cell prediction with a flow-matching transformer, and its DiSA sampler (spec ``flowar_xar.md`` §1, §3).

The 16×16 latent is cut into four 8×8 **cells** of 64 tokens (raster order of cells, raster inside a cell). The whole
encoder–decoder transformer is the velocity network: every flow step of a cell is one full pass over that cell
(plus, on its first step, the previous clean cell), conditioned per sample and per cell through AdaLN on
``class_emb(y) + time_embed(floor(1000 t))``. Cells attend block-causally to earlier cells through a KV cache
(:meth:`xAR.sample_inference`).

Module and parameter names, shapes and buffer layout match the released checkpoints (flat state dicts that load
with ``strict=True``). The sampling maths is shared: :mod:`disa.flow`, :mod:`disa.guidance`, :mod:`disa.schedules`
(through the adapter :mod:`.sampler`).

Deviations from the official code that change no result of a working setting:

* no unused ``flash_attn`` import and no ``.cuda()``: the model runs on any device;
* ``sample_tokens(label=None, bsz=n)`` samples unconditionally (the official code crashed on ``label=None``);
* batch size 1 works in training (the official ``squeeze()`` broke it);
* the training forward works in eval mode too (validation loss) and draws its logit-normal times with torch
  instead of numpy's global RNG (same distribution);
* the KV cache is freed when ``sample_tokens`` returns;
* ``class_num`` sets the embedding size (``class_num + 1`` rows, null class ``class_num``); the official code always
  built 1001 rows, which is the same for the default 1000 classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from disa.flow import flow_t_index
from disa.guidance import check_cfg, ramp_cfg_scale
from disa.noise import NoiseSource, TorchNoise
from disa.schedules import annealed_steps
from disa.layers import RMSNorm, TimestepEmbedder, geglu_mlp, mlp_hidden_features

from .rope import VisionRotaryEmbeddingFast, cell_order, cell_rows
from .sampler import euler_maruyama_sampler, first_eval_path

__all__ = ["Attention", "Block", "CellPlan", "xAR", "xar_base", "xar_large", "xar_huge", "block_causal_mask"]


def block_causal_mask(seq_len: int, block: int) -> torch.Tensor:
    """Additive attention mask (1, 1, S, S): 0 where query block >= key block, -inf elsewhere."""
    blocks = torch.arange(seq_len) // block  # (S,)
    allowed = blocks[:, None] >= blocks[None, :]  # (S, S)
    mask = torch.zeros(seq_len, seq_len).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


class Attention(nn.Module):
    """Multi-head self-attention with cell-ordered 2-D RoPE and xAR's per-cell KV cache.

    ``scale_index=None``: the whole sequence at once (training), no cache. ``scale_index=s``: the input is the
    last ``N`` tokens ending with cell ``s``; keys/values are appended to the cache (``k``, ``v``: (B, H, T, hd),
    ``None`` when empty) and attention runs over cache + input. With ``update_cache=True`` the cache is then
    replaced by everything but the last cell, i.e. it holds cells ``0..s-1`` afterwards.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        grid_size: int = 16,
        clusters: int = 4,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = VisionRotaryEmbeddingFast(self.head_dim // 2, pt_seq_len=grid_size, clusters=clusters)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, update_cache: bool = True, scale_index: int | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        q, k = self.rope(q, scale_index), self.rope(k, scale_index)
        if scale_index is not None:
            if self.k is not None:
                # The cache holds rows of the batch it was filled with; a smaller batch reads its first rows.
                k = torch.cat([self.k[:B], k], dim=2)  # (B, H, T + N, hd)
                v = torch.cat([self.v[:B], v], dim=2)
            if update_cache:
                cell_len = self.rope.cell_len
                self.k, self.v = k[:, :, :-cell_len], v[:, :, :-cell_len]
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, H, N, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """AdaLN transformer block: ``h = x + γ1 Attn(norm(x)(1+s1)+b1)``, ``out = h + γ2 MLP(norm(h)(1+s2)+b2)``.

    The six modulation vectors come from ``ada_lin(condition)`` in the order γ1, γ2, s1, s2, b1, b2, one set per
    cell of the input. The MLP is timm's ``SwiGLU`` built with exact GELU (a GeGLU), hidden ``int(D * r * 2/3)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        *,
        grid_size: int = 16,
        clusters: int = 4,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            grid_size=grid_size, clusters=clusters,
        )
        self.norm2 = RMSNorm(dim, affine=False)
        self.mlp = geglu_mlp(dim, mlp_hidden_features(dim, mlp_ratio), drop=proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None,
        update_cache: bool = True,
        scale_index: int | None = None,
    ) -> torch.Tensor:
        """x: (R, n L, D) tokens of ``n`` cells; condition: (R, n, D), one per row and cell."""
        n = condition.shape[1]
        mods = self.ada_lin(condition).unflatten(-1, (6, self.dim))[:, :, None]  # (R, n, 1, 6, D)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(-2)  # (R, n, 1, D) each: broadcast over L

        def per_cell(h: torch.Tensor) -> torch.Tensor:
            return h.unflatten(1, (n, -1))  # (R, n L, D) -> (R, n, L, D)

        h = (per_cell(self.norm1(x)) * (1 + scale1) + shift1).flatten(1, 2)
        attn = self.attn(h, mask, update_cache=update_cache, scale_index=scale_index)
        x = x + (per_cell(attn) * gamma1).flatten(1, 2)
        h = (per_cell(self.norm2(x)) * (1 + scale2) + shift2).flatten(1, 2)
        return x + (per_cell(self.mlp(h)) * gamma2).flatten(1, 2)


@dataclass(frozen=True)
class CellPlan:
    """What sampling one cell (AR step) costs and uses.

    ``num_steps``: the step count passed to the flow sampler (DiSA: linear from upper to lower over the cells);
    ``cfg_scale``: the ramped guidance scale; ``tokens_per_eval``: tokens per transformer pass, one entry per
    network evaluation (each pass runs ``2B`` rows: every evaluation is doubled for guidance).
    """

    ar_step: int
    num_steps: int
    cfg_scale: float
    tokens_per_eval: tuple[int, ...]

    @property
    def network_evals(self) -> int:
        return len(self.tokens_per_eval)

    @property
    def stochastic_steps(self) -> int:
        return self.num_steps - 1


class xAR(nn.Module):
    """xAR velocity transformer over cells, with the official constructor arguments.

    The layout is the official one: the latent grid ``img_size / vae_stride`` (16) per side, ``patch_size`` 1,
    ``clusters`` square cells (4 → 8×8). ``diffusion_batch_mul`` is accepted and stored but unused, as upstream.
    """

    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        vae_embed_dim: int = 16,
        label_drop_prob: float = 0.1,
        class_num: int = 1000,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        diffusion_batch_mul: int = 4,
        clusters: int = 4,
    ) -> None:
        super().__init__()
        if patch_size != 1:
            raise ValueError(f"xAR works on latent tokens directly: patch_size must be 1, got {patch_size}")
        if img_size <= 0 or vae_stride <= 0 or img_size % vae_stride:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of vae_stride ({vae_stride})")
        grid = img_size // vae_stride
        cells_per_side = round(clusters**0.5)
        if clusters < 1 or cells_per_side**2 != clusters or grid % cells_per_side:
            raise ValueError(
                f"clusters must be a square number of cells whose side divides the {grid}x{grid} latent grid "
                f"(official: 4), got {clusters}"
            )
        if encoder_embed_dim != decoder_embed_dim:
            # The AdaLN condition (encoder width) feeds the decoder blocks too.
            raise ValueError(
                f"encoder and decoder widths must be equal, got {encoder_embed_dim} and {decoder_embed_dim}"
            )
        if not 0.0 <= label_drop_prob <= 1.0:
            raise ValueError(f"label_drop_prob must be in [0, 1], got {label_drop_prob}")
        if class_num < 1:
            raise ValueError(f"class_num must be >= 1, got {class_num}")

        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = grid
        self.seq_len = grid * grid
        self.clusters = clusters
        self.cell_len = self.seq_len // clusters
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul  # unused (upstream keeps it too)

        width = encoder_embed_dim
        block_kw = dict(mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=proj_dropout, attn_drop=attn_dropout,
                        grid_size=grid, clusters=clusters)
        # Registration order = the checkpoints' key order.
        self.class_emb = nn.Embedding(class_num + 1, width)  # row class_num: the null class of guidance
        self.time_embed = TimestepEmbedder(width)
        self.z_proj = nn.Linear(vae_embed_dim, width)
        self.z_proj_ln = RMSNorm(width)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.encoder_blocks = nn.ModuleList(
            [Block(width, encoder_num_heads, **block_kw) for _ in range(encoder_depth)]
        )
        self.encoder_norm = RMSNorm(width)
        self.decoder_embed = nn.Linear(width, decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, **block_kw) for _ in range(decoder_depth)]
        )
        self.decoder_norm = RMSNorm(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, vae_embed_dim)
        self.initialize_weights()

        self.register_buffer("mask", block_causal_mask(self.seq_len, self.cell_len))  # (1, 1, S, S)
        # Sequence position -> raster index of the latent grid; not in the checkpoints.
        self.register_buffer("cell_order", cell_order(grid, grid // cells_per_side), persistent=False)

    # ---- construction ----------------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Official init: N(0, 0.02) class and position embeddings, Xavier-uniform Linears with zero biases."""
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.encoder_pos_embed_learned, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def verify_buffers(self, atol: float = 1e-6) -> None:
        """Check that the buffers (e.g. loaded from a checkpoint) equal freshly computed ones; ValueError if not.

        The released checkpoints store the mask and every RoPE table; this catches a checkpoint built for another
        layout (same shapes, different tables) instead of sampling with it silently.
        """
        reference = {"mask": block_causal_mask(self.seq_len, self.cell_len)}
        for name, module in self.named_modules():
            if isinstance(module, VisionRotaryEmbeddingFast):
                fresh = VisionRotaryEmbeddingFast(module.freqs.numel() * 2, module.pt_seq_len, module.clusters)
                reference.update({f"{name}.{key}": value for key, value in fresh.state_dict().items()})
        buffers = dict(self.named_buffers())
        bad = []
        for key, expected in reference.items():
            actual = buffers[key].detach().float().cpu()
            if key == "mask":
                same = torch.equal(actual == 0, expected == 0) and bool((actual[expected != 0] == float("-inf")).all())
            else:
                same = bool(torch.allclose(actual, expected, rtol=0.0, atol=atol))
            if not same:
                bad.append(key)
        if bad:
            raise ValueError(
                f"{len(bad)} buffer(s) differ from the tables this model computes (block-causal mask over "
                f"{self.cell_len}-token cells, cell-ordered RoPE on a {self.seq_h}x{self.seq_w} grid): "
                + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
            )

    # ---- layout ----------------------------------------------------------------------------------------------

    def clusterify(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B, C, H, W) -> ``clusters`` cells, each (B, L, C), tokens raster inside the cell."""
        tokens = x.flatten(2)[:, :, self.cell_order].transpose(1, 2)  # (B, S, C) in cell order
        return list(tokens.chunk(self.clusters, dim=1))

    def unclusterify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in cell order (B, S, C) -> latent (B, C, H, W)."""
        raster = x[:, torch.argsort(self.cell_order)]  # (B, S, C) in raster order
        return raster.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.seq_h, self.seq_w)

    def _window(
        self, num_tokens: int, scale_index: int | None, pos: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position embeddings and mask for the ``num_tokens`` rows ending with cell ``scale_index``
        (the whole sequence when None): mask rows of those tokens, columns of every token up to the cell's end."""
        if scale_index is None:
            if num_tokens != self.seq_len:
                raise ValueError(f"a whole-sequence pass needs {self.seq_len} tokens, got {num_tokens}")
            return pos, mask
        rows = cell_rows(scale_index, num_tokens, self.cell_len)
        return pos[:, rows], (None if mask is None else mask[:, :, rows, : rows.stop])

    def _cell_conditions(self, condition: torch.Tensor, rows: int, num_tokens: int) -> torch.Tensor:
        """Official condition layout (n R, D), cell-major, -> (R, n, D) for ``n`` cells of ``num_tokens`` tokens."""
        n = condition.shape[0] // rows
        if n * rows != condition.shape[0] or n * self.cell_len != num_tokens:
            raise ValueError(
                f"{condition.shape[0]} conditions for {rows} rows of {num_tokens} tokens: need one per row and "
                f"{self.cell_len}-token cell"
            )
        return condition.view(n, rows, -1).transpose(0, 1)

    # ---- network ---------------------------------------------------------------------------------------------

    def forward_mae_encoder(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None,
        update_cache: bool = True,
        scale_index: int | None = 0,
    ) -> torch.Tensor:
        """x: (R, N, D) projected tokens; condition: (n R, D), cell-major as upstream. ``scale_index=None``: the
        whole sequence (training); else the ``N`` tokens ending with that cell. Returns (R, N, D)."""
        rows, num_tokens, _ = x.shape
        cond = self._cell_conditions(condition, rows, num_tokens)  # (R, n, D)
        pos, mask = self._window(num_tokens, scale_index, self.encoder_pos_embed_learned, mask)
        x = self.z_proj_ln(x + pos)
        for block in self.encoder_blocks:
            x = block(x, cond, mask, update_cache=update_cache, scale_index=scale_index)
        return self.encoder_norm(x)

    def forward_mae_decoder(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None,
        update_cache: bool = True,
        scale_index: int | None = 0,
    ) -> torch.Tensor:
        """Encoder output (R, N, D) -> velocity (R, N, C); arguments as :meth:`forward_mae_encoder`."""
        rows, num_tokens, _ = x.shape
        cond = self._cell_conditions(condition, rows, num_tokens)
        pos, mask = self._window(num_tokens, scale_index, self.decoder_pos_embed_learned, mask)
        x = self.decoder_embed(x) + pos
        for block in self.decoder_blocks:
            x = block(x, cond, mask, update_cache=update_cache, scale_index=scale_index)
        return self.pred(self.decoder_norm(x))

    def forward(
        self,
        imgs: torch.Tensor,
        labels: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        noise: Sequence[torch.Tensor] | None = None,
        return_velocity: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training loss on latents ``imgs`` (B, C, H, W) with ``labels`` (B,): flow matching with noisy context.

        Every cell of every sample gets its own time ``t ~ sigmoid(N(0, 1))`` (``t``: (clusters B,), row
        ``cell * B + b``) and noise (``noise``: one (B, L, C) tensor per cell); all cells go through one
        block-causal pass and the loss is the MSE of the velocity against ``noise - x``. In training mode labels are
        dropped to the null class with ``label_drop_prob``. ``return_velocity`` also returns the prediction
        (B, S, C) in cell order.
        """
        batch = imgs.shape[0]
        labels = labels.long()
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(batch, device=imgs.device) < self.label_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        cells = self.clusterify(imgs)  # clusters x (B, L, C)
        if t is None:
            t = torch.sigmoid(torch.randn(self.clusters * batch, device=imgs.device))  # logit-normal
        if noise is None:
            noise = [torch.randn_like(cell) for cell in cells]
        if t.shape != (self.clusters * batch,) or len(noise) != self.clusters:
            raise ValueError(
                f"need t of shape ({self.clusters * batch},) and {self.clusters} noise tensors, got t "
                f"{tuple(t.shape)} and {len(noise)} noise tensors"
            )
        t_cells = t.to(imgs.dtype).view(self.clusters, batch, 1, 1)  # (n, B, 1, 1)
        x_t = torch.cat([(1 - t_cells[i]) * cells[i] + t_cells[i] * noise[i] for i in range(self.clusters)], dim=1)
        target = torch.cat([noise[i] - cells[i] for i in range(self.clusters)], dim=1)  # (B, S, C): v = eps - x
        condition = self.class_emb(labels).repeat(self.clusters, 1) + self.time_embed(flow_t_index(t))  # (n B, D)
        h = self.forward_mae_encoder(self.z_proj(x_t), condition, self.mask, scale_index=None)
        velocity = self.forward_mae_decoder(h, condition, self.mask, scale_index=None)  # (B, S, C)
        loss = ((velocity - target) ** 2).mean(dim=(1, 2)).mean()
        return (loss, velocity) if return_velocity else loss

    def sample_inference(
        self,
        x: torch.Tensor,
        label: torch.Tensor,
        time_input: torch.Tensor,
        update_cache: bool,
        scale_index: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One velocity evaluation during sampling (the cache protocol, spec §3.6).

        x: (R, N, C) with N = L (the current cell) or 2L (previous clean cell, then current cell); label: (R,);
        time_input: (n R,) one time per row and cell, cell-major. The time index is ``floor(1000 t)`` computed in
        ``time_input``'s own dtype — float64 on the sampler's first-evaluation path, which is what the official
        network does. ``update_cache=True`` (first evaluation of a cell): attend with ``mask`` and rewrite the cache
        to everything but the last cell; returns the last cell's velocity (R, L, C). ``False``: read-only.
        """
        if not time_input.dtype.is_floating_point:
            raise TypeError(f"time_input must be a floating tensor of times in [0, 1], got {time_input.dtype}")
        rows = x.shape[0]
        t_index = flow_t_index(time_input, time_input.dtype)  # (n R,)
        n = time_input.shape[0] // rows
        condition = self.class_emb(label.long()).repeat(n, 1) + self.time_embed(t_index)  # (n R, D)
        kw = dict(update_cache=update_cache, scale_index=scale_index)
        h = self.forward_mae_encoder(self.z_proj(x), condition, mask, **kw)
        out = self.forward_mae_decoder(h, condition, mask, **kw)
        return out[:, -self.cell_len:] if update_cache else out  # (R, L, C) or (R, N, C)

    def reset_cache(self) -> None:
        """Empty every attention's KV cache."""
        for block in chain(self.encoder_blocks, self.decoder_blocks):
            block.attn.k = block.attn.v = None

    # ---- sampling --------------------------------------------------------------------------------------------

    def sampling_plan(
        self, flow_upper_steps: int, flow_lower_steps: int, cfg: float = 1.0, *, official_short_grids: bool = True
    ) -> list[CellPlan]:
        """Per-cell step counts, guidance scales and evaluation costs of :meth:`sample_tokens` (validated).

        DiSA: ``N_s = L + floor((U - L)(T - s) / T)``, ``T = clusters - 1`` (50/15 -> 50, 38, 26, 15); the original
        xAR is ``U == L``. Guidance ramps ``w_s = 1 + (cfg - 1) s / T``. Raises ValueError for settings the official
        code cannot sample (see :meth:`sample_tokens`).
        """
        check_cfg(cfg)
        plans = []
        for s in range(self.clusters):
            n = annealed_steps(s, self.clusters, flow_upper_steps, flow_lower_steps, "linear")
            where = (
                f"cell {s} gets {n} flow step(s) (flow_upper_steps={flow_upper_steps}, "
                f"flow_lower_steps={flow_lower_steps})"
            )
            if n < 2:
                raise ValueError(f"{where}; xAR's sampler needs at least 2 (the official code crashes on 1)")
            if official_short_grids and n == 2 and 0 < s < self.clusters - 1:
                raise ValueError(
                    f"{where}; the official sampler re-encodes the context into the KV cache a second time on the "
                    f"last of 2 steps, and the next cell then crashes. Use flow_lower_steps >= 3, or "
                    f"official_short_grids=False for the fixed behaviour"
                )
            first = 2 * self.cell_len if s else self.cell_len
            tokens = tuple(first if first_eval_path(i, n, official_short_grids) else self.cell_len for i in range(n))
            plans.append(CellPlan(s, n, ramp_cfg_scale(cfg, s, self.clusters), tokens))
        return plans

    def nfe_per_ar_step(
        self, flow_upper_steps: int, flow_lower_steps: int, *, official_short_grids: bool = True
    ) -> list[int]:
        """Network evaluations (full transformer passes, each over the doubled batch) per cell."""
        plans = self.sampling_plan(flow_upper_steps, flow_lower_steps, official_short_grids=official_short_grids)
        return [p.network_evals for p in plans]

    def _labels(self, label: torch.Tensor | None, bsz: int | None) -> torch.Tensor:
        device = self.mask.device
        if label is None:
            if bsz is None or bsz < 1:
                raise ValueError(f"unconditional sampling (label=None) needs bsz >= 1 images, got bsz={bsz}")
            return torch.full((bsz,), self.num_classes, dtype=torch.long, device=device)
        if not isinstance(label, torch.Tensor) or label.dim() != 1 or label.dtype.is_floating_point:
            raise ValueError(f"label must be a 1-D integer tensor of class indices, got {label!r}")
        if bsz is not None and bsz != label.shape[0]:
            raise ValueError(f"bsz ({bsz}) does not match the {label.shape[0]} labels given")
        if label.numel() == 0 or int(label.min()) < 0 or int(label.max()) > self.num_classes:
            raise ValueError(
                f"labels must be class indices in [0, {self.num_classes - 1}] (or {self.num_classes} for "
                f"unconditional), got {label.tolist()}"
            )
        return label.to(device=device, dtype=torch.long)

    @torch.no_grad()
    def sample_tokens(
        self,
        cfg: float = 1.0,
        label: torch.Tensor | None = None,
        flow_upper_steps: int = 50,
        flow_lower_steps: int = 10,
        *,
        num_steps: int | None = None,
        bsz: int | None = None,
        noise: NoiseSource | None = None,
        official_short_grids: bool = True,
    ) -> torch.Tensor:
        """Generate latents (B, C, H, W) for ``label`` (B,), cell by cell (the DiSA fork's ``sample_tokens``).

        Cell ``s`` is sampled with ``N_s`` flow steps (:meth:`sampling_plan`), guidance ``w_s``, Euler–Maruyama with
        a final deterministic step; its sample becomes the clean context of the next cell. ``num_steps=N`` is the
        original xAR's ``sample_tokens(num_steps=N)``: N steps for every cell, i.e. ``flow_upper_steps =
        flow_lower_steps = N`` (then leave those two at their defaults). ``label=None`` with ``bsz``: unconditional.

        ``noise`` draws, in the official order, each cell's initial (B, L, C) float32 noise and then its per-step
        float64 noise (default: the global RNG; the initial noise comes from the CPU generator and the step noise
        from the model's device, as in the official code). ``PerImageNoise(seeds)`` makes image k independent of the
        rest of the batch.

        ``official_short_grids`` (default True) reproduces the official handling of cells with 2 steps: the last
        evaluation takes the first-evaluation path (float64 time index; with a context, re-encoded into the cache a
        second time, no mask); a setting where the next cell would crash raises ValueError. False sends that
        evaluation down the ordinary read-only path. Cells with 1 step raise ValueError (official: crash).
        """
        if num_steps is not None:
            if (flow_upper_steps, flow_lower_steps) != (50, 10):
                raise ValueError(
                    "pass either num_steps (the original xAR: the same count for every cell) or "
                    f"flow_upper_steps/flow_lower_steps (DiSA), got num_steps={num_steps} with "
                    f"flow_upper_steps={flow_upper_steps}, flow_lower_steps={flow_lower_steps}"
                )
            flow_upper_steps = flow_lower_steps = num_steps
        plans = self.sampling_plan(flow_upper_steps, flow_lower_steps, cfg, official_short_grids=official_short_grids)
        labels = self._labels(label, bsz)
        noise = TorchNoise() if noise is None else noise
        device = self.mask.device
        cell_shape = (labels.shape[0], self.cell_len, self.vae_embed_dim)
        self.reset_cache()
        try:
            context, cells = None, []
            for plan in plans:
                end = self.cell_len * (plan.ar_step + 1)
                # The official initial noise comes from the CPU generator (randn, then moved to the device).
                latents = noise(cell_shape, dtype=torch.float32, device="cpu").to(device)  # (B, L, C)
                sample = euler_maruyama_sampler(
                    self.sample_inference, latents, labels, plan.ar_step, condition=context,
                    num_steps=plan.num_steps, cfg_scale=plan.cfg_scale, mask=self.mask[:, :, :end, :end],
                    noise=noise, null_label=self.num_classes, official_short_grid=official_short_grids,
                )
                context = sample.float()  # (B, L, C): the next cell's clean context
                cells.append(context)
        finally:
            self.reset_cache()
        return self.unclusterify(torch.cat(cells, dim=1))  # (B, C, H, W)


def xar_base(**kwargs) -> xAR:
    return xAR(encoder_embed_dim=768, encoder_depth=8, encoder_num_heads=12,
               decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=12, mlp_ratio=4, **kwargs)


def xar_large(**kwargs) -> xAR:
    return xAR(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
               decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, mlp_ratio=4, **kwargs)


def xar_huge(**kwargs) -> xAR:
    return xAR(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
               decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, mlp_ratio=4, **kwargs)
