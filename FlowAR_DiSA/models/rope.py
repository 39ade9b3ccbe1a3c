"""FlowAR's 2-D rotary position embedding (an EVA-02 "fast" vision RoPE variant, spec flowar_xar.md §1.4).

Every attention module owns one (key ``<attn>.rope.freqs``, a persistent buffer of ``head_dim / 4`` base
frequencies that the released checkpoints contain). The tables are not stored: FlowAR derives the token grid from
the number of tokens it is given, so one module serves every scale.

Geometry, as the official code has it:

* an ``n x n`` grid is laid on a 16-unit axis anchored at the top-left corner: ``p_i = i * 16 / n``
  (n = 1: {0}; n = 2: {0, 8}; n = 4: {0, 4, 8, 12}; ...), so coarse scales see the coordinates of the top-left
  cell of each block they cover, not its centre;
* the first half of the channels encodes the row, the second half the column; within each half every frequency
  is repeated twice, **interleaved** (``f0 f0 f1 f1 ...``), and adjacent channels (2k, 2k+1) are rotated together
  (GPT-J pairing, not the NeoX half split); no channel passes through unrotated.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["GridRotaryEmbedding"]


class GridRotaryEmbedding(nn.Module):
    """Rotates queries/keys ``(..., N, head_dim)`` laid out as one or several square grids in raster order."""

    def __init__(self, head_dim: int, *, theta: float = 10000.0, pt_seq_len: int = 16) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4 (two axes of rotated pairs), got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.pt_seq_len = pt_seq_len
        self.register_buffer("freqs", self.base_frequencies(head_dim, theta))
        # (cos, sin) per (sides, device), built once instead of at every call: FlowAR's flow head rotates the same
        # grid in every block at every flow step. Keyed by the buffer's identity and version, so loading weights
        # or moving the module rebuilds them. ``cache_tables = False`` recomputes them per call (reference path).
        self.cache_tables = True
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def base_frequencies(
        head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``f_j = theta^(-2j / (head_dim/2))``, j < head_dim / 4, float32 (the ``rope.freqs`` buffer)."""
        axis_dim = head_dim // 2
        return 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim)

    def tables(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each float32 ``(side**2, head_dim)``, for a ``side x side`` grid in raster order."""
        # Same float32 operation order as the official module (i / n * 16), exact for power-of-two sides.
        pos = torch.arange(side, dtype=torch.float32, device=self.freqs.device) / side * self.pt_seq_len  # (n,)
        angles = (pos[:, None] * self.freqs.float()[None, :]).repeat_interleave(2, dim=-1)  # (n, head_dim/2)
        grid = torch.cat(
            [angles[:, None, :].expand(side, side, -1), angles[None, :, :].expand(side, side, -1)], dim=-1
        )  # (n, n, head_dim): rows then columns
        grid = grid.reshape(side * side, self.head_dim)
        return grid.cos(), grid.sin()

    def grid_tables(self, sides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(N, head_dim)`` for consecutive square grids of the given sides (cached, see __init__)."""
        if not self.cache_tables or torch.compiler.is_compiling():
            # Under torch.compile the tables are traced (and fused) instead: the cache's bookkeeping would break
            # the graph.
            return self._concat_tables(sides)
        key = (sides, self.freqs.device, self.freqs.data_ptr(), self.freqs._version)
        cached = self._tables.get(key)
        if cached is None:
            with torch.inference_mode(False):  # plain tensors: the cache may serve a later training pass
                cached = self._concat_tables(sides)
            self._tables = {k: v for k, v in self._tables.items() if k[1:] == key[1:]}  # drop stale entries
            self._tables[key] = cached
        return cached

    def _concat_tables(self, sides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        tables = [self.tables(s) for s in sides]
        return torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])

    def forward(self, x: torch.Tensor, sides: Sequence[int] | None = None) -> torch.Tensor:
        """Rotate ``x`` (..., N, head_dim).

        ``sides``: the grid side of each consecutive segment of the N tokens (a training sequence holds every
        scale: ``(1, 2, 4, ...)``, each rotated on its own grid). ``None``: the N tokens form one square grid,
        ``side = sqrt(N)``, which is how the official module is called at inference.
        """
        n_tokens = x.shape[-2]
        if sides is None:
            side = math.isqrt(n_tokens)
            if side * side != n_tokens:
                raise ValueError(f"RoPE without explicit sides needs a square token count, got {n_tokens} tokens")
            sides = (side,)
        if sum(s * s for s in sides) != n_tokens:
            raise ValueError(f"RoPE grid sides {list(sides)} cover {sum(s * s for s in sides)} tokens, got {n_tokens}")
        cos, sin = self.grid_tables(tuple(sides))  # (N, head_dim) each
        pairs = x.unflatten(-1, (-1, 2))  # (..., N, head_dim/2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        return (x * cos + rotated * sin).to(x.dtype)
