"""Turn a source (local path, ``https://``, ``gs://bucket/obj``, ``hf://owner/repo/file``) into a local file.

Every remote URI is parsed and checked before anything is fetched (``parse_remote``): path segments that
are empty, ``.``, ``..``, or hold characters outside ``[A-Za-z0-9._~@+=,!-]`` after percent-decoding (so
``%2F``, ``%2e%2e``, backslashes, NUL) are refused with one line, as are credentials in the URL, invalid
ports and malformed IPv6 literals.

``hf://`` goes through ``huggingface_hub.hf_hub_download``: its cache is shared with every other Hugging Face
tool, ``HF_TOKEN`` opens gated or private repos, ``HF_HUB_OFFLINE=1`` reads the cache only, ``HF_ENDPOINT``
points at a mirror, and revisions are written ``hf://owner/repo@revision/path``.

``http(s)://`` and ``gs://`` (Google Cloud Storage's public HTTPS endpoint, no SDK) use our own client. Their
cache (``$LOPT_BRIDGE_CACHE`` or the XDG user cache, ``~/.cache/lopt-bridge/downloads``) is laid out as
``<root>/<scheme>/<host>[_<port>]/<sha256 of the normalised URL, 32 hex>/<sanitised base name>`` plus a
``.download.json`` beside the file (URL, size, sha256, ETag, Last-Modified). No decoded URL text ever
becomes a path component except the sanitised base name inside the hash folder; every folder is created
one level at a time and refused if it is a symbolic link or resolves outside the cache root. A download
is written atomically (temp file + rename) with the user's umask, stops at a size cap
(``--max-source-size`` / ``$LOPT_BRIDGE_MAX_SOURCE_SIZE``, default 1 GiB), and is checked against a known
sha256; a cached copy is reused only if its size and sha256 still match what was recorded, and
``refresh=True`` asks the server again (``If-None-Match`` / ``If-Modified-Since``; a 304 keeps the copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, files
from .errors import ConversionError

GCS_ENDPOINT = "https://storage.googleapis.com"
#: Test hook: an endpoint for hf:// passed to huggingface_hub; None means huggingface_hub's own
#: (``$HF_ENDPOINT`` or https://huggingface.co).
HF_ENDPOINT: str | None = None
#: Largest source file read or downloaded by default: far above the largest published checkpoint (~9 MB).
DEFAULT_MAX_SOURCE_BYTES = 1 << 30
MAX_SOURCE_ENV = "LOPT_BRIDGE_MAX_SOURCE_SIZE"
META_NAME = ".download.json"
_CHUNK = 1 << 20
_MAX_URI = 4096
_MAX_SEGMENT = 255
_SEGMENT = re.compile(r"[A-Za-z0-9._~@+=,!-]+")
_HOST = re.compile(r"[A-Za-z0-9.-]+")
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_REVISION = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_QUERY = re.compile(r"[!$&'()*+,;=:@/?%A-Za-z0-9._~-]*")
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_SCHEMES = ("http://", "https://", "gs://", "hf://")


class DownloadError(Exception):
    """A download failed for a reason other than bad input (offline, server error): CLI exit code 1."""


# ------------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class RemoteRef:
    """A checked remote source. ``url`` is what our HTTP client fetches (None for hf://)."""

    uri: str  # as given
    scheme: str  # "http" | "https" | "gs" | "hf"
    normalised: str  # canonical form: cache key and registry comparison
    url: str | None
    host: str = ""
    port: int | None = None
    segments: tuple[str, ...] = ()  # decoded path segments, each checked
    repo_id: str = ""  # hf only
    repo_type: str = "model"
    revision: str = "main"

    @property
    def filename(self) -> str:
        """The path inside an hf repo (``a/b.state``) or the decoded last URL segment."""
        return "/".join(self.segments)

    @property
    def base_name(self) -> str:
        return self.segments[-1]


def _bad(uri: str, problem: str) -> ConversionError:
    return ConversionError(uri, problem)


def _check_segment(uri: str, raw: str, *, what: str = "path segment") -> str:
    """A decoded URL path segment, refused unless plainly a file or folder name."""
    try:
        seg = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise _bad(uri, f"{what} {raw!r} is not valid UTF-8 after percent-decoding") from None
    if seg == "":
        raise _bad(uri, f"empty {what} ('//' or a trailing '/'): name a file")
    if seg in (".", ".."):
        raise _bad(uri, f"{what} {seg!r} is not allowed (no relative segments in a source URL)")
    if len(seg) > _MAX_SEGMENT:
        raise _bad(uri, f"{what} is {len(seg)} characters long (at most {_MAX_SEGMENT})")
    if not _SEGMENT.fullmatch(seg):
        odd = next(c for c in seg if not _SEGMENT.fullmatch(c))
        shown = {"/": "'/' (%2F)", "\\": "a backslash", "\0": "NUL"}.get(odd, repr(odd))
        raise _bad(uri, f"{what} {raw!r} holds {shown}; allowed are letters, digits and ._~@+=,!-")
    return seg


def _segments(uri: str, path: str) -> tuple[str, ...]:
    if not path.startswith("/") or path == "/":
        raise _bad(uri, "the URL names no file")
    return tuple(_check_segment(uri, raw) for raw in path[1:].split("/"))


def _quote(seg: str) -> str:
    return urllib.parse.quote(seg, safe="@+=,!~")


def _parse_http(uri: str) -> RemoteRef:
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535", non-numeric port
        raise _bad(uri, f"malformed URL ({e})") from None
    if parts.username is not None or parts.password is not None:
        raise _bad(
            uri, "credentials in the URL are refused (they would be recorded in the output's metadata)"
        )
    if parts.fragment or "#" in uri:
        raise _bad(uri, "a '#fragment' has no meaning in a source URL")
    host = parts.hostname or ""
    if not host:
        raise _bad(uri, "the URL has no host")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(uri, f"malformed IPv6 literal {host!r}") from None
        host_in_url = f"[{host}]"
    else:
        if not _HOST.fullmatch(host) or ".." in host or len(host) > 253:
            raise _bad(uri, f"malformed host name {host!r}")
        host_in_url = host
    if port == 0:
        raise _bad(uri, "port 0 is not a valid port")
    if not _QUERY.fullmatch(parts.query):
        raise _bad(uri, "the query string holds characters that must be percent-encoded")
    segments = _segments(uri, parts.path)
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}[scheme]
    netloc = host_in_url + (f":{port}" if port not in (None, default) else "")
    url = f"{scheme}://{netloc}/" + "/".join(_quote(s) for s in segments)
    if parts.query:
        url += f"?{parts.query}"
    return RemoteRef(uri, scheme, url, url, host, port, segments)


def _parse_gs(uri: str) -> RemoteRef:
    rest = uri[len("gs://") :]
    bucket, slash, obj = rest.partition("/")
    if not bucket or not slash or not obj:
        raise _bad(uri, "a gs:// source needs a bucket and an object: gs://bucket/path/to/file")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}", bucket):
        raise _bad(uri, f"malformed bucket name {bucket!r}")
    if "?" in obj or "#" in obj:
        raise _bad(uri, "a gs:// object name cannot hold '?' or '#'")
    segments = _segments(uri, "/" + obj)
    url = f"{GCS_ENDPOINT.rstrip('/')}/{bucket}/" + "/".join(_quote(s) for s in segments)
    normalised = f"gs://{bucket}/" + "/".join(_quote(s) for s in segments)
    host = urllib.parse.urlsplit(url).hostname or "gcs"
    return RemoteRef(uri, "gs", normalised, url, host, None, (bucket, *segments))


def _parse_hf(uri: str) -> RemoteRef:
    parts = uri[len("hf://") :].split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces"):
        repo_type = parts.pop(0)[:-1]
    if len(parts) < 3:
        raise _bad(uri, "an hf:// source is hf://owner/repo[@revision]/path/to/file")
    owner, repo_rev = parts[0], parts[1]
    repo, at, revision = repo_rev.partition("@")
    for name, what in ((owner, "owner"), (repo, "repository name")):
        if not _HF_NAME.fullmatch(name) or ".." in name or len(name) > 96:
            raise _bad(uri, f"malformed hf {what} {name!r}")
    if at:
        revision = urllib.parse.unquote(revision)  # refs/pr/1 is written refs%2Fpr%2F1
        if not _HF_REVISION.fullmatch(revision) or ".." in revision:
            raise _bad(uri, f"malformed hf revision {revision!r}")
    else:
        revision = "main"
    segments = tuple(_check_segment(uri, raw) for raw in parts[2:])
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    normalised = f"hf://{prefix}{owner}/{repo}@{_quote(revision)}/" + "/".join(_quote(s) for s in segments)
    return RemoteRef(
        uri, "hf", normalised, None, segments=segments, repo_id=f"{owner}/{repo}", repo_type=repo_type,
        revision=revision,
    )  # fmt: skip


def is_remote(uri: str) -> bool:
    """True for ``http(s)://``, ``gs://`` and ``hf://`` sources."""
    return uri.lower().startswith(_SCHEMES)


def parse_remote(uri: str) -> RemoteRef:
    """Check a remote URI and return its parts; ConversionError (one line) for anything odd."""
    if len(uri) > _MAX_URI:
        raise _bad(uri[:80] + "...", f"the URI is {len(uri)} characters long (at most {_MAX_URI})")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        raise _bad(repr(uri), "the URI holds spaces or control characters")
    lower = uri.lower()
    if lower.startswith(("http://", "https://")):
        return _parse_http(uri)
    if lower.startswith("gs://"):
        return _parse_gs(uri)
    if lower.startswith("hf://"):
        return _parse_hf(uri)
    raise _bad(uri, "unsupported URI scheme (use a path, https://, gs:// or hf://)")


def normalise(uri: str) -> str:
    """Canonical form of a remote URI (for comparing with the registry); a local path unchanged."""
    return parse_remote(uri).normalised if is_remote(uri) else uri


def to_url(uri: str) -> str | None:
    """The HTTP(S) URL a remote source is fetched from, or None for a local path.

    ``gs://bucket/obj`` -> ``https://storage.googleapis.com/bucket/obj``; ``hf://owner/repo@rev/file`` ->
    the hub's ``resolve`` URL (informational: hf:// downloads go through huggingface_hub).
    """
    if uri.startswith("file://"):
        return None
    if not is_remote(uri):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri) and not Path(uri).exists():
            raise ConversionError(uri, "unsupported URI scheme (use a path, https://, gs:// or hf://)")
        return None
    ref = parse_remote(uri)
    if ref.url is not None:
        return ref.url
    endpoint = HF_ENDPOINT or _hf_default_endpoint()
    prefix = "" if ref.repo_type == "model" else f"{ref.repo_type}s/"
    path = "/".join(_quote(s) for s in ref.segments)
    return f"{endpoint}/{prefix}{ref.repo_id}/resolve/{_quote(ref.revision)}/{path}"


def _hf_default_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def local_path(uri: str) -> Path:
    """The path of a local source (``file://`` prefix allowed)."""
    return Path(
        urllib.parse.unquote(uri[len("file://") :]) if uri.startswith("file://") else uri
    ).expanduser()


def sibling(uri: str, name: str) -> str:
    """The URI of file ``name`` in the same folder as ``uri`` (local or remote)."""
    if is_remote(uri):
        head, _, _ = uri.split("?", 1)[0].rpartition("/")
        return f"{head}/{name}"
    return str(local_path(uri).parent / name)


def parse_size(text: str | int, *, where: str = "--max-source-size") -> int:
    """``"1G"``, ``"512MiB"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024); ConversionError if not."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise ConversionError(where, f"{text!r} is not a size (e.g. 1G, 512M, 1000000)")
        value = int(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")
    if value <= 0:
        raise ConversionError(where, f"{text!r}: the size limit must be positive")
    return value


def max_source_bytes(value: str | int | None = None) -> int:
    """The source size cap: ``value``, else ``$LOPT_BRIDGE_MAX_SOURCE_SIZE``, else 1 GiB."""
    if value is not None:
        return parse_size(value)
    env = os.environ.get(MAX_SOURCE_ENV)
    if env:
        return parse_size(env, where=MAX_SOURCE_ENV)
    return DEFAULT_MAX_SOURCE_BYTES


# ------------------------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """Where our downloads are kept: ``$LOPT_BRIDGE_CACHE`` or the XDG user cache dir for lopt-bridge."""
    env = os.environ.get("LOPT_BRIDGE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lopt-bridge")) / "downloads"


def _safe_name(text: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:100]
    return name or fallback


def _cache_parts(ref: RemoteRef) -> tuple[str, ...]:
    """Cache path components below the root: from a hash of the normalised URL, never decoded segments."""
    host = _safe_name(ref.host.lower(), "host") + (f"_{ref.port}" if ref.port else "")
    digest = hashlib.sha256(ref.normalised.encode()).hexdigest()[:32]
    return (ref.scheme, host, digest, _safe_name(ref.base_name, "download"))


def cache_path(uri: str) -> Path:
    """Cache location of an ``http(s)://`` or ``gs://`` source (hf:// lives in huggingface_hub's cache)."""
    ref = parse_remote(uri)
    if ref.scheme == "hf":
        raise ConversionError(uri, "hf:// files are kept in huggingface_hub's cache, not lopt-bridge's")
    return cache_dir().joinpath(*_cache_parts(ref))


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _prepare_cache_folder(root: Path, parts: tuple[str, ...], uri: str) -> Path:
    """Create ``root/parts...`` one level at a time, refusing symbolic links and anything outside root."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root
    for part in parts:
        folder = folder / part
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            try:
                folder.mkdir()
            except FileExistsError:  # created concurrently: checked below
                pass
            st = os.lstat(folder)
        if stat.S_ISLNK(st.st_mode):
            raise ConversionError(
                uri, f"cache entry {folder} is a symbolic link; lopt-bridge never makes one, remove it"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ConversionError(uri, f"cache entry {folder} is not a folder; remove it")
        if not _inside(root, folder):
            raise ConversionError(uri, f"cache entry {folder} resolves outside the cache {root}")
    return folder


def _cached_file(dest: Path, root: Path, uri: str) -> bool:
    """True if ``dest`` exists as a plain file inside the cache; refuse a link or other node there."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode) or not _inside(root, dest):
        raise ConversionError(
            uri, f"cache entry {dest} is not a plain file (a link or device?); remove it and retry"
        )
    return True


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def clear_cache() -> None:
    """Remove every download in lopt-bridge's cache (huggingface_hub's cache is left alone)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)


# ------------------------------------------------------------------------------------------------ fetching


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str | None, uri: str, *, note: str = "") -> None:
    if expected is None:
        return
    got = sha256_file(path)
    if got != expected.lower():
        raise ConversionError(uri, f"sha256 mismatch: expected {expected.lower()}, got {got}{note}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most 10 redirects, and only to http(s) (urllib alone would also follow ftp://)."""

    max_redirections = 10

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise ConversionError(req.full_url, f"redirected to a {scheme or 'relative'}:// URL, refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(ref: RemoteRef, headers: dict[str, str], timeout: float) -> Any:
    """Open the URL; maps every failure to ConversionError (bad reply) or DownloadError (network)."""
    assert ref.url is not None
    uri, url = ref.uri, ref.url
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 304:
            return e  # not modified: the caller keeps its cached copy
        if e.code in (400, 401, 403, 404, 410):
            raise ConversionError(uri, f"not found at {url} (HTTP {e.code} {e.reason})") from None
        raise DownloadError(f"{uri}: download failed: HTTP {e.code} {e.reason} from {url}") from None
    except http.client.HTTPException as e:  # not HTTP, bad status line, header line too long, ...
        raise ConversionError(
            uri, f"the server at {url} did not answer with valid HTTP ({type(e).__name__})"
        ) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, http.client.HTTPException):
            raise ConversionError(
                uri, f"the server at {url} did not answer with valid HTTP ({type(reason).__name__})"
            ) from None
        raise DownloadError(
            f"{uri}: cannot download {url}: offline or host unreachable ({reason}); "
            "download the file by hand and pass its path with --source"
        ) from None
    except OSError as e:  # timeouts and refused connections
        raise DownloadError(
            f"{uri}: cannot download {url}: offline or host unreachable ({e}); "
            "download the file by hand and pass its path with --source"
        ) from None
    except ValueError as e:  # http.client.InvalidURL and friends
        raise ConversionError(uri, f"malformed URL ({e})") from None


def _download(
    ref: RemoteRef, dest: Path, *, progress: bool | None, timeout: float, max_bytes: int, refresh: bool
) -> None:
    """Stream ``ref.url`` into ``dest`` atomically with its ``.download.json``; keep it on a 304."""
    from tqdm import tqdm

    uri, url = ref.uri, ref.url
    headers = {"User-Agent": f"lopt-bridge/{__version__}", "Accept-Encoding": "identity"}
    old = _read_meta(dest.parent) if refresh and dest.is_file() else {}
    if old.get("etag"):
        headers["If-None-Match"] = str(old["etag"])
    elif old.get("last_modified"):
        headers["If-Modified-Since"] = str(old["last_modified"])
    response = _open(ref, headers, timeout)
    if getattr(response, "code", None) == 304 and old:
        if old.get("size") == dest.stat().st_size and old.get("sha256") == sha256_file(dest):
            return
        headers.pop("If-None-Match", None)
        headers.pop("If-Modified-Since", None)
        response = _open(ref, headers, timeout)  # the server says unchanged but our copy is not intact
    if getattr(response, "code", None) == 304:
        raise ConversionError(uri, f"{url} answered 304 Not Modified to a request for the whole file")
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.strip().isdigit() else None
        if total is not None and total > max_bytes:
            raise ConversionError(
                uri,
                f"the server announces {total} bytes, over the {max_bytes}-byte source limit "
                "(raise it with --max-source-size or LOPT_BRIDGE_MAX_SOURCE_SIZE)",
            )
        digest = hashlib.sha256()
        received = 0
        with files.atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as out:
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, file=sys.stderr,
                disable=(None if progress is None else not progress), leave=False,
            )  # fmt: skip
            with bar:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except http.client.IncompleteRead as e:
                        raise ConversionError(
                            uri, f"the reply from {url} is truncated ({received + len(e.partial)} bytes, "
                            "then the body ended early)",
                        ) from None  # fmt: skip
                    except http.client.HTTPException as e:
                        raise ConversionError(
                            uri, f"the reply from {url} is not valid HTTP ({type(e).__name__})"
                        ) from None
                    except OSError as e:
                        raise DownloadError(f"{uri}: download of {url} interrupted ({e})") from None
                    if not block:
                        break
                    received += len(block)
                    if received > max_bytes:
                        raise ConversionError(
                            uri,
                            f"the server sent more than the {max_bytes}-byte source limit "
                            "(raise it with --max-source-size or LOPT_BRIDGE_MAX_SOURCE_SIZE)",
                        )
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise ConversionError(
                    uri, f"the reply from {url} is truncated ({received} of {total} bytes, then it ended)"
                )
            out.flush()
            os.fsync(out.fileno())
        meta = {
            "uri": uri,
            "url": url,
            "size": received,
            "sha256": digest.hexdigest(),
            "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified"),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    files.atomic_write_bytes(dest.parent / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())


def _fetch_http(
    ref: RemoteRef,
    *,
    sha256: str | None,
    progress: bool | None,
    timeout: float,
    refresh: bool,
    max_bytes: int,
) -> Path:
    root = cache_dir()
    parts = _cache_parts(ref)
    folder = _prepare_cache_folder(root, parts[:-1], ref.uri)
    dest = folder / parts[-1]
    if _cached_file(dest, root, ref.uri) and not refresh:
        meta = _read_meta(folder)
        size = dest.stat().st_size
        if meta.get("size") == size and size <= max_bytes:
            got = sha256_file(dest)
            if got == meta.get("sha256") and (sha256 is None or got == sha256.lower()):
                return dest
    _download(ref, dest, progress=progress, timeout=timeout, max_bytes=max_bytes, refresh=refresh)
    if not _inside(root, dest) or not _cached_file(dest, root, ref.uri):  # belt and braces
        raise ConversionError(ref.uri, f"cache entry {dest} escaped the cache {root}")
    try:
        _check_sha(dest, sha256, ref.uri)
    except ConversionError:
        dest.unlink(missing_ok=True)  # never leave a file that failed its check in the cache
        (folder / META_NAME).unlink(missing_ok=True)
        raise
    return dest


@contextlib.contextmanager
def _hf_progress(progress: bool | None) -> Iterator[None]:
    """``progress=False`` silences huggingface_hub's bars for this call only."""
    if progress is not False:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _hf_error(uri: str, e: BaseException) -> Exception:
    """huggingface_hub's exceptions as our two kinds: bad input (exit 2) or a failed download (exit 1)."""
    try:
        from huggingface_hub import errors as hf
    except ImportError:  # pragma: no cover - huggingface_hub < 0.23
        from huggingface_hub import utils as hf  # type: ignore[no-redef]
    first = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:300]
    if isinstance(e, getattr(hf, "LocalEntryNotFoundError", ())):
        return DownloadError(
            f"{uri}: not in the huggingface_hub cache and the hub cannot be reached "
            "(offline or host unreachable, or HF_HUB_OFFLINE=1 is set); download it once online"
        )
    if isinstance(e, getattr(hf, "OfflineModeIsEnabled", ())):
        return DownloadError(f"{uri}: HF_HUB_OFFLINE=1 is set and the file is not in the cache")
    if isinstance(e, getattr(hf, "GatedRepoError", ())):
        return ConversionError(uri, "gated repository: accept its terms on the hub and set HF_TOKEN")
    if isinstance(e, getattr(hf, "RepositoryNotFoundError", ())):
        return ConversionError(uri, "repository not found on the hub (if it is private, set HF_TOKEN)")
    if isinstance(e, getattr(hf, "RevisionNotFoundError", ())):
        return ConversionError(uri, "revision not found in the repository")
    if isinstance(e, getattr(hf, "EntryNotFoundError", ())):
        return ConversionError(uri, "no such file in the repository")
    if isinstance(e, getattr(hf, "HFValidationError", ())):
        return ConversionError(uri, f"not a valid hub reference ({first})")
    if isinstance(e, getattr(hf, "HfHubHTTPError", ())):
        return DownloadError(f"{uri}: download through huggingface_hub failed ({first})")
    name = type(e).__name__
    if isinstance(e, (OSError, TimeoutError)) or "Connect" in name or "Timeout" in name or "Network" in name:
        return DownloadError(
            f"{uri}: cannot reach the hub: offline or host unreachable ({name}: {first}); files already "
            "in the huggingface_hub cache are used with HF_HUB_OFFLINE=1, or pass a local path with --source"
        )
    return DownloadError(f"{uri}: download through huggingface_hub failed ({name}: {first})")


def _hf_cached(where: dict[str, str]) -> Any:
    """huggingface_hub's cached path for ``where`` (a str), or something else when not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return try_to_load_from_cache(**where)
    except Exception:  # a malformed cache must not hide the real error
        return None


def _fetch_hf(
    ref: RemoteRef,
    *,
    sha256: str | None,
    progress: bool | None,
    timeout: float,
    refresh: bool,
    max_bytes: int,
) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError:
        raise DownloadError(
            f"{ref.uri}: hf:// sources need huggingface_hub (pip install huggingface_hub)"
        ) from None
    where = {"repo_id": ref.repo_id, "filename": ref.filename, "revision": ref.revision,
             "repo_type": ref.repo_type}  # fmt: skip
    if not huggingface_hub.constants.HF_HUB_OFFLINE:  # check the announced size before downloading
        try:
            size = get_hf_file_metadata(hf_hub_url(**where, endpoint=HF_ENDPOINT), timeout=timeout).size
        except Exception as e:
            err = _hf_error(ref.uri, e)
            if isinstance(err, ConversionError):
                raise err from None
            if not isinstance(_hf_cached(where), str):  # fail now rather than after the hub's retries
                raise err from None
            size = None  # network trouble but a cached copy: hf_hub_download falls back to it
        if size is not None and size > max_bytes:
            raise ConversionError(
                ref.uri,
                f"the hub announces {size} bytes, over the {max_bytes}-byte source limit "
                "(raise it with --max-source-size or LOPT_BRIDGE_MAX_SOURCE_SIZE)",
            )
    try:
        with _hf_progress(progress):
            path = Path(
                hf_hub_download(**where, endpoint=HF_ENDPOINT, force_download=refresh, etag_timeout=timeout)
            )
    except ConversionError:
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many kinds
        raise _hf_error(ref.uri, e) from None
    if path.stat().st_size > max_bytes:
        raise ConversionError(
            ref.uri, f"is {path.stat().st_size} bytes, over the {max_bytes}-byte source limit"
        )
    _check_sha(
        path, sha256, ref.uri,
        note=" (huggingface_hub's cached copy was kept: it is the hub's file; --refresh downloads it again)",
    )  # fmt: skip
    return path


def fetch(
    uri: str,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    refresh: bool = False,
    max_bytes: int | None = None,
) -> Path:
    """A local file holding ``uri``'s bytes: the path itself, or a (cached) download.

    ``sha256``: expected hex digest; a cached copy that does not match is downloaded again, a download
    that does not match raises ConversionError. ``progress``: None shows a bar only on a terminal.
    ``refresh``: ask the server again even if a cached copy exists. ``max_bytes``: size cap (default
    ``max_source_bytes()``). Raises ConversionError (bad input or reply, exit 2) or DownloadError (exit 1).
    """
    limit = max_source_bytes() if max_bytes is None else max_bytes
    if uri.startswith("file://") or not is_remote(uri):
        to_url(uri)  # refuses unknown schemes
        path = local_path(uri)
        if not path.exists():
            raise ConversionError(path, "no such file or directory")
        if path.is_file():
            _check_sha(path, sha256, str(path))
        return path
    ref = parse_remote(uri)
    kwargs = {
        "sha256": sha256,
        "progress": progress,
        "timeout": timeout,
        "refresh": refresh,
        "max_bytes": limit,
    }
    if ref.scheme == "hf":
        return _fetch_hf(ref, **kwargs)  # type: ignore[arg-type]
    return _fetch_http(ref, **kwargs)  # type: ignore[arg-type]
