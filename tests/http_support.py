"""Loopback HTTP servers for the converter's download tests: a file server with misbehaving routes, and a
fake Hugging Face hub that speaks the ``resolve`` URLs ``hf_hub_download`` uses."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; extra routes for broken replies. ``hits`` lists every request path."""

    hits: list[str]
    etag_of: dict[str, str]

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.hits.append(self.path)
        tail = self.path.rsplit("/", 1)[-1]
        if tail == "short":  # declares more bytes than it sends
            self._raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + b"x" * 10)
        elif tail == "chunked-truncated":  # a chunk that ends early, then the connection closes
            self._raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"y" * 100)
        elif tail == "not-http":
            self._raw(b"SSH-2.0-OpenSSH_9.0\r\nthis is not http\r\n")
        elif tail == "endless":  # no Content-Length, never ends on its own
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"z" * 65536)
            except OSError:
                return
        elif tail == "huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        elif tail == "boom":
            self.send_error(500, "server fell over")
        elif tail == "to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x")
            self.end_headers()
        else:
            etag = self.etag_of.get(self.path)
            if etag and self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            if etag:
                self._etag = etag
            super().do_GET()

    def end_headers(self) -> None:
        etag = getattr(self, "_etag", None)
        if etag:
            self.send_header("ETag", etag)
            self._etag = None
        super().end_headers()

    def _raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class FakeHub(http.server.BaseHTTPRequestHandler):
    """``/{owner}/{repo}/resolve/{revision}/{path}`` for HEAD and GET, with the headers hf_hub_download
    needs (X-Repo-Commit, ETag, Content-Length) and the hub's X-Error-Code on errors."""

    files: dict[tuple[str, str], bytes]  # (repo_id, path) -> bytes
    gated: set[str]
    hits: list[tuple[str, str]]

    def _reply(self, body: bool) -> None:
        self.hits.append((self.command, self.path))
        parts = self.path.split("?", 1)[0].split("/")
        if len(parts) < 6 or parts[3] != "resolve":
            return self._error(404, "EntryNotFound")
        repo_id, revision, path = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
        if repo_id in self.gated and "authorization" not in {k.lower() for k in self.headers}:
            return self._error(403, "GatedRepo")
        if not any(r == repo_id for r, _ in self.files):
            return self._error(401, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        data = self.files.get((repo_id, path))
        if data is None:
            return self._error(404, "EntryNotFound")
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, code: int, error_code: str) -> None:
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(body=True)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run ``handler`` on a loopback port in a thread; yield its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def file_server(root: Path, etags: dict[str, str] | None = None) -> tuple[type[FileServer], Callable]:
    """A FileServer subclass with its own hit list, and the factory ``serve`` takes."""
    cls = type("Files", (FileServer,), {"hits": [], "etag_of": dict(etags or {})})
    return cls, lambda *a, **k: cls(*a, directory=str(root), **k)


def fake_hub(files: dict[tuple[str, str], bytes], gated: set[str] | None = None) -> type[FakeHub]:
    """A FakeHub subclass serving ``files``."""
    return type("Hub", (FakeHub,), {"files": dict(files), "gated": set(gated or ()), "hits": []})


def free_port() -> int:
    """A loopback port nobody listens on (for the offline cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["COMMIT", "FakeHub", "FileServer", "fake_hub", "file_server", "free_port", "serve"]
