"""Sources: URI mapping, downloads from a loopback HTTP server (progress, cache, sha256, offline, errors)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from converter import sources
from converter.errors import ConversionError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: several read blocks


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        _Handler.hits.append(self.path)
        if self.path.endswith("/short"):  # declares more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            return
        if self.path.endswith("/boom"):
            self.send_error(500, "server fell over")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    (root / "bucket" / "run").mkdir(parents=True)
    (root / "bucket" / "run" / "params").write_bytes(PAYLOAD)
    (root / "bucket" / "run" / "config.gin").write_text("run_train.lopt = @HyperV2()\n")
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    _Handler.hits.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_uri_mapping():
    assert (
        sources.to_url("gs://gresearch/a/b/params") == "https://storage.googleapis.com/gresearch/a/b/params"
    )
    assert sources.to_url("hf://amoudgl/celo/theta.state") == (
        "https://huggingface.co/amoudgl/celo/resolve/main/theta.state"
    )
    assert sources.to_url("hf://amoudgl/celo@abc123/sub/theta.state") == (
        "https://huggingface.co/amoudgl/celo/resolve/abc123/sub/theta.state"
    )
    assert sources.to_url("https://x.org/f") == "https://x.org/f"
    assert sources.to_url("/tmp/params") is None
    assert sources.sibling("gs://b/run/params", "config.gin") == "gs://b/run/config.gin"
    assert sources.sibling("/a/run/params", "config.gin") == "/a/run/config.gin"
    for bad, match in [
        ("gs://bucket", "bucket and an object"),
        ("hf://owner/repo", "hf://owner"),
        ("s3://b/k", "unsupported URI scheme"),
    ]:
        with pytest.raises(ConversionError, match=match):
            sources.to_url(bad)


def test_download_progress_cache_hit_and_sibling(server, capsys):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    uri = f"{server}/bucket/run/params"
    path = sources.fetch(uri, sha256=sha, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert "params" in capsys.readouterr().err  # tqdm's bar, labelled with the file name
    assert not list(path.parent.glob("*.part"))
    again = sources.fetch(uri, sha256=sha)
    assert again == path and _Handler.hits == ["/bucket/run/params"]  # served from the cache
    gin = sources.fetch(sources.sibling(uri, "config.gin"))
    assert gin.parent == path.parent and gin.name == "config.gin"  # the pair lands side by side


def test_gs_uri_goes_through_the_https_endpoint(server, monkeypatch):
    monkeypatch.setattr(sources, "GCS_ENDPOINT", server)
    assert sources.fetch("gs://bucket/run/params").read_bytes() == PAYLOAD
    assert _Handler.hits == ["/bucket/run/params"]


def test_sha_mismatch_leaves_nothing_in_cache(server):
    uri = f"{server}/bucket/run/params"
    with pytest.raises(ConversionError, match=r"sha256 mismatch: expected 0+, got [0-9a-f]{64}"):
        sources.fetch(uri, sha256="0" * 64)
    assert not sources.cache_path(uri).exists()
    # a cached copy that does not match a known sha256 is fetched again
    sources.fetch(uri)
    sources.cache_path(uri).write_bytes(b"corrupt")
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert sources.fetch(uri, sha256=sha).read_bytes() == PAYLOAD
    assert len(_Handler.hits) == 3


def test_http_errors(server):
    with pytest.raises(ConversionError, match=r"not found at .*HTTP 404"):
        sources.fetch(f"{server}/bucket/run/missing")
    with pytest.raises(sources.DownloadError, match="HTTP 500"):
        sources.fetch(f"{server}/bucket/boom")
    with pytest.raises(sources.DownloadError, match=r"ended early \(10 of 1000 bytes\)"):
        sources.fetch(f"{server}/bucket/short")
    assert not sources.cache_path(f"{server}/bucket/short").exists()
    assert not list(sources.cache_path(f"{server}/bucket/short").parent.glob("*"))


def test_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sources.DownloadError) as info:
        sources.fetch(f"http://127.0.0.1:{port}/b/params", timeout=5)
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
