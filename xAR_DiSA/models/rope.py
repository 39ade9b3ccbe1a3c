"""2-D rotary position embedding of xAR, with its tables permuted into cell order (spec ``flowar_xar.md`` §1.4, §3.3).

The tables are the EVA-02 "fast" variant: per-axis rotary dim ``head_dim / 2``, base frequencies
``f_j = theta^(-2j / (head_dim / 2))``, each angle repeated twice (adjacent channel pairs rotate together, GPT-J
style), row angles in the first half of the channels and column angles in the second. xAR precomputes them once on
the fixed 16×16 latent grid and stores them as persistent buffers (``freqs``, ``freqs_cos``, ``freqs_sin``), which
the released checkpoints contain; their rows follow xAR's sequence order (cells in raster order, raster inside a
cell, see :func:`cell_order`), so a cell's rows are one contiguous slice.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["cell_order", "cell_rows", "rotate_half", "VisionRotaryEmbeddingFast"]


def cell_order(grid_size: int, cell_size: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Raster index ``r * grid_size + c`` of the latent token at each sequence position, shape ``(grid_size**2,)``.

    The ``grid_size``² grid is cut into ``(grid_size / cell_size)``² square cells taken in raster order, tokens in
    raster order inside each cell: position ``cell_len * cell + cell_size * (r mod cell_size) + (c mod cell_size)``
    holds raster token ``(r, c)``. xAR: 16×16 grid, 8×8 cells.
    """
    if grid_size < 1 or cell_size < 1 or grid_size % cell_size:
        raise ValueError(f"cell_size ({cell_size}) must divide grid_size ({grid_size}), both >= 1")
    n = grid_size // cell_size
    raster = torch.arange(grid_size * grid_size, device=device).view(n, cell_size, n, cell_size)  # (rb, r, cb, c)
    return raster.permute(0, 2, 1, 3).reshape(-1)  # (rb, cb, r, c) flattened


def cell_rows(scale_index: int, num_tokens: int, cell_len: int) -> slice:
    """Sequence rows ``[cell_len (s + 1) - N, cell_len (s + 1))``: the rows an input of ``N`` tokens ending with cell
    ``s`` occupies (``N = cell_len``: cell s alone; ``2 cell_len``: the previous cell as context, then cell s).
    RoPE tables, learned position embeddings and the mask are all sliced this way."""
    end = cell_len * (scale_index + 1)
    if scale_index < 0 or not 0 < num_tokens <= end:
        raise ValueError(
            f"an input of {num_tokens} tokens cannot end with cell {scale_index} (cells hold {cell_len} tokens; "
            f"allowed: scale_index >= 0 and 1 <= tokens <= {end})"
        )
    return slice(end - num_tokens, end)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs by 90°: ``(x_{2k}, x_{2k+1}) -> (-x_{2k+1}, x_{2k})``."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., C/2, 2)
    first, second = pairs.unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    """RoPE for xAR's attention: ``x * cos + rotate_half(x) * sin`` with cell-ordered tables.

    ``dim`` is the per-axis rotary dim (``head_dim / 2``, as the official constructor takes it); the tables have
    ``head_dim`` channels and ``pt_seq_len``² rows. Buffers: ``freqs`` (``dim / 2``), ``freqs_cos``/``freqs_sin``
    (``pt_seq_len``², ``2 dim``).
    """

    def __init__(self, dim: int, pt_seq_len: int = 16, clusters: int = 4, theta: float = 10000.0) -> None:
        super().__init__()
        cells_per_side = round(clusters**0.5)
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dim per axis must be even and >= 2 (head_dim a multiple of 4), got {dim}")
        if cells_per_side**2 != clusters or pt_seq_len % cells_per_side:
            raise ValueError(f"clusters ({clusters}) must be a square whose side divides pt_seq_len ({pt_seq_len})")
        self.pt_seq_len = pt_seq_len
        self.clusters = clusters
        self.seq_len = pt_seq_len * pt_seq_len
        self.cell_len = self.seq_len // clusters

        # Computed in float32 exactly as the checkpoints' buffers were (the stored tables match bit for bit).
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # (dim/2,)
        self.register_buffer("freqs", freqs)
        positions = torch.arange(pt_seq_len) / pt_seq_len * pt_seq_len  # (P,) = 0..P-1, float32
        axis = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (P, dim): pairs share an angle
        rows = axis[:, None, :].expand(pt_seq_len, pt_seq_len, dim)  # angle of the token's row
        cols = axis[None, :, :].expand(pt_seq_len, pt_seq_len, dim)  # angle of the token's column
        angles = torch.cat([rows, cols], dim=-1).reshape(self.seq_len, 2 * dim)  # (P², head_dim), raster order
        order = cell_order(pt_seq_len, pt_seq_len // cells_per_side)
        self.register_buffer("freqs_cos", angles.cos()[order].contiguous())  # (P², head_dim), cell order
        self.register_buffer("freqs_sin", angles.sin()[order].contiguous())

    def forward(self, x: torch.Tensor, scale_index: int | None = None) -> torch.Tensor:
        """x: (B, H, N, head_dim). ``scale_index`` None: the whole sequence (N = P², training); else the ``N`` rows
        ending with cell ``scale_index`` (see :func:`cell_rows`)."""
        if scale_index is None:
            cos, sin = self.freqs_cos, self.freqs_sin
        else:
            rows = cell_rows(scale_index, x.shape[2], self.cell_len)
            cos, sin = self.freqs_cos[rows], self.freqs_sin[rows]  # (N, head_dim)
        return x * cos + rotate_half(x) * sin
