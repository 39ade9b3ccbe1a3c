"""Download FlowAR's files: ``cd FlowAR_DiSA && python util/download.py``.

With no arguments it fetches the KL-16 VAE (``pretrained_models/vae/kl16.ckpt``, the default ``--vae_path``),
FlowAR-S/L/H from Hugging Face (``pretrained_models/flowar/FlowAR-*.pth``, pass them to ``--resume``) and
``fid_stats/adm_in256_stats.npz``; name files to fetch fewer, see ``--help``.

Deviation: the official ``FlowAR_DiSA/util/download.py`` is a copy of MAR's and downloads the MAR checkpoints,
not FlowAR's weights (the FlowAR README only links the Hugging Face page); this script fetches what FlowAR needs.
``download_pretrained_vae`` keeps the upstream function name.
"""
from __future__ import annotations

from disa import download


def download_pretrained_vae(overwrite: bool = False) -> None:
    """``pretrained_models/vae/kl16.ckpt``."""
    download.ensure("kl16", ".", force=overwrite)


if __name__ == "__main__":
    raise SystemExit(download.main(family="flowar"))
