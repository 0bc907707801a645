"""small_fc_lopt's fused step in Triton: all tensors of a call in two launches per parameter dtype.

Pass A updates the element-wise accumulators (momentum, rms, the diagonal second moment of rank <= 1
tensors) in place and adds every tensor's per-feature sums of squares into a small table (atomics). Pass B
rebuilds the 28 features from the new state, normalises them with that table, runs the MLP and writes the
parameter. The factored row/column accumulators are reductions over whole tensors: they stay ordinary torch
ops (as DTensor needs), done before pass A. Tensors are addressed through tables of data pointers, so no
flat copies are made.

MLP precision: the first layer is 28 rank-one updates in fp32 FMAs; the hidden x hidden layers use ``tl.dot``
with ``input_precision="ieee"`` (fp32 products, fp32 accumulation) by default, the choice that keeps parity
(``LOPT_TRITON_DOT_PRECISION=tf32`` trades ~1e-3 relative error in the MLP for tensor-core speed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from .. import adafac as ref
from ..base import write_param
from .triton_common import BLOCK, TL_DTYPES, block_of, factored_aux, load_state, pack_group

N_FEAT = 28


def dot_precision() -> str:
    """``ieee`` (default, parity) or ``tf32`` from ``LOPT_TRITON_DOT_PRECISION``."""
    v = os.environ.get("LOPT_TRITON_DOT_PRECISION", "ieee")
    if v not in ("ieee", "tf32"):
        raise ValueError(f"LOPT_TRITON_DOT_PRECISION must be 'ieee' or 'tf32', got {v!r}")
    return v


@triton.jit
def _features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT: tl.constexpr):
    """The 28 un-normalised inputs of ``AdafacMLPLOpt._mod`` (same order).

    Factored tensors: ``rs*`` are the row values, ``v*`` the column values, ``f*`` row_factor * col_factor.
    Others: ``rs*`` and ``v*`` both the diagonal second moment, ``f*`` unused.
    """
    rsq = tl.math.rsqrt(r + 1e-6)
    if FACT:
        fg0 = g * f0
        fg1 = g * f1
        fg2 = g * f2
        fm0 = m0 * f0
        fm1 = m1 * f1
        fm2 = m2 * f2
        a0, a1, a2 = rs0, rs1, rs2
        b0, b1, b2 = v0, v1, v2
    else:
        fg0 = g * tl.math.rsqrt(tl.maximum(v0 + 1e-9, 1e-9))
        fg1 = g * tl.math.rsqrt(tl.maximum(v1 + 1e-9, 1e-9))
        fg2 = g * tl.math.rsqrt(tl.maximum(v2 + 1e-9, 1e-9))
        fm0 = m0 / tl.sqrt(v0 + 1e-6)
        fm1 = m1 / tl.sqrt(v1 + 1e-6)
        fm2 = m2 / tl.sqrt(v2 + 1e-6)
        a0, a1, a2 = v0, v1, v2
        b0, b1, b2 = v0, v1, v2
    return (
        g, p, m0, m1, m2, r, m0 * rsq, m1 * rsq, m2 * rsq, rsq, fg0, fg1, fg2,
        a0, a1, a2, b0, b1, b2,
        tl.math.rsqrt(a0 + 1e-8), tl.math.rsqrt(a1 + 1e-8), tl.math.rsqrt(a2 + 1e-8),
        tl.math.rsqrt(b0 + 1e-8), tl.math.rsqrt(b1 + 1e-8), tl.math.rsqrt(b2 + 1e-8),
        fm0, fm1, fm2,
    )  # fmt: skip


@triton.jit
def _adafac_pass_a(PTRS, INFO, AUX, DEC, BLK_T, BLK_S, STATS, P_DT: tl.constexpr, FACT: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """Update the element-wise accumulators; add per-tensor feature sums of squares into STATS."""
    t, offs, mask, n = block_of(BLK_T, BLK_S, INFO, BLOCK)
    _, p, g, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, _ = load_state(
        t, offs, mask, PTRS, INFO, AUX, DEC, P_DT, FACT, True
    )
    feats = _features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT)
    for k in tl.static_range(28):
        x = tl.where(mask, feats[k], 0.0)
        tl.atomic_add(STATS + t * 28 + k, tl.sum(x * x, 0))


@triton.jit
def _adafac_pass_b(PTRS, INFO, AUX, DEC, BLK_T, BLK_S, STATS, W1, B1, WH, BH, W3, B3, SCALE,
                   exp_mult, step_mult,
                   P_DT: tl.constexpr, FACT: tl.constexpr, H: tl.constexpr, N_MID: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Features -> normalise -> MLP -> ``p - step`` for one block of one tensor."""
    t, offs, mask, n = block_of(BLK_T, BLK_S, INFO, BLOCK)
    pp, p, g, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, _ = load_state(
        t, offs, mask, PTRS, INFO, AUX, DEC, P_DT, FACT, False
    )
    feats = _features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT)
    nf = n.to(tl.float32)
    hcols = tl.arange(0, H)
    h = tl.zeros((BLOCK, H), tl.float32) + tl.load(B1 + hcols)[None, :]
    for k in tl.static_range(28):
        s = tl.math.rsqrt(1e-5 + tl.load(STATS + t * 28 + k) / nf)
        w = tl.load(W1 + k * H + hcols)
        h += (feats[k] * s)[:, None] * w[None, :]
    h = tl.maximum(h, 0.0)
    for layer in tl.static_range(N_MID):
        wptr = WH + layer * H * H + hcols[:, None] * H + hcols[None, :]
        w = tl.load(wptr)
        if USE_DOT:
            h = tl.dot(h, w, input_precision=DOT_PREC)
        else:
            h = tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        h = tl.maximum(h + tl.load(BH + layer * H + hcols)[None, :], 0.0)
    direction = tl.sum(h * tl.load(W3 + hcols * 2 + 0)[None, :], axis=1) + tl.load(B3 + 0)
    magnitude = tl.sum(h * tl.load(W3 + hcols * 2 + 1)[None, :], axis=1) + tl.load(B3 + 1)
    step = direction * tl.exp(magnitude * exp_mult) * step_mult
    step = step * tl.load(SCALE + t)
    tl.store(pp + offs, (p - step).to(P_DT), mask=mask)


def adafac_step_triton(params, grads, lrs, scales, states, *, step: Any) -> None:
    """One ``SmallFCLOpt`` / ``MuLO`` step with the Triton kernels (same state as the reference path).

    ``step``: ``adafac.AdafacStep``; ``scales``: muLO's per-tensor multipliers; hidden_size a power of two
    (``dispatch`` checks it at construction).
    """
    device = params[0].device
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    time_feat = step.time_feat
    exp_mult, step_mult = step.exp_mult, step.step_mult
    hidden = weights[0].shape[1]
    f32 = dict(dtype=torch.float32, device=device)
    dec = torch.cat([mom_d, torch.clamp(rms_d, 0.0, 1.0), torch.clamp(fac_d, 0.0, 1.0)]).to(**f32)
    w1 = weights[0][:N_FEAT].contiguous()
    b1 = (biases[0] + time_feat @ weights[0][N_FEAT:]).contiguous()
    n_mid = len(weights) - 2
    wh = torch.stack(weights[1:-1]).contiguous() if n_mid else torch.zeros(1, **f32)
    bh = torch.stack(biases[1:-1]).contiguous() if n_mid else torch.zeros(1, **f32)
    w3, b3 = weights[-1].contiguous(), biases[-1].contiguous()

    # Group by (param dtype, factored?) -> one pair of launches each.
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    work = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        st = states[i]
        shape = tuple(p.shape) or (1,)
        fdims = ref.factored_dims(shape)
        pc = p.detach() if p.is_contiguous() else p.detach().contiguous()
        gc = g.reshape(shape).to(torch.float32).contiguous()
        aux = None
        if fdims is not None:
            aux = factored_aux(st, "v_row", "v_col", gc, fac_d, fdims)
        for k in ("m", "rms", "v_diag"):
            if k in st and not st[k].is_contiguous():
                st[k] = st[k].contiguous()
        work.append((p, pc, gc, st, shape, fdims, aux))
        groups.setdefault((p.dtype, fdims is not None), []).append(i)

    scale_vals = [float(s) * float(lr) for s, lr in zip(scales, lrs, strict=True)]
    prec = dot_precision()
    items = [(w[1], w[2], w[3]["m"], w[3]["rms"], w[3].get("v_diag"), w[4], w[5], w[6]) for w in work]
    for (dtype, fact), idx in groups.items():
        if dtype not in TL_DTYPES:
            raise TypeError(f"the fused kernels take float32/bfloat16/float16 params, not {dtype}")
        ptr_t, info_t, aux_t, blk_t_t, blk_s_t, _ = pack_group([items[i] for i in idx], device)
        sc_t = torch.tensor([scale_vals[i] for i in idx], dtype=torch.float32).to(device, non_blocking=True)
        stats = torch.zeros(len(idx) * N_FEAT, **f32)
        grid = (blk_t_t.numel(),)
        p_dt = TL_DTYPES[dtype]
        args = (ptr_t, info_t, aux_t, dec, blk_t_t, blk_s_t, stats)
        _adafac_pass_a[grid](*args, P_DT=p_dt, FACT=fact, BLOCK=BLOCK)
        _adafac_pass_b[grid](
            *args, w1, b1, wh, bh, w3, b3, sc_t,
            exp_mult, step_mult,
            P_DT=p_dt, FACT=fact, H=hidden, N_MID=n_mid, USE_DOT=hidden >= 16, DOT_PREC=prec, BLOCK=BLOCK,
        )  # fmt: skip
        for i in idx:
            p, pc = work[i][0], work[i][1]
            if pc.data_ptr() != p.data_ptr():  # a non-contiguous param was stepped in a contiguous copy
                write_param(p, pc.reshape(p.shape))
        del ptr_t, info_t, blk_t_t, blk_s_t, sc_t, aux_t
