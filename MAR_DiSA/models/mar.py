"""MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization") with DiSA's step annealing.

A masked autoencoder over the VAE's token grid: the encoder sees ``buffer_size`` class-embedding rows plus the known
tokens, the decoder fills the unknown positions with ``mask_token`` and returns one condition vector ``z`` per
position, and the per-token diffusion head (:class:`~mar_disa.models.diffloss.DiffLoss`) turns the ``z`` of the
positions chosen at each autoregressive (AR) step into tokens. Positions are revealed in a random order on the
MaskGIT cosine schedule (:func:`mask_schedule`); classifier-free guidance (CFG) follows Muse's linear ramp
(:func:`disa.guidance.mar_cfg_scale`). The diffusion steps per AR step come from the head's sampler options
(``diff_sampler``, ``diff_upper_steps``, ``diff_lower_steps``, ``diff_annealing_strategy``, as in MAR_DiSA).

Module and parameter names are those of the official checkpoints (``specs/mar.md`` §1.2; timm's ViT ``Block``), so
``state_dict()`` equals the official key set and shapes and ``ckpt["model_ema"]`` loads with ``strict=True``.

Reproducibility additions to the upstream ``sample_tokens`` (keyword-only, defaults = upstream behaviour):

* ``orders``: inject the generation orders (default: numpy's global RNG, as upstream);
* ``noise``: a :class:`disa.noise.NoiseSource` for every diffusion draw (default: the global torch RNG).

The head receives the predicted positions **token-major**: row ``j * B + b`` is image ``b``'s ``j``-th predicted
position (ascending position index), cond rows first under CFG. That is the block layout of
:class:`disa.noise.PerImageNoise`, so with per-image seeds (:func:`orders_from_seeds` + ``PerImageNoise``) image k
is the same whatever the batch it is generated in. Upstream passes the rows image-major; this only decides which
i.i.d. draw lands on which token (the distribution is unchanged). Replaying noise recorded from the official code
therefore means permuting each recorded draw's rows (see ``tests/test_mar.py``).

Written from the project's specification (``specs/mar.md`` §1, §3); no upstream code is copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy import stats
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from disa.guidance import CFG_SCHEDULES, check_cfg, mar_cfg_is_guided, mar_cfg_scale
from disa.layers import compile_forward, uncompile_forward
from disa.noise import NoiseSource, TorchNoise
from disa.schedules import DDIM_CLIP, DISA_CLIP

from .diffloss import DiffLoss

__all__ = [
    "MAR",
    "SampleStats",
    "mask_schedule",
    "MaskStep",
    "mask_steps",
    "orders_from_seeds",
    "mar_base",
    "mar_large",
    "mar_huge",
    "MAR_MODELS",
    "compile_head",
]

NormLayer = Callable[..., nn.Module]


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each AR step ``k = 0..num_iter-1`` (MaskGIT / MAGE cosine schedule).

    ``m_k = floor(seq_len * cos(pi/2 * (k+1) / num_iter))`` clamped to ``[1, m_{k-1} - 1]`` (``m_{-1} = seq_len``):
    every step reveals at least one token. The last entry is clamped to 1 although the last AR step predicts every
    remaining token (official quirk; the linear CFG scale uses this clamped value, so it never reaches ``cfg``).
    """
    if seq_len < 1 or num_iter < 1:
        raise ValueError(f"need seq_len >= 1 and num_iter >= 1, got seq_len={seq_len}, num_iter={num_iter}")
    masked, after = seq_len, []
    for k in range(num_iter):
        target = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
        masked = max(1, min(masked - 1, target))
        after.append(masked)
    return after


def orders_from_seeds(
    seeds: Sequence[int], seq_len: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """One generation order per image from its own seed, ``(B, seq_len)`` int64.

    Row ``b`` is ``np.random.RandomState(seeds[b])``'s shuffle of ``0..seq_len-1``: the order upstream MAR draws for
    a batch of one after ``np.random.seed(seeds[b])``. It depends on the seed only, never on the batch.
    """
    if len(seeds) == 0:
        raise ValueError("orders_from_seeds needs at least one seed")
    rows = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seeds must be ints in [0, 2**32), got {seed!r}")
        rows.append(np.random.RandomState(int(seed)).permutation(seq_len))
    return torch.from_numpy(np.stack(rows)).to(device=device, dtype=torch.int64)


@dataclass(frozen=True)
class MaskStep:
    """One AR step of the reveal schedule for a batch of generation orders."""

    step: int
    mask: torch.Tensor  # (B, N) float, 1 = still unknown entering the step
    positions: torch.Tensor  # (B, n) int64, ascending: the positions this step predicts
    masked_after: int  # tokens still masked after the step, as upstream counts them (clamped to >= 1)


def mask_steps(orders: torch.Tensor, num_iter: int) -> Iterator[MaskStep]:
    """The AR steps for ``orders (B, N)`` (one permutation per image) on :func:`mask_schedule`.

    The unknown positions are always the first ``m`` entries of each order, so positions are revealed from the
    tail of the permutation towards its head; the last step predicts every position still unknown.
    """
    bsz, seq_len = orders.shape
    masked_before = seq_len
    for k, masked_after in enumerate(mask_schedule(seq_len, num_iter)):
        lo = 0 if k == num_iter - 1 else masked_after
        mask = torch.zeros(bsz, seq_len, device=orders.device).scatter(1, orders[:, :masked_before], 1.0)
        yield MaskStep(k, mask, orders[:, lo:masked_before].sort(dim=1).values, masked_after)
        masked_before = masked_after


@dataclass(frozen=True)
class SampleStats:
    """What one :meth:`MAR.sample_tokens` call ran, per AR step (for NFE and cost reporting).

    ``tokens_per_step[k]``: positions predicted per image at AR step k (sums to ``seq_len``).
    ``head_calls_per_step[k]``: sequential diffusion-head evaluations at step k, measured (each is one batch over
    all predicted rows, both CFG halves included). ``guided``: whether the rows were doubled for CFG.
    """

    tokens_per_step: tuple[int, ...]
    head_calls_per_step: tuple[int, ...]
    guided: bool

    @property
    def transformer_passes(self) -> int:
        """Encoder + decoder passes (one per AR step)."""
        return len(self.tokens_per_step)

    @property
    def head_calls(self) -> int:
        """Sequential diffusion-head evaluations over the whole call (the NFE DiSA reduces)."""
        return sum(self.head_calls_per_step)

    @property
    def token_evals_per_image(self) -> int:
        """Head evaluations summed over the tokens of one image, one CFG branch: ``sum_k tokens_k * calls_k``."""
        return sum(n * c for n, c in zip(self.tokens_per_step, self.head_calls_per_step))


class MAR(nn.Module):
    """Masked autoregressive generator over ``(img_size / vae_stride / patch_size)^2`` VAE tokens.

    Constructor arguments are upstream MAR's plus MAR_DiSA's sampler options; keyword-only extras expose the
    head's explicit switches (:class:`DiffLoss`): ``train_clip`` (training diffusion, 950 as MAR_DiSA),
    ``disa_clip`` (950) / ``ddim_clip`` (980) for the samplers, ``dpm_cfg`` (off: DPM-Solver ignores CFG as in
    MAR_DiSA). ``norm_layer`` defaults to ``nn.LayerNorm`` (eps 1e-5) as upstream; the factories pass eps 1e-6,
    which the checkpoints were trained with.
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
        norm_layer: NormLayer = nn.LayerNorm,
        vae_embed_dim: int = 16,
        mask_ratio_min: float = 0.7,
        label_drop_prob: float = 0.1,
        class_num: int = 1000,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        diff_upper_steps: int = 25,
        diff_lower_steps: int = 5,
        diff_annealing_strategy: str = "linear",
        diff_sampler: str = "default",
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
        *,
        train_clip: int | None = DISA_CLIP,
        disa_clip: int | None = DISA_CLIP,
        ddim_clip: int | None = DDIM_CLIP,
        dpm_cfg: bool = False,
    ) -> None:
        super().__init__()
        _validate_architecture(
            img_size=img_size,
            vae_stride=vae_stride,
            patch_size=patch_size,
            encoder_embed_dim=encoder_embed_dim,
            encoder_num_heads=encoder_num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_num_heads=decoder_num_heads,
            vae_embed_dim=vae_embed_dim,
            class_num=class_num,
            buffer_size=buffer_size,
            diffusion_batch_mul=diffusion_batch_mul,
        )
        probabilities = {"label_drop_prob": label_drop_prob, "attn_dropout": attn_dropout, "proj_dropout": proj_dropout}
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not 0.0 <= mask_ratio_min < 1.0:
            raise ValueError(f"mask_ratio_min must be in [0, 1), got {mask_ratio_min}")

        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.buffer_size = buffer_size
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        # Training mask ratio: a half-Gaussian (std 0.25) on [mask_ratio_min, 1], peaked at "everything masked".
        # scipy draws from numpy's global RNG, like upstream (main_mar seeds numpy with seed + rank).
        self.mask_ratio_generator = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
        self.last_sample_stats: SampleStats | None = None

        # Registration order = the official state_dict order: module-level parameters first, then the submodules.
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # class embedding of "no class" (CFG)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + self.seq_len, encoder_embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + self.seq_len, decoder_embed_dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        # Fixed eps 1e-6 whatever norm_layer is (upstream builds it directly, not through norm_layer).
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                        proj_drop=proj_dropout, attn_drop=attn_dropout)  # fmt: skip
        self.encoder_blocks = nn.ModuleList(block(encoder_embed_dim, encoder_num_heads) for _ in range(encoder_depth))
        self.encoder_norm = norm_layer(encoder_embed_dim)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        # Initialise before the head exists: the head keeps its own init (zeroed AdaLN and output layers).
        self.initialize_weights()

        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim,
            z_channels=decoder_embed_dim,
            depth=diffloss_d,
            width=diffloss_w,
            diff_upper_steps=diff_upper_steps,
            diff_lower_steps=diff_lower_steps,
            diff_annealing_strategy=diff_annealing_strategy,
            diff_sampler=diff_sampler,
            grad_checkpointing=grad_checkpointing,
            train_clip=train_clip,
            disa_clip=disa_clip,
            ddim_clip=ddim_clip,
            dpm_cfg=dpm_cfg,
        )

    def initialize_weights(self) -> None:
        """N(0, 0.02) embeddings and tokens; Xavier-uniform Linears with zero bias; LayerNorms at (1, 0)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):  # fmt: skip
            nn.init.normal_(p, std=0.02)

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init)

    # ---- token layout ----------------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, H, W)`` -> tokens ``(B, (H/p)(W/p), C p^2)``: token ``h * W/p + w``, channels ``(c, i, j)``
        for patch size p."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, seq_len, C p^2)`` -> latent ``(B, C, seq_h p, seq_w p)``; the inverse of :meth:`patchify`."""
        b, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    def sample_orders(self, bsz: int) -> torch.Tensor:
        """Random generation orders ``(B, seq_len)`` int64, one numpy global-RNG permutation per image (upstream)."""
        orders = np.stack([np.random.permutation(self.seq_len) for _ in range(bsz)])
        return torch.from_numpy(orders).to(device=self.fake_latent.device, dtype=torch.int64)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """Training mask ``(B, N)`` float, 1 = masked: the first ``ceil(N * r)`` positions of each order, with one
        ratio ``r`` per batch from the truncated Gaussian on ``[mask_ratio_min, 1]``."""
        bsz, seq_len, _ = x.shape
        rate = float(self.mask_ratio_generator.rvs(1)[0])
        num_masked = int(np.ceil(seq_len * rate))
        mask = torch.zeros(bsz, seq_len, device=x.device)
        return mask.scatter(1, orders[:, :num_masked], 1.0)

    # ---- MAE encoder / decoder -------------------------------------------------------------------------------

    def _visible(self, mask: torch.Tensor) -> torch.Tensor:
        """``(B, Bf + N)`` bool: buffer rows and known tokens; every row must have the same count."""
        keep = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1) == 0
        counts = keep.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every row of the mask must hide the same number of tokens (got visible counts "
                f"{counts.tolist()} incl. {self.buffer_size} buffer rows)"
            )
        return keep

    def _visible_index(self, mask: torch.Tensor, visible: int) -> torch.Tensor:
        """``(B, visible)`` int64: the buffer rows and known tokens of each row (indices into ``Bf + N``, ascending),
        i.e. what indexing with :meth:`_visible` selects, found without reading a count back from the device."""
        masked = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)  # (B, Bf + N), 1 = hidden
        return torch.argsort(masked, dim=1, stable=True)[:, :visible]

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_mae_encoder(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        class_embedding: torch.Tensor,
        *,
        pos_embed: torch.Tensor | None = None,
        visible: int | None = None,
    ) -> torch.Tensor:
        """Tokens ``(B, N, C)``, mask ``(B, N)`` (1 = unknown; their values are ignored), class embedding ``(B, D)``
        -> ``(B, Bf + N_visible, D)``: ``Bf`` rows holding the class embedding, then the known tokens.

        ``pos_embed`` ``(1, Bf + N, D)`` replaces ``encoder_pos_embed_learned`` (Harmon passes it resized to a
        token grid other than the native one). ``visible``: ``Bf + N_visible`` when the caller knows it (the
        sampler does): the rows are then gathered without the validity check and the boolean indexing, which both
        wait for the device; the caller vouches that every row of ``mask`` hides the same number of tokens."""
        x = self.z_proj(x)  # (B, N, D); masked positions are projected too, then dropped
        bsz = x.shape[0]
        if self.training:
            # CFG dropout: replace the class by fake_latent with probability label_drop_prob per image. Drawn on the
            # CPU generator, as upstream does, so seeded runs match on every device.
            drop = (torch.rand(bsz) < self.label_drop_prob).to(device=x.device, dtype=x.dtype)[:, None]  # (B, 1)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        buffer = class_embedding[:, None, :].expand(bsz, self.buffer_size, -1)  # (B, Bf, D)
        x = torch.cat([buffer, x], dim=1)  # (B, Bf + N, D)
        pos_embed = self.encoder_pos_embed_learned if pos_embed is None else pos_embed
        x = self.z_proj_ln(x + pos_embed)  # the LayerNorm also sees the buffer rows
        if visible is None:
            x = x[self._visible(mask)].reshape(bsz, -1, x.shape[-1])  # (B, Bf + N_visible, D), row-major order
        else:
            index = self._visible_index(mask, visible)[..., None].expand(-1, -1, x.shape[-1])  # (B, V, D)
            x = x.gather(1, index)  # (B, Bf + N_visible, D), the same rows in the same order
        return self.encoder_norm(self._blocks(self.encoder_blocks, x))

    def forward_mae_decoder(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        *,
        pos_embed: torch.Tensor | None = None,
        diffusion_pos_embed: torch.Tensor | None = None,
        visible: int | None = None,
    ) -> torch.Tensor:
        """Encoder output ``(B, Bf + N_visible, D)`` and mask ``(B, N)`` -> per-position conditions ``z (B, N, D)``.

        ``pos_embed`` ``(1, Bf + N, D)`` and ``diffusion_pos_embed`` ``(1, N, D)`` replace the learned ones (Harmon
        passes them resized to its token grid). ``visible``: as in :meth:`forward_mae_encoder` (scatter instead of
        boolean indexing, no check against the mask)."""
        x = self.decoder_embed(x)  # (B, V, D)
        bsz, num_visible, dim = x.shape
        padded = self.mask_token.to(x.dtype).repeat(bsz, self.buffer_size + mask.shape[1], 1)  # (B, Bf + N, D)
        if visible is None:
            keep = self._visible(mask)  # (B, Bf + N)
            if keep.shape[0] != bsz or int(keep[0].sum()) != num_visible:
                raise ValueError(
                    f"encoder output has {bsz} rows of {num_visible} visible tokens, the mask gives {keep.shape[0]} "
                    f"rows of {int(keep[0].sum())} (buffer incl.)"
                )
            padded[keep] = x.reshape(-1, dim)  # back to their positions, row-major as the encoder gathered them
        else:
            if visible != num_visible:
                raise ValueError(f"encoder output has {num_visible} visible tokens per row, visible={visible}")
            index = self._visible_index(mask, visible)[..., None].expand(-1, -1, dim)  # (B, V, D)
            padded = padded.scatter(1, index, x)
        pos_embed = self.decoder_pos_embed_learned if pos_embed is None else pos_embed
        diffusion_pos_embed = self.diffusion_pos_embed_learned if diffusion_pos_embed is None else diffusion_pos_embed
        x = self.decoder_norm(self._blocks(self.decoder_blocks, padded + pos_embed))
        return x[:, self.buffer_size :] + diffusion_pos_embed  # (B, N, D)

    # ---- training --------------------------------------------------------------------------------------------

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Diffusion loss on the masked positions; ``z (B, N, D)``, ``target (B, N, C)``, ``mask (B, N)``.

        Rows are tiled ``diffusion_batch_mul`` times, each copy with its own timestep and noise: more diffusion
        samples per transformer pass (MAR's training recipe uses 4).
        """
        mul = self.diffusion_batch_mul
        target = target.reshape(-1, target.shape[-1]).repeat(mul, 1)  # (mul B N, C)
        z = z.reshape(-1, z.shape[-1]).repeat(mul, 1)  # (mul B N, D)
        return self.diffloss(target, z, mask=mask.reshape(-1).repeat(mul))

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss for scaled VAE latents ``imgs (B, C, H, W)`` (posterior sample x 0.2325), classes ``labels``."""
        class_embedding = self.class_emb(labels)  # (B, D)
        x = self.patchify(imgs)  # (B, N, C)
        target = x.detach().clone()
        mask = self.random_masking(x, self.sample_orders(x.shape[0]))
        z = self.forward_mae_decoder(self.forward_mae_encoder(x, mask, class_embedding), mask)
        return self.forward_loss(z, target, mask)

    # ---- generation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_tokens(
        self,
        bsz: int,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        progress: bool = False,
        *,
        noise: NoiseSource | None = None,
        orders: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate ``bsz`` token grids in ``num_iter`` AR steps; returns scaled latents ``(B, C, seq_h p, seq_w p)``
        (divide by 0.2325 before decoding: :func:`disa.vae.tokens_to_latent`).

        ``labels`` ``(B,)`` int64 classes, or ``None`` for unconditional generation (``fake_latent``). With
        ``cfg != 1`` every pass runs ``2B`` rows ``[class; fake_latent]`` and the head is guided with the per-step
        scale of ``cfg_schedule`` (``linear``: Muse ramp; ``constant``). ``temperature`` scales the per-step noise
        of the ancestral samplers. ``orders`` ``(B, seq_len)``: one permutation per image (default: numpy's global
        RNG); ``noise``: the head's noise source (default: the global torch RNG). Per-step counts of what ran are
        left in :attr:`last_sample_stats`.
        """
        device = self.fake_latent.device
        labels = self._check_sampling_args(bsz, num_iter, cfg, cfg_schedule, labels, temperature)
        orders = self.sample_orders(bsz) if orders is None else self._check_orders(orders, bsz)
        noise = TorchNoise() if noise is None else noise
        guided = cfg != 1.0
        halves = 2 if guided else 1
        seq_len, channels = self.seq_len, self.token_embed_dim

        fake = self.fake_latent.expand(bsz, -1)  # (B, D)
        class_embedding = self.class_emb(labels) if labels is not None else fake  # (B, D)
        if guided:
            class_embedding = torch.cat([class_embedding, fake])  # (2B, D): conditional rows first
        tokens = torch.zeros(bsz, seq_len, channels, device=device)  # (B, N, C); zeros where unknown

        # Count the head's evaluations as they happen (the sampler decides how many it makes).
        head_calls = [0]
        hook = self.diffloss.net.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
        tokens_per_step, calls_per_step = [], []
        masked_before = seq_len  # known on the host: the sampler never reads a count back from the device
        try:
            for st in tqdm(mask_steps(orders, num_iter), total=num_iter, disable=not progress):
                state, mask = tokens.repeat(halves, 1, 1), st.mask.repeat(halves, 1)  # (H B, N, C), (H B, N)
                visible = self.buffer_size + seq_len - masked_before
                encoded = self.forward_mae_encoder(state, mask, class_embedding, visible=visible)  # (H B, V, D)
                z = self.forward_mae_decoder(encoded, mask, visible=visible)  # (H B, N, D)
                n = st.positions.shape[1]
                calls_before = head_calls[0]
                if n > 0:  # n = 0 only when num_iter > seq_len (the clamp then stalls some steps)
                    # (1,) float32 as upstream; filled on the device (torch.tensor(list, device) would copy and sync).
                    m_after = torch.full((1,), float(st.masked_after), device=device)
                    cfg_iter = mar_cfg_scale(cfg, cfg_schedule, m_after, seq_len)  # (1,)
                    rows = _token_major_rows(z, st.positions, halves)  # (H n B, D)
                    sampled = self.diffloss.sample(
                        rows, temperature, cfg_iter, step=st.step, ar_num_iter=num_iter, noise=noise,
                        guided=mar_cfg_is_guided(cfg, cfg_schedule, st.masked_after, seq_len),
                    )  # (H n B, C)
                    sampled = sampled[: n * bsz].reshape(n, bsz, channels).transpose(0, 1)  # (B, n, C), cond half
                    index = st.positions[..., None].expand(-1, -1, channels)  # (B, n, C)
                    tokens = tokens.scatter(1, index, sampled.to(tokens.dtype))
                tokens_per_step.append(n)
                calls_per_step.append(head_calls[0] - calls_before)
                masked_before = st.masked_after
        finally:
            hook.remove()
        self.last_sample_stats = SampleStats(tuple(tokens_per_step), tuple(calls_per_step), guided)
        return self.unpatchify(tokens)

    def _check_sampling_args(
        self,
        bsz: int,
        num_iter: int,
        cfg: float,
        cfg_schedule: str,
        labels: torch.Tensor | None,
        temperature: float,
    ) -> torch.Tensor | None:
        if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 1:
            raise ValueError(f"bsz must be an int >= 1, got {bsz!r}")
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"num_iter must be an int >= 1, got {num_iter!r}")
        check_cfg(cfg)
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {cfg_schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
        if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if labels is None:
            return None
        labels = torch.as_tensor(labels, device=self.fake_latent.device)
        if labels.shape != (bsz,) or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"labels must be {bsz} integer class ids, shape ({bsz},); got {labels.dtype} {tuple(labels.shape)}"
            )
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}")
        return labels.long()

    def _check_orders(self, orders: torch.Tensor, bsz: int) -> torch.Tensor:
        orders = torch.as_tensor(orders, device=self.fake_latent.device)
        if orders.shape != (bsz, self.seq_len) or orders.dtype != torch.int64:
            raise ValueError(
                f"orders must be int64 of shape ({bsz}, {self.seq_len}) (one permutation per image); "
                f"got {orders.dtype} {tuple(orders.shape)}"
            )
        if not torch.equal(orders.sort(dim=1).values, torch.arange(self.seq_len, device=orders.device).expand(bsz, -1)):
            raise ValueError(f"every row of orders must be a permutation of 0..{self.seq_len - 1}")
        return orders


def compile_head(
    model: MAR, *, enabled: bool = True, mode: str | None = None, cuda_graphs: bool = False, dynamic: bool | None = None
) -> MAR:
    """Opt-in: ``torch.compile`` the per-token diffusion head in place (``model.diffloss.net``, called for every
    diffusion step); returns ``model``.

    Speed only: the ``state_dict`` is unchanged and results equal the eager ones to floating-point rounding (the
    compiled kernels may fuse and reorder operations; measured in ``tests/test_fast_paths.py``).
    ``cuda_graphs=True`` (CUDA only) also replays the head from CUDA graphs (:func:`disa.layers.compile_forward`).
    ``enabled=False`` restores the eager forward (the reference path for side-by-side comparisons).
    ``dynamic``: as ``torch.compile`` (default: a static graph first, one dynamic graph once the row count changes,
    which it does at every AR step).
    """
    if enabled:
        compile_forward(model.diffloss.net, mode=mode, cuda_graphs=cuda_graphs, dynamic=dynamic)
    else:
        uncompile_forward(model.diffloss.net)
    return model


def _token_major_rows(z: torch.Tensor, positions: torch.Tensor, halves: int) -> torch.Tensor:
    """Rows of ``z (H B, N, D)`` at ``positions (B, n)`` for each half, laid out ``[h][j][b]`` -> ``(H n B, D)``."""
    hb, _, dim = z.shape
    bsz, n = positions.shape
    index = positions.repeat(halves, 1)[..., None].expand(-1, -1, dim)  # (H B, n, D)
    picked = z.gather(1, index).reshape(halves, bsz, n, dim)  # (H, B, n, D)
    return picked.transpose(1, 2).reshape(hb * n, dim)


def _validate_architecture(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    stride = sizes["vae_stride"] * sizes["patch_size"]
    if sizes["img_size"] % stride:
        raise ValueError(
            f"img_size ({sizes['img_size']}) must be divisible by vae_stride * patch_size ({stride})"
        )
    for part in ("encoder", "decoder"):
        dim, heads = sizes[f"{part}_embed_dim"], sizes[f"{part}_num_heads"]
        if dim % heads:
            raise ValueError(f"{part}_embed_dim ({dim}) must be divisible by {part}_num_heads ({heads})")


# Factory sizes (width, depth, heads), the same for encoder and decoder. The diffusion head's depth and width are
# not set here: pass diffloss_d / diffloss_w matching the checkpoint (B 6/1024, L 8/1280, H 12/1536).
_SIZES: dict[str, tuple[int, int, int]] = {
    "mar_base": (768, 12, 12),
    "mar_large": (1024, 16, 16),
    "mar_huge": (1280, 20, 16),
}


def _build(name: str, **kwargs: object) -> MAR:
    width, depth, heads = _SIZES[name]
    return MAR(
        encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
        decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
        mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
    )  # fmt: skip


def mar_base(**kwargs: object) -> MAR:
    """MAR-B (208M with ``diffloss_d=6, diffloss_w=1024``): width 768, 12 + 12 blocks, 12 heads."""
    return _build("mar_base", **kwargs)


def mar_large(**kwargs: object) -> MAR:
    """MAR-L (479M with ``diffloss_d=8, diffloss_w=1280``): width 1024, 16 + 16 blocks, 16 heads."""
    return _build("mar_large", **kwargs)


def mar_huge(**kwargs: object) -> MAR:
    """MAR-H (943M with ``diffloss_d=12, diffloss_w=1536``): width 1280, 20 + 20 blocks, 16 heads (head dim 80)."""
    return _build("mar_huge", **kwargs)


# Name -> factory, for command lines (``--model mar_large``).
MAR_MODELS: dict[str, Callable[..., MAR]] = {"mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}
