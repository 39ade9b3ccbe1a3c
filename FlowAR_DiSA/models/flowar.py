"""FlowAR: scale-wise autoregressive generation with a per-scale flow-matching head, plus DiSA step annealing.

Spec: ``flowar_xar.md`` §2 (the official FlowAR_DiSA code at 283fa59, described in prose; no code was copied).

Generation runs over the token grids of the scales ``(1, 2, 4, 8, 16)`` (1 + 4 + 16 + 64 + 256 = 341 tokens of the
16-channel KL-16 latent). At scale k the AR transformer (encoder + decoder of AdaLN blocks conditioned on the class
embedding, block-causal over scales, KV-cached at inference) reads the class token (k = 0) or the up-sampled
previous scale (k >= 1) and outputs one condition vector per token; the flow head then integrates the scale's
tokens from noise with ``N_k`` Euler steps. DiSA anneals ``N_k`` linearly from ``flow_upper_steps`` at the first
scale to ``flow_lower_steps`` at the last (:func:`disa.schedules.annealed_steps`, T = number of scales - 1).

Faithful by default, with explicit switches for the official quirks:

* the flow time grid is uniform only for 50 steps, odd counts lose a step (``official_grid=False``: N uniform
  steps; see :func:`disa.schedules.flowar_time_grid`);
* inference up-samples through a **hard-coded 16 x 16** bicubic intermediate (:data:`INFERENCE_UPSAMPLE_SIDE`),
  training through the latent's own size; identical for the real 16 x 16 latent;
* CFG ramps across scales (1 at the first, ``cfg`` at the last) and is applied only for ``t <= guidance``; outside
  it the unconditional half is integrated from its own noise and then discarded;
* the initial noise comes from torch's global **CPU** generator unless a :class:`disa.noise.NoiseSource` is given
  (``PerImageNoise`` makes image k independent of the batch it is generated in).

Deviations (none changes a result of the official code): ``labels=None`` raises a clear error where the official
code crashes; ``flowar_huge(use_checkpoint=...)`` is accepted where the official factory raised ``TypeError``; the
KV cache is an explicit object per sampling call instead of state inside the attention modules.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from disa.guidance import check_cfg, ramp_cfg_scale
from disa.layers import compile_forward, uncompile_forward
from disa.noise import NoiseSource, TorchNoise
from disa.schedules import step_schedule

from .flowmodel import SimpleTransformerAdaLN
from .layers import AdaLNBlock, KVCache, RMSNorm, maybe_checkpoint, mlp_hidden_features
from .rope import GridRotaryEmbedding
from .sampler import euler_sampler, num_evaluations

__all__ = [
    "INFERENCE_UPSAMPLE_SIDE",
    "compile_head",
    "FlowARConfig",
    "ARCache",
    "FlowAR",
    "flowar_small",
    "flowar_large",
    "flowar_huge",
    "scale_offsets",
    "block_causal_mask",
    "patchify",
    "unpatchify",
    "scale_targets",
    "upsample_tokens",
    "teacher_inputs",
]

# Official quirk: at inference every scale is up-sampled to 16 x 16 (bicubic) before the area resize to the next
# scale, whatever the latent size; training goes through the latent's own size instead.
INFERENCE_UPSAMPLE_SIDE = 16


# --------------------------------------------------------------------------------------------------------------
# Scale geometry (pure functions)


def scale_offsets(sides: Sequence[int]) -> list[int]:
    """Token offsets of each scale in the sequence: ``(1, 2, 4, 8, 16) -> [0, 1, 5, 21, 85, 341]``."""
    offsets = [0]
    for side in sides:
        offsets.append(offsets[-1] + side * side)
    return offsets


def block_causal_mask(sides: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Additive mask (1, 1, L, L): 0 where a token may attend (every token of its own or a coarser scale), -inf else."""
    scale_of = torch.cat([torch.full((s * s,), k, device=device) for k, s in enumerate(sides)])  # (L,)
    allowed = scale_of[None, :] <= scale_of[:, None]  # (L, L): row = query, column = key
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


def patchify(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, n, n) -> (B, n*n, C), tokens in raster order (patch size 1)."""
    return grid.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """(B, n*n, C) -> (B, C, n, n)."""
    batch, n_tokens, channels = tokens.shape
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} tokens on a square grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


def scale_targets(latent: torch.Tensor, sides: Sequence[int]) -> list[torch.Tensor]:
    """Training targets of every scale: area (average-pool) resizes of ``latent`` (B, C, H, W), as tokens (B, n^2, C).

    The last scale is the latent itself.
    """
    targets = [patchify(F.interpolate(latent, size=(side, side), mode="area")) for side in sides[:-1]]
    return targets + [patchify(latent)]


def upsample_tokens(tokens: torch.Tensor, side: int, via: tuple[int, int] | int) -> torch.Tensor:
    """The input of the next scale: tokens (B, n^2, C) -> bicubic to ``via`` (align_corners=False) -> area to
    ``side x side`` -> tokens (B, side^2, C). Float32 (the official code casts the float64 sample first)."""
    via = (via, via) if isinstance(via, int) else tuple(via)
    grid = unpatchify(tokens.to(torch.float32))  # (B, C, n, n)
    grid = F.interpolate(grid, size=via, mode="bicubic", align_corners=False)  # (B, C, *via)
    return patchify(F.interpolate(grid, size=(side, side), mode="area"))  # (B, side^2, C)


def teacher_inputs(latent: torch.Tensor, sides: Sequence[int]) -> torch.Tensor:
    """Teacher-forced inputs of scales 1.. (before ``z_proj``): latent (B, C, H, W) -> (B, L - 1, C).

    Scale k >= 1 reads the ground-truth scale k - 1 up-sampled through the latent's own size (H, W) (the training
    path; inference goes through :data:`INFERENCE_UPSAMPLE_SIDE` instead).
    """
    targets = scale_targets(latent, sides)
    via = tuple(latent.shape[-2:])
    return torch.cat([upsample_tokens(targets[k - 1], side, via) for k, side in enumerate(sides) if k > 0], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class FlowARConfig:
    """Constructor arguments of the official ``FlowAR`` (same names), validated.

    Defaults: the official constructor's where the spec states them (image and latent geometry, scales, classes,
    v1 flow head), the dropouts and flow-head size of the official CLI (0.1; 12 x 1536), FlowAR-L's AR transformer.
    Use the factories :func:`flowar_small` / :func:`flowar_large` / :func:`flowar_huge` for the released models.
    """

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 1024
    encoder_depth: int = 8
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    vae_embed_dim: int = 16
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 0
    diffloss_d: int = 12  # flow-head depth (official CLI --diffloss_d)
    diffloss_w: int = 1536  # flow-head width (official CLI --diffloss_w)
    scale: tuple[int, ...] = (1, 2, 4, 8, 16)  # token-grid side of each AR step
    cross: bool = False  # flow-head block type: False = v1 (FlowAR-S), True = v2 with cross-attention (L/H)
    use_checkpoint: bool = False  # activation checkpointing in training (no effect under no_grad)

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        for name in ("img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "vae_embed_dim", "class_num",
                     "diffloss_d", "diffloss_w"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FlowAR {name} must be a positive int, got {value!r}")
        if self.patch_size != 1:
            raise ValueError(f"FlowAR patch_size must be 1 (every official FlowAR model uses 1), got {self.patch_size}")
        if self.buffer_size != 0:
            raise ValueError(
                f"FlowAR buffer_size must be 0 (the official models have no buffer tokens), got {self.buffer_size}"
            )
        if self.img_size % self.vae_stride:
            raise ValueError(f"img_size {self.img_size} must be a multiple of vae_stride {self.vae_stride}")
        latent_side = self.img_size // self.vae_stride
        if (not self.scale or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.scale)
                or any(b <= a for a, b in zip(self.scale, self.scale[1:])) or self.scale[-1] != latent_side):
            raise ValueError(
                f"FlowAR scale must be strictly increasing positive grid sides ending at the latent side "
                f"img_size / vae_stride = {latent_side}, got {self.scale}"
            )
        if self.encoder_embed_dim != self.decoder_embed_dim:
            raise ValueError(
                f"encoder_embed_dim ({self.encoder_embed_dim}) must equal decoder_embed_dim "
                f"({self.decoder_embed_dim}): "
                "the class embedding conditions both halves of the AR transformer"
            )
        for part, dim, heads in (("encoder", self.encoder_embed_dim, self.encoder_num_heads),
                                 ("decoder", self.decoder_embed_dim, self.decoder_num_heads)):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(
                    f"{part}_embed_dim / {part}_num_heads must be an integer head size divisible by 4 (2-D RoPE), "
                    f"got {dim} / {heads}"
                )
        if self.diffloss_w < 64:
            raise ValueError(
                f"diffloss_w must be >= 64 (the flow head has diffloss_w // 64 heads), got {self.diffloss_w}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f"FlowAR label_drop_prob must be in [0, 1], got {self.label_drop_prob}")
        for name in ("attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"FlowAR {name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(eq=False)
class ARCache:
    """KV caches of every AR attention layer for one sampling call (fresh per call)."""

    encoder: list[KVCache] = field(default_factory=list)
    decoder: list[KVCache] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# The model


class FlowAR(nn.Module):
    """FlowAR with the official module names, so the released flat state dicts load with ``strict=True``.

    Construct with the official keyword arguments (see :class:`FlowARConfig`), or use the factories.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        allowed = [f.name for f in dataclasses.fields(FlowARConfig)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"unknown FlowAR argument(s) {unknown}; allowed: {', '.join(allowed)}")
        self.config = cfg = FlowARConfig(**kwargs)
        self.seq_sides: tuple[int, ...] = cfg.scale
        self.offsets = scale_offsets(cfg.scale)
        self.seq_len = self.offsets[-1]
        self.token_embed_dim = cfg.vae_embed_dim * cfg.patch_size**2
        self.class_num = cfg.class_num
        self.label_drop_prob = cfg.label_drop_prob
        dim = cfg.encoder_embed_dim

        # Registration order = the official state_dict order.
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.register_buffer("mask", block_causal_mask(cfg.scale))
        self.class_emb = nn.Embedding(cfg.class_num + 1, dim)  # the last row is the null class (CFG)
        self.z_proj = nn.Linear(self.token_embed_dim, dim)
        self.z_proj_ln = RMSNorm(dim)

        def blocks(depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                AdaLNBlock(dim, heads, mlp_hidden_features(dim, cfg.mlp_ratio), qkv_bias=True, ada_lin_sequential=True,
                           attn_drop=cfg.attn_dropout, proj_drop=cfg.proj_dropout)
                for _ in range(depth)
            )

        self.encoder_blocks = blocks(cfg.encoder_depth, cfg.encoder_num_heads)
        self.encoder_norm = RMSNorm(dim)
        self.decoder_embed = nn.Linear(dim, dim)
        self.decoder_blocks = blocks(cfg.decoder_depth, cfg.decoder_num_heads)
        self.decoder_norm = RMSNorm(dim)
        self.flownet = SimpleTransformerAdaLN(
            in_channels=self.token_embed_dim,
            model_channels=cfg.diffloss_w,
            out_channels=self.token_embed_dim,
            z_channels=dim,
            num_res_blocks=cfg.diffloss_d,
            cross=cfg.cross,
            use_checkpoint=cfg.use_checkpoint,
        )
        self.initialize_weights()

    # ---- weights -----------------------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Training initialisation (DiT/MAR style; the official initialiser is not part of the recorded data and
        does not matter for released checkpoints): N(0, 0.02) embeddings, Xavier Linears with zero biases, zeroed
        AdaLN modulations and flow output so every block starts as the identity and the head predicts 0."""
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned,
                  self.class_emb.weight):
            nn.init.normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        flow = self.flownet
        nn.init.normal_(flow.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(flow.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.ada_lin[-1] for b in (*self.encoder_blocks, *self.decoder_blocks)]
        zeroed += [flow.final_layer.adaLN_modulation[-1], flow.final_layer.linear]
        for block in flow.res_blocks:
            zeroed += [block.ada_lin_attn, block.ada_lin_mlp] if flow.cross else [block.ada_lin]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def expected_buffers(self) -> dict[str, torch.Tensor]:
        """The persistent buffers (``mask``, every ``*.rope.freqs``) as this configuration computes them."""
        fresh = {"mask": block_causal_mask(self.seq_sides, device="cpu")}
        for name, module in self.named_modules():
            if isinstance(module, GridRotaryEmbedding):
                fresh[f"{name}.freqs"] = module.base_frequencies(module.head_dim, module.theta, device="cpu")
        return fresh

    def check_buffers(self) -> None:
        """Raise if the loaded ``mask`` / ``rope.freqs`` buffers differ from the recomputed ones (a checkpoint of a
        different layout, or a corrupted file). Frequencies may differ by float32 rounding (1e-6 relative)."""
        bad = []
        buffers = dict(self.named_buffers())
        for name, expected in self.expected_buffers().items():
            got = buffers[name].detach().cpu().float()
            if name == "mask":
                ok = torch.equal(got, expected)
            else:
                ok = torch.allclose(got, expected, rtol=1e-6, atol=0.0)
            if not ok:
                bad.append(name)
        if bad:
            raise ValueError(f"FlowAR buffers differ from the values this configuration computes: {', '.join(bad)}")

    # ---- AR transformer ------------------------------------------------------------------------------------------

    def new_cache(self) -> ARCache:
        """Empty KV caches for one sampling call."""
        return ARCache([KVCache() for _ in self.encoder_blocks], [KVCache() for _ in self.decoder_blocks])

    def _segment_sides(self, x: torch.Tensor, start: int, end: int, caches: list[KVCache] | None) -> tuple[int, ...]:
        """RoPE grid sides of the tokens [start, end), after checking the range, x (R, end - start, D) and the cache."""
        if start not in self.offsets or end not in self.offsets or not start < end:
            raise ValueError(f"token range [{start}, {end}) must span whole scales; scale offsets are {self.offsets}")
        if x.dim() != 3 or x.shape[1] != end - start:
            raise ValueError(f"tokens [{start}, {end}) need x of shape (R, {end - start}, D), got {tuple(x.shape)}")
        if caches is not None and caches[0].length != start:
            raise ValueError(f"KV cache holds {caches[0].length} tokens but this pass starts at token {start}")
        return self.seq_sides[self.offsets.index(start) : self.offsets.index(end)]

    def _run_blocks(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None,
        sides: tuple[int, ...],
        caches: list[KVCache] | None,
    ) -> torch.Tensor:
        for i, block in enumerate(blocks):
            cache = None if caches is None else caches[i]
            x = maybe_checkpoint(self.config.use_checkpoint, block, x, condition, mask, sides, cache)
        return x

    def forward_mae_encoder(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        *,
        cache: ARCache | None = None,
    ) -> torch.Tensor:
        """Encoder pass over the tokens ``[start, end)`` (whole scales).

        x (R, end - start, D): embedded inputs (the class embedding for scale 0, ``z_proj`` of the up-sampled
        previous scale after it); condition (R, D): class embeddings (the AdaLN condition of every block);
        mask: additive attention mask (training: the block-causal ``self.mask`` over the whole sequence); cache:
        the sampling call's KV caches (inference: one scale at a time, attending over all cached scales).
        Returns (R, end - start, D).
        """
        end = self.seq_len if end is None else end
        caches = None if cache is None else cache.encoder
        sides = self._segment_sides(x, start, end, caches)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, start:end])
        return self.encoder_norm(self._run_blocks(self.encoder_blocks, x, condition, mask, sides, caches))

    def forward_mae_decoder(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        mask: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        *,
        cache: ARCache | None = None,
    ) -> torch.Tensor:
        """Decoder pass (arguments as :meth:`forward_mae_encoder`); returns the flow-head condition z (R, N, D),
        the diffusion position embedding included."""
        end = self.seq_len if end is None else end
        caches = None if cache is None else cache.decoder
        sides = self._segment_sides(x, start, end, caches)
        x = self.decoder_embed(x) + self.decoder_pos_embed_learned[:, start:end]
        x = self._run_blocks(self.decoder_blocks, x, condition, mask, sides, caches)
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned[:, start:end]

    # ---- training ------------------------------------------------------------------------------------------------

    def _check_latent(self, latent: torch.Tensor) -> None:
        side = self.seq_sides[-1]
        if latent.dim() != 4 or tuple(latent.shape[1:]) != (self.token_embed_dim, side, side):
            raise ValueError(
                f"expected latents (B, {self.token_embed_dim}, {side}, {side}), got {tuple(latent.shape)}"
            )

    def forward_backbone(self, latent: torch.Tensor, labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher-forced AR pass over the whole sequence with the block-causal mask.

        latent (B, C, h, w) (VAE latents times 0.2325), labels (B,) (already dropped; ``class_num`` = null).
        Returns the per-scale targets (list of (B, n^2, C)) and z (B, L, D), the flow-head condition of every token.
        """
        self._check_latent(latent)
        condition = self.class_emb(labels)  # (B, D)
        x = torch.cat([condition.unsqueeze(1), self.z_proj(teacher_inputs(latent, self.seq_sides))], dim=1)  # (B, L, D)
        x = self.forward_mae_encoder(x, condition, self.mask)
        return scale_targets(latent, self.seq_sides), self.forward_mae_decoder(x, condition, self.mask)

    def flow_loss(self, target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE of one scale: t ~ U(0, 1) per row (shared by its tokens), ``x_t = (1 - t) x0 + t eps``,
        target velocity ``eps - x0``. target (B, N, C), z (B, N, D)."""
        t = torch.rand(target.shape[0], device=target.device)  # (B,)
        eps = torch.randn_like(target)
        t_ = t[:, None, None]
        x_t = (1 - t_) * target + t_ * eps
        return F.mse_loss(self.flownet(x_t, t, z), eps - target)

    def forward(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: ``sum_k (n_k^2 / n_K^2) * L_k`` over the scales (the official weights n_k^2 / 256 for the
        16 x 16 latent), with labels dropped to the null class with probability ``label_drop_prob`` in training."""
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.class_num), labels)
        targets, z = self.forward_backbone(latent, labels)
        last = self.seq_sides[-1] ** 2
        loss = latent.new_zeros(())
        for k, target in enumerate(targets):
            z_k = z[:, self.offsets[k] : self.offsets[k + 1]]
            loss = loss + self.flow_loss(target, z_k) * (target.shape[1] / last)
        return loss

    # ---- sampling ------------------------------------------------------------------------------------------------

    def flow_num_steps(
        self, flow_upper_steps: int = 50, flow_lower_steps: int = 15, *, num_steps: int | None = None
    ) -> list[int]:
        """The step count handed to the sampler at each scale: DiSA's linear annealing from upper to lower
        (``int((U - L)(T - k)/T + L)``, T = scales - 1), or ``num_steps`` everywhere (the original FlowAR)."""
        if num_steps is not None:
            return step_schedule(len(self.seq_sides), num_steps, num_steps)
        return step_schedule(len(self.seq_sides), flow_upper_steps, flow_lower_steps, "linear")

    def nfe_per_ar_step(
        self,
        flow_upper_steps: int = 50,
        flow_lower_steps: int = 15,
        *,
        num_steps: int | None = None,
        official_grid: bool = True,
        heun: bool = False,
    ) -> list[int]:
        """Flow-head calls at each AR step (scale) of :meth:`sample_tokens`; each call evaluates all rows (2B under
        CFG). The AR transformer adds one KV-cached pass per scale. 25 -> 15: [24, 22, 20, 16, 14]."""
        return [
            num_evaluations(n, heun=heun, official_grid=official_grid)
            for n in self.flow_num_steps(flow_upper_steps, flow_lower_steps, num_steps=num_steps)
        ]

    def _check_labels(self, labels: torch.Tensor | Sequence[int] | None, device: torch.device) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "sample_tokens needs labels: a (B,) tensor of class indices in [0, class_num]; for unconditional "
                f"samples pass the null class {self.class_num} with cfg=1.0"
            )
        labels = torch.as_tensor(labels, device=device)
        if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) > self.class_num:
            raise ValueError(f"labels must lie in [0, {self.class_num}] ({self.class_num} = null class), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.long()

    @torch.no_grad()
    def sample_tokens(
        self,
        flow_upper_steps: int = 50,
        flow_lower_steps: int = 15,
        guidance: float = 0.9,
        cfg: float = 1.0,
        labels: torch.Tensor | Sequence[int] | None = None,
        progress: bool = False,
        *,
        num_steps: int | None = None,
        noise: NoiseSource | None = None,
        official_grid: bool = True,
        heun: bool = False,
        cache_condition: bool = True,
        sync_free_guidance: bool = True,
    ) -> torch.Tensor:
        """Generate latents (B, C, h, w) (float32, to be divided by 0.2325 for the VAE) for ``labels`` (B,).

        ``flow_upper_steps`` / ``flow_lower_steps``: DiSA's step counts at the first / last scale (equal values give
        the original FlowAR, as does ``num_steps``, the original ``--num_step``). ``cfg``: guidance scale at the last
        scale (ramped from 1 at the first); ``guidance``: guide only for ``t <= guidance``. ``noise``: source of
        the initial noise of each scale, one ``(R, n^2, C)`` draw per scale in that order (default: torch's global
        CPU generator, as the official code); ``PerImageNoise(seeds)`` makes image b depend on ``seeds[b]`` only.
        ``official_grid=False``: uniform time grids with exactly N steps. ``heun=True``: Heun's method (not official).
        ``cache_condition`` / ``sync_free_guidance``: speed-only switches of :func:`~.sampler.euler_sampler` (the
        same samples either way; ``False`` runs the reference paths, for before/after comparisons).
        """
        guidance = float(guidance)
        if not guidance >= 0.0:
            raise ValueError(f"guidance (the upper end of the guidance interval) must be >= 0, got {guidance}")
        cfg = check_cfg(cfg)
        steps = self.flow_num_steps(flow_upper_steps, flow_lower_steps, num_steps=num_steps)
        device = self.class_emb.weight.device
        labels = self._check_labels(labels, device)
        noise = TorchNoise(torch.default_generator) if noise is None else noise
        batch, num_scales = labels.shape[0], len(self.seq_sides)
        guided = cfg != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.class_num)])  # rows [cond; uncond]
        rows = labels.shape[0]
        condition = self.class_emb(labels)  # (R, D)
        cache = self.new_cache()
        sample: torch.Tensor | None = None
        for k in tqdm(range(num_scales), disable=not progress, desc="scales"):
            side, start, end = self.seq_sides[k], self.offsets[k], self.offsets[k + 1]
            if sample is None:
                x = condition.unsqueeze(1)  # (R, 1, D): the class token
            else:
                previous = sample[:batch]  # (B, n_{k-1}^2, C) float64, conditional half
                if guided:
                    previous = torch.cat([previous, previous])  # both halves continue from the conditional sample
                x = self.z_proj(upsample_tokens(previous, side, INFERENCE_UPSAMPLE_SIDE))  # (R, n^2, D)
            z = self.forward_mae_encoder(x, condition, None, start, end, cache=cache)
            z = self.forward_mae_decoder(z, condition, None, start, end, cache=cache)  # (R, n^2, D)
            latents = noise((rows, side * side, self.token_embed_dim), dtype=torch.float32, device=device)
            sample = euler_sampler(
                self.flownet,
                latents,
                z,
                steps[k],
                heun,
                cfg_scale=ramp_cfg_scale(cfg, k, num_scales),
                guidance_low=0.0,
                guidance_high=guidance,
                official_grid=official_grid,
                cache_condition=cache_condition,
                sync_free_guidance=sync_free_guidance,
            )  # (R, n^2, C) float64
        return unpatchify(sample[:batch].to(torch.float32))  # (B, C, h, w)


def compile_head(
    model: FlowAR, *, enabled: bool = True, mode: str | None = None, cuda_graphs: bool = False, dynamic: bool = False
) -> FlowAR:
    """Opt-in: ``torch.compile`` the per-token flow head in place (``model.flownet``, called for every flow
    step); returns ``model``.

    Speed only: the ``state_dict`` is unchanged and results equal the eager ones to floating-point rounding (the
    compiled kernels may fuse and reorder operations; measured in ``tests/test_fast_paths.py``).
    ``cuda_graphs=True`` (CUDA only) also replays the head from CUDA graphs (:func:`disa.layers.compile_forward`).
    ``enabled=False`` restores the eager forward (the reference path for side-by-side comparisons).
    ``dynamic=False`` (default here): one static graph per scale, since the head derives its RoPE grid from the
    token count (a symbolic count would break the graph) and there are only a few scales.
    """
    if enabled:
        compile_forward(model.flownet, mode=mode, cuda_graphs=cuda_graphs, dynamic=dynamic)
    else:
        uncompile_forward(model.flownet)
    return model


# --------------------------------------------------------------------------------------------------------------
# Factories (official names). The flow-head size is part of each released model; the official factories left it
# to the CLI (--diffloss_d / --diffloss_w, whose defaults 12 / 1536 only fit H), so here it defaults per size.


def flowar_small(**kwargs: Any) -> FlowAR:
    """FlowAR-S: D 768, 6 + 6 AR blocks, 12 heads; v1 flow head 2 x 1024 (171,718,072 parameters)."""
    kwargs = {"diffloss_d": 2, "diffloss_w": 1024, **kwargs}
    return FlowAR(encoder_embed_dim=768, encoder_depth=6, encoder_num_heads=12, decoder_embed_dim=768, decoder_depth=6,
                  decoder_num_heads=12, mlp_ratio=4.0, **kwargs)


def flowar_large(**kwargs: Any) -> FlowAR:
    """FlowAR-L: D 1024, 8 + 8 AR blocks, 16 heads; v2 flow head 12 x 1024 (586,862,912 parameters)."""
    kwargs = {"diffloss_d": 12, "diffloss_w": 1024, **kwargs}
    return FlowAR(encoder_embed_dim=1024, encoder_depth=8, encoder_num_heads=16, decoder_embed_dim=1024,
                  decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, cross=True, **kwargs)


def flowar_huge(**kwargs: Any) -> FlowAR:
    """FlowAR-H: D 1536, 15 + 15 AR blocks, 16 heads (head size 96); v2 flow head 12 x 1536 (1,913,316,880
    parameters). Activation checkpointing is on by default, as in the official factory (which, unlike this one,
    raised TypeError when ``use_checkpoint`` was passed again)."""
    kwargs = {"diffloss_d": 12, "diffloss_w": 1536, "use_checkpoint": True, **kwargs}
    return FlowAR(encoder_embed_dim=1536, encoder_depth=15, encoder_num_heads=16, decoder_embed_dim=1536,
                  decoder_depth=15, decoder_num_heads=16, mlp_ratio=4.0, cross=True, **kwargs)
