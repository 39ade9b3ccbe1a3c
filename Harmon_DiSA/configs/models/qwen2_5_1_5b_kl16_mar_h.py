"""Harmon-1.5B (Qwen2.5-1.5B-Instruct + MAR-H): the original sampler, 100 diffusion steps at every AR step.

The DiSA fork deleted this file; it is the baseline of the paper's Harmon timings (no 950 clamp, top timestep 999).

Plain Python (no mmengine): the official config's variables and values, read by
`harmon_disa.src.models.load_config`. Differences from upstream are listed in `src/models/config.py`
(sdpa attention by default, factories named by string).
"""
from harmon_disa.src.models.prompts import QWEN_CHAT_TEMPLATE

llm_name_or_path = "Qwen/Qwen2.5-1.5B-Instruct"
prompt_template = dict(QWEN_CHAT_TEMPLATE)
tokenizer = dict(pretrained_model_name_or_path=llm_name_or_path, padding_side="right")

model = dict(
    tokenizer=tokenizer,
    prompt_template=prompt_template,
    vae=dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ckpt_path="checkpoints/kl16.ckpt"),
    vae_scale=0.2325,
    # Upstream: attn_implementation="flash_attention_2" (needs flash-attn and CUDA; same attention as sdpa).
    llm=dict(pretrained_model_name_or_path=llm_name_or_path, torch_dtype="bfloat16", attn_implementation="sdpa"),
    mar=dict(
        type="mar_huge",
        img_size=256,
        vae_stride=16,
        patch_size=1,
        vae_embed_dim=16,
        mask_ratio_min=0.7,
        label_drop_prob=0.1,
        class_num=1000,
        attn_dropout=0.1,
        proj_dropout=0.1,
        buffer_size=64,
        diffloss_d=12,
        diffloss_w=1536,
        num_sampling_steps="100",
        diffusion_batch_mul=4,
        grad_checkpointing=True,
    ),
)
