"""The hand-fused C passes of the CPU fast path (``lopt_cpu.c``): built once with the system C compiler,
cached, loaded with ctypes, run on torch's OpenMP threads.

No build step at install time and no Python headers: the source is compiled on first use with ``$CC``
(default ``cc``) into ``<user cache>/lopt-bridge/native/<hash>.so`` (written to a temporary file and
renamed), with ``-fopenmp`` where the compiler has it, so that the passes' parallel regions run on the
libgomp torch has loaded (its threads, not a second pool spinning against them), else single-threaded.
Without a working compiler, or with ``LOPT_BRIDGE_NATIVE=0``, :func:`library` returns None and the CPU
path falls back to its torch implementation (one warning says why).
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

import torch

SOURCE = Path(__file__).with_name("lopt_cpu.c")
#: Widest hidden layer the passes take (MAXH in lopt_cpu.c).
MAXH = 256
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
                        f"using the torch CPU path: {exc}",
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


def ptr(t: torch.Tensor) -> Any:
    """A float* (float32) or double* (float64) to a contiguous tensor's data."""
    if not t.is_contiguous():
        raise ValueError("the native passes take contiguous tensors")
    if t.dtype == torch.float32:
        return ctypes.cast(t.data_ptr(), _f32p)
    if t.dtype == torch.float64:
        return ctypes.cast(t.data_ptr(), _f64p)
    raise TypeError(f"native passes take float32/float64 tensors, not {t.dtype}")


def slots() -> int:
    """Thread slots for the passes' partial sums: torch's intra-op thread count (OpenMP's, in the passes)."""
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------------
# The two per-element passes every family runs on a 2-D tensor (rows: axis 0, columns: axis 1).
def by_axis(
    x_row: torch.Tensor, x_col: torch.Tensor, d0: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-axis-0, per-axis-1) contiguous arrays of a 2-D tensor's factored row / column statistics
    (``x_row`` is reduced over d0, the largest axis, so it runs along the other one)."""
    a, b = (x_row, x_col) if d0 == 1 else (x_col, x_row)
    return a.reshape(shape[0], -1).contiguous(), b.reshape(shape[1], -1).contiguous()


def gsq_means(lib: Any, g: torch.Tensor) -> dict[int, torch.Tensor]:
    """``mean(g**2 + 1e-30)`` of a 2-D gradient over axis 0 (per column) and axis 1 (per row), summed in
    float64 by one pass (``gsq_sums``); keyed by the reduced axis, float32."""
    (nrow, ncol), k = g.shape, slots()
    rows = torch.zeros(k, nrow, dtype=torch.float64)
    cols = torch.zeros(k, ncol, dtype=torch.float64)
    lib.gsq_sums(g.numel(), k, ncol, ptr(g), ptr(rows), ptr(cols))
    return {0: (cols.sum(0) / nrow).float(), 1: (rows.sum(0) / ncol).float()}


def accumulate(fn: Any, nfeat: int, pf, g, m, rms, fa, fb, mom_d, rms_d, stats: int = 0):
    """Pass 1 (``*_pass1``): m / rms updated in place; returns the features' sums of squares (float32), and
    with ``stats`` also the ``stats`` float64 sums the pass takes of the previous state (VeLO's)."""
    n, ncol = pf.numel(), pf.shape[1]
    mc = (1.0 - mom_d).contiguous()
    rd = torch.clamp(rms_d, 0.0, 1.0)
    rd_f, rc_f = float(rd[0]), float((1.0 - rd)[0])
    ptrs = [ptr(t) for t in (pf, g, m, rms, fa, fb, mom_d.contiguous(), mc)]
    k = slots()
    sums = torch.zeros(k, nfeat, dtype=torch.float64)
    if not stats:
        fn(n, k, ncol, *ptrs, rd_f, rc_f, ptr(sums))
        return sums.sum(0).to(torch.float32)
    state = torch.zeros(k, stats, dtype=torch.float64)
    fn(n, k, ncol, *ptrs, rd_f, rc_f, ptr(sums), ptr(state))
    return sums.sum(0).to(torch.float32), state.sum(0)


def mlp_update(fn: Any, pf, g, m, rms, fa, fb, we, a0, a1, layers, *scalars: Any) -> None:
    """Pass 2 (``*_pass2``): features, MLP (``we``: the scaled first-layer weights of the per-element
    features; ``a0`` / ``a1``: the per-row / per-column first-layer init; ``layers``: (w2, b2, w3, b3)) and
    the update, written into ``pf`` in place (elements are read before they are written)."""
    n, ncol, hidden = pf.numel(), pf.shape[1], we.shape[1]
    if hidden > MAXH:
        raise ValueError(f"native passes take hidden layers up to {MAXH} wide, not {hidden}")
    keep = [t.contiguous() for t in (we, a0, a1.t(), *layers)]  # alive until the passes end
    ptrs = [ptr(t) for t in (pf, g, m, rms, fa, fb, *keep)]
    fn(n, slots(), ncol, hidden, *ptrs, *scalars, ptr(pf))


def usable(pf: torch.Tensor, state: list[torch.Tensor]) -> bool:
    """Whether the passes can take a tensor: 2-D, and it and its state float32 and contiguous."""
    return pf.dim() == 2 and all(t.dtype == torch.float32 and t.is_contiguous() for t in (pf, *state))


def write_back(p: torch.Tensor, pf: torch.Tensor) -> None:
    """Store the passes' result ``pf`` into ``p`` unless they wrote ``p`` itself."""
    if not (p.dtype == torch.float32 and p.data_ptr() == pf.data_ptr() and p.is_contiguous()):
        from ..base import write_param

        write_param(p, pf.reshape(p.shape))
