"""The KL-16 autoencoder (LDM ``AutoencoderKL``, "KL-f16") shared by MAR, FlowAR, xAR and Harmon.

All four families decode their 16-channel token grids with the same VAE and the same ``kl16.ckpt``. This module
rebuilds it so that its ``state_dict`` has exactly the official key names and shapes (312 keys, 66,456,019
parameters for the default configuration):

* :class:`AutoencoderKL` — ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``;
* :class:`DiagonalGaussian` — the posterior; ``sample`` takes its noise explicitly (a tensor or a
  :class:`disa.noise.NoiseSource`) so that recorded noise can be replayed;
* :data:`LATENT_SCALE`, :func:`latent_to_tokens`, :func:`tokens_to_latent` — the 0.2325 scaling between VAE
  latents and the tokens the AR models work with;
* :func:`load_vae` — strict, loud checkpoint loading (see its docstring for how it departs from the official
  ``strict=False``);
* :func:`to_uint8` — the official post-processing to 8-bit RGB;
* :class:`PixelTokenizer` — the identity "autoencoder" of the embedded Fashion-MNIST testbed (tokens are pixels).

Typical generation code::

    vae = load_vae("pretrained_models/vae/kl16.ckpt", decoder_only=True).to(device)
    images = to_uint8(vae.decode(tokens_to_latent(tokens)))     # (B, H, W, 3) uint8, RGB
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, compare_state_dict
from .noise import NoiseSource

__all__ = [
    "LATENT_SCALE",
    "AttnBlock",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "PixelTokenizer",
    "ResnetBlock",
    "Upsample",
    "latent_to_tokens",
    "load_vae",
    "load_vae_checkpoint",
    "to_uint8",
    "tokens_to_latent",
]

# MAR's training latents are posterior samples times 0.2325 (chosen to give the latents about unit std); every
# generator divides its tokens by the same number before decoding. Hard-coded upstream, named here.
LATENT_SCALE: float = 0.2325

# The decoder weights that every generator needs; the rest (encoder.*, quant_conv.*) only serves encoding.
_DECODER_PREFIXES: tuple[str, ...] = ("decoder.", "post_quant_conv.")


def latent_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """VAE latent ``z`` -> the scaled latent the AR models are trained on: ``z * 0.2325``."""
    return z * LATENT_SCALE


def tokens_to_latent(tokens: torch.Tensor) -> torch.Tensor:
    """Scaled tokens -> VAE latent: ``tokens / 0.2325``.

    A true division, as upstream does it; multiplying by ``1 / 0.2325`` would differ in the last float32 bit.
    """
    return tokens / LATENT_SCALE


class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` over latents, built from the encoder's moments ``(B, 2E, h, w)``.

    The first E channels are the mean, the last E the log-variance, which is clamped to [-30, 20] (as upstream)
    so that ``exp`` can neither underflow to an exact zero nor overflow.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        mean, logvar = torch.chunk(moments, 2, dim=1)  # 2 x (B, E, h, w)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: torch.Tensor | NoiseSource) -> torch.Tensor:
        """``mean + std * eps``; ``eps`` is ``noise`` itself (a tensor shaped like ``mean``) or drawn from it."""
        if isinstance(noise, torch.Tensor):
            if noise.shape != self.mean.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(self.mean.shape)}")
            eps = noise.to(device=self.mean.device, dtype=self.mean.dtype)
        else:
            eps = noise(self.mean.shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(GN, swish, conv3x3) twice, plus a shortcut that is a 1x1 conv only when the width changes.

    The LDM block also takes a time embedding; the autoencoder never uses one, so it has no ``temb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convs, plus a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C): one head of width C
            return t.reshape(b, 1, c, hgt * wid).transpose(-1, -2)

        # SDPA's default scale is C^-1/2, the scale of the upstream explicit softmax(q k^T / sqrt(C)) v.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding right and bottom only.

    The one-sided pad is upstream's (conv2d cannot pad one side only): output pixel i sees input pixels 2i..2i+2,
    so a symmetric padding=1 would shift every window by one pixel and not match the checkpoint.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{i}`` ResnetBlocks through ``widths``, each followed by ``attn.{i}`` when
    the level has attention, then an optional ``downsample`` or ``upsample`` (the attribute names are the
    checkpoint's)."""

    def __init__(
        self, widths: Sequence[int], with_attn: bool, dropout: float, resample: Literal["down", "up"] | None
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(b) for b in widths[1:]) if with_attn else nn.ModuleList()
        self.downsample = Downsample(widths[-1]) if resample == "down" else None
        self.upsample = Upsample(widths[-1]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class _Mid(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> ``(B, 2 z_channels or z_channels, H/f, W/f)``, f = 2^(len(ch_mult)-1).

    Level ``l`` runs at width ``ch * ch_mult[l]``; it gets attention after each block when its nominal
    resolution (``resolution / 2^l``) is in ``attn_resolutions`` — ``resolution`` decides nothing else, so inputs
    of other sizes work.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        in_channels: int = 3,
        resolution: int = 256,
        z_channels: int = 16,
        double_z: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        width, res = ch, resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            last = level == len(ch_mult) - 1
            out = ch * mult
            self.down.append(
                _Level([width] + [out] * num_res_blocks, res in attn_resolutions, dropout, None if last else "down")
            )
            width, res = out, res // 2
        self.mid = _Mid(width, dropout)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for stage in self.down:
            h = stage(h)  # (B, ch * mult, H/f, W/f) at the last level
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 z, H/f, W/f)


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, out_ch, h*f, w*f)``, nominally in [-1, 1] (no tanh).

    ``up`` is stored in level order (``up.0`` is the full-resolution level, as in the checkpoint) but run from the
    last level down to 0; each level has ``num_res_blocks + 1`` blocks and all but level 0 end in an upsample.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        out_ch: int = 3,
        resolution: int = 256,
        z_channels: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, padding=1)
        self.mid = _Mid(width, dropout)
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            out = ch * ch_mult[level]
            resample: Literal["up"] | None = "up" if level != 0 else None
            levels.append(_Level([width] + [out] * (num_res_blocks + 1), res in attn_resolutions, dropout, resample))
            width, res = out, res * 2
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for stage in reversed(self.up):
            h = stage(h)  # (B, ch, h*f, w*f) after level 0
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder: ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``.

    The defaults are KL-16 (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` upstream): 256x256 images
    to 16x16x16 latents. ``with_encoder=False`` builds only ``decoder`` and ``post_quant_conv`` (all that
    generation needs, 38.2M of the 66.5M parameters); ``encode`` then raises.
    """

    def __init__(
        self,
        embed_dim: int = 16,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        ch: int = 128,
        num_res_blocks: int = 2,
        resolution: int = 256,
        dropout: float = 0.0,
        with_encoder: bool = True,
    ) -> None:
        super().__init__()
        shared: dict[str, Any] = dict(
            ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, resolution=resolution,
            z_channels=embed_dim, dropout=dropout,
        )
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder: Encoder | None = Encoder(**shared) if with_encoder else None
        self.decoder = Decoder(**shared)
        # The encoder's z_channels equals embed_dim, so quant_conv maps the 2E moments to 2E moments.
        self.quant_conv: nn.Conv2d | None = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1) if with_encoder else None
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image ``(B, 3, H, W)`` in [-1, 1] -> posterior over latents ``(B, E, H/f, W/f)``."""
        if self.encoder is None or self.quant_conv is None:
            raise RuntimeError("this AutoencoderKL was built without its encoder (decoder_only / with_encoder=False)")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2E, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, E, h, w)`` (unscaled: ``tokens_to_latent(tokens)``) -> image ``(B, 3, h*f, w*f)``."""
        return self.decoder(self.post_quant_conv(z))


def _read_state_dict(path: str | os.PathLike[str], weights_only: bool) -> dict[str, torch.Tensor]:
    """The AutoencoderKL state dict in ``path``: ``ckpt["model"]`` (the official kl16.ckpt) or a bare state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VAE checkpoint not found: {os.fspath(path)!r} (the official file is pretrained_models/vae/kl16.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        hint = " If you trust the file, retry with weights_only=False." if weights_only else ""
        raise RuntimeError(
            f"could not read VAE checkpoint {os.fspath(path)!r} ({type(err).__name__}: {err}). "
            f"Is it a truncated download or an HTML page?{hint}"
        ) from err
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        top = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{os.fspath(path)!r} is neither a checkpoint with a 'model' state dict nor a bare state dict "
            f"(found {top}); a MAR checkpoint ('model_ema') is not a VAE checkpoint"
        )
    return dict(ckpt)


def load_vae(
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    decoder_only: bool = False,
    weights_only: bool = True,
    **config: Any,
) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` (``config`` = its keyword arguments, KL-16 by default), load ``path``
    into it and return it in eval mode on the CPU.

    ``path`` holds either ``{"model": state_dict, ...}`` (the official ``kl16.ckpt`` layout) or a bare state dict.

    Upstream loads with ``strict=False`` and only prints the mismatches, so a wrong file silently decodes with
    random weights. Here:

    * a missing key raises — except that with ``decoder_only=True`` the model is built without its encoder and
      ``encoder.*`` / ``quant_conv.*`` are neither required nor loaded (generation needs only the decoder);
    * a key whose shape differs raises;
    * an unexpected key raises when ``strict`` (the default) and is otherwise ignored, so ``strict=False``
      tolerates extra entries (e.g. a training loss's weights) but never missing or mis-shaped ones.

    The error (a :class:`disa.checkpoints.CheckpointError`, which is a ``ValueError``) lists the missing,
    unexpected and mis-shaped keys. ``weights_only=False`` is needed only for a file
    that pickles more than tensors (trust it first).
    """
    state = _read_state_dict(path, weights_only)
    vae = AutoencoderKL(**config, with_encoder=not decoder_only)
    ignored = [k for k in state if k.startswith(("encoder.", "quant_conv."))] if decoder_only else []
    mismatch = compare_state_dict(vae, state, ignore_unexpected=ignored)
    if mismatch.missing or mismatch.misshaped or (strict and mismatch.unexpected):
        hints = []
        if mismatch.missing and not decoder_only and all(not k.startswith(_DECODER_PREFIXES) for k in mismatch.missing):
            hints.append("only encoder keys are missing: pass decoder_only=True if you only decode")
        if mismatch.unexpected and not (mismatch.missing or mismatch.misshaped):
            hints.append("pass strict=False to ignore unexpected keys")
        hint = f"\n  hint: {'; '.join(hints)}" if hints else ""
        raise CheckpointError(
            f"VAE checkpoint {os.fspath(path)!r} does not match AutoencoderKL({config or 'KL-16 defaults'}):"
            f"{mismatch.report()}{hint}"
        )
    vae.load_state_dict({k: state[k] for k in vae.state_dict()}, strict=True)
    return vae.eval()


def load_vae_checkpoint(
    path: str | os.PathLike[str], *, embed_dim: int = 16, ch: int = 128, decoder_only: bool = True
) -> AutoencoderKL:
    """:func:`load_vae` of a KL-16 file named by a command line's ``--vae_path`` (``embed_dim`` latent channels,
    base width ``ch``), in eval mode on the CPU; every failure is a :class:`~disa.checkpoints.CheckpointError` that
    names the flag and how to fetch ``kl16.ckpt``. ``decoder_only`` skips the encoder (generation needs only the
    decoder)."""
    try:
        return load_vae(path, decoder_only=decoder_only, embed_dim=embed_dim, ch=ch)
    except CheckpointError:  # the mismatch report already says what is wrong with the file
        raise
    except (OSError, RuntimeError, ValueError) as err:  # missing file, unreadable file, not a VAE layout
        raise CheckpointError(f"--vae_path: {err} (fetch kl16.ckpt with `python util/download.py kl16`)") from err


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images ``(B, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] -> uint8 RGB ``(B, H, W, 3)`` / ``(H, W, 3)``.

    The official conversion: ``x = (x + 1) / 2``, ``x * 255``, clip to [0, 255], round half to even
    (``np.round``), cast. Out-of-range values and +-inf saturate at 0 / 255; NaN raises (upstream would cast it to
    an arbitrary byte). The result is a NumPy array because every consumer (PNG writers, npz batches) wants HWC
    NumPy; channels stay RGB (upstream flips to BGR only for ``cv2.imwrite``).

    The arithmetic is float32 on the input's device. Upstream ran it in the dtype its fp16 autocast left the
    decoder output in; float32 is the exact version of the same formula.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    x = images.detach().float()
    if torch.isnan(x).any():
        raise ValueError(f"images contain {int(torch.isnan(x).sum())} NaN values; refusing to write them as pixels")
    x = (x + 1) / 2
    x = torch.round(torch.clamp(x * 255, 0, 255))  # torch.round, like np.round, rounds half to even
    return x.to(torch.uint8).movedim(-3, -1).cpu().numpy()


class _PointPosterior:
    """A posterior with no spread: ``sample`` and ``mode`` return the latent itself and draw no noise."""

    def __init__(self, latent: torch.Tensor) -> None:
        self.mean = latent

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: torch.Tensor | NoiseSource) -> torch.Tensor:
        return self.mean


class PixelTokenizer(nn.Module):
    """Pixels as tokens: a parameter-free stand-in for :class:`AutoencoderKL` with the same ``encode``/``decode``.

    Used by the embedded Fashion-MNIST testbed, where images are 28x28 and a learned VAE would cost more than the
    model it serves: MAR's ``patch_size`` 4 then turns a (1, 28, 28) image into 7x7 = 49 tokens of 16 pixel values.
    The generators scale latents by the KL-16 constant (:data:`LATENT_SCALE`) on the way in and out, so this
    tokenizer's "latent" is ``pixels / 0.2325``: the tokens the AR model sees are the pixels themselves, in
    [-1, 1]. ``decode`` repeats a single channel three times, giving the RGB images every consumer (PNG writer,
    feature extractors) expects.
    """

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"PixelTokenizer: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.embed_dim = channels
        self.downsample_factor = 1

    def encode(self, x: torch.Tensor) -> _PointPosterior:
        """Image ``(B, C, H, W)`` in [-1, 1] -> its latent ``(B, C, H, W)`` (tokens = latent x 0.2325 = pixels)."""
        if x.dim() != 4 or x.shape[1] != self.embed_dim:
            raise ValueError(f"PixelTokenizer({self.embed_dim}) encodes (B, {self.embed_dim}, H, W) images, got "
                             f"{tuple(x.shape)}")
        return _PointPosterior(x / LATENT_SCALE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C, H, W)`` -> image ``(B, 3, H, W)`` (pixels = latent x 0.2325; grayscale repeated)."""
        images = z * LATENT_SCALE
        return images.expand(-1, 3, -1, -1) if self.embed_dim == 1 else images
