"""Building and loading the C passes (``lopt_cpu.c``): compiled once with the system C compiler, cached,
loaded with ctypes; their parallel regions run on torch's OpenMP threads.

No build step at install time and no Python headers: the source is compiled on first use with ``$CC``
(default ``cc``) into ``<user cache>/lopt-bridge/native/<hash>.so`` (written to a temporary file and
renamed), with ``-fopenmp`` where the compiler has it, so that the passes' parallel regions run on the
libgomp torch has loaded (its threads, not a second pool spinning against them), else single-threaded.
Without a working compiler, or with ``LOPT_BRIDGE_NATIVE=0``, :func:`library` returns None: the default
flags then run the foreach (torch-ops) path (one warning says why) and ``fused=True`` is refused.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("lopt_cpu.c")
#: Compiler flags: -march=native because the library is built on the machine that runs it.
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fno-math-errno"]
#: Tried first; dropped (single-threaded passes) where the compiler lacks OpenMP.
OPENMP = ["-fopenmp"]

_f32p = ctypes.POINTER(ctypes.c_float)
_f64p = ctypes.POINTER(ctypes.c_double)
_i64, _int, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: argtypes of every exported function ("p": float*, "d": double*, "i": int64, "n": int, "f": float); each
#: starts with (number of elements, number of thread slots, number of columns).
SIGNATURES = {
    "sfc_pass1": "ini" + "p" * 8 + "ffd",
    "sfc_pass2": "inin" + "p" * 13 + "ffff" + "p",
    "gsq_sums": "ini" + "p" + "dd",
    "velo_pass1": "ini" + "p" * 8 + "ffdd",
    "velo_pass2": "inin" + "p" * 13 + "ffff" + "n" + "f" + "p",
}
_CODES = {"p": _f32p, "d": _f64p, "i": _i64, "n": _int, "f": _f32}

_lock = threading.Lock()
_lib: list[Any] = []  # [CDLL or None] once tried
_error: list[str] = []  # why the last try failed


def enabled() -> bool:
    """False when the user turned the native passes off (``LOPT_BRIDGE_NATIVE=0``)."""
    return os.environ.get("LOPT_BRIDGE_NATIVE", "1") not in ("0", "false", "off")


def _cpu_id() -> str:
    """What ``-march=native`` depends on: machine and CPU model / flags (a shared cache may see several)."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))]
        info += "".join(sorted(set(lines)))
    except OSError:
        info += platform.processor()
    return info


def cache_dir() -> Path:
    """Where built libraries live (``LOPT_BRIDGE_CACHE`` overrides the user cache directory)."""
    root = os.environ.get("LOPT_BRIDGE_CACHE")
    if root:
        return Path(root) / "native"
    import platformdirs

    return Path(platformdirs.user_cache_dir("lopt-bridge")) / "native"


def build(cc: str | None = None) -> Path:
    """Compile ``lopt_cpu.c`` unless cached; return the library's path. RuntimeError if it cannot."""
    cc = cc or os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([exe, *FLAGS, _cpu_id()]).encode()).hexdigest()[:20]
    out = cache_dir() / f"lopt_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in (OPENMP, []):
            cmd = [exe, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, sig in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CODES[c] for c in sig]
        fn.restype = None
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
