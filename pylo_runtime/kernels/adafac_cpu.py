"""small_fc_lopt's fast CPU step: the reference math reorganised around a few big matrix products.

Same accumulators, features and MLP as ``pylo_runtime.adafac`` (the specification), computed so that the
39 -> h -> h -> 2 MLP costs as few flops and memory passes as possible:

- the per-tensor feature normalisation ``x * rsqrt(1e-5 + mean(x**2))`` is folded into the first-layer
  weights (``diag(s) @ W1``), and the 11 tanh time features, constant over a step, into its bias;
- the 12 Adafactor row/column features of a factored tensor are constant along one axis: their share of the
  first layer is computed once per row and once per column and broadcast, so per element the first layer
  reads 16 features, not 28;
- 2-D factored tensors run on the hand-fused C passes (``native``, ``lopt_cpu.c``): one pass updates the
  accumulators and sums the features' squares, one recomputes the features and runs the MLP and the update
  per tile of 48 elements, so nothing per element is written but the state and the parameter;
- other factored tensors run the MLP over cache-sized chunks of elements (``addmm`` + in-place relu);
  small and non-factored tensors are batched into one product.

Float32 results differ from the reference by summation order (torch ops, about 1e-7 relative), and in the
C passes also by FMA contraction and a polynomial exp (at most 2e-6 relative per update in the tests).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import adafac as ref
from .. import distributed as _dist
from ..base import write_param
from . import native

#: Elements per MLP chunk (activations of 2 x 32 floats each stay in a 1 MiB L2).
CHUNK = 8192
#: Factored tensors smaller than this go to the batched small-tensor product instead.
SMALL = 65536

# Column layout of the 28 reference features (AdafacMLPLOpt._mod, standard decay counts 3 / 1 / 3).
_G, _P, _M, _RMS, _MR, _RSQ, _FG = 0, 1, slice(2, 5), 5, slice(6, 9), 9, slice(10, 13)
_ROW, _COL, _RROW, _RCOL, _FMM = slice(13, 16), slice(16, 19), slice(19, 22), slice(22, 25), slice(25, 28)
#: Per-element columns of a factored tensor, in the order ``_elem_features`` writes them.
_ELEM_ROWS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 25, 26, 27]


def factored_update(st: dict, mean_d0: torch.Tensor, mean_d1: torch.Tensor, fac_d: torch.Tensor, fdims):
    """Update ``st``'s factored accumulators from this step's ``mean(g**2 + 1e-30)`` over axis d0 / d1
    (common.factored_rolling); return the (row, column) factors (``adafac._row_col_factors``)."""
    d = torch.clamp(fac_d, 0.0, 1.0)
    mix = 1.0 - d
    st["v_row"] = d * st["v_row"] + mix * mean_d0.unsqueeze(-1)
    st["v_col"] = d * st["v_col"] + mix * mean_d1.unsqueeze(-1)
    return ref._row_col_factors(st["v_row"], st["v_col"], fdims)


def _factored_update(st: dict, g: torch.Tensor, fac_d: torch.Tensor, fdims: tuple[int, int]):
    """``adafac.update_factored`` for a factored tensor, returning the row/col factors (each with its
    reduced axis kept) instead of fac_g."""
    grad_sqr = g * g + 1e-30
    d1, d0 = fdims
    mean_d0, mean_d1 = _dist.tensor_mean(grad_sqr, d0), _dist.tensor_mean(grad_sqr, d1)
    row_factor, col_factor = factored_update(st, mean_d0, mean_d1, fac_d, fdims)
    return row_factor.unsqueeze(d0), col_factor.unsqueeze(d1)


def _elem_features(pf, g, m, rms, fac, out: torch.Tensor) -> None:
    """Write the 16 per-element features (g, p, m, rms, m*rsqrt, rsqrt, fac_g, fac_mom_mult) into ``out``.

    One concatenation writes each row once (16 strided column writes cost several times more).
    """
    rsqrt = torch.rsqrt(rms + 1e-6)
    gu = g.unsqueeze(-1)
    parts = [gu, pf.unsqueeze(-1), m, rms, m * rsqrt, rsqrt, gu * fac, m * fac]
    torch.cat(parts, dim=-1, out=out.view(pf.shape + (16,)))


def _rms_scale(sumsq: torch.Tensor, n: int) -> torch.Tensor:
    """``rsqrt(1e-5 + mean(x**2))`` per feature from sums of squares over ``n`` elements."""
    return torch.rsqrt(1e-5 + sumsq / n)


def _shard_rms_scale(x: torch.Tensor, shape: tuple[int, ...], dropped: int | None = None) -> torch.Tensor:
    """``_rms_scale`` of ``x`` (``shape``: leading axes the tensor's, less ``dropped``), over all the shards
    of an FSDP2 tensor stepped rank-locally (one all-reduce per call)."""
    return _rms_scale(*_dist.column_sums(_sumsq(x), shape, dropped))


def _sumsq(x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Sum of squares per column (last axis) over all other axes, in cache-sized row chunks.

    ``torch.sum`` (cascade summation) keeps about 1e-7 relative; ``linalg.vector_norm`` loses 1e-3 at 1M rows.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= chunk:
        return torch.sum(x * x, dim=0)
    acc = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for c0 in range(0, x.shape[0], chunk):
        xc = x[c0 : c0 + chunk]
        acc += torch.sum(xc * xc, dim=0)
    return acc


def first_layer_shares(v_row, v_col, w_row, w_col, bias, fdims) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layer's share of a factored tensor's row features ``[v_row, rsqrt(v_row + 1e-8)]`` and
    column features (each normalised over the tensor), bias in the row share: ``(per row, per column)``."""
    d1, d0 = fdims
    rowf = torch.cat([v_row, torch.rsqrt(v_row + 1e-8)], dim=-1)
    colf = torch.cat([v_col, torch.rsqrt(v_col + 1e-8)], dim=-1)
    a_row = rowf @ (_shard_rms_scale(rowf, rowf.shape, d0).unsqueeze(1) * w_row) + bias
    a_col = colf @ (_shard_rms_scale(colf, colf.shape, d1).unsqueeze(1) * w_col)
    return a_row, a_col


def _mlp_tail(h: torch.Tensor, h2: torch.Tensor, weights, biases, out: torch.Tensor) -> None:
    """relu(h) -> hidden layers -> ``out`` (in place on the chunk buffers)."""
    h.relu_()
    n = len(weights)
    for i in range(1, n - 1):
        torch.addmm(biases[i], h, weights[i], out=h2)
        h2.relu_()
        h, h2 = h2, h
    torch.addmm(biases[n - 1], h, weights[n - 1], out=out)


def _native_factored(lib, step, st, p, pf, g, fdims, w1_parts, b1, scale, lr) -> None:
    """The whole step of one 2-D factored tensor on the C passes: accumulators, features, MLP, update."""
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    w_elem, w_rowf, w_colf = w1_parts
    shape = tuple(pf.shape)
    d0 = fdims[1]
    g = g.to(torch.float32).contiguous()
    mean = native.gsq_means(lib, g)
    rf, cf = factored_update(st, mean[d0], mean[fdims[0]], fac_d, fdims)
    fa, fb = native.by_axis(rf, cf, d0, shape)
    sumsq = native.accumulate(lib.sfc_pass1, 16, pf, g, st["m"], st["rms"], fa, fb, mom_d, rms_d)
    w_e = _rms_scale(sumsq, pf.numel()).unsqueeze(1) * w_elem
    a_row, a_col = first_layer_shares(st["v_row"], st["v_col"], w_rowf, w_colf, b1, fdims)
    a0, a1 = native.by_axis(a_row, a_col, d0, shape)
    layers = (weights[1], biases[1], weights[2], biases[2])
    native.mlp_update(lib.sfc_pass2, pf, g, st["m"], st["rms"], fa, fb, w_e, a0, a1, layers,
                      step.exp_mult, step.step_mult, scale, lr)  # fmt: skip
    native.write_back(p, pf)


def adafac_step_cpu(params, grads, lrs, scales, states, *, step: Any, lib: Any = None) -> None:
    """One ``SmallFCLOpt`` / ``MuLO`` step: same state, same result as the reference to float32 rounding.

    ``step``: ``adafac.AdafacStep`` (decays, MLP, time features, multipliers); ``scales``: muLO's per-tensor
    multipliers; ``lib`` None: the torch-ops (foreach) path, any device; the loaded C library: the fused
    CPU path.
    """
    device = params[0].device
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    time_feat = step.time_feat
    exp_mult, step_mult = step.exp_mult, step.step_mult
    w1 = weights[0]
    hidden = w1.shape[1]
    b1 = biases[0] + time_feat @ w1[28:]  # time features are not normalised: fold them into the bias
    w_elem = w1[_ELEM_ROWS]
    w_rowf = torch.cat([w1[_ROW], w1[_RROW]])
    w_colf = torch.cat([w1[_COL], w1[_RCOL]])

    small_x: list[torch.Tensor] = []  # normalised 28-wide features of batched tensors
    small_idx: list[int] = []
    outs: list[torch.Tensor | None] = [None] * len(params)
    pfs: list[torch.Tensor] = []
    bufs: dict[str, torch.Tensor] = {}

    def buf(name: str, rows: int, cols: int) -> torch.Tensor:
        b = bufs.get(name)
        if b is None or b.shape[0] < rows * cols:
            b = bufs[name] = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return b[: rows * cols].view(rows, cols)

    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        with _dist.on_tensor(p):  # an FSDP2 shard: its statistics are all-reduced over the shard group
            st = states[i]
            shape = tuple(p.shape) or (1,)
            pf = p.detach().to(torch.float32).reshape(shape)
            pfs.append(pf)
            g = g.reshape(shape)
            n = pf.numel()
            fdims = ref.factored_dims(_dist.global_shape(shape))
            big = fdims is not None and _dist.global_numel(pf) >= SMALL  # (a shard: all ranks agree)
            if (
                big
                and lib
                and len(weights) == 3
                and hidden <= native.MAXH
                and native.usable(pf, [st["m"], st["rms"]])
            ):
                _native_factored(
                    lib,
                    step,
                    st,
                    p,
                    pf,
                    g,
                    fdims,
                    (w_elem, w_rowf, w_colf),
                    b1,
                    float(scales[i]),
                    float(lrs[i]),
                )
                continue
            st["m"] = ref.update_momentum(st["m"], g, mom_d)
            st["rms"] = ref.update_rms(st["rms"], g, rms_d)
            m, rms = st["m"], st["rms"]
            if not big:
                # Reference features, normalised, batched with the other small tensors.
                empty = m.new_zeros(())
                v_row, v_col, v_diag, fac_g = ref.update_factored(
                    st.get("v_row", empty), st.get("v_col", empty), st.get("v_diag", empty), g, fac_d, fdims
                )
                if fdims is None:
                    st["v_diag"] = v_diag
                else:
                    st["v_row"], st["v_col"] = v_row, v_col
                f = ref.adafac_features(pf, g, m, rms, fac_g, v_row, v_col, v_diag, fdims)
                small_x.append(f.reshape(n, 28) * _shard_rms_scale(f, shape + (28,)))
                small_idx.append(i)
                continue

            rf, cf = _factored_update(st, g, fac_d, fdims)
            d1, d0 = fdims
            e = buf("e", n, 16)
            _elem_features(pf, g, m, rms, rf * cf, e)
            w_e = _shard_rms_scale(e, shape + (16,)).unsqueeze(1) * w_elem
            # Row / column features: normalise over the tensor (each value repeats along one axis).
            a_row, a_col = first_layer_shares(st["v_row"], st["v_col"], w_rowf, w_colf, b1, fdims)
            a_row = a_row.unsqueeze(d0)  # shape with 1 at d0, + (hidden,)
            a_col = a_col.unsqueeze(d1)
            out = torch.empty(n, 2, dtype=torch.float32, device=device)
            inner = n // shape[0] if shape[0] else 0  # an empty shard: no rows to run
            rows_per = max(1, CHUNK // max(inner, 1))
            for r0 in range(0, shape[0], rows_per):
                r1 = min(shape[0], r0 + rows_per)
                c0, c1 = r0 * inner, r1 * inner
                ar = a_row[r0:r1] if a_row.shape[0] != 1 else a_row
                ac = a_col[r0:r1] if a_col.shape[0] != 1 else a_col
                h = buf("h", c1 - c0, hidden)
                torch.add(ar, ac, out=h.view((r1 - r0,) + shape[1:] + (hidden,)))
                h.addmm_(e[c0:c1], w_e)
                _mlp_tail(h, buf("h2", c1 - c0, hidden), weights, biases, out[c0:c1])
            outs[i] = out

    if small_x:
        x = torch.cat(small_x) if len(small_x) > 1 else small_x[0]
        out = torch.empty(x.shape[0], 2, dtype=torch.float32, device=device)
        w_s = w1[:28]
        for c0 in range(0, x.shape[0], CHUNK):
            c1 = min(x.shape[0], c0 + CHUNK)
            h = buf("h", c1 - c0, hidden)
            torch.addmm(b1, x[c0:c1], w_s, out=h)
            _mlp_tail(h, buf("h2", c1 - c0, hidden), weights, biases, out[c0:c1])
        for i, o in zip(small_idx, torch.split(out, [pfs[j].numel() for j in small_idx]), strict=True):
            outs[i] = o

    for i, (p, pf, o, lr) in enumerate(zip(params, pfs, outs, lrs, strict=True)):
        if o is None:  # stepped by the C passes
            continue
        u = (o[:, 0] * torch.exp(o[:, 1] * exp_mult) * step_mult).reshape(pf.shape)
        if scales[i] != 1.0:
            u = u * scales[i]
        if lr != 1.0:
            u = u * lr
        write_param(p, (pf - u).reshape(p.shape))
