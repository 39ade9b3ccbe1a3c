"""disa.download against a local HTTP server (127.0.0.1, started here) and a stand-in for huggingface_hub.

No test touches the network: plain-URL downloads talk to the server below, which supports Range/If-Range and can
drop connections, ignore ranges or serve HTML; Hugging Face calls are replaced by fakes that write local files.
"""
from __future__ import annotations

import hashlib
import http.server
import random
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from disa import download
from disa.download import (
    REGISTRY,
    ChecksumError,
    DownloadError,
    HubFile,
    HubSnapshot,
    RemoteFile,
    Url,
    direct_url,
    download_url,
    fetch,
    select,
    verify_file,
)

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    honour_range: bool = True
    drops: int = 0  # how many of the next responses are cut off ...
    drop_after: int = 100_000  # ... after this many body bytes
    drop_with_reset: bool = False  # TCP RST instead of a clean close
    content_type: str = "application/octet-stream"
    errors: list[int] = field(default_factory=list)  # statuses to answer the next requests with
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        st.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path in st.redirects:  # like Dropbox's dl=1 -> dl.dropboxusercontent.com
            self.send_response(302)
            self.send_header("Location", st.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if st.errors:
            self.send_error(st.errors.pop(0))
            return
        if self.path not in st.files:
            self.send_error(404)
            return
        body, etag, start = st.files[self.path], st.etag(self.path), 0
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        if rng and st.honour_range and (if_range is None or if_range == etag):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Content-Type", st.content_type)
        self.send_header("ETag", etag)
        self.end_headers()
        if st.drops:
            st.drops -= 1
            self.wfile.write(chunk[: st.drop_after])
            self.wfile.flush()
            if st.drop_with_reset:  # close with RST rather than FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # HTTP/1.0: the server closes the connection after the handler returns
        self.wfile.write(chunk)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState(files={"/file.bin": PAYLOAD})  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + ".part*"))


FAST = dict(retry_wait=0.0, timeout=10.0, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Plain-URL downloader


def test_full_download_verifies_sha256_and_size(server, tmp_path):
    base, st = server
    dest = tmp_path / "a" / "b" / "file.bin"
    status, checks = download_url(f"{base}/file.bin", dest, sha256=SHA, **FAST)
    assert (status, checks) == ("downloaded", ("size", "sha256"))  # size = the Content-Length the server announced
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest) == []
    assert len(st.requests) == 1 and "range" not in st.requests[0][1]
    assert st.requests[0][1]["user-agent"] == download.USER_AGENT


def test_interrupted_transfer_keeps_part_and_next_run_resumes_with_range(server, tmp_path):
    base, st = server
    st.redirects["/share/file.bin"] = "/file.bin"  # the Range header has to survive a redirect (Dropbox)
    st.drops = 1
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"interrupted.*100000 bytes are kept in .*file\.bin\.part.*resumes"):
        download_url(f"{base}/share/file.bin", dest, sha256=SHA, retries=0, **FAST)
    assert not dest.exists()  # a partial file never sits at the final path
    part = dest.with_name("file.bin.part")
    assert part.read_bytes() == PAYLOAD[:100_000]

    status, checks = download_url(f"{base}/share/file.bin", dest, sha256=SHA, retries=0, **FAST)
    assert (status, checks) == ("resumed", ("size", "sha256"))
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest) == []
    resumed = [h for path, h in st.requests if path == "/file.bin"][-1]
    assert resumed["range"] == "bytes=100000-"
    assert resumed["if-range"] == st.etag("/file.bin")


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_interruptions_are_retried_within_one_call(server, tmp_path, reset):
    base, st = server
    st.drops, st.drop_with_reset = 2, reset
    dest = tmp_path / "file.bin"
    status, _ = download_url(f"{base}/file.bin", dest, sha256=SHA, retries=2, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(st.requests) == 3
    if not reset:  # with RST the client may lose what was in flight, so only a clean close pins the offsets
        assert status == "resumed"
        assert [h.get("range") for _, h in st.requests] == [None, "bytes=100000-", "bytes=200000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    base, st = server
    st.honour_range = False
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"\xff" * 5000)  # a partial file from an earlier run
    status, _ = download_url(f"{base}/file.bin", dest, sha256=SHA, **FAST)
    assert st.requests[0][1]["range"] == "bytes=5000-"  # it asked to resume ...
    assert status == "downloaded"  # ... got 200 and started over instead of appending
    assert dest.read_bytes() == PAYLOAD


def test_file_changed_on_server_is_not_spliced(server, tmp_path):
    base, st = server
    st.drops = 1
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError):
        download_url(f"{base}/file.bin", dest, retries=0, **FAST)
    new = PAYLOAD[::-1]
    st.files["/file.bin"] = new  # new content, new ETag: If-Range fails and the server sends the whole file
    status, checks = download_url(f"{base}/file.bin", dest, retries=0, **FAST)
    assert st.requests[1][1]["range"] == "bytes=100000-"
    assert (status, checks) == ("downloaded", ("size",))
    assert dest.read_bytes() == new


def test_server_errors_are_retried_client_errors_are_not(server, tmp_path):
    base, st = server
    dest = tmp_path / "file.bin"
    st.errors = [503, 503]
    with pytest.raises(DownloadError, match=r"interrupted \(HTTP 503 Service Unavailable\); nothing arrived"):
        download_url(f"{base}/file.bin", dest, retries=1, **FAST)
    st.errors = [503]
    assert download_url(f"{base}/file.bin", dest, sha256=SHA, retries=1, **FAST)[0] == "downloaded"
    assert len(st.requests) == 4
    st.errors = [403]
    with pytest.raises(DownloadError, match="answered HTTP 403"):
        download_url(f"{base}/file.bin", tmp_path / "other.bin", retries=3, **FAST)
    assert len(st.requests) == 5


def test_part_longer_than_the_file_restarts(server, tmp_path):
    base, st = server
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD + b"junk")
    status, checks = download_url(f"{base}/file.bin", dest, retries=1, **FAST)
    assert [h.get("range") for _, h in st.requests] == [f"bytes={len(PAYLOAD) + 4}-", None]  # 416, then from 0
    assert (status, checks) == ("downloaded", ("size",))
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_answered_416_is_finished_without_download(server, tmp_path):
    base, st = server
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)  # crashed after the transfer, before the rename
    status, checks = download_url(f"{base}/file.bin", dest, sha256=SHA, **FAST)
    assert (status, checks) == ("resumed", ("sha256",))
    assert dest.read_bytes() == PAYLOAD and leftovers(dest) == []


def test_sha256_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    base, _ = server
    dest = tmp_path / "file.bin"
    with pytest.raises(ChecksumError, match=f"sha256 is {SHA}, expected {'0' * 64}.*deleted; nothing was written"):
        download_url(f"{base}/file.bin", dest, sha256="0" * 64, **FAST)
    assert not dest.exists() and leftovers(dest) == []
    # --force over an existing file: the old file survives a failed replacement
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download_url(f"{base}/file.bin", dest, sha256="0" * 64, force=True, **FAST)
    assert dest.read_bytes() == b"old" and leftovers(dest) == []


def test_existing_file_is_skipped_and_verified(server, tmp_path):
    base, st = server
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD)
    assert download_url(f"{base}/file.bin", dest, sha256=SHA, **FAST) == ("present", ("sha256",))
    assert st.requests == []
    dest.write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="existing file does not match.*--force"):
        download_url(f"{base}/file.bin", dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == b"something else"  # never deleted: it may be the user's own file
    assert download_url(f"{base}/file.bin", dest, sha256=SHA, force=True, **FAST)[0] == "downloaded"
    assert dest.read_bytes() == PAYLOAD


def test_html_answer_is_refused(server, tmp_path):
    base, st = server
    st.content_type = "text/html; charset=utf-8"
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="HTML page instead of the file"):
        download_url(f"{base}/file.bin", dest, **FAST)
    assert not dest.exists() and leftovers(dest) == []


def test_http_error_names_url_and_destination(server, tmp_path):
    base, _ = server
    dest = tmp_path / "missing.bin"
    with pytest.raises(DownloadError, match=r"missing\.bin answered HTTP 404.*place it at .*missing\.bin"):
        download_url(f"{base}/missing.bin", dest, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_verify_file_git_blob_sha1(tmp_path):
    # git's ids for "hello\n" and the empty file (`git hash-object`)
    (tmp_path / "h").write_bytes(b"hello\n")
    (tmp_path / "e").write_bytes(b"")
    assert verify_file(tmp_path / "h", git_blob_sha1="ce013625030ba8dba906f756967f9e9ca394464a") == ("git-blob-sha1",)
    assert verify_file(tmp_path / "e", size=0, git_blob_sha1="e69de29bb2d1d6434b8b29ae775ad8c2e48c5391") == (
        "size", "git-blob-sha1")
    with pytest.raises(ChecksumError, match="git-blob-sha1"):
        verify_file(tmp_path / "h", git_blob_sha1="e69de29bb2d1d6434b8b29ae775ad8c2e48c5391")


def test_direct_url_turns_dropbox_shares_into_downloads():
    share = REGISTRY["kl16"].source
    assert isinstance(share, Url) and share.url.endswith("&dl=0")  # kept verbatim as upstream has it
    assert direct_url(share.url) == share.url[: -len("dl=0")] + "dl=1"
    other = "https://example.org/x?dl=0"
    assert direct_url(other) == other


# ---------------------------------------------------------------------------------------------------------------
# Registry, selection and command line


def test_registry_paths_are_where_the_upstream_code_looks():
    want = {
        "kl16": "pretrained_models/vae/kl16.ckpt",  # --vae_path default of main_mar.py / eval.py
        "mar-b": "pretrained_models/mar/mar_base/checkpoint-last.pth",  # --resume <dir>/checkpoint-last.pth
        "mar-l": "pretrained_models/mar/mar_large/checkpoint-last.pth",
        "mar-h": "pretrained_models/mar/mar_huge/checkpoint-last.pth",
        "fid-stats": "fid_stats/adm_in256_stats.npz",  # fid_statistics_file, relative to the working directory
        "harmon-kl16": "checkpoints/kl16.ckpt",  # Harmon configs: checkpoints/kl16.ckpt
        "harmon-1.5b": "checkpoints/harmon_1.5b.pth",
    }
    assert {name: REGISTRY[name].dest for name in want} == want
    hub = {n: (e.source.repo_id, e.source.filename) for n, e in REGISTRY.items() if isinstance(e.source, HubFile)}
    assert {hub[f"flowar-{s}"] for s in "slh"} == {("OliverRen/FlowAR", f"FlowAR-{s}.pth") for s in "SLH"}
    assert {hub[f"xar-{s}"] for s in "blh"} == {("OliverRen/xAR", f"xAR-{s}.pth") for s in "BLH"}
    assert {hub[n][1] for n in hub if n.startswith("harmon")} == {
        "kl16.ckpt", "harmon_0.5b.pth", "harmon_1.5b.pth", "harmon_1.5b-o.pth"}


def test_selection_defaults_and_errors():
    assert [e.name for e in select([], "mar")] == ["kl16", "mar-b", "mar-l", "mar-h", "fid-stats"]
    assert [e.name for e in select(["flowar"])] == ["kl16", "flowar-s", "flowar-l", "flowar-h", "fid-stats"]
    assert [e.name for e in select(["xar-b", "kl16", "xar-b"])] == ["xar-b", "kl16"]
    harmon_all = [e.name for e in select(["all"], "harmon")]
    assert "qwen2.5-1.5b-instruct" in harmon_all and "qwen2.5-1.5b-instruct" not in [
        e.name for e in select([], "harmon")]
    with pytest.raises(ValueError, match="nothing selected"):
        select([])
    with pytest.raises(ValueError, match=r"unknown selection 'flowar-s'; allowed: mar, all, or one of kl16"):
        select(["flowar-s"], "mar")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dest="/abs/x.pth"), "relative path"),
        (dict(dest="../x.pth"), "relative path"),
        (dict(sha256="ABC"), "sha256 must be 64 lower-case hex"),
        (dict(families=("dit",)), "families must be a non-empty subset"),
        (dict(name="mar"), "reserved"),
        (dict(source=HubFile("o/r", "y.pth")), "dest must end with the Hub file name"),
        (dict(source=HubSnapshot("o/r")), "dest must be None exactly for a HubSnapshot"),
    ],
)
def test_remote_file_validation(kwargs, message):
    base = dict(name="x", families=("mar",), description="", source=Url("https://example.org/x"), dest="a/x.pth")
    with pytest.raises(ValueError, match=message):
        RemoteFile(**{**base, **kwargs})


@pytest.fixture
def local_entry(server, monkeypatch):
    """Registry entry ``test-file`` served by the local server (family mar)."""
    base, st = server
    entry = RemoteFile("test-file", ("mar",), "test", Url(f"{base}/file.bin"), "sub/file.bin", sha256=SHA)
    monkeypatch.setattr(download, "REGISTRY", {**REGISTRY, "test-file": entry})
    return entry, st


def test_cli_downloads_a_selection(local_entry, tmp_path, capsys):
    assert download.main(["test-file", "--root", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "sub/file.bin").read_bytes() == PAYLOAD
    assert "test-file: downloaded" in capsys.readouterr().out
    assert download.main(["test-file", "--root", str(tmp_path), "--no-progress"]) == 0
    assert "test-file: present" in capsys.readouterr().out


def test_cli_unreachable_url_gives_clear_error_and_nonzero_exit(monkeypatch, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/kl16.ckpt"
    entry = RemoteFile("offline", ("mar",), "test", Url(url), "pretrained_models/vae/kl16.ckpt")
    monkeypatch.setattr(download, "REGISTRY", {**REGISTRY, "offline": entry})
    assert download.main(["offline", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"offline: FAILED: could not reach {url}" in err
    assert f"download {url} elsewhere and place it at {tmp_path / 'pretrained_models/vae/kl16.ckpt'}" in err
    assert list(tmp_path.iterdir()) == []  # no folders, no partial files


def test_cli_bad_input_exits_2_with_allowed_values(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "disa.download", *args], capture_output=True, text=True,
                              cwd=tmp_path)
    bad = run("mar-x")
    assert bad.returncode == 2 and "unknown selection 'mar-x'; allowed: mar, flowar, xar, harmon, all" in bad.stderr
    assert run().returncode == 2
    neg = run("kl16", "--retries", "-1")
    assert neg.returncode == 2 and "--retries: expected an integer >= 0" in neg.stderr
    (tmp_path / "f").write_text("")
    assert "is a file" in run("kl16", "--root", "f").stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]


@pytest.mark.parametrize("folder, expected", [("MAR_DiSA", "mar-h"), ("FlowAR_DiSA", "flowar-h"),
                                              ("xAR_DiSA", "xar-h"), ("Harmon_DiSA", "harmon-1.5b")])
def test_util_download_scripts_run_from_their_folder(folder, expected):
    out = subprocess.run([sys.executable, "util/download.py", "--help"], cwd=REPO / folder, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: python util/download.py" in out.stdout and expected in out.stdout
    others = {"MAR_DiSA": "flowar-s", "FlowAR_DiSA": "mar-b", "xAR_DiSA": "flowar-s", "Harmon_DiSA": "mar-b"}
    assert others[folder] not in out.stdout  # each script lists only its family's files


def test_mar_upstream_function_writes_the_upstream_path(server, monkeypatch, tmp_path):
    base, _ = server
    from mar_disa.util.download import download_pretrained_vae

    kl16 = RemoteFile("kl16", ("mar",), "test", Url(f"{base}/file.bin"), REGISTRY["kl16"].dest, sha256=SHA)
    monkeypatch.setattr(download, "REGISTRY", {**REGISTRY, "kl16": kl16})
    monkeypatch.chdir(tmp_path)
    download_pretrained_vae(overwrite=False)
    assert (tmp_path / "pretrained_models/vae/kl16.ckpt").read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face (hf_hub_download / snapshot_download replaced by fakes)


class FakeHub:
    def __init__(self, content: bytes = b"", error: Exception | None = None) -> None:
        self.content, self.error, self.calls = content, error, []

    def __call__(self, **kwargs: object) -> str:
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        if "filename" not in kwargs:  # snapshot_download
            return "/hf-cache/snapshot"
        path = Path(kwargs["local_dir"]) / str(kwargs["filename"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content)
        return str(path)


def test_hub_file_lands_in_the_layout_and_is_verified(monkeypatch, tmp_path):
    fake = FakeHub(PAYLOAD)
    monkeypatch.setattr(download, "hf_hub_download", fake)
    entry = RemoteFile("t", ("flowar",), "test", HubFile("OliverRen/FlowAR", "FlowAR-S.pth"),
                       "pretrained_models/flowar/FlowAR-S.pth", sha256=SHA)
    result = fetch(entry, tmp_path, progress=False)
    assert fake.calls == [dict(repo_id="OliverRen/FlowAR", filename="FlowAR-S.pth", revision="main",
                               local_dir=tmp_path / "pretrained_models/flowar", force_download=False)]
    assert (result.status, result.checks) == ("downloaded", ("sha256",))
    assert result.path == tmp_path / "pretrained_models/flowar/FlowAR-S.pth"
    assert result.path.read_bytes() == PAYLOAD
    assert fetch(entry, tmp_path, progress=False).status == "present" and len(fake.calls) == 1


def test_hub_file_with_wrong_sha256_is_deleted(monkeypatch, tmp_path):
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(b"not the checkpoint"))
    entry = REGISTRY["flowar-s"]  # the real entry and its published sha256
    with pytest.raises(ChecksumError, match=f"expected {entry.sha256}.*deleted"):
        fetch(entry, tmp_path, progress=False)
    assert not (tmp_path / entry.dest).exists()


def test_hub_offline_error_says_what_to_place_where(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(error=LocalEntryNotFoundError("no connection")))
    assert download.main(["xar-b", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "could not fetch xAR-B.pth from the Hugging Face repository OliverRen/xAR" in err
    assert ("download https://huggingface.co/OliverRen/xAR/resolve/main/xAR-B.pth elsewhere and place it at "
            f"{tmp_path / 'pretrained_models/xar/xAR-B.pth'}") in err


def test_qwen_snapshot_goes_to_the_hub_cache(monkeypatch, tmp_path):
    fake = FakeHub()
    monkeypatch.setattr(download, "snapshot_download", fake)
    result = fetch(REGISTRY["qwen2.5-1.5b-instruct"], tmp_path)
    assert fake.calls == [dict(repo_id="Qwen/Qwen2.5-1.5B-Instruct", revision="main", force_download=False)]
    assert (result.status, result.path) == ("cached", Path("/hf-cache/snapshot"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(download, "snapshot_download", FakeHub(error=LocalEntryNotFoundError("no connection")))
    with pytest.raises(DownloadError, match="Qwen/Qwen2.5-1.5B-Instruct .*offline, copy a Hugging Face cache"):
        fetch(REGISTRY["qwen2.5-1.5b-instruct"], tmp_path)
