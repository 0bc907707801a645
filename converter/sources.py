"""Turn a source (local path, ``https://``, ``gs://bucket/obj``, ``hf://owner/repo/file``) into a local file.

Remote files are downloaded once into a cache directory (``$LOPT_BRIDGE_CACHE`` or the XDG user cache,
``~/.cache/lopt-bridge``), with a progress bar, written atomically (temp file + rename) and checked
against a known sha256. ``gs://`` uses Google Cloud Storage's public HTTPS endpoint, ``hf://`` Hugging Face's
``resolve`` endpoint, so no cloud SDK is needed. Files that belong together (``params`` + ``config.gin``)
land in the same cache folder, so "the file beside it" means the same thing locally and remotely.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from . import __version__
from .errors import ConversionError

GCS_ENDPOINT = "https://storage.googleapis.com"
HF_ENDPOINT = "https://huggingface.co"
_CHUNK = 1 << 20


class DownloadError(Exception):
    """A download failed for a reason other than bad input (offline, server error): CLI exit code 1."""


def to_url(uri: str) -> str | None:
    """The HTTP(S) URL a remote source is fetched from, or None for a local path.

    ``gs://bucket/obj`` -> ``https://storage.googleapis.com/bucket/obj``;
    ``hf://owner/repo/file`` (or ``hf://owner/repo@revision/file``) ->
    ``https://huggingface.co/owner/repo/resolve/<revision or main>/file``.
    """
    if uri.startswith(("http://", "https://")):
        return uri
    if uri.startswith("gs://"):
        rest = uri[len("gs://") :]
        if "/" not in rest.strip("/"):
            raise ConversionError(
                uri, "a gs:// source needs a bucket and an object: gs://bucket/path/to/file"
            )
        return f"{GCS_ENDPOINT}/{urllib.parse.quote(rest)}"
    if uri.startswith("hf://"):
        parts = uri[len("hf://") :].split("/")
        if len(parts) < 3 or not all(parts):
            raise ConversionError(uri, "an hf:// source is hf://owner/repo/path/to/file")
        owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
        repo, _, revision = repo.partition("@")
        return f"{HF_ENDPOINT}/{owner}/{repo}/resolve/{revision or 'main'}/{urllib.parse.quote(path)}"
    if uri.startswith("file://"):
        return None
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri) and not Path(uri).exists():
        raise ConversionError(uri, "unsupported URI scheme (use a path, https://, gs:// or hf://)")
    return None


def is_remote(uri: str) -> bool:
    """True for ``http(s)://``, ``gs://`` and ``hf://`` sources."""
    return uri.startswith(("http://", "https://", "gs://", "hf://"))


def local_path(uri: str) -> Path:
    """The path of a local source (``file://`` prefix allowed)."""
    return Path(
        urllib.parse.unquote(uri[len("file://") :]) if uri.startswith("file://") else uri
    ).expanduser()


def sibling(uri: str, name: str) -> str:
    """The URI of file ``name`` in the same folder as ``uri`` (local or remote)."""
    if is_remote(uri):
        head, _, _ = uri.rpartition("/")
        return f"{head}/{name}"
    return str(local_path(uri).parent / name)


def cache_dir() -> Path:
    """Where downloads are kept: ``$LOPT_BRIDGE_CACHE`` or the XDG user cache dir for lopt-bridge."""
    env = os.environ.get("LOPT_BRIDGE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lopt-bridge")) / "downloads"


def cache_path(uri: str) -> Path:
    """Cache location of a remote source: one folder per remote folder, the remote file name kept."""
    url = to_url(uri)
    assert url is not None, uri
    folder_url, _, name = url.split("?", 1)[0].rpartition("/")
    parsed = urllib.parse.urlparse(folder_url)
    readable = "_".join(p for p in (parsed.netloc + parsed.path).split("/") if p)[-80:]
    digest = hashlib.sha256(folder_url.encode()).hexdigest()[:12]
    return cache_dir() / f"{readable}-{digest}" / (urllib.parse.unquote(name) or "download")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str | None, uri: str) -> None:
    if expected is None:
        return
    got = sha256_file(path)
    if got != expected.lower():
        raise ConversionError(uri, f"sha256 mismatch: expected {expected.lower()}, got {got}")


def _download(url: str, dest: Path, *, uri: str, progress: bool | None, timeout: float) -> None:
    """Stream ``url`` into ``dest`` atomically (temp file in the same folder, then rename)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": f"lopt-bridge/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404, 410):
            raise ConversionError(uri, f"not found at {url} (HTTP {e.code} {e.reason})") from None
        raise DownloadError(f"{uri}: download failed: HTTP {e.code} {e.reason} from {url}") from None
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"{uri}: cannot download {url}: offline or host unreachable ({reason}); "
            "download the file by hand and pass its path with --source"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with response, os.fdopen(fd, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                file=sys.stderr,
                disable=(None if progress is None else not progress),
                leave=False,
            )
            received = 0
            with bar:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except OSError as e:
                        raise DownloadError(f"{uri}: download of {url} interrupted ({e})") from None
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise DownloadError(f"{uri}: download of {url} ended early ({received} of {total} bytes)")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch(
    uri: str,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    refresh: bool = False,
) -> Path:
    """A local file holding ``uri``'s bytes: the path itself, or a (cached) download.

    ``sha256``: expected hex digest; a cached copy that does not match is downloaded again, a download
    that does not match raises ConversionError. ``progress``: None shows a bar only on a terminal.
    """
    url = to_url(uri)
    if url is None:
        path = local_path(uri)
        if not path.exists():
            raise ConversionError(path, "no such file or directory")
        if path.is_file():
            _check_sha(path, sha256, str(path))
        return path
    dest = cache_path(uri)
    if dest.is_file() and not refresh:
        if sha256 is None or sha256_file(dest) == sha256.lower():
            return dest
    _download(url, dest, uri=uri, progress=progress, timeout=timeout)
    try:
        _check_sha(dest, sha256, uri)
    except ConversionError:
        dest.unlink(missing_ok=True)  # never leave a file that failed its check in the cache
        raise
    return dest


def clear_cache() -> None:
    """Remove every cached download."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
