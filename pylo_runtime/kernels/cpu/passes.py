"""The C passes as functions of tensors and numbers (``lopt_cpu.c``, loaded by ``build``).

Every pass takes one contiguous factored float32 tensor of any rank >= 2 (2-D matrices, conv kernels
(out, in, kh, kw)) and its factored dims ``(d1, d0)`` (``features.factored_dims``) with its state and the
small row / column arrays the caller computed with torch (shaped as reductions over d0 / over d1, as the
factored accumulators are); it splits the elements over torch's OpenMP threads (``slots``) and returns or
writes float32 (its internal sums are float64). Which math each pass restates is said in lopt_cpu.c; the
family modules (``velo.py``, ``adafac.py``, ``celo.py``) call them.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from . import build

#: Widest hidden layer the passes take (MAXH in lopt_cpu.c).
MAXH = 256

_f32p = ctypes.POINTER(ctypes.c_float)
_f64p = ctypes.POINTER(ctypes.c_double)


def _lib() -> Any:
    lib = build.library()
    if lib is None:
        raise RuntimeError(f"the C passes are not available: {build.last_error() or 'turned off'}")
    return lib


def _call(name: str, *args: Any) -> None:
    """Run C entry point ``name``; its status code other than 0 becomes a RuntimeError naming the problem."""
    rc = getattr(_lib(), name)(*args)
    if rc != 0:
        raise RuntimeError(f"lopt_cpu.{name} refused its arguments: {build.ERRORS.get(rc, f'status {rc}')}")


def _counts(mom: torch.Tensor, rms: torch.Tensor, fa: torch.Tensor) -> tuple[int, int, int]:
    """The momentum, rms and Adafactor decay counts of a tensor's state (the passes check them)."""
    return mom.shape[-1], rms.shape[-1] if rms.dim() > 1 else 1, fa.shape[-1]


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


def usable(pf: torch.Tensor, state: list[torch.Tensor]) -> bool:
    """Whether the passes can take a tensor: rank >= 2 (factored), it and its state float32 and contiguous."""
    return pf.dim() >= 2 and all(t.dtype == torch.float32 and t.is_contiguous() for t in (pf, *state))


def layout(shape: tuple[int, ...], fdims: tuple[int, int]) -> tuple[int, int, int, int]:
    """(stride, size) of axis d0, which the row arrays drop, then of axis d1, which the column arrays drop, in
    a contiguous tensor of ``shape`` (``fdims = (d1, d0)``, ``features.factored_dims``): how lopt_cpu.c finds
    an element's entries in arrays laid out as torch's reductions over those axes."""
    d1, d0 = fdims
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides[d0], shape[d0], strides[d1], shape[d1]


def _entries(pf: torch.Tensor, fdims: tuple[int, int], fa: torch.Tensor, fb: torch.Tensor, width: int):
    """The layout, after checking that the row / column arrays hold ``width`` floats per entry (the C passes
    index them without bounds)."""
    lay = layout(tuple(pf.shape), fdims)
    n = pf.numel()
    for name, arr, size in (("row", fa, lay[1]), ("column", fb, lay[3])):
        if arr.numel() != n // size * width:
            raise ValueError(f"the {name} array has {arr.numel()} floats, not {n // size} x {width}")
    return lay


def gsq_means(g: torch.Tensor, fdims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over d0, mean over d1)`` of ``g**2 + 1e-30`` for a contiguous factored gradient (shaped as
    ``torch.mean(., dim=d)``), summed in float64 by one pass (``gsq_sums``), float32."""
    shape, k = tuple(g.shape), slots()
    d1, d0 = fdims
    lay = layout(shape, fdims)
    n = g.numel()
    rows = torch.zeros(k, n // lay[1], dtype=torch.float64)
    cols = torch.zeros(k, n // lay[3], dtype=torch.float64)
    _call("gsq_sums", n, k, *lay, ptr(g), ptr(rows), ptr(cols))
    mean_d0 = (rows.sum(0) / shape[d0]).float().reshape(shape[:d0] + shape[d0 + 1 :])
    mean_d1 = (cols.sum(0) / shape[d1]).float().reshape(shape[:d1] + shape[d1 + 1 :])
    return mean_d0, mean_d1


def _pass1(
    name: str, nfeat: int, nstats: int, pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d, null_stats=False
):
    n = pf.numel()
    lay = _entries(pf, fdims, fa, fb, 3)
    mc = (1.0 - mom_d).contiguous()
    rd = torch.clamp(rms_d, 0.0, 1.0)
    rd_f, rc_f = float(rd[0]), float((1.0 - rd)[0])
    ptrs = [ptr(t) for t in (pf, g, mom, rms, fa, fb, mom_d.contiguous(), mc)]
    k = slots()
    sums = torch.zeros(k, nfeat, dtype=torch.float64)
    counts = _counts(mom, rms, fa)
    if not nstats:
        _call(name, n, k, *lay, *counts, *ptrs, rd_f, rc_f, ptr(sums), *([None] if null_stats else []))
        return sums.sum(0).to(torch.float32), None
    stats = torch.zeros(k, nstats, dtype=torch.float64)
    _call(name, n, k, *lay, *counts, *ptrs, rd_f, rc_f, ptr(sums), ptr(stats))
    return sums.sum(0).to(torch.float32), stats.sum(0)


def sfc_pass1(pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d) -> torch.Tensor:
    """small_fc_lopt pass 1 over a contiguous factored tensor ``pf`` (``fdims = (d1, d0)``): ``mom`` / ``rms``
    updated in place; the sums of squares of the 16 per-element features (float32). ``fa`` / ``fb``: the
    Adafactor row / column factors (``accumulators.row_col_factors``: the shape less d0 / less d1, x 3)."""
    return _pass1("sfc_pass1", 16, 0, pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d)[0]


def velo_pass1(
    pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d, *, lstm_stats: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VeLO pass 1: as ``sfc_pass1`` for its 18 features, and the previous state's sums for the LSTM inputs
    (float64: sum p^2, sum m (3), sum m^2 (3), sum rms, sum rms^2); ``lstm_stats=False`` (Celo, whose LSTM
    reads no per-tensor input) skips them and returns None in their place."""
    if not lstm_stats:
        return _pass1("velo_pass1", 18, 0, pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d, null_stats=True)
    return _pass1("velo_pass1", 18, 9, pf, fdims, g, mom, rms, fa, fb, mom_d, rms_d)


def _pass2(name: str, pf, fdims, g, mom, rms, fa, fb, we, a0, a1, layers, *scalars: Any) -> None:
    n, hidden = pf.numel(), we.shape[1]
    lay = _entries(pf, fdims, fa, fb, 3)
    _entries(pf, fdims, a0, a1, hidden)
    # The row / column shares transposed to (hidden, entries): a segment reads each unit's run contiguously.
    a0t, a1t = (a.reshape(-1, hidden).t() for a in (a0, a1))
    keep = [t.contiguous() for t in (we, a0t, a1t, *layers)]  # alive until the passes end
    ptrs = [ptr(t) for t in (pf, g, mom, rms, fa, fb, *keep)]
    _call(name, n, slots(), *lay, *_counts(mom, rms, fa), hidden, *ptrs, *scalars, ptr(pf))


def sfc_pass2(pf, fdims, g, mom, rms, fa, fb, we, a0, a1, layers, exp_mult, step_mult, scale, lr) -> None:
    """small_fc_lopt pass 2: features, MLP 16 -> H -> H -> 2 (``we``: first-layer weights of the per-element
    features, normalisation folded in; ``a0`` / ``a1``: the first layer's row / column shares, shaped as
    ``fa`` / ``fb`` with H per entry; ``layers``: (w2, b2, w3, b3)) and ``p - step``, written into ``pf``
    (read before written)."""
    _pass2("sfc_pass2", pf, fdims, g, mom, rms, fa, fb, we, a0, a1, layers, exp_mult, step_mult, scale, lr)


def velo_pass2(
    pf, fdims, g, mom, rms, fa, fb, we, a0, a1, layers, exp_mult, step_mult, pscale, lr_mult, precond, lr
) -> None:
    """VeLO pass 2: features, MLP 18 -> H -> H -> 3 and the output head (``pscale < 0``: no param scale;
    ``precond``: 0 / 1), ``p - lr * step`` written into ``pf``; arguments as ``sfc_pass2``."""
    _pass2("velo_pass2", pf, fdims, g, mom, rms, fa, fb, we, a0, a1, layers, exp_mult, step_mult, pscale,
           lr_mult, int(precond), lr)  # fmt: skip


#: Elements per thread below which the Celo-Adam pass runs on one thread (a hand-off costs more).
ELEMENTWISE_PER_THREAD = 1 << 15


def celo_adam_step(
    pf, g, mom, rms, mom_d, rms_d, c1: float, c2: float, lr: float, eps: float, scale: float, glr: float
) -> None:
    """Celo-Adam's whole step of one tensor (any shape, contiguous float32): ``g`` clipped, ``mom`` /
    ``rms`` (decays on the last axis) updated in place, ``pf - glr * step`` written into ``pf``; ``c1`` /
    ``c2``: the bias corrections (1: none), ``lr``: lr_mult * step_mult, ``scale``: the param scale (1: none).
    ``celo_adam._single_tensor_celo_adam``: the accumulators bit for bit, the step to one sqrt rounding."""
    n = pf.numel()
    md = mom_d.to(torch.float32).contiguous()
    mc = (1.0 - md).contiguous()  # accumulators.momentum_update: (1 - decays) in float32
    rd = torch.clamp(rms_d.to(torch.float32), 0.0, 1.0).contiguous()
    rc = (1.0 - rd).contiguous()
    k = max(1, min(slots(), n // ELEMENTWISE_PER_THREAD))
    nm, nr = mom.shape[-1] if mom.dim() else 1, rms.shape[-1] if rms.dim() else 1
    if (
        g.numel() != n
        or mom.numel() != n * nm
        or rms.numel() != n * nr
        or md.numel() != nm
        or rd.numel() != nr
    ):
        raise ValueError("celo_adam_step: param, grad, state and decays disagree in size")
    ptrs = [ptr(t) for t in (pf, g, mom, rms, md, mc, rd, rc)]
    _call("celo_adam_step", n, k, 1, nm, nr, *ptrs, c1, c2, lr, eps, scale, glr, ptr(pf))
