"""Harmon-1.5B with DiSA, 25 -> 5 diffusion steps (linear): the fork's `qwen2_5_1_5b_kl16_mar_h_disa_25_5.py`.

Plain Python (no mmengine), read by `harmon_disa.src.models.load_config`: the baseline config
`qwen2_5_1_5b_kl16_mar_h.py` with only the sampler changed. The diffusion steps anneal linearly from 25 at the
first AR step to 5 at the last; the fork also clamps the respaced timesteps at 950 (disa_clip; None turns it off).
"""
import copy
import runpy
from pathlib import Path

_base = runpy.run_path(str(Path(__file__).with_name("qwen2_5_1_5b_kl16_mar_h.py")))
llm_name_or_path, prompt_template, tokenizer = _base["llm_name_or_path"], _base["prompt_template"], _base["tokenizer"]

model = copy.deepcopy(_base["model"])
del model["mar"]["num_sampling_steps"]  # the original sampler's fixed step count
model["mar"].update(diff_upper_steps=25, diff_lower_steps=5, diff_annealing_strategy="linear", disa_clip=950)
