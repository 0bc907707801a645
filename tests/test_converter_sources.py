"""Sources: URI checks and normalisation, our HTTP client against a loopback server (cache layout, metadata,
refresh, size cap, broken replies, redirects), local files that are not regular files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from http_support import file_server, free_port, serve

from lopt_bridge.converter import files, sources
from lopt_bridge.converter.errors import ConversionError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: several read blocks


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "bucket" / "run").mkdir(parents=True)
    (root / "bucket" / "run" / "params").write_bytes(PAYLOAD)
    (root / "bucket" / "run" / "config.gin").write_text("run_train.lopt = @HyperV2()\n")
    return root


@pytest.fixture
def server(www, tmp_path, monkeypatch):
    handler_cls, factory = file_server(www, etags={"/bucket/run/params": '"v1"'})
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    with serve(factory) as url:
        handler_cls.base = url
        yield handler_cls


def test_uri_mapping_and_normalisation():
    assert (
        sources.to_url("gs://gresearch/a/b/params") == "https://storage.googleapis.com/gresearch/a/b/params"
    )
    assert sources.to_url("https://x.org/f") == "https://x.org/f"
    assert sources.to_url("HTTPS://X.org:443/a/%66") == "https://x.org/a/f"  # case, default port, %66 = f
    assert sources.to_url("http://[::1]:8080/a") == "http://[::1]:8080/a"
    assert sources.to_url("/tmp/params") is None
    assert sources.to_url("file:///tmp/params") is None
    ref = sources.parse_remote("hf://amoudgl/celo@abc123/sub/theta.state")
    assert (ref.repo_id, ref.revision, ref.filename, ref.repo_type) == (
        "amoudgl/celo", "abc123", "sub/theta.state", "model"
    )  # fmt: skip
    assert sources.parse_remote("hf://datasets/o/r/f.bin").repo_type == "dataset"
    assert sources.parse_remote("hf://o/r@refs%2Fpr%2F1/f").revision == "refs/pr/1"
    assert sources.normalise("hf://o/r/f") == sources.normalise("hf://o/r@main/f")
    assert sources.sibling("gs://b/run/params", "config.gin") == "gs://b/run/config.gin"
    assert sources.sibling("/a/run/params", "config.gin") == "/a/run/config.gin"


@pytest.mark.parametrize(
    "uri, match",
    [
        ("gs://bucket", "bucket and an object"),
        ("hf://owner/repo", "hf://owner/repo"),
        ("hf://owner/re po/f", "spaces or control"),
        ("hf://../repo/f", "malformed hf owner"),
        ("hf://o/r/../f", r"'\.\.' is not allowed"),
        ("hf://o/r@../f", "malformed hf revision"),
        ("s3://b/k", "unsupported URI scheme"),
        ("http://h/a/%2Ftmp%2Fevil.pth", r"'/' \(%2F\)"),
        ("http://h/a/%2e%2e/x", r"'\.\.' is not allowed"),
        ("http://h/a/../x", r"'\.\.' is not allowed"),
        ("http://h/a/./x", r"'\.' is not allowed"),
        ("http://h/a/..", r"'\.\.' is not allowed"),
        ("http://h/a/.", r"'\.' is not allowed"),
        ("http://h/a//x", "empty path segment"),
        ("http://h/a/", "empty path segment"),
        ("http://h", "names no file"),
        ("http://h/a\\..\\x", "backslash"),
        ("http://h/a/%5C..%5Cx", "backslash"),
        ("http://h/a/x%00y", "NUL"),
        ("http://h/a/%ff", "not valid UTF-8"),
        ("http://h:99999/x", r"malformed URL \(Port out of range"),
        ("http://h:abc/x", "malformed URL"),
        ("http://[::1/x", "malformed URL"),
        ("http://[zz::1]/x", "malformed"),
        ("http://user:pw@h/x", "credentials"),
        ("http:///x", "no host"),
        ("http://h/x#frag", "fragment"),
        ("http://h/" + "a" * 300, "characters long"),
    ],
)
def test_refused_uris(uri, match):
    with pytest.raises(ConversionError, match=match) as info:
        sources.parse_remote(uri)
    assert "\n" not in str(info.value)


def test_cache_path_comes_from_a_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "c"))
    uri = "http://127.0.0.1:8000/a/b/theta.state"
    path = sources.cache_path(uri)
    digest = hashlib.sha256(sources.normalise(uri).encode()).hexdigest()[:32]
    assert path == tmp_path / "c" / "http" / "127.0.0.1_8000" / digest / "theta.state"
    # the same file spelled differently shares the entry; a leading dot is dropped from the name
    assert sources.cache_path("HTTP://127.0.0.1:8000/a/%62/theta.state") == path
    assert sources.cache_path("http://h/x/.hidden").name == "hidden"
    with pytest.raises(ConversionError, match="huggingface_hub's cache"):
        sources.cache_path("hf://o/r/f")


def test_download_cache_hit_metadata_and_mode(server, capsys):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    uri = f"{server.base}/bucket/run/params"
    old = os.umask(0o022)
    try:
        path = sources.fetch(uri, sha256=sha, progress=True)
    finally:
        os.umask(old)
    assert path.read_bytes() == PAYLOAD and path == sources.cache_path(uri)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    assert "params" in capsys.readouterr().err  # tqdm's bar, labelled with the file name
    meta = json.loads((path.parent / sources.META_NAME).read_text())
    assert meta["size"] == len(PAYLOAD) and meta["sha256"] == sha and meta["etag"] == '"v1"'
    assert meta["url"] == uri
    assert sorted(p.name for p in path.parent.iterdir()) == [sources.META_NAME, "params"]  # no temp left
    assert sources.fetch(uri, sha256=sha) == path and server.hits == ["/bucket/run/params"]  # cache hit
    assert sources.fetch(uri) == path and len(server.hits) == 1  # no sha known: size + recorded sha
    gin = sources.fetch(sources.sibling(uri, "config.gin"))
    assert gin.read_text().startswith("run_train.lopt") and gin.parent != path.parent


def test_refresh_uses_etag_and_replaces_changed_files(server, www):
    uri = f"{server.base}/bucket/run/params"
    path = sources.fetch(uri)
    assert sources.fetch(uri, refresh=True) == path
    assert server.hits == ["/bucket/run/params"] * 2  # asked again: 304, the copy kept
    path.write_bytes(b"corrupted in the cache")
    assert sources.fetch(uri).read_bytes() == PAYLOAD  # recorded sha256 differs: downloaded again
    server.etag_of.clear()
    (www / "bucket" / "run" / "params").write_bytes(b"new bytes")
    assert sources.fetch(uri).read_bytes() == PAYLOAD  # without --refresh the cached copy stands
    assert sources.fetch(uri, refresh=True).read_bytes() == b"new bytes"


def test_sha_mismatch_leaves_nothing_in_cache(server):
    uri = f"{server.base}/bucket/run/params"
    with pytest.raises(ConversionError, match=r"sha256 mismatch: expected 0+, got [0-9a-f]{64}"):
        sources.fetch(uri, sha256="0" * 64)
    assert not sources.cache_path(uri).exists()
    assert not (sources.cache_path(uri).parent / sources.META_NAME).exists()
    sources.fetch(uri)
    sources.cache_path(uri).write_bytes(b"corrupt")
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert sources.fetch(uri, sha256=sha).read_bytes() == PAYLOAD
    assert len(server.hits) == 3


def test_broken_replies_are_one_line_and_leave_nothing(server):
    base = f"{server.base}/bucket"
    with pytest.raises(ConversionError, match=r"not found at .*HTTP 404"):
        sources.fetch(f"{base}/run/missing")
    with pytest.raises(sources.DownloadError, match="HTTP 500"):
        sources.fetch(f"{base}/boom")
    cases = {
        "short": r"truncated \(10 of 1000 bytes",
        "chunked-truncated": "truncated",
        "not-http": "did not answer with valid HTTP",
        "to-ftp": "redirected to a ftp:// URL, refused",
        "huge-length": "announces 1099511627776 bytes, over the",
    }
    for name, match in cases.items():
        with pytest.raises(ConversionError, match=match) as info:
            sources.fetch(f"{base}/{name}", timeout=10)
        assert "\n" not in str(info.value)
        folder = sources.cache_path(f"{base}/{name}").parent
        assert not folder.exists() or not any(folder.iterdir()), name


def test_size_cap_stops_an_endless_stream(server, monkeypatch):
    uri = f"{server.base}/bucket/endless"
    with pytest.raises(ConversionError, match=r"more than the 3145728-byte source limit"):
        sources.fetch(uri, max_bytes=3 << 20, timeout=10)
    monkeypatch.setenv(sources.MAX_SOURCE_ENV, "2M")
    with pytest.raises(ConversionError, match=r"more than the 2097152-byte source limit"):
        sources.fetch(uri, timeout=10)
    assert not any(sources.cache_path(uri).parent.iterdir())
    with pytest.raises(ConversionError, match="over the 1000-byte source limit"):
        sources.fetch(f"{server.base}/bucket/run/params", max_bytes=1000)
    assert sources.parse_size("1G") == 1 << 30 and sources.parse_size("512MiB") == 512 << 20
    for bad in ("lots", "-1", "0"):
        with pytest.raises(ConversionError):
            sources.parse_size(bad)


def test_symlinked_cache_entries_are_refused(server, tmp_path):
    uri = f"{server.base}/bucket/run/params"
    dest = sources.cache_path(uri)
    outside = tmp_path / "outside"
    outside.mkdir()
    host = dest.parent.parent
    host.parent.mkdir(parents=True)
    host.symlink_to(outside, target_is_directory=True)  # <root>/http/<host> -> outside
    with pytest.raises(ConversionError, match="is a symbolic link"):
        sources.fetch(uri)
    assert not any(outside.iterdir())
    host.unlink()
    dest.parent.mkdir(parents=True)
    dest.symlink_to(outside / "target")  # the file itself a link
    with pytest.raises(ConversionError, match="not a plain file"):
        sources.fetch(uri)
    assert not (outside / "target").exists()


def test_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(sources.DownloadError) as info:
        sources.fetch(f"http://127.0.0.1:{free_port()}/b/params", timeout=5)
    msg = str(info.value)
    assert "offline or host unreachable" in msg and "--source" in msg and "\n" not in msg


def test_local_paths(tmp_path):
    f = tmp_path / "theta.state"
    f.write_bytes(b"abc")
    assert sources.fetch(str(f)) == f
    assert sources.fetch(f"file://{f}") == f
    with pytest.raises(ConversionError, match="sha256 mismatch"):
        sources.fetch(str(f), sha256="1" * 64)
    with pytest.raises(ConversionError, match="no such file"):
        sources.fetch(str(tmp_path / "nope"))
    assert sources.sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    assert isinstance(sources.cache_dir(), Path)
    assert files.read_regular_file(f, max_bytes=3) == b"abc"
    with pytest.raises(ConversionError, match="over the 2-byte limit"):
        files.read_regular_file(f, max_bytes=2)


def test_fifo_and_devices_are_not_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConversionError, match="not a regular file"):
        files.read_regular_file(fifo, max_bytes=100)  # would block forever without O_NONBLOCK + fstat
    with pytest.raises(ConversionError, match="not a regular file"):
        files.read_regular_file(Path("/dev/zero"), max_bytes=100)
    with pytest.raises(ConversionError, match="is a directory"):
        files.read_regular_file(tmp_path, max_bytes=100)
