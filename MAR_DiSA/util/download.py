"""Download MAR's official files into the upstream layout: ``cd MAR_DiSA && python util/download.py``.

With no arguments it fetches what the official script fetched (the KL-16 VAE and MAR-B/L/H into
``pretrained_models/``) plus ``fid_stats/adm_in256_stats.npz``, which upstream committed to the repository;
name files to fetch fewer (``python util/download.py kl16 mar-b``), see ``--help``. Downloads resume, are
verified where a checksum is known and appear at their final path only when complete (:mod:`disa.download`).

The upstream functions stay for the demo notebook (``from util import download``); they write below the current
folder, as upstream did.
"""
from __future__ import annotations

from disa import download


def download_pretrained_vae(overwrite: bool = False) -> None:
    """``pretrained_models/vae/kl16.ckpt``."""
    download.ensure("kl16", ".", force=overwrite)


def download_pretrained_marb(overwrite: bool = False) -> None:
    """``pretrained_models/mar/mar_base/checkpoint-last.pth``."""
    download.ensure("mar-b", ".", force=overwrite)


def download_pretrained_marl(overwrite: bool = False) -> None:
    """``pretrained_models/mar/mar_large/checkpoint-last.pth``."""
    download.ensure("mar-l", ".", force=overwrite)


def download_pretrained_marh(overwrite: bool = False) -> None:
    """``pretrained_models/mar/mar_huge/checkpoint-last.pth``."""
    download.ensure("mar-h", ".", force=overwrite)


if __name__ == "__main__":
    raise SystemExit(download.main(family="mar"))
