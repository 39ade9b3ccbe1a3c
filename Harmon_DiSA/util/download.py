"""Download Harmon's checkpoints: ``cd Harmon_DiSA && python util/download.py``.

With no arguments it does what the upstream README's ``huggingface-cli download wusize/harmon --local-dir
checkpoints`` does: ``checkpoints/{kl16.ckpt, harmon_0.5b.pth, harmon_1.5b.pth, harmon_1.5b-o.pth}``. The
Qwen2.5 LLMs (``qwen2.5-0.5b-instruct``, ``qwen2.5-1.5b-instruct``) are fetched only when named (or with
``all``): the configs download them on first use anyway, into the same Hugging Face cache this fills, so naming
them here prepares a machine that will run offline (``HF_HUB_OFFLINE=1``). See ``--help``.
"""
from __future__ import annotations

from disa import download

if __name__ == "__main__":
    raise SystemExit(download.main(family="harmon"))
