"""Harmon-1.5B with DiSA, 25 -> 5 diffusion steps (linear): the fork's `qwen2_5_1_5b_kl16_mar_h_disa_25_5.py`.

Plain Python (no mmengine): the official config's variables and values, read by
`harmon_disa.src.models.load_config`. Differences from upstream are listed in `src/models/config.py`
(sdpa attention by default, factories named by string, the DiSA clamp written out as disa_clip).
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
        # DiSA: the diffusion steps anneal linearly from 25 at the first AR step to 5 at the last; the fork also
        # clamps the respaced timesteps at 950 (disa_clip; set None to turn the clamp off).
        diff_upper_steps=25,
        diff_lower_steps=5,
        diff_annealing_strategy="linear",
        disa_clip=950,
        diffusion_batch_mul=4,
        grad_checkpointing=True,
    ),
)
