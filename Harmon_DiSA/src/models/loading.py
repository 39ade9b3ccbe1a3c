"""Loading Harmon for generation: config, tokenizer, KL-16 VAE and the Harmon ``.pth``, strictly and loudly.

Where the weights live (``specs/harmon.md`` §5): the ``.pth`` (``harmon_0.5b.pth``, ``harmon_1.5b.pth``,
``harmon_1.5b-o.pth`` from the Hugging Face repo ``wusize/harmon``) is a flat state dict with Harmon-root keys
``llm.*``, ``mar.*``, ``proj_in.*``, ``proj_out.*`` and no ``vae.*`` (the training wrapper dropped them); the VAE
comes from ``kl16.ckpt`` (``ckpt["model"]``); the Qwen2.5-Instruct directory provides the LLM's ``config.json`` and
the tokenizer. Upstream loads the ``.pth`` with ``strict=False`` and never looks at the result, so a wrong file
generates from random weights. Here:

* every non-VAE key of the model must be in the ``.pth`` with its shape (``llm.lm_head.weight`` may be absent: it is
  tied to ``llm.model.embed_tokens.weight``); an unexpected key is an error unless ``strict=False`` (which tolerates
  extras, never missing or mis-shaped keys); the error lists the keys (:class:`disa.checkpoints.CheckpointError`);
* ``vae.*`` entries in the ``.pth``, if any, are checked and loaded over ``kl16.ckpt``, as upstream's order does;
* the VAE file goes through :func:`disa.vae.load_vae` (strict; ``decoder_only`` when the config builds no encoder).

Nothing is downloaded here: fetch the files with ``python util/download.py`` (see ``disa.download``), which puts the
``.pth`` files and ``kl16.ckpt`` under ``checkpoints/`` and, when named, the Qwen2.5 repositories into the Hugging
Face cache, where a hub id such as ``Qwen/Qwen2.5-1.5B-Instruct`` resolves offline.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

from disa.checkpoints import CheckpointError, KeyMismatch, compare_state_dict, load_checkpoint, load_state_dict_strict
from disa.vae import load_vae

from .config import HarmonConfig, TokenizerConfig, build_harmon, load_config, resolve_dtype
from .harmon import Harmon

__all__ = ["TIED_KEYS", "load_tokenizer", "check_harmon_state_dict", "load_harmon"]

log = logging.getLogger(__name__)

# (key that may be missing, the key it is tied to) when the LLM ties its output embedding to the input one.
TIED_KEYS: tuple[tuple[str, str], ...] = (("llm.lm_head.weight", "llm.model.embed_tokens.weight"),)


def load_tokenizer(cfg: TokenizerConfig, path: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` on ``path`` (default: the config's), right padding; checks the eos id."""
    from transformers import AutoTokenizer

    where = path or cfg.pretrained_model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            where, padding_side=cfg.padding_side, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the tokenizer from {where!r} ({err}). Give the local Qwen2.5-Instruct directory "
            "(--llm_path), or fetch it once: cd Harmon_DiSA && python util/download.py qwen2.5-1.5b-instruct"
        ) from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {where!r} has no eos token; Harmon pads prompts with it")
    return tokenizer


def check_harmon_state_dict(
    model: Harmon, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Check a Harmon ``.pth`` against ``model`` and return the complete state dict to load strictly.

    The result is the model's current ``vae.*`` tensors (from ``kl16.ckpt``) overlaid with the file's entries, plus
    the tied ``lm_head`` filled from the embedding when the file omits it. Raises :class:`CheckpointError` listing
    missing, mis-shaped and (when ``strict``) unexpected keys.
    """
    reference = model.state_dict()
    tied = {k: src for k, src in TIED_KEYS if getattr(model.llm.config, "tie_word_embeddings", False)}
    required = {k: v for k, v in reference.items() if not k.startswith("vae.") and k not in tied}
    file_keys = {k: v for k, v in state.items() if not k.startswith("vae.") and k not in tied}
    mismatch = compare_state_dict(required, file_keys)
    # vae.* and tied entries are optional, but when present they must fit.
    optional = {k: state[k] for k in state if k.startswith("vae.") or k in tied}
    extra = compare_state_dict({k: reference[k] for k in optional if k in reference}, optional)
    misshaped = mismatch.misshaped + extra.misshaped
    unexpected = mismatch.unexpected + extra.unexpected
    if mismatch.missing or misshaped or (strict and unexpected):
        report = KeyMismatch(missing=mismatch.missing, unexpected=unexpected, misshaped=misshaped).report()
        hints = []
        if mismatch.missing and len(mismatch.missing) == len(required):
            hints.append("no Harmon key matched: is this a Harmon .pth (flat llm.*/mar.*/proj_* keys)?")
        if misshaped:
            hints.append("mis-shaped keys usually mean the config is for the other model size (0.5B vs 1.5B)")
        if unexpected and not (mismatch.missing or misshaped):
            hints.append("only unexpected keys: pass strict=False (CLI: --allow_unexpected_keys) to ignore them")
        hint = f"\n  hint: {'; '.join(hints)}" if hints else ""
        raise CheckpointError(
            f"{source} does not match the Harmon model ({len(state)} keys in the file, {len(required)} required, "
            f"vae.* from kl16.ckpt):{report}{hint}"
        )
    complete = {k: v for k, v in reference.items() if k.startswith("vae.")}
    complete.update({k: v for k, v in state.items() if k in reference})
    for key, source_key in tied.items():
        complete.setdefault(key, complete[source_key])
    return complete


def load_harmon(
    config: HarmonConfig | str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None,
    *,
    llm_path: str | None = None,
    vae_path: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    strict: bool = True,
    with_tokenizer: bool = True,
    llm_config: Any | None = None,
) -> Harmon:
    """Build Harmon from ``config`` (a :class:`HarmonConfig` or a config file), load its weights, return it in eval
    mode on ``device`` in ``dtype``.

    ``checkpoint``: the Harmon ``.pth``; ``None`` keeps random MAR/LLM/projector weights and is only for
    benchmarks (logged as a warning). ``llm_path``: the Qwen2.5-Instruct directory or hub id (default: the config's
    ``llm.pretrained_model_name_or_path``); its ``config.json`` gives the LLM architecture and it holds the tokenizer.
    ``vae_path``: ``kl16.ckpt`` (default: the config's ``vae.ckpt_path``; ``None`` there means a random VAE, also
    warned). ``dtype``: default the config's ``llm.torch_dtype`` (bfloat16, as upstream). ``attn_implementation``
    overrides the config's. ``llm_config``: a ``PretrainedConfig`` to use instead of any ``config.json``.
    """
    cfg = load_config(config) if not isinstance(config, HarmonConfig) else config
    if attn_implementation is not None:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, attn_implementation=attn_implementation))
    if llm_path is not None:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, pretrained_model_name_or_path=llm_path))
    target_dtype = resolve_dtype(dtype if dtype is not None else cfg.llm.torch_dtype)

    tokenizer = None
    if with_tokenizer:
        tok_cfg = cfg.tokenizer or TokenizerConfig(cfg.llm.pretrained_model_name_or_path)
        tokenizer = load_tokenizer(tok_cfg, llm_path)
    if llm_config is None and cfg.llm.qwen2_config is None:
        llm_config = _llm_config(cfg.llm.pretrained_model_name_or_path)
    model = build_harmon(cfg, llm_config=llm_config, tokenizer=tokenizer)

    vae_file = vae_path if vae_path is not None else cfg.vae.ckpt_path
    if vae_file is None:
        log.warning("no VAE checkpoint given: decoding with a random VAE")
    else:
        model.vae = load_vae(vae_file, decoder_only=not cfg.vae.with_encoder, **cfg.vae.model_kwargs)

    if checkpoint is None:
        log.warning("no Harmon checkpoint given: LLM, MAR and projectors keep random weights (benchmarks only)")
    else:
        state = load_checkpoint(checkpoint, key="auto")
        complete = check_harmon_state_dict(model, state, strict=strict, source=f"checkpoint {os.fspath(checkpoint)!r}")
        load_state_dict_strict(model, complete, what=f"checkpoint {os.fspath(checkpoint)!r}")
    return model.to(device=device, dtype=target_dtype).eval()


def _llm_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not read the LLM config from {name_or_path!r} ({err}). Give the local Qwen2.5-Instruct directory "
            "(--llm_path), or fetch it once: cd Harmon_DiSA && python util/download.py qwen2.5-1.5b-instruct"
        ) from err
