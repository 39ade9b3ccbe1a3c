"""Harmon text-to-image (Wu et al. 2025, arXiv 2503.21979) with DiSA's diffusion step annealing.

A Qwen2.5 LLM and a MAR masked autoencoder share the image tokens: at every autoregressive (AR) step the MAR
encoder embeds the known tokens, the LLM (its body ``llm.model``, through ``proj_in`` / ``proj_out``) adds a text-
conditioned residual, the MAR decoder turns the result into one condition ``z`` per position, and MAR's per-token
diffusion head samples the tokens revealed at that step (MaskGIT cosine schedule, random order). The KL-16 VAE
decodes the final 16-channel token grid. Everything but the LLM and the projectors is reused from
:mod:`mar_disa` (encoder/decoder, :class:`~mar_disa.models.diffloss.DiffLoss`, the reveal schedule) and
:mod:`disa` (samplers, guidance, VAE); DiSA itself is the head's ``diff_sampler="DiSA"`` step schedule.

One sampling call (``specs/harmon.md`` §1.3), with ``bsz = 2B`` rows ``[cond_1..cond_B, uncond_1..uncond_B]`` under
classifier-free guidance (CFG) and ``B`` rows without:

1. prefill: one LLM pass over the right-padded prompt embeddings into an empty KV cache (no mask needed: valid
   tokens never see the pads after them);
2. per AR step: MAR encoder (buffer rows = ``fake_latent``; position embeddings bilinearly resized when the grid is
   not the native 16x16) -> ``proj_in`` -> LLM pass over [known tokens, buffer] with the prompt cache, the 2-D
   mask and position ids that continue each row's own prompt length (causal attention) -> cache cut back to the
   prompt -> ``x_enc + proj_out(h)`` -> MAR decoder -> head on the revealed positions (guided eps), tokens written
   to the conditional rows and copied to the unconditional ones;
3. decode the conditional rows: ``tokens / vae_scale`` through ``post_quant_conv`` and the VAE decoder.

Reproducibility additions (keyword-only; defaults = the official behaviour): ``orders`` (default: numpy's global
RNG, as upstream) and ``noise`` (a :class:`disa.noise.NoiseSource`; default the global torch RNG). The head
receives the revealed positions token-major (row ``j * B + b`` is image ``b``'s ``j``-th position), as in
:meth:`mar_disa.models.mar.MAR.sample_tokens`, so :func:`~mar_disa.models.mar.orders_from_seeds` plus
:class:`disa.noise.PerImageNoise` make image k depend on its seed only. Upstream gathers the rows image-major; that
only decides which i.i.d. draw lands on which token, and replaying noise recorded from the official code means
permuting each draw's rows (``tests/test_harmon.py``).

Dtype: the official script runs everything in bfloat16 (``model.to(model.dtype)``). Harmon's head casts its inputs
to the weight dtype while MAR's head (shared here) expects float32 noise to meet float32 weights, so in a
non-float32 model the head runs under ``torch.autocast`` to that dtype: its Linear layers then compute in bfloat16
as upstream, while autocast keeps LayerNorm outputs in float32 (rounding-level differences from the official
pure-bf16 run; not testable without a GPU here). In float32 nothing changes.

Written from ``specs/harmon.md`` and the golden data's README; no upstream code is copied.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from disa.guidance import CFG_SCHEDULES, check_cfg, mar_cfg_is_guided, mar_cfg_scale
from disa.noise import NoiseSource, TorchNoise
from disa.vae import AutoencoderKL
from mar_disa.models.mar import MAR, SampleStats, _token_major_rows, mask_steps
from mar_disa.models.mar import compile_head as compile_mar_head

from .prompts import DEFAULT_CFG_PROMPT, QWEN_CHAT_TEMPLATE, PromptTokenizer, tokenize_rows

__all__ = ["Harmon", "compile_head", "resize_pos_embed", "to_uint8", "make_grid", "StepCallback"]

# callback(record) once per AR step; see Harmon.sample for the keys.
StepCallback = Callable[[dict[str, Any]], None]


def resize_pos_embed(
    pos_embed: torch.Tensor, native_shape: tuple[int, int], image_shape: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Learned position embeddings ``(1, P + h0 w0, D)`` for another token grid -> ``(1, P + h w, D)``.

    The ``P`` prefix (buffer) rows are kept; the grid rows, an ``h0 x w0`` raster image of embeddings, are resized
    bilinearly (``align_corners=False``). The native grid is returned unchanged (no interpolation round trip).
    Runs in the embedding's dtype (bfloat16 in the official bf16 path).
    """
    if tuple(image_shape) == tuple(native_shape):
        return pos_embed
    (h0, w0), (h, w) = native_shape, image_shape
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]  # (1, P, D), (1, h0 w0, D)
    dim = grid.shape[-1]
    grid = grid.reshape(1, h0, w0, dim).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # (1, h w, D)
    return torch.cat([prefix, grid], dim=1)


def _dynamic_cache() -> Any:
    # Imported lazily: transformers is the `harmon` extra, not a core dependency of the monorepo.
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


class Harmon(nn.Module):
    """Harmon's text-to-image model: ``vae``, ``llm`` (``Qwen2ForCausalLM``), ``mar``, ``proj_in``, ``proj_out``.

    The submodules are registered in that order, so :meth:`state_dict` has the official keys in the official order
    (``llm.*`` as in the HF model, ``mar.*`` as in MAR, ``vae.*`` as in ``kl16.ckpt`` with the prefix).
    ``proj_in`` maps the MAR encoder width E to the LLM width H (Linear, SiLU, Linear), ``proj_out`` maps back.

    Args:
        llm: a Hugging Face causal LM with a ``.model`` body (Qwen2); only the body runs (``lm_head`` is unused).
        mar: the MAR whose encoder, decoder and diffusion head generate the tokens; its head's sampler options
            decide the diffusion steps (``diff_sampler="default"``: the original fixed count; ``"DiSA"``: annealed).
        vae: the KL-16 autoencoder (only ``post_quant_conv`` and ``decoder`` are used for generation).
        vae_scale: tokens are VAE latents times this (0.2325 in every config).
        tokenizer: for :meth:`prepare_text_conditions` (optional if you pass token ids yourself).
        prompt_template: the chat template dict (``INSTRUCTION`` is used).
    """

    def __init__(
        self,
        llm: nn.Module,
        mar: MAR,
        vae: AutoencoderKL,
        *,
        vae_scale: float = 0.2325,
        tokenizer: PromptTokenizer | None = None,
        prompt_template: Mapping[str, Any] = QWEN_CHAT_TEMPLATE,
    ) -> None:
        super().__init__()
        if not (isinstance(vae_scale, (int, float)) and vae_scale > 0 and math.isfinite(vae_scale)):
            raise ValueError(f"vae_scale must be a finite number > 0, got {vae_scale!r}")
        if not hasattr(llm, "model") or not hasattr(llm, "config"):
            raise TypeError(f"llm must be a Hugging Face causal LM with a .model body, got {type(llm).__name__}")
        # Registration order = the official state_dict order.
        self.vae = vae
        self.llm = llm
        self.mar = mar
        width, hidden = mar.z_proj.out_features, int(llm.config.hidden_size)
        self.proj_in = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.proj_out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.vae_scale = float(vae_scale)
        self.tokenizer = tokenizer
        self.prompt_template = dict(prompt_template)
        self.last_sample_stats: SampleStats | None = None

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def llm_model(self) -> nn.Module:
        """The LLM body (embeddings, decoder layers, final RMSNorm); ``lm_head`` is never used for images."""
        return self.llm.model

    @property
    def device(self) -> torch.device:
        return self.mar.fake_latent.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype: that of the LLM, to which the official script casts everything."""
        return next(self.llm.parameters()).dtype

    @property
    def native_shape(self) -> tuple[int, int]:
        """The MAR token grid its position embeddings were learned for (16 x 16 for ``img_size=256``)."""
        return (self.mar.seq_h, self.mar.seq_w)

    # ---- text ------------------------------------------------------------------------------------------------

    def prepare_text_conditions(
        self,
        prompt: str | Sequence[str],
        cfg_prompt: str | None = DEFAULT_CFG_PROMPT,
        *,
        pad_id: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token rows for :meth:`sample`: ``input_ids`` (R, L) int64 and ``attention_mask`` (R, L) bool.

        ``prompt``: the conditional text(s), already prefixed as the caller wants (``scripts/text2image.py`` passes
        ``"Generate an image: " + prompt``). Rows are ``[cond_1..cond_B, cfg_prompt x B]``, or only the conditional
        rows when ``cfg_prompt`` is None (no CFG). Right-padded with ``pad_id`` (default: the eos id, as upstream).
        """
        if self.tokenizer is None:
            raise RuntimeError("this Harmon has no tokenizer: pass tokenizer= when building it, or give token ids")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prepare_text_conditions needs at least one prompt")
        texts = prompts + ([cfg_prompt] * len(prompts) if cfg_prompt is not None else [])
        input_ids, attention_mask = tokenize_rows(self.tokenizer, texts, template=self.prompt_template, pad_id=pad_id)
        return dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))

    # ---- position embeddings (bilinearly resized for grids other than the native one) ------------------------

    def get_encoder_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """``(1, buffer + h w, E)``."""
        return resize_pos_embed(self.mar.encoder_pos_embed_learned, self.native_shape, (h, w), self.mar.buffer_size)

    def get_decoder_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """``(1, buffer + h w, D)``."""
        return resize_pos_embed(self.mar.decoder_pos_embed_learned, self.native_shape, (h, w), self.mar.buffer_size)

    def get_diffusion_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """``(1, h w, D)``."""
        return resize_pos_embed(self.mar.diffusion_pos_embed_learned, self.native_shape, (h, w), 0)

    # ---- one AR step -----------------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor) -> Any:
        """Run the LLM body over the prompt rows ``(R, L)`` and return the filled ``DynamicCache`` (length L).

        ``attention_mask`` and ``position_ids`` are deliberately None, as upstream: with right padding no valid token
        attends to a pad, and the pads' keys/values are hidden from the image positions by the 2-D mask later.
        """
        cache = _dynamic_cache()
        embeds = self.llm.get_input_embeddings()(input_ids)  # (R, L, H)
        self.llm_model(inputs_embeds=embeds, attention_mask=None, position_ids=None, past_key_values=cache,
                       use_cache=True)  # fmt: skip
        return cache

    @staticmethod
    def curtail_cache(past_key_values: Any, cur_len: int) -> None:
        """Cut every layer's cached keys/values back to the first ``cur_len`` positions, in place.

        ``crop`` with a negative count ("remove n") means the same in transformers 4.4x and 5.x (a positive argument
        is a target length in 4.4x and an error in 5.x).
        """
        extra = past_key_values.get_seq_length() - cur_len
        if extra < 0:
            raise ValueError(f"cache holds {past_key_values.get_seq_length()} positions, cannot curtail to {cur_len}")
        if extra > 0:
            past_key_values.crop(-extra)

    def extract_visual_feature(
        self, x: torch.Tensor, mask: torch.Tensor, *, visible: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAR encoder on tokens ``x`` (R, m, n, C) with ``mask`` (R, m n) (1 = unknown).

        Returns ``x_enc`` (R, nb + V, E) — buffer rows (all ``fake_latent``) first, then the V known tokens in raster
        order — and ``z_enc = proj_in(x_enc)`` (R, V + nb, H) with the buffer rows moved **last**: in the LLM's causal
        attention the buffer then sees every known token. ``visible``: ``nb + V`` when known (see
        :meth:`MAR.forward_mae_encoder`: no device read).
        """
        rows, m, n, _ = x.shape
        nb = self.mar.buffer_size
        class_embedding = self.mar.fake_latent.expand(rows, -1)  # (R, E): text enters through the LLM only
        x_enc = self.mar.forward_mae_encoder(
            x.reshape(rows, m * n, -1), mask, class_embedding, pos_embed=self.get_encoder_pos_embed(m, n),
            visible=visible,
        )  # (R, nb + V, E)
        z_enc = self.proj_in(x_enc)  # (R, nb + V, H)
        return x_enc, torch.cat([z_enc[:, nb:], z_enc[:, :nb]], dim=1)

    def llm_image_pass(
        self, z_enc: torch.Tensor, past_key_values: Any, attention_mask: torch.Tensor, *, curtail: bool = True
    ) -> torch.Tensor:
        """LLM body over image embeddings ``z_enc`` (R, l, H) after the prompt cache; returns (R, l, H).

        The mask is the prompt mask (R, L) followed by ones; position ids are the running count of valid positions
        minus one, so each row's image positions continue from its own prompt length. Qwen2's causal mask makes the
        attention over the image positions causal (as in every official attention backend). With ``curtail`` the
        cache is cut back to the prompt afterwards, ready for the next AR step.
        """
        rows, length = z_enc.shape[:2]
        prompt_len = past_key_values.get_seq_length()
        full_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(rows, length, dtype=torch.bool)], 1)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (R, l)
        out = self.llm_model(inputs_embeds=z_enc, attention_mask=full_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=True)  # fmt: skip
        if curtail:
            self.curtail_cache(past_key_values, prompt_len)
        return out.last_hidden_state[:, -length:]  # (R, l, H)

    def forward_mae_encoder(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        *,
        past_key_values: Any,
        attention_mask: torch.Tensor,
        visible: int | None = None,
    ) -> torch.Tensor:
        """MAR encoder plus the LLM residual: tokens (R, m, n, C), mask (R, m n) -> ``x_enc + proj_out(h)``
        (R, nb + V, E).

        ``past_key_values`` holds the prompt (left at the prompt length on return), ``attention_mask`` its (R, L) mask;
        ``visible`` as in :meth:`extract_visual_feature`.
        """
        nb = self.mar.buffer_size
        x_enc, z_enc = self.extract_visual_feature(x, mask, visible=visible)
        h = self.llm_image_pass(z_enc, past_key_values, attention_mask)  # (R, V + nb, H), buffer last
        h = torch.cat([h[:, -nb:], h[:, :-nb]], dim=1)  # buffer first again
        return x_enc + self.proj_out(h)

    def forward_mae_decoder(
        self, x: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int], *, visible: int | None = None
    ) -> torch.Tensor:
        """MAR decoder on ``x`` (R, nb + V, E) for an ``m x n`` grid -> conditions ``z`` (R, m n, D)."""
        m, n = image_shape
        return self.mar.forward_mae_decoder(
            x, mask, pos_embed=self.get_decoder_pos_embed(m, n), diffusion_pos_embed=self.get_diffusion_pos_embed(m, n),
            visible=visible,
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, m, n, C)`` (VAE latents x ``vae_scale``) -> images ``(B, 3, 16 m, 16 n)`` in about [-1, 1]."""
        latent = (z / self.vae_scale).permute(0, 3, 1, 2)  # (B, C, m, n); a true division, as upstream
        return self.vae.decode(latent)

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_iter: int = 64,
        cfg: float = 3.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        progress_bar: bool = False,
        image_shape: tuple[int, int] = (32, 32),
        *,
        orders: torch.Tensor | None = None,
        noise: NoiseSource | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Generate images for the prompt rows; returns ``(B, 3, 16 m, 16 n)`` in the model dtype.

        ``input_ids`` / ``attention_mask`` ``(R, L)``: right-padded rows, ``[cond_1..cond_B, uncond_1..uncond_B]``
        (R = 2B) when ``cfg != 1``, only the B conditional rows otherwise (:meth:`prepare_text_conditions`).
        ``num_iter``: AR steps (64 in the scripts); ``cfg``: guidance scale (3.0); ``cfg_schedule``: ``"constant"``
        or ``"linear"`` (Muse ramp on the revealed fraction); ``temperature`` scales the head's per-step noise;
        ``image_shape``: the token grid ``(m, n)`` (``image_size // 16`` each; the scripts default to 512 px).
        The diffusion steps per AR step are the head's (``self.mar.diffloss``): fixed, or annealed by DiSA.

        ``orders`` ``(B, m n)`` int64: one permutation per image (default: numpy's global RNG, one draw per row of
        ``input_ids``, the first B kept, as upstream). ``noise``: every draw of the head (default global torch RNG).
        ``callback(record)`` after each AR step, with ``step``, ``mask`` (R, N) at the start of the step,
        ``tokens_in`` / ``tokens_after`` (R, N, C), ``x_enc``, ``z`` (R, N, D), ``positions`` (B, n) revealed,
        ``z_rows`` (the head's input, token-major), ``cfg`` (the scale used), ``sampled`` (the head's output rows)
        and ``prompt_cache_len``. Counts of what ran are left in :attr:`last_sample_stats`.
        """
        self._check_sampling_args(num_iter, cfg, cfg_schedule, temperature, image_shape)
        device = self.device
        input_ids, attention_mask = self._check_prompt_rows(input_ids, attention_mask, device)
        guided = cfg != 1.0
        halves = 2 if guided else 1
        rows = input_ids.shape[0]
        if rows % halves:
            raise ValueError(f"with cfg != 1 the prompt rows must be [cond; uncond] (an even count), got {rows}")
        bsz = rows // halves
        m, n = image_shape
        seq_len, channels = m * n, self.mar.token_embed_dim
        if orders is None:
            orders = self._default_orders(rows, seq_len)[:bsz].to(device)
        orders = self._check_orders(orders, bsz, seq_len)
        noise = TorchNoise() if noise is None else noise
        # The shared head expects float32 noise against its weights; see the module docstring for bf16.
        head_precision = (
            torch.autocast(device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        )

        cache = self.prefill(input_ids)  # length L
        tokens = torch.zeros(bsz, seq_len, channels, device=device, dtype=self.dtype)  # (B, N, C), conditional rows
        head_calls = [0]
        hook = self.mar.diffloss.net.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
        tokens_per_step, calls_per_step = [], []
        masked_before = seq_len  # known on the host: no count is read back from the device
        try:
            for st in tqdm(mask_steps(orders, num_iter), total=num_iter, disable=not progress_bar):
                state, mask = tokens.repeat(halves, 1, 1), st.mask.repeat(halves, 1)  # (R, N, C), (R, N)
                visible = self.mar.buffer_size + seq_len - masked_before
                x_enc = self.forward_mae_encoder(
                    state.reshape(rows, m, n, channels), mask, past_key_values=cache, attention_mask=attention_mask,
                    visible=visible,
                )  # (R, nb + V, E)
                z = self.forward_mae_decoder(x_enc, mask, image_shape, visible=visible)  # (R, N, D)
                count = st.positions.shape[1]
                calls_before = head_calls[0]
                record: dict[str, Any] = {}
                if count > 0:  # 0 only when num_iter > N (the reveal schedule then stalls some steps)
                    # (1,) float32 as upstream, filled on the device (no host-to-device copy and sync).
                    m_after = torch.full((1,), float(st.masked_after), device=device)
                    cfg_iter = mar_cfg_scale(cfg, cfg_schedule, m_after, seq_len)  # (1,)
                    z_rows = _token_major_rows(z, st.positions, halves)  # (H n B, D)
                    with head_precision:
                        sampled = self.mar.diffloss.sample(
                            z_rows, temperature, cfg_iter, step=st.step, ar_num_iter=num_iter, noise=noise,
                            guided=mar_cfg_is_guided(cfg, cfg_schedule, st.masked_after, seq_len),
                        )  # (H n B, C)
                    picked = sampled[: count * bsz].reshape(count, bsz, channels).transpose(0, 1)  # (B, n, C)
                    index = st.positions[..., None].expand(-1, -1, channels)  # (B, n, C)
                    tokens = tokens.scatter(1, index, picked.to(tokens.dtype))
                    record = dict(z_rows=z_rows, cfg=cfg_iter, sampled=sampled)
                tokens_per_step.append(count)
                calls_per_step.append(head_calls[0] - calls_before)
                masked_before = st.masked_after
                if callback is not None:
                    callback(dict(record, step=st.step, mask=mask, tokens_in=state, x_enc=x_enc, z=z,
                                  positions=st.positions, tokens_after=tokens.repeat(halves, 1, 1),
                                  prompt_cache_len=cache.get_seq_length()))  # fmt: skip
        finally:
            hook.remove()
        self.last_sample_stats = SampleStats(tuple(tokens_per_step), tuple(calls_per_step), guided)
        # Upstream decodes all R rows and returns the first B; the unconditional rows are copies, so decode B only.
        return self.decode(tokens.reshape(bsz, m, n, channels))

    # ---- argument checks -------------------------------------------------------------------------------------

    def _check_sampling_args(
        self, num_iter: int, cfg: float, cfg_schedule: str, temperature: float, image_shape: tuple[int, int]
    ) -> None:
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"num_iter must be an int >= 1, got {num_iter!r}")
        check_cfg(cfg)
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {cfg_schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
        if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if (
            len(image_shape) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in image_shape)
        ):
            raise ValueError(f"image_shape must be two ints >= 1 (tokens = image_size // 16), got {image_shape!r}")

    @staticmethod
    def _check_prompt_rows(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.as_tensor(input_ids, device=device)
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.shape[0] < 1:
            raise ValueError(
                f"input_ids must be (R, L) integer token ids, got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        mask = attention_mask.bool()
        # Right padding: each row is ones then zeros. Left padding would shift the image position ids (see prefill).
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()) or not bool(mask[:, 0].all()):
            raise ValueError("prompt rows must be right-padded (attention_mask = ones then zeros, first token valid)")
        return input_ids.long(), mask

    @staticmethod
    def _default_orders(rows: int, seq_len: int) -> torch.Tensor:
        # numpy's global RNG, one shuffle per prompt row as upstream draws them (so a seeded numpy gives upstream's
        # orders); under CFG upstream then overwrites the unconditional half with the conditional one.
        drawn = []
        for _ in range(rows):
            order = np.arange(seq_len)
            np.random.shuffle(order)
            drawn.append(order)
        return torch.from_numpy(np.stack(drawn)).long()

    def _check_orders(self, orders: torch.Tensor, bsz: int, seq_len: int) -> torch.Tensor:
        orders = torch.as_tensor(orders)
        if orders.shape != (bsz, seq_len) or orders.dtype != torch.int64:
            raise ValueError(
                f"orders must be int64 of shape ({bsz}, {seq_len}) (one permutation per image); "
                f"got {orders.dtype} {tuple(orders.shape)}"
            )
        if not torch.equal(orders.sort(dim=1).values, torch.arange(seq_len, device=orders.device).expand(bsz, -1)):
            raise ValueError(f"every row of orders must be a permutation of 0..{seq_len - 1}")
        return orders.to(self.device)


def compile_head(
    model: Harmon, *, enabled: bool = True, mode: str | None = None, cuda_graphs: bool = False,
    dynamic: bool | None = None,
) -> Harmon:
    """Opt-in ``torch.compile`` of Harmon's per-token diffusion head (MAR's, ``model.mar.diffloss.net``); see
    :func:`mar_disa.models.mar.compile_head`. For the LLM, flash-attn is the config's ``attn_implementation``."""
    compile_mar_head(model.mar, enabled=enabled, mode=mode, cuda_graphs=cuda_graphs, dynamic=dynamic)
    return model


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)`` the way Harmon's scripts convert them.

    ``clamp(127.5 x + 128, 0, 255)`` then a truncating cast, i.e. round-half-up of ``127.5 (x + 1)``. This differs
    from :func:`disa.vae.to_uint8` (MAR's ``round((x + 1) / 2 * 255)``, half to even) at exact ties. It runs in the
    images' own dtype, as the script does: bfloat16 images give bfloat16 arithmetic (values >= 128 then have a
    spacing of 1 before the cast); call ``images.float()`` first for the exact float32 version. NaN raises.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    if bool(torch.isnan(images).any()):
        raise ValueError(f"images contain {int(torch.isnan(images).sum())} NaN values; refusing to write them")
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)  # truncation toward zero
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, grid_size: int) -> np.ndarray:
    """``grid_size**2`` images ``(B, H, W, 3)`` -> one ``(g H, g W, 3)`` image, row-major (image i at row i // g)."""
    b, h, w, c = images.shape
    if b != grid_size * grid_size:
        raise ValueError(f"a {grid_size}x{grid_size} grid needs {grid_size * grid_size} images, got {b}")
    rows = images.reshape(grid_size, grid_size, h, w, c).transpose(0, 2, 1, 3, 4)  # (g, H, g, W, 3)
    return rows.reshape(grid_size * h, grid_size * w, c)
