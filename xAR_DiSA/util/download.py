"""Download xAR's files: ``cd xAR_DiSA && python util/download.py``.

With no arguments it fetches the KL-16 VAE (``pretrained_models/vae/kl16.ckpt``, the default ``--vae_path``),
xAR-B/L/H from Hugging Face (``pretrained_models/xar/xAR-*.pth``; the README's example passes
``--resume ../ckpt/xAR-B.pth``, any path works) and ``fid_stats/adm_in256_stats.npz``; name files to fetch
fewer, see ``--help``.

Deviation: the official ``xAR_DiSA/util/download.py`` is a copy of MAR's and downloads the MAR checkpoints, not
xAR's weights; this script fetches what xAR needs. ``download_pretrained_vae`` keeps the upstream function name.
"""
from __future__ import annotations

from disa import download


def download_pretrained_vae(overwrite: bool = False) -> None:
    """``pretrained_models/vae/kl16.ckpt``."""
    download.ensure("kl16", ".", force=overwrite)


if __name__ == "__main__":
    raise SystemExit(download.main(family="xar"))
