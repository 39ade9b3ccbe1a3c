"""Harmon text-to-image: the model, its typed configuration, prompt templating and checkpoint loading."""
from .config import HarmonConfig, LLMConfig, MARConfig, TokenizerConfig, VAEConfig, build_harmon, load_config
from .harmon import Harmon, make_grid, resize_pos_embed, to_uint8
from .loading import check_harmon_state_dict, load_harmon, load_tokenizer
from .prompts import DEFAULT_CFG_PROMPT, QWEN_CHAT_TEMPLATE, T2I_PREFIX, batch_text2image_input, text2image_input

__all__ = [
    "Harmon",
    "HarmonConfig",
    "LLMConfig",
    "MARConfig",
    "VAEConfig",
    "TokenizerConfig",
    "build_harmon",
    "load_config",
    "load_harmon",
    "load_tokenizer",
    "check_harmon_state_dict",
    "resize_pos_embed",
    "to_uint8",
    "make_grid",
    "QWEN_CHAT_TEMPLATE",
    "T2I_PREFIX",
    "DEFAULT_CFG_PROMPT",
    "text2image_input",
    "batch_text2image_input",
]
