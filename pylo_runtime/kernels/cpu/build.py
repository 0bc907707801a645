"""Building and loading the C passes (``lopt_cpu.c``): compiled once with the system C compiler, cached,
loaded with ctypes; their parallel regions run on torch's OpenMP threads.

No build step at install time and no Python headers: the source is compiled with ``$CC`` (default ``cc``)
into ``<user cache>/lopt-bridge/native/lopt_cpu-<key>.so`` on first use, or ahead of time with
``python -m lopt_bridge.pylo_runtime.kernels.cpu build``. ``-fopenmp`` where the compiler has it, so that the
passes' parallel regions run on the libgomp torch has loaded (its threads, not a second pool spinning against
them), else single-threaded. The build cannot corrupt the cache:

- ``key`` hashes the source, the compiler (its path and ``--version``), the flags and what ``-march=native``
  expands to on this machine, as the compiler itself reports it (``cc -march=native -###``; every
  architecture, not only x86's /proc/cpuinfo);
- one process builds, the others wait (an ``fcntl`` lock beside the library), at most ``timeout()``;
- the compiler runs with a timeout (``LOPT_BRIDGE_NATIVE_TIMEOUT`` seconds, default 120);
- the library is written to a temporary file and renamed, and its sha256 recorded beside it (``.sha256``);
  a library is loaded only if it matches (a truncated or garbage file is rebuilt, never loaded).

Without a working compiler, on a timeout, or with ``LOPT_BRIDGE_NATIVE=0``, :func:`library` returns None
(one warning says why): the default flags then run the foreach (torch-ops) path and ``fused=True`` is
refused at construction.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("lopt_cpu.c")
#: Compiler flags: -march=native because the library is built on the machine that runs it.
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fno-math-errno"]
#: Tried first; dropped (single-threaded passes) where the compiler lacks OpenMP.
OPENMP = ["-fopenmp"]
#: Seconds a compiler run (and the wait for another process's build) may take, unless
#: ``LOPT_BRIDGE_NATIVE_TIMEOUT`` says otherwise; a build takes ~5 s on a quiet machine, ~60 s under load.
DEFAULT_TIMEOUT = 120.0

_f32p = ctypes.POINTER(ctypes.c_float)
_f64p = ctypes.POINTER(ctypes.c_double)
_i64, _int, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: argtypes of every exported function ("p": float*, "d": double*, "i": int64, "n": int, "f": float); each
#: starts with (number of elements, number of thread slots, the stride and size of the axis the row arrays
#: drop, those of the axis the column arrays drop), the passes then with the momentum / rms / Adafactor
#: decay counts (and pass 2 the hidden width); each returns an int status.
_LAYOUT = "in" + "iiii"
SIGNATURES = {
    "sfc_pass1": _LAYOUT + "nnn" + "p" * 8 + "ffd",
    "sfc_pass2": _LAYOUT + "nnnn" + "p" * 13 + "ffff" + "p",
    "gsq_sums": _LAYOUT + "p" + "dd",
    "velo_pass1": _LAYOUT + "nnn" + "p" * 8 + "ffdd",
    "velo_pass2": _LAYOUT + "nnnn" + "p" * 13 + "ffff" + "n" + "f" + "p",
    "celo_adam_step": "ininn" + "p" * 8 + "f" * 6 + "p",
}
_CODES = {"p": _f32p, "d": _f64p, "i": _i64, "n": _int, "f": _f32}
#: The C entry points' status codes (lopt_cpu.c, LOPT_E*).
ERRORS = {
    -1: "a null pointer",
    -2: "a bad size (n < 0, an axis stride or size < 1, or n not a multiple of stride * size)",
    -3: "a bad number of thread slots (< 1)",
    -4: "a hidden layer width outside 1..256",
    -5: "decay counts the passes do not take (3 momentum, 1 rms, 3 Adafactor decays; Celo-Adam: >= 1 each)",
}

_lock = threading.Lock()
_lib: list[Any] = []  # [CDLL or None] once tried
_error: list[str] = []  # why the last try failed


def enabled() -> bool:
    """False when the user turned the native passes off (``LOPT_BRIDGE_NATIVE=0``)."""
    return os.environ.get("LOPT_BRIDGE_NATIVE", "1") not in ("0", "false", "off")


def timeout() -> float:
    """Seconds one compiler run, or the wait for another process's build, may take."""
    raw = os.environ.get("LOPT_BRIDGE_NATIVE_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise RuntimeError(f"LOPT_BRIDGE_NATIVE_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise RuntimeError(f"LOPT_BRIDGE_NATIVE_TIMEOUT must be > 0, got {raw!r}")
    return value


def cache_dir() -> Path:
    """Where built libraries live (``LOPT_BRIDGE_CACHE`` overrides the user cache directory)."""
    root = os.environ.get("LOPT_BRIDGE_CACHE")
    if root:
        return Path(root) / "native"
    import platformdirs

    return Path(platformdirs.user_cache_dir("lopt-bridge")) / "native"


def _run(cmd: list[str], seconds: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{Path(cmd[0]).name} took more than {seconds:g} s on {SOURCE.name} (LOPT_BRIDGE_NATIVE_TIMEOUT)"
        ) from None


@functools.lru_cache(maxsize=8)
def native_target(exe: str, seconds: float) -> str:
    """What ``-march=native`` means to this compiler on this machine: its ``--version`` line and the target
    options its driver expands it to (GCC's cc1 ``-march=... -m...``, clang's ``-target-cpu`` /
    ``-target-feature``); x86 /proc/cpuinfo only if the driver says nothing. Asked once per process per
    compiler: a process never switches between two libraries."""
    version = _run([exe, "--version"], seconds).stdout.splitlines()[:1]
    probe = [exe, "-march=native", "-###", "-x", "c", "-c", os.devnull, "-o", os.devnull]
    for _ in range(3):  # a driver that could not run (e.g. fork failing on a loaded machine): ask again
        res = _run(probe, seconds)
        if res.returncode == 0:
            break
    else:  # never a silent fallback: a different answer would give the library another cache key
        raise RuntimeError(f"{Path(exe).name} -march=native -### failed: {res.stderr.strip()[-300:]}")
    lines = [ln for ln in res.stderr.splitlines() if "-march=" in ln or "-target-cpu" in ln or "cc1" in ln]
    words = sorted({w.strip('"') for ln in lines for w in ln.split() if w.strip('"').startswith("-")})
    target = " ".join(w for w in words if os.devnull not in w and not w.startswith(("-o", "-dumpbase")))
    if not target:
        target = platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
            target += "".join(sorted({ln for ln in fh if ln.startswith(("model name", "flags"))}))
    return "\n".join([*version, target])


def library_path(exe: str, seconds: float) -> Path:
    """Where the library for this source, compiler, flags and machine lives (it may not exist yet)."""
    src = SOURCE.read_bytes()
    ident = "\n".join([exe, *FLAGS, native_target(exe, seconds)]).encode()
    key = hashlib.sha256(src + b"\0" + ident).hexdigest()[:20]
    return cache_dir() / f"lopt_cpu-{key}.so"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path) -> bool:
    """Whether ``path`` exists and matches the sha256 recorded beside it when it was built."""
    record = path.with_suffix(".sha256")
    try:
        return record.read_text().strip() == _sha256(path)
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path, seconds: float) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``lock_path``, waiting at most ``seconds`` for another holder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no fcntl (Windows): one process at a time is then up to the user
        yield
        return
    with open(lock_path, "a+") as fh:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"another process has been building {lock_path.stem}.so for more than {seconds:g} s "
                        f"(lock {lock_path}; LOPT_BRIDGE_NATIVE_TIMEOUT)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build(cc: str | None = None, *, force: bool = False) -> Path:
    """Compile ``lopt_cpu.c`` unless a verified library is cached; return its path. RuntimeError if it
    cannot (no compiler, a compile error, a timeout). ``force``: rebuild even if cached."""
    cc = cc or os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    seconds = timeout()
    out = library_path(exe, seconds)
    if not force and verified(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.with_suffix(".lock"), seconds):
        if not force and verified(out):  # another process built it while we waited
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
        os.close(fd)
        try:
            for extra in (OPENMP, []):
                res = _run([exe, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], seconds)
                if res.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed on {SOURCE}:\n{res.stderr.strip()[-2000:]}")
            digest = _sha256(Path(tmp))
            os.replace(tmp, out)
            record_tmp = out.with_suffix(".sha256.tmp")
            record_tmp.write_text(digest + "\n")
            os.replace(record_tmp, out.with_suffix(".sha256"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, sig in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CODES[c] for c in sig]
        fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native library, built on first call; None (with one warning) where it cannot be built."""
    with _lock:
        if not _lib:
            lib = None
            if enabled():
                try:
                    lib = _load(build())
                except (RuntimeError, OSError) as exc:
                    _error[:] = [str(exc).splitlines()[0]]
                    warnings.warn(
                        "lopt-bridge: the native CPU passes are unavailable, "
                        f"using the foreach (torch ops) path: {exc}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _lib.append(lib)
        return _lib[0]


def last_error() -> str:
    """Why :func:`library` returned None (first line), or ""."""
    return _error[0] if _error else ""


def reset() -> None:
    """Forget the loaded library (tests: rebuild under another environment)."""
    with _lock:
        _lib.clear()
        _error.clear()
