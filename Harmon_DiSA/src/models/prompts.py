"""Harmon's prompt templating: the exact strings the official text-to-image scripts feed the LLM.

Harmon formats prompts itself with the ``INSTRUCTION`` entry of xtuner's ``qwen_chat`` template (inlined in the
official configs as ``prompt_template``) and never calls ``tokenizer.apply_chat_template``: Qwen's own chat
template would insert its default system turn, which Harmon was not trained with. So the model sees

    <|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n

and the image tokens follow ``assistant\\n`` directly (no placeholder or begin-of-image tokens). The inputs are

* conditional, ``scripts/text2image.py``: ``"Generate an image: " + prompt`` with the prompt exactly as given;
* conditional, ``scripts/batch_text2image.py``: ``"Generate an image: " + prompt.strip() + "."``;
* unconditional (the CFG branch): ``--cfg_prompt``, default ``"Generate an image."`` — a real text prompt in the same
  template, not an empty or null embedding (training dropped the condition to this string with p = 0.1).

Token ids come from ``tokenizer.encode(s, add_special_tokens=True)`` (Qwen2.5 adds no BOS); rows are right-padded
(``padding_side='right'`` in the configs) with a boolean mask. Written from ``specs/harmon.md`` §1.2.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "T2I_PREFIX",
    "DEFAULT_CFG_PROMPT",
    "format_instruction",
    "text2image_input",
    "batch_text2image_input",
    "PromptTokenizer",
    "pad_right",
    "tokenize_rows",
]

# xtuner's `qwen_chat` template as the Harmon configs inline it; only INSTRUCTION is used for generation.
QWEN_CHAT_TEMPLATE: dict[str, Any] = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
    STOP_WORDS=["<|im_end|>", "<|endoftext|>"],
)
T2I_PREFIX = "Generate an image: "
DEFAULT_CFG_PROMPT = "Generate an image."


class PromptTokenizer(Protocol):
    """The part of a Hugging Face tokenizer Harmon uses."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def format_instruction(text: str, template: Mapping[str, Any] = QWEN_CHAT_TEMPLATE) -> str:
    """``template["INSTRUCTION"].format(input=text)``: one user turn, then the assistant header (no system turn)."""
    if "INSTRUCTION" not in template:
        raise ValueError(
            f"prompt_template needs an 'INSTRUCTION' entry with an '{{input}}' field; got {sorted(template)}"
        )
    return str(template["INSTRUCTION"]).format(input=text)


def text2image_input(prompt: str) -> str:
    """The conditional text of ``scripts/text2image.py``: the prompt exactly as given, after the fixed prefix."""
    return T2I_PREFIX + prompt


def batch_text2image_input(prompt: str) -> str:
    """The conditional text of ``scripts/batch_text2image.py``: stripped, and a period appended (even after one)."""
    return T2I_PREFIX + prompt.strip() + "."


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows to the longest: ``input_ids`` (R, L) int64 and ``attention_mask`` (R, L) bool.

    Right padding is what makes Harmon's prompt prefill safe without a mask: valid tokens never attend to the pads
    that follow them, and the image positions start at each row's own length (see ``Harmon.forward_mae_encoder``).
    """
    if len(rows) == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must tokenize to at least one token")
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.int64)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.int64)
        attention_mask[i, : len(r)] = True
    return input_ids, attention_mask


def tokenize_rows(
    tokenizer: PromptTokenizer,
    texts: Sequence[str],
    *,
    template: Mapping[str, Any] = QWEN_CHAT_TEMPLATE,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap each text in the INSTRUCTION template, tokenize it and right-pad the rows.

    ``pad_id`` defaults to ``tokenizer.eos_token_id`` (``Harmon.prepare_text_conditions``; ``<|im_end|>`` for
    Qwen2.5-Instruct); the batch script pads with ``tokenizer.pad_token_id`` instead. The pad id cannot change the
    result: padded positions are masked out wherever later positions could see them.
    """
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass pad_id explicitly")
    rows = [tokenizer.encode(format_instruction(t, template), add_special_tokens=True) for t in texts]
    return pad_right(rows, pad_id)
