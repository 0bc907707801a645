"""VeLO's fast CPU step: the reference per-element math reorganised around a few chunked matrix products.

Same LSTM (run once on all tensors, with ``pylo_runtime.velo``'s own functions), accumulators and
per-element MLP as the reference path; what changes is how the per-element part is computed:

- the ``param_inits`` MLP copies are interpolated for all tensors in one matrix product;
- the per-tensor feature normalisation ``x * rsqrt(1e-5 + mean(x**2))`` is folded into the first-layer
  weights, and the 12 Adafactor row/column features of a factored tensor, constant along one axis, enter
  the first layer once per row and once per column (broadcast), so per element it reads 18 features, not 30;
- the 30 -> 4 -> 4 -> 3 MLP runs over cache-sized chunks of elements;
- 2-D tensors (from NATIVE_MIN elements) run on the hand-fused C passes (``native``, ``lopt_cpu.c``): one
  pass for this step's g**2 row / column sums, one that updates the accumulators and sums the features'
  squares and the previous state's LSTM statistics (float64), one for the features, MLP and update.

Float32 results differ from the reference by summation order (torch ops, about 1e-7 relative), and in the
C passes also by FMA contraction and a polynomial exp (at most 2e-6 relative per update in the tests).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import accumulators as acc
from .. import distributed as _dist
from .. import features as feat
from .. import velo as ref
from . import native
from .adafac_cpu import CHUNK, _rms_scale, _shard_rms_scale, factored_update, first_layer_shares

#: Smallest 2-D tensor the C passes take (below, the torch path's few ops cost less than a thread hand-off).
NATIVE_MIN = 4096

#: Columns (of the 30 reference inputs) that vary per element in a factored tensor.
_ELEM = list(range(15)) + [27, 28, 29]
_ROW = [15, 16, 17, 21, 22, 23]  # v_row, rsqrt(v_row + 1e-8)
_COL = [18, 19, 20, 24, 25, 26]  # v_col, rsqrt(v_col + 1e-8)


def interpolate_all(controls: torch.Tensor, ff_theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """``100 * mean(ff_p * c, axis=0)`` for every tensor at once: list over ff tensors of (T, ...)."""
    n_inits = controls.shape[1]
    flat = torch.cat([t.reshape(n_inits, -1) for t in ff_theta], dim=1)
    mixed = (controls @ flat) / n_inits * 100.0
    out, start = [], 0
    for t in ff_theta:
        k = t[0].numel()
        out.append(mixed[:, start : start + k].reshape((controls.shape[0],) + tuple(t.shape[1:])))
        start += k
    return out


def _elem_chunk(pf, g, m, rms, rf_u, cf_u, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """The 18 per-element inputs of rows ``r0:r1`` (axis 0) of a factored tensor, in reference order.

    ``rf_u`` / ``cf_u`` are the row / column factors with their reduced axis kept (size 1). Written into
    ``out`` (a cache-sized buffer) and returned as a (rows, 18) matrix.
    """

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[r0:r1] if t.shape[0] != 1 else t

    gc = g[r0:r1].unsqueeze(-1)
    mc, rc = m[r0:r1], rms[r0:r1]
    fac = rows(rf_u) * rows(cf_u)
    rsqrt = torch.rsqrt(rc + 1e-6)
    parts = [gc, torch.clamp(gc, -0.1, 0.1), pf[r0:r1].unsqueeze(-1), mc, rc, mc * rsqrt, rsqrt]
    parts += [gc * fac, gc * rsqrt, mc * fac]
    o = out[: gc.numel() * 18].view(gc.shape[:-1] + (18,))
    torch.cat(parts, dim=-1, out=o)
    return o.view(-1, 18)


def _row_chunks(shape: tuple[int, ...]):
    """``(r0, r1, c0, c1)``: slices of axis 0 holding about CHUNK elements, and their element ranges."""
    inner = 1
    for s_ in shape[1:]:
        inner *= s_
    rows_per = max(1, CHUNK // max(inner, 1))
    for r0 in range(0, shape[0], rows_per):
        r1 = min(shape[0], r0 + rows_per)
        yield r0, r1, r0 * inner, r1 * inner


def _mlp_chunks(e_of, w_e, bias_of, shape, weights, out) -> None:
    """Chunked ``relu(e @ w_e + bias) -> relu(@ w1 + b1) -> @ w2 + b2`` into ``out`` (n, 3)."""
    (w1, b1), (w2, b2) = weights
    hidden = w_e.shape[1]
    for r0, r1, c0, c1 in _row_chunks(shape):
        h = bias_of(r0, r1, c1 - c0, hidden)
        h.addmm_(e_of(r0, r1, c0, c1), w_e)
        h.relu_()
        h = torch.addmm(b1, h, w1)
        h.relu_()
        torch.addmm(b2, h, w2, out=out[c0:c1])


def _tensor_mlp_out(pf, g, st, w0, b0, w1, b1, w2, b2, decays, cfg) -> torch.Tensor:
    """Update one tensor's accumulators in ``st``; return its MLP output (n, 3). ``pf`` has rank >= 1.

    Inside ``distributed.on_tensor``, an FSDP2 shard's statistics are reduced over its shard group.
    """
    mom_d, rms_d, fac_d = decays
    shape = tuple(pf.shape)
    n = pf.numel()
    m = acc.momentum_update(st["m"], g, mom_d)
    rms = acc.rms_update(st["rms"], g, rms_d)
    st["m"], st["rms"] = m, rms
    fdims = feat.factored_dims(_dist.global_shape(shape))
    out = torch.empty(n, 3, dtype=torch.float32, device=pf.device)
    layers = ((w1, b1), (w2, b2))
    if fdims is None:
        v_row, v_col, v_full, fac_g = acc.factored_update(
            st["v_row"], st["v_col"], st["v_full"], g, fac_d, None
        )
        st["v_full"] = v_full
        x = torch.cat(
            [t.reshape(n, -1) for t in ref.ff_inputs(pf, g, m, rms, fac_g, v_row, v_col, v_full, cfg)], 1
        )
        w = _shard_rms_scale(x, shape + (x.shape[1],)).unsqueeze(1) * w0
        bias = lambda r0, r1, c, h: b0.expand(c, h).clone()  # noqa: E731
        _mlp_chunks(lambda r0, r1, c0, c1: x[c0:c1], w, bias, (n,), layers, out)
        return out
    d1, d0 = fdims
    gsq = g * g + 1e-30
    row_factor, col_factor = factored_update(
        st, _dist.tensor_mean(gsq, d0), _dist.tensor_mean(gsq, d1), fac_d, fdims
    )
    rf_u, cf_u = row_factor.unsqueeze(d0), col_factor.unsqueeze(d1)
    # The 18 per-element features, written once by one concatenation (strided column writes cost more).
    e = _elem_chunk(
        pf, g, m, rms, rf_u, cf_u, 0, shape[0], torch.empty(n * 18, dtype=torch.float32, device=pf.device)
    )
    w_e = _shard_rms_scale(e, shape + (18,)).unsqueeze(1) * w0[_ELEM]
    a_row, a_col = first_layer_shares(st["v_row"], st["v_col"], w0[_ROW], w0[_COL], b0, fdims)
    a_row, a_col = a_row.unsqueeze(d0), a_col.unsqueeze(d1)

    def bias_of(r0: int, r1: int, c: int, hidden: int) -> torch.Tensor:
        ar = a_row[r0:r1] if a_row.shape[0] != 1 else a_row
        ac = a_col[r0:r1] if a_col.shape[0] != 1 else a_col
        return torch.add(ar, ac).reshape(c, hidden)

    def e_of(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        return e[c0:c1]

    _mlp_chunks(e_of, w_e, bias_of, shape, layers, out)
    return out


def _native_pass1(lib: Any, pf: torch.Tensor, g: torch.Tensor, s: dict, fac_d, mom_d, rms_d) -> dict:
    """A 2-D tensor's first C passes: this step's ``g**2`` row / column sums (factored accumulators updated
    in ``s``), then the momentum / rms update with the features' sums of squares and the previous state's
    LSTM statistics (``gsq_sums``, ``velo_pass1`` in lopt_cpu.c). Returns what the MLP pass needs."""
    shape = tuple(pf.shape)
    fdims = feat.factored_dims(shape)
    st = {"v_row": s["fac_row"], "v_col": s["fac_col"]}
    mean = native.gsq_means(lib, g)
    row_factor, col_factor = factored_update(st, mean[fdims[1]], mean[fdims[0]], fac_d, fdims)
    s["fac_row"], s["fac_col"] = st["v_row"], st["v_col"]
    fa, fb = native.by_axis(row_factor, col_factor, fdims[1], shape)
    sumsq, stats = native.accumulate(
        lib.velo_pass1, 18, pf, g, s["mom"], s["rms"], fa, fb, mom_d, rms_d, stats=9
    )
    return {"fa": fa, "fb": fb, "sumsq": sumsq, "stats": stats, "fdims": fdims, "g": g}


def _lstm_row_from_stats(sums: torch.Tensor, n: int, ctx: Any, rank: torch.Tensor) -> torch.Tensor:
    """``velo.lstm_features_for_tensor`` from ``_native_pass1``'s state sums: means of ``m * norm_mult`` and
    ``rms * norm_mult`` and their (sic) variances, as E[x**2] - E[x]**2 in float64."""
    mean_p2 = (sums[0] / n).to(torch.float32)
    nm = torch.rsqrt(torch.clamp(mean_p2, min=1e-9)).double()
    mean_m = sums[1:4] / n * nm
    var_m = sums[4:7] / n * nm**2 - mean_m**2
    mean_rms = sums[7:8] / n * nm
    var_rms = sums[8] / n * nm**2 - 2.0 * mean_m * mean_rms + mean_m**2  # centred on mean_m, as the reference
    parts = [ctx.fraction_left, ctx.loss_features, feat.clip_log_abs(mean_rms.float(), scale=10.0), rank]
    parts += [feat.clip_log_abs(var_m.float(), scale=10.0), feat.clip_log_abs(var_rms.float(), scale=10.0)]
    if ctx.cfg.with_validation_feature_dim:
        parts.append(torch.full((1,), float(ctx.cfg.validation_mode), dtype=torch.float32))
    return torch.cat(parts)


def _native_step(lib, p, pf, s, pre: dict, mlp, lr_mult: float, lr: float, ctx) -> None:
    """The MLP pass and update of a 2-D tensor on the C passes, after ``_native_pass1``."""
    cfg = ctx.cfg
    w0, b0, w1, b1, w2, b2 = mlp
    shape = tuple(pf.shape)
    n = pf.numel()
    w_e = _rms_scale(pre["sumsq"], n).unsqueeze(1) * w0[_ELEM]
    shares = first_layer_shares(s["fac_row"], s["fac_col"], w0[_ROW], w0[_COL], b0, pre["fdims"])
    a0, a1 = native.by_axis(*shares, pre["fdims"][1], shape)
    pscale = -1.0
    if cfg.param_scale_mult:
        param_scale = torch.sqrt((pre["stats"][0] / n).to(torch.float32) + 1e-9)
        if cfg.clip_param_scale_amount is not None:
            max_scale = cfg.clip_param_scale_amount * float(n) ** 0.5
            param_scale = torch.clamp(param_scale, max=float(torch.tensor(max_scale, dtype=torch.float32)))
        pscale = float(param_scale)
    native.mlp_update(lib.velo_pass2, pf, pre["g"], s["mom"], s["rms"], pre["fa"], pre["fb"], w_e, a0, a1,
                      (w1, b1, w2, b2), cfg.exp_mult, cfg.step_mult, pscale, lr_mult,
                      int(cfg.precondition_output), lr)  # fmt: skip
    native.write_back(p, pf)


def velo_impl_cpu(params, grads, lrs, states, ctx, lib: Any = None) -> None:
    """Drop-in for ``velo._single_tensor_velo(params, grads, lrs, states, ctx)``; grads clipped.

    ``lib`` None: the torch-ops (foreach) path, any device; the loaded C library: the fused CPU path.
    """
    cfg = ctx.cfg
    rows = []
    pfs, stats = [], []
    for p, g, s in zip(params, grads, states, strict=True):
        pf = p.detach().to(torch.float32)
        with _dist.on_tensor(p):  # an FSDP2 shard: the means over it are all-reduced
            rank = ref._rank_feature(_dist.global_shape(p.shape), pf.device)
            st = None
            if lib and pf.numel() >= NATIVE_MIN and native.usable(pf, [s["mom"], s["rms"]]):
                mom_d, rms_d, fac_d = ctx.decays
                st = _native_pass1(lib, pf, g.to(torch.float32).contiguous(), s, fac_d, mom_d, rms_d)
                rows.append(_lstm_row_from_stats(st["stats"], pf.numel(), ctx, rank))
            else:
                rows.append(
                    ref.lstm_features_for_tensor(
                        pf, s["mom"], s["rms"], ctx.fraction_left, ctx.loss_features, rank, cfg
                    )
                )
        pfs.append(pf)
        stats.append(st)
    controls, lr_mult = ref._run_lstm(rows, states, ctx)
    w_names, b_names = ref.ff_layer_names(cfg)
    n_first = len(w_names) - cfg.ff_hidden_layers
    mixed = interpolate_all(controls, [ctx.theta[k] for k in w_names + b_names])
    w0_all = torch.cat(mixed[:n_first], dim=1)  # (T, 30, hidden)
    w1_all, w2_all = mixed[n_first], mixed[n_first + 1]
    b0_all, b1_all, b2_all = mixed[len(w_names) :]
    for i, (p, pf, g, lr, s) in enumerate(zip(params, pfs, grads, lrs, states, strict=True)):
        if stats[i] is not None:
            mlp = (w0_all[i], b0_all[i], w1_all[i], b1_all[i], w2_all[i], b2_all[i])
            _native_step(lib, p, pf, s, stats[i], mlp, float(lr_mult[i]), float(lr), ctx)
            continue
        shape = tuple(pf.shape) or (1,)
        st = {
            "m": s["mom"],
            "rms": s["rms"],
            "v_row": s["fac_row"],
            "v_col": s["fac_col"],
            "v_full": s["fac_full"],
        }
        if pf.dim() == 0:  # the reference reshapes scalars to (1,): every feature normalised on its own
            st = {k: (v.unsqueeze(0) if k != "v_row" and k != "v_col" else v) for k, v in st.items()}
        x = pf.reshape(shape)
        with _dist.on_tensor(p):
            o = _tensor_mlp_out(
                x,
                g.reshape(shape),
                st,
                w0_all[i],
                b0_all[i],
                w1_all[i],
                b1_all[i],
                w2_all[i],
                b2_all[i],
                ctx.decays,
                cfg,
            )
            if cfg.param_scale_mult:
                param_scale = torch.sqrt(_dist.tensor_mean(torch.square(x)) + 1e-9)
            numel = _dist.global_numel(x)
        if pf.dim() == 0:
            st = {k: (v.squeeze(0) if k != "v_row" and k != "v_col" else v) for k, v in st.items()}
        s["mom"], s["rms"], s["fac_row"], s["fac_col"], s["fac_full"] = (
            st["m"], st["rms"], st["v_row"], st["v_col"], st["v_full"]
        )  # fmt: skip
        direction, magnitude = o[:, 0], o[:, 1]
        mag_param = torch.exp(magnitude * cfg.exp_mult)
        if cfg.param_scale_mult:
            if cfg.clip_param_scale_amount is not None:
                max_scale = cfg.clip_param_scale_amount * float(numel) ** 0.5
                param_scale = torch.clamp(
                    param_scale, max=float(torch.tensor(max_scale, dtype=torch.float32))
                )
            step = direction * (param_scale * mag_param) * cfg.step_mult
        else:
            step = direction * mag_param * cfg.step_mult
        step = lr_mult[i] * step
        if cfg.precondition_output:
            step = step * torch.rsqrt(st["rms"].reshape(-1, st["rms"].shape[-1])[:, -1] + 1e-6)
        step = step.reshape(pf.shape)
        ref.write_param(p, pf - step if lr == 1.0 else pf - lr * step)
