"""Download the official checkpoints, VAE and FID statistics, verified and resumable.

One registry (:data:`REGISTRY`) names every file the four model families need, where it comes from and where the
upstream code expects it (paths relative to the model folder, e.g. ``MAR_DiSA/``, since the upstream commands
run from there). Two ways in:

* command line: ``python -m disa.download mar --root MAR_DiSA`` (``--list`` shows the registry), or the upstream
  habit ``cd MAR_DiSA && python util/download.py``, which fetches that family's files into the current folder;
* library: :func:`ensure` (``ensure("kl16", "MAR_DiSA")``), :func:`fetch`, or :func:`download_url` for any URL.

Plain URLs (Dropbox, GitHub, OpenAI's blob store) go through our own downloader:

* the transfer writes ``<dest>.part`` and only a verified file is renamed to ``<dest>`` (``os.replace``, atomic
  on one file system), so a file at the final path is always complete; ``<dest>.part.json`` remembers the URL and
  the server's validator (ETag / Last-Modified) for the resume;
* an interrupted transfer resumes from the end of ``.part`` with an HTTP ``Range`` request plus ``If-Range``, so a
  file that changed on the server is downloaded again instead of being spliced from two versions; a server that
  ignores ``Range`` answers ``200`` with the whole file and the download restarts from byte 0;
* checks: the byte count the server announced, and the exact size, sha256 and git blob hash where the registry
  knows them. A download that fails a check is deleted (resuming it could never fix it) and nothing is written
  at the final path; an existing file at the final path is kept untouched;
* an HTML answer is refused: that is what Dropbox serves for a preview page, and what the upstream script saved
  silently as a checkpoint.

Hugging Face files go through ``huggingface_hub.hf_hub_download`` (its own atomic write and resume) into the same
layout (``local_dir``), then through the same checks; the Qwen2.5 LLMs that Harmon builds on are fetched as
whole repositories into the Hugging Face cache, where ``from_pretrained("Qwen/...")`` looks for them.

Checksums: only those published with the files are recorded (two FlowAR sha256 from Hugging Face, the git blob id
of the FID statistics); every other one is ``None`` because nobody who wrote this registry could download the
file. Sizes are the upstream progress-bar totals and the Hugging Face listings, rounded, so they are shown but
not checked; the exact byte count announced by the server is.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence, get_args

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from tqdm import tqdm

from .cli import finite_float, int_at_least

__all__ = [
    "Family",
    "FAMILIES",
    "FAMILY_FOLDERS",
    "Url",
    "HubFile",
    "HubSnapshot",
    "RemoteFile",
    "REGISTRY",
    "FetchResult",
    "DownloadError",
    "ChecksumError",
    "direct_url",
    "verify_file",
    "download_url",
    "fetch",
    "ensure",
    "select",
    "main",
]

log = logging.getLogger(__name__)

Family = Literal["mar", "flowar", "xar", "harmon"]
FAMILIES: tuple[Family, ...] = get_args(Family)
# The folder each family's upstream commands run from, and so the root its relative destinations start at.
FAMILY_FOLDERS: Mapping[Family, str] = {
    "mar": "MAR_DiSA",
    "flowar": "FlowAR_DiSA",
    "xar": "xAR_DiSA",
    "harmon": "Harmon_DiSA",
}

# The upstream downloader's user agent. Dropbox answers a browser-like client on a ``dl=0`` link with an HTML
# preview page; with ``dl=1`` (see direct_url) it redirects any client to the file, and we send this agent too.
USER_AGENT = "Wget/1.16 (linux-gnu)"
_CHUNK = 1 << 20  # bytes per read/write
_HEX = re.compile(r"[0-9a-f]+")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the source, the destination and what to do."""


class ChecksumError(DownloadError):
    """A file's size or hash differs from what the registry or the server announced."""


class _Interrupted(Exception):
    """The transfer broke off (or the server is briefly unavailable); what arrived is in ``.part``, resumable."""


class _RangeRejected(_Interrupted):
    """The server cannot serve the requested range (416): the ``.part`` is useless and the next try restarts."""


# --------------------------------------------------------------------------------------------------------------
# Registry entries


@dataclass(frozen=True)
class Url:
    """A file served at a plain HTTP(S) URL (kept verbatim as the upstream code has it)."""

    url: str

    def __post_init__(self) -> None:
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"Url.url must be an http(s) URL, got {self.url!r}")

    def describe(self) -> str:
        return direct_url(self.url)


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face model repository, fetched with ``hf_hub_download``."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"HubFile.repo_id must look like 'owner/name', got {self.repo_id!r}")
        if not self.filename or "/" in self.filename:
            raise ValueError(f"HubFile.filename must be a file at the top of the repository, got {self.filename!r}")

    def describe(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class HubSnapshot:
    """A whole Hugging Face repository, fetched with ``snapshot_download`` into the Hugging Face cache."""

    repo_id: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"HubSnapshot.repo_id must look like 'owner/name', got {self.repo_id!r}")

    def describe(self) -> str:
        return f"https://huggingface.co/{self.repo_id} (revision {self.revision})"


Source = Url | HubFile | HubSnapshot


@dataclass(frozen=True)
class RemoteFile:
    """One registry entry.

    ``dest`` is the path the upstream code opens, relative to the family's folder (:data:`FAMILY_FOLDERS`), or
    ``None`` for a :class:`HubSnapshot`, which lives in the Hugging Face cache. ``size`` (bytes), ``sha256`` and
    ``git_blob_sha1`` are checked when set and are ``None`` where unknown. ``approx_size`` is for display only.
    ``default`` entries are fetched when a family is selected; the others only when named (or with ``all``).
    """

    name: str
    families: tuple[Family, ...]
    description: str
    source: Source
    dest: str | None
    size: int | None = None
    sha256: str | None = None
    git_blob_sha1: str | None = None
    approx_size: str | None = None
    default: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"RemoteFile.name must be lower-case [a-z0-9._-], got {self.name!r}")
        if self.name in FAMILIES or self.name == "all":
            raise ValueError(f"RemoteFile.name {self.name!r} is reserved for a selection ({', '.join(FAMILIES)}, all)")
        bad = [f for f in self.families if f not in FAMILIES]
        if not self.families or bad:
            raise ValueError(f"{self.name}: families must be a non-empty subset of {FAMILIES}, got {self.families!r}")
        if isinstance(self.source, HubSnapshot) != (self.dest is None):
            raise ValueError(f"{self.name}: dest must be None exactly for a HubSnapshot source (the HF cache)")
        if self.dest is not None:
            parts = Path(self.dest).parts
            if Path(self.dest).is_absolute() or not parts or ".." in parts:
                raise ValueError(f"{self.name}: dest must be a relative path inside the root, got {self.dest!r}")
            if isinstance(self.source, HubFile) and Path(self.dest).name != self.source.filename:
                raise ValueError(
                    f"{self.name}: dest must end with the Hub file name {self.source.filename!r} "
                    f"(hf_hub_download writes local_dir/<filename>), got {self.dest!r}"
                )
        for field_name, length in (("sha256", 64), ("git_blob_sha1", 40)):
            value = getattr(self, field_name)
            if value is not None and (len(value) != length or not _HEX.fullmatch(value)):
                raise ValueError(f"{self.name}: {field_name} must be {length} lower-case hex digits, got {value!r}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"{self.name}: size must be >= 0 bytes, got {self.size}")
        if isinstance(self.source, HubSnapshot) and (self.size or self.sha256 or self.git_blob_sha1):
            raise ValueError(f"{self.name}: a HubSnapshot is a folder; it takes no size or checksum")

    def path(self, root: str | os.PathLike[str] = ".") -> Path | None:
        """Where this file lands under ``root`` (``None``: the Hugging Face cache)."""
        return None if self.dest is None else Path(root) / self.dest

    @property
    def checksum(self) -> str:
        """Which content checks are known, for listings: ``sha256``, ``git-blob-sha1`` or ``none``."""
        return "sha256" if self.sha256 else "git-blob-sha1" if self.git_blob_sha1 else "none"


def _dropbox(key: str, rlkey: str, filename: str) -> Url:
    return Url(f"https://www.dropbox.com/scl/fi/{key}/{filename}?rlkey={rlkey}&dl=0")


_FID_STATS_NOTE = (
    "Committed in the upstream repositories (same git blob in LTH14/mar fe470ac, fid_stats/, and in the "
    "MAR/FlowAR/xAR folders of DiSA 283fa59); fetched from DiSA's commit. Keys mu (2048,), sigma (2048, 2048)."
)

_ENTRIES: tuple[RemoteFile, ...] = (
    # MAR's util/download.py (byte-identical in MAR_DiSA, FlowAR_DiSA and xAR_DiSA). Sizes: its tqdm totals in MiB.
    RemoteFile(
        "kl16", ("mar", "flowar", "xar"), "KL-16 VAE (MAR's AutoencoderKL, shared by MAR, FlowAR and xAR)",
        _dropbox("hhmuvaiacrarfg28qxhwz", "l44xipsezc8atcffdp4q7mwmh", "kl16.ckpt"),
        "pretrained_models/vae/kl16.ckpt", approx_size="≈254 MiB",
    ),
    RemoteFile(
        "mar-b", ("mar",), "MAR-B (208M), training checkpoint {model, model_ema, ...}",
        _dropbox("f6dpuyjb7fudzxcyhvrhk", "a6i4bo71vhfo4anp33n9ukujb", "checkpoint-last.pth"),
        "pretrained_models/mar/mar_base/checkpoint-last.pth", approx_size="≈1587 MiB",
    ),
    RemoteFile(
        "mar-l", ("mar",), "MAR-L (479M), training checkpoint {model, model_ema, ...}",
        _dropbox("pxacc5b2mrt3ifw4cah6k", "m48ovo6g7ivcbosrbdaz0ehqt", "checkpoint-last.pth"),
        "pretrained_models/mar/mar_large/checkpoint-last.pth", approx_size="≈3650 MiB",
    ),
    RemoteFile(
        "mar-h", ("mar",), "MAR-H (943M), training checkpoint {model, model_ema, ...}",
        _dropbox("1qmfx6fpy3k7j9vcjjs3s", "4lae281yzxb406atp32vzc83o", "checkpoint-last.pth"),
        "pretrained_models/mar/mar_huge/checkpoint-last.pth", approx_size="≈7191 MiB",
    ),
    # FlowAR / xAR: flat state dicts on Hugging Face. Upstream passes any path to --resume; we keep them next to
    # the VAE (the xAR README's example is ../ckpt/xAR-*.pth).
    RemoteFile(
        "flowar-s", ("flowar",), "FlowAR-S weights (flat state dict)", HubFile("OliverRen/FlowAR", "FlowAR-S.pth"),
        "pretrained_models/flowar/FlowAR-S.pth", approx_size="687 MB",
        sha256="70728d9d81b8023928cf9fd8daead4c007c5a0ce3f3201d0f3805bb9e42e0c34",
    ),
    RemoteFile(
        "flowar-l", ("flowar",), "FlowAR-L weights (flat state dict)", HubFile("OliverRen/FlowAR", "FlowAR-L.pth"),
        "pretrained_models/flowar/FlowAR-L.pth", approx_size="2.35 GB",
    ),
    RemoteFile(
        "flowar-h", ("flowar",), "FlowAR-H weights (flat state dict)", HubFile("OliverRen/FlowAR", "FlowAR-H.pth"),
        "pretrained_models/flowar/FlowAR-H.pth", approx_size="7.65 GB",
        sha256="a413fc1b71f8e2948729f3ff70943d9bf09484dc2ca36de593487adcd2160af0",
    ),
    RemoteFile(
        "xar-b", ("xar",), "xAR-B weights (flat state dict)", HubFile("OliverRen/xAR", "xAR-B.pth"),
        "pretrained_models/xar/xAR-B.pth", approx_size="693 MB",
    ),
    RemoteFile(
        "xar-l", ("xar",), "xAR-L weights (flat state dict)", HubFile("OliverRen/xAR", "xAR-L.pth"),
        "pretrained_models/xar/xAR-L.pth", approx_size="2.44 GB",
    ),
    RemoteFile(
        "xar-h", ("xar",), "xAR-H weights (flat state dict)", HubFile("OliverRen/xAR", "xAR-H.pth"),
        "pretrained_models/xar/xAR-H.pth", approx_size="4.75 GB",
    ),
    # FID reference statistics, opened relative to the working directory by every ImageNet evaluation.
    RemoteFile(
        "fid-stats", ("mar", "flowar", "xar"), "ADM ImageNet-256 Inception statistics for FID",
        Url(
            "https://raw.githubusercontent.com/Qinyu-Allen-Zhao/DiSA/283fa59be538e2c33043427c45f7b8db40a0dfc6/"
            "MAR_DiSA/fid_stats/adm_in256_stats.npz"
        ),
        "fid_stats/adm_in256_stats.npz", approx_size="≈34 MB (est.)",
        git_blob_sha1="1da4c17607fe959d54999fd098105649a0c05e15", note=_FID_STATS_NOTE,
    ),
    RemoteFile(
        "adm-ref-batch", ("mar", "flowar", "xar"),
        "ADM ImageNet-256 reference batch (statistics + 10k images; for precision/recall, not used by the official FID)",
        Url("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
            "VIRTUAL_imagenet256_labeled.npz"),
        "fid_stats/VIRTUAL_imagenet256_labeled.npz", default=False,
        note="From openai/guided-diffusion's evaluation suite.",
    ),
    # Harmon: `huggingface-cli download wusize/harmon --local-dir checkpoints` upstream.
    RemoteFile(
        "harmon-kl16", ("harmon",), "KL-16 VAE as Harmon ships it", HubFile("wusize/harmon", "kl16.ckpt"),
        "checkpoints/kl16.ckpt",
        note="Same name as MAR's kl16.ckpt; whether the bytes are identical is unverified.",
    ),
    RemoteFile(
        "harmon-0.5b", ("harmon",), "Harmon-0.5B (Qwen2.5-0.5B + MAR-B)", HubFile("wusize/harmon", "harmon_0.5b.pth"),
        "checkpoints/harmon_0.5b.pth",
    ),
    RemoteFile(
        "harmon-1.5b", ("harmon",), "Harmon-1.5B (Qwen2.5-1.5B + MAR-H)", HubFile("wusize/harmon", "harmon_1.5b.pth"),
        "checkpoints/harmon_1.5b.pth",
    ),
    RemoteFile(
        "harmon-1.5b-o", ("harmon",), "Harmon-1.5B with the MAR decoder fine-tuned on BLIP3o-60k",
        HubFile("wusize/harmon", "harmon_1.5b-o.pth"), "checkpoints/harmon_1.5b-o.pth",
    ),
    # Harmon's configs build the LLM with from_pretrained("Qwen/Qwen2.5-*-Instruct"), which downloads on first
    # use; fetching ahead fills the same cache, after which HF_HUB_OFFLINE=1 works.
    RemoteFile(
        "qwen2.5-0.5b-instruct", ("harmon",), "Qwen2.5-0.5B-Instruct (LLM, config and tokenizer of Harmon-0.5B)",
        HubSnapshot("Qwen/Qwen2.5-0.5B-Instruct"), None, default=False,
        note="Into the Hugging Face cache (HF_HOME), where Harmon's from_pretrained looks.",
    ),
    RemoteFile(
        "qwen2.5-1.5b-instruct", ("harmon",), "Qwen2.5-1.5B-Instruct (LLM, config and tokenizer of Harmon-1.5B)",
        HubSnapshot("Qwen/Qwen2.5-1.5B-Instruct"), None, default=False,
        note="Into the Hugging Face cache (HF_HOME), where Harmon's from_pretrained looks.",
    ),
)

REGISTRY: Mapping[str, RemoteFile] = {entry.name: entry for entry in _ENTRIES}


# --------------------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` did: ``downloaded`` (fresh), ``resumed`` (continued a ``.part``), ``present`` (already
    there, verified where possible) or ``cached`` (a Hub snapshot, synced by huggingface_hub); ``checks`` names the
    verifications that passed."""

    name: str
    path: Path
    status: Literal["downloaded", "resumed", "present", "cached"]
    checks: tuple[str, ...]


def direct_url(url: str) -> str:
    """The URL that serves the file itself: Dropbox share links ``...&dl=0`` become ``...&dl=1``.

    ``dl=0`` opens Dropbox's preview page; ``dl=1`` redirects to the raw file on ``dl.dropboxusercontent.com``,
    which supports ``Range`` (so downloads resume). The upstream script kept ``dl=0`` and relied on the Wget user
    agent instead; we do both. Other URLs are returned unchanged.
    """
    parts = urllib.parse.urlsplit(url)
    if not (parts.hostname or "").endswith("dropbox.com"):
        return url
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "dl"]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query + [("dl", "1")])))


def _read_chunks(path: Path, progress: bool, what: str) -> Iterator[bytes]:
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=what, disable=None if progress else True, leave=False
    ) as bar:
        while chunk := f.read(_CHUNK):
            bar.update(len(chunk))
            yield chunk


def verify_file(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    git_blob_sha1: str | None = None,
    progress: bool = False,
) -> tuple[str, ...]:
    """Check ``path`` against what is known; returns the names of the checks done, raises :class:`ChecksumError`.

    ``git_blob_sha1`` is git's object id: sha1 over ``b"blob <size>\\0"`` followed by the content. It identifies
    files that were committed to a repository (the FID statistics) without anyone having published a sha256.
    """
    path = Path(path)
    actual_size = path.stat().st_size
    checks: list[str] = []
    if size is not None:
        if actual_size != size:
            raise ChecksumError(f"{path}: size {actual_size} bytes, expected {size}")
        checks.append("size")
    if sha256 is None and git_blob_sha1 is None:
        return tuple(checks)
    h256, hgit = hashlib.sha256(), hashlib.sha1()
    hgit.update(b"blob %d\0" % actual_size)
    for chunk in _read_chunks(path, progress, f"verify {path.name}"):
        if sha256 is not None:
            h256.update(chunk)
        if git_blob_sha1 is not None:
            hgit.update(chunk)
    for label, expected, digest in (("sha256", sha256, h256), ("git-blob-sha1", git_blob_sha1, hgit)):
        if expected is None:
            continue
        if digest.hexdigest() != expected:
            raise ChecksumError(f"{path}: {label} is {digest.hexdigest()}, expected {expected}")
        checks.append(label)
    return tuple(checks)


# --------------------------------------------------------------------------------------------------------------
# Plain-URL downloader


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _by_hand(url: str, dest: Path) -> str:
    return f"If this machine is offline, download {url} elsewhere and place it at {dest}."


def _read_state(meta: Path, url: str) -> dict[str, object] | None:
    """The saved resume state for ``url``, or ``None`` (no state, unreadable, or for another URL)."""
    try:
        state = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("url") == url else None


def _validator(resp: http.client.HTTPResponse) -> str | None:
    """The value for a later ``If-Range``: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total); anything else -> (None, None)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _open(url: str, offset: int, validator: str | None, timeout: float, dest: Path) -> http.client.HTTPResponse | int:
    """GET ``url`` from byte ``offset``; returns the response, or the total size when the server answers 416 to
    a range that starts exactly at the end (the ``.part`` is already complete)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                return total
            raise _RangeRejected(f"the server refused to resume at byte {offset} (HTTP 416)") from err
        if err.code == 429 or err.code >= 500:  # overloaded or briefly down: worth another try
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}. {_by_hand(url, dest)}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason}). {_by_hand(url, dest)}") from err


def _transfer(url: str, dest: Path, size: int | None, timeout: float, progress: bool) -> tuple[int, bool]:
    """One GET into ``<dest>.part``, continuing what is there. Returns (bytes in ``.part``, resumed?).

    Raises :class:`_Interrupted` when the connection breaks (what arrived stays in ``.part``).
    """
    part, meta = _part_paths(dest)
    state = _read_state(meta, url)
    offset = part.stat().st_size if part.exists() else 0
    if offset and meta.exists() and state is None:
        offset = 0  # the .part belongs to another URL (the registry changed): start over
    if size is not None and offset > size:
        offset = 0
    if size is not None and offset == size:
        return offset, True
    validator = state.get("validator") if state else None
    try:
        opened = _open(url, offset, validator if isinstance(validator, str) else None, timeout, dest)
    except _RangeRejected:
        part.unlink(missing_ok=True)  # the next attempt starts from byte 0
        raise
    if isinstance(opened, int):
        return opened, True
    with opened as resp:
        if (resp.headers.get_content_type() or "") == "text/html":
            raise DownloadError(
                f"{url} returned an HTML page instead of the file (a preview, login or captive-portal page). "
                f"{_by_hand(url, dest)}"
            )
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Interrupted(f"asked for bytes from {offset}, the server sent a range starting at {start}")
        elif resp.status == 200:
            if offset:
                log.info("%s: the server sent the whole file instead of resuming at byte %d; restarting", url, offset)
            offset, total = 0, None
        else:
            raise DownloadError(f"{url} answered HTTP {resp.status}, expected 200 or 206. {_by_hand(url, dest)}")
        if total is None and length is not None:
            total = offset + int(length)
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url} offers {total} bytes, the registry expects {size}; nothing was written to {dest}")
        try:  # only now, so that a failed request leaves no empty folders behind
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DownloadError(f"cannot create the folder {dest.parent} for {dest.name}: {err}") from err
        meta.write_text(json.dumps({"url": url, "validator": _validator(resp), "total": total}))
        received = offset
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
            disable=None if progress else True,
        ) as bar:
            try:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead
                        raise _Interrupted(f"{type(err).__name__}: {err}") from err
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                f.flush()
                os.fsync(f.fileno())
        # http.client returns b"" rather than raising when the connection closes before Content-Length bytes.
        if total is not None and received < total:
            raise _Interrupted(f"the connection closed after {received} of {total} bytes")
    return received, offset > 0


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    git_blob_sha1: str | None = None,
    force: bool = False,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> tuple[Literal["downloaded", "resumed", "present"], tuple[str, ...]]:
    """Download ``url`` to ``dest`` (see the module docstring for ``.part``, resume and checks).

    An existing ``dest`` is kept and verified (``present``) unless ``force``, which downloads again and replaces
    it only once the new file has passed its checks. ``retries`` resumes after that many interruptions, waiting
    ``retry_wait * attempt`` seconds between them. Returns ``(status, checks passed)``.
    """
    if retries < 0 or retry_wait < 0 or timeout <= 0:
        raise ValueError(f"need retries >= 0, retry_wait >= 0, timeout > 0; got {retries}, {retry_wait}, {timeout}")
    dest = Path(dest)
    if dest.is_dir():
        raise DownloadError(f"{dest} is a folder; expected a file path to download {url} to")
    if dest.exists() and not force:
        try:
            return "present", verify_file(dest, size=size, sha256=sha256, git_blob_sha1=git_blob_sha1, progress=progress)
        except ChecksumError as err:
            raise ChecksumError(f"existing file does not match: {err}. Delete it or download again with --force "
                                f"(force=True), which replaces it only after the new file is verified") from err
    fetch_url = direct_url(url)
    part, meta = _part_paths(dest)
    if force:  # "download again": do not build on an earlier partial transfer either
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    resumed = False
    for attempt in range(retries + 1):
        try:
            _, resumed = _transfer(fetch_url, dest, size, timeout, progress)
            break
        except _Interrupted as err:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                kept = f"{have} bytes are kept in {part} and the next run resumes from there" if have else (
                    "nothing arrived; run again later")
                raise DownloadError(f"download of {fetch_url} was interrupted ({err}); {kept}") from err
            log.warning("%s: interrupted (%s); resuming from byte %d (retry %d of %d)",
                        dest.name, err, have, attempt + 1, retries)
            time.sleep(retry_wait * (attempt + 1))
        except OSError as err:  # writing the .part: disk full, permissions
            raise DownloadError(f"cannot write {part}: {err}") from err
    state = _read_state(meta, fetch_url)
    announced = state.get("total") if state else None
    expected = size if size is not None else announced if isinstance(announced, int) else None
    try:
        checks = verify_file(part, size=expected, sha256=sha256, git_blob_sha1=git_blob_sha1, progress=progress)
    except ChecksumError as err:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise ChecksumError(f"download of {fetch_url} failed verification: {err}. The download was deleted; "
                            f"nothing was written to {dest}") from err
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    return ("resumed" if resumed else "downloaded"), checks


# --------------------------------------------------------------------------------------------------------------
# Registry-level fetching


def _fetch_hub_file(entry: RemoteFile, dest: Path, force: bool, progress: bool) -> FetchResult:
    source = entry.source
    assert isinstance(source, HubFile)
    checks = {"size": entry.size, "sha256": entry.sha256, "git_blob_sha1": entry.git_blob_sha1}
    if dest.exists() and not force:
        try:
            return FetchResult(entry.name, dest, "present", verify_file(dest, **checks, progress=progress))
        except ChecksumError as err:
            raise ChecksumError(
                f"existing file does not match: {err}. Delete it or download again with --force"
            ) from err
    try:
        got = Path(hf_hub_download(
            repo_id=source.repo_id, filename=source.filename, revision=source.revision,
            local_dir=dest.parent, force_download=force,
        ))
    except (OSError, EntryNotFoundError) as err:
        raise DownloadError(
            f"could not fetch {source.filename} from the Hugging Face repository {source.repo_id} "
            f"({type(err).__name__}: {err}). {_by_hand(source.describe(), dest)}"
        ) from err
    try:
        done = verify_file(got, **checks, progress=progress)
    except ChecksumError as err:
        got.unlink(missing_ok=True)
        raise ChecksumError(f"{source.describe()} failed verification: {err}. The file was deleted") from err
    return FetchResult(entry.name, got, "downloaded", done)


def fetch(
    entry: RemoteFile,
    root: str | os.PathLike[str] = ".",
    *,
    force: bool = False,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> FetchResult:
    """Make sure ``entry`` is at ``root / entry.dest``, downloading and verifying it as needed.

    Raises :class:`DownloadError` (or :class:`ChecksumError`) with a message that names the source and what to
    place where by hand.
    """
    dest = entry.path(root)
    if isinstance(entry.source, HubSnapshot):
        try:
            got = snapshot_download(repo_id=entry.source.repo_id, revision=entry.source.revision, force_download=force)
        except (OSError, EntryNotFoundError) as err:
            raise DownloadError(
                f"could not fetch the Hugging Face repository {entry.source.repo_id} ({type(err).__name__}: {err}). "
                f"If this machine is offline, copy a Hugging Face cache that holds it into HF_HOME, or download "
                f"the repository to a folder and pass that folder where the config names {entry.source.repo_id}."
            ) from err
        return FetchResult(entry.name, Path(got), "cached", ())
    assert dest is not None
    if isinstance(entry.source, HubFile):
        return _fetch_hub_file(entry, dest, force, progress)
    status, checks = download_url(
        entry.source.url, dest, size=entry.size, sha256=entry.sha256, git_blob_sha1=entry.git_blob_sha1,
        force=force, retries=retries, retry_wait=retry_wait, timeout=timeout, progress=progress,
    )
    return FetchResult(entry.name, dest, status, checks)


def ensure(name: str, root: str | os.PathLike[str] = ".", **kwargs: object) -> FetchResult:
    """:func:`fetch` the registry entry called ``name`` (see :data:`REGISTRY`) into ``root``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown file {name!r}; known: {', '.join(REGISTRY)}")
    return fetch(REGISTRY[name], root, **kwargs)  # type: ignore[arg-type]


def select(items: Sequence[str], family: Family | None = None) -> list[RemoteFile]:
    """Resolve a selection: entry names, family names (their ``default`` entries) or ``all``.

    With ``family`` set (the per-folder scripts), only that family's entries are allowed, an empty selection
    means its defaults and ``all`` means every one of its entries. Without it, an empty selection is an error.
    Raises ``ValueError`` naming what is allowed.
    """
    pool = [e for e in REGISTRY.values() if family is None or family in e.families]
    families = (family,) if family else FAMILIES
    if not items:
        if family is None:
            raise ValueError(f"nothing selected: name files or families ({', '.join(FAMILIES)}), or 'all'; "
                             "--list shows the files")
        items = [family]
    chosen: dict[str, RemoteFile] = {}
    for item in items:
        if item == "all":
            picked = pool
        elif item in families:
            picked = [e for e in pool if item in e.families and e.default]
        elif item in REGISTRY and REGISTRY[item] in pool:
            picked = [REGISTRY[item]]
        else:
            raise ValueError(f"unknown selection {item!r}; allowed: {', '.join(families)}, all, "
                             f"or one of {', '.join(e.name for e in pool)}")
        chosen.update((e.name, e) for e in picked)
    return list(chosen.values())


# --------------------------------------------------------------------------------------------------------------
# Command line


def _listing(family: Family | None) -> str:
    rows = [
        (e.name, "*" if e.default else "", ",".join(e.families), e.approx_size or "?", e.checksum,
         e.dest or "(Hugging Face cache)", e.source.describe())
        for e in REGISTRY.values()
        if family is None or family in e.families
    ]
    header = ("name", "default", "families", "size", "checksum", "destination", "source")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [header, *rows])


def _parser(family: Family | None) -> argparse.ArgumentParser:
    if family is None:
        prog, what = "python -m disa.download", "the official DiSA files"
        sel_help = "file names, family names (their default files: mar, flowar, xar, harmon) or 'all'"
        root_help = "destination root; paths below are relative to it, e.g. MAR_DiSA (default: the current folder)"
    else:
        prog, what = "python util/download.py", f"the official {FAMILY_FOLDERS[family]} files"
        sel_help = "file names or 'all' (default: the files marked * below, as the upstream script)"
        root_help = f"destination root (default: the current folder; run from {FAMILY_FOLDERS[family]}/)"
    epilog = (
        "files (* = fetched by default for its family):\n" + _listing(family) + "\n\n"
        "Plain URLs download to <dest>.part, resume after an interruption and are renamed to <dest> only once "
        "verified. Hugging Face files use huggingface_hub (HF_HOME, HF_TOKEN and HF_ENDPOINT apply)."
    )
    p = argparse.ArgumentParser(prog=prog, description=f"Download {what}, verified and resumable.", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("selection", nargs="*", metavar="NAME", help=sel_help)
    p.add_argument("--root", type=Path, default=Path("."), help=root_help)
    p.add_argument("--list", action="store_true", help="print the files and exit")
    p.add_argument("--force", action="store_true", help="download again even if the file is there (replaced only "
                   "once the new copy is verified)")
    p.add_argument("--retries", type=int_at_least(0), default=3, help="resumes after an interruption (default 3)")
    p.add_argument("--timeout", type=finite_float(0, inclusive=False), default=60.0,
                   help="seconds without data before giving up on a connection (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None, *, family: Family | None = None) -> int:
    """The command line; ``family`` restricts it to one model folder (the ``util/download.py`` scripts).

    Returns 0 when every selected file is in place, 1 when any failed (the others are still fetched), and exits
    with 2 on a bad selection or option.
    """
    parser = _parser(family)
    args = parser.parse_args(argv)
    if args.list:
        print(_listing(family))
        return 0
    try:
        entries = select(args.selection, family)
    except ValueError as err:
        parser.error(str(err))
    if args.root.exists() and not args.root.is_dir():
        parser.error(f"--root {args.root} is a file; expected a folder (created if missing)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for entry in entries:
        try:
            result = fetch(entry, args.root, force=args.force, retries=args.retries, timeout=args.timeout,
                           progress=not args.no_progress)
        except DownloadError as err:
            failed += 1
            print(f"{entry.name}: FAILED: {err}", file=sys.stderr)
            continue
        checked = f" ({', '.join(result.checks)} ok)" if result.checks else " (no checksum known)"
        print(f"{entry.name}: {result.status} {result.path}{checked if entry.dest else ''}")
    if failed:
        print(f"{failed} of {len(entries)} files failed (partial downloads are kept and resume on the next run)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
