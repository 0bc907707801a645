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

import torch
import triton
import triton.language as tl

from .common import BLOCK, TL_DTYPES, block_of, by_group, contiguous, load_state, pack_group, write_back

N_FEAT = 28


def dot_precision() -> str:
    """``ieee`` (default, parity) or ``tf32`` from ``LOPT_TRITON_DOT_PRECISION``."""
    v = os.environ.get("LOPT_TRITON_DOT_PRECISION", "ieee")
    if v not in ("ieee", "tf32"):
        raise ValueError(f"LOPT_TRITON_DOT_PRECISION must be 'ieee' or 'tf32', got {v!r}")
    return v


@triton.jit
def _features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT: tl.constexpr):
    """The 28 un-normalised inputs of ``adafac.adafac_features`` (``AdafacMLPLOpt._mod``, same order).

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


def adafac_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moms: list[torch.Tensor],
    rmss: list[torch.Tensor],
    fulls: list[torch.Tensor | None],
    fdims: list[tuple[int, int] | None],
    auxes: list[tuple[torch.Tensor, torch.Tensor] | None],
    scales: list[float],
    dec: torch.Tensor,
    mlp: tuple[torch.Tensor, ...],
    *,
    exp_mult: float,
    step_mult: float,
) -> None:
    """One small_fc_lopt / muLO step of ``params`` in place (the math of ``adafac._adafac_reference``).

    ``grads``: float32, contiguous, in the reference's shape (0-d as (1,)); ``moms`` / ``rmss`` / ``fulls``:
    contiguous state, updated in place (``fulls[i]``: the diagonal second moment, None when factored);
    ``auxes[i]``: ``common.aux_rows`` of the factored accumulators (already updated), else None;
    ``scales[i]``: muLO scale x lr; ``dec``: 3 momentum, 1 rms, 3 adafactor decays (clipped);
    ``mlp``: (w1 (28, H), b1 with the time features folded in, hidden weights (N_MID, H, H), their biases,
    w3 (H, 2), b3); H a power of two.
    """
    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    w1, b1, wh, bh, w3, b3 = mlp
    hidden, n_mid = w1.shape[1], wh.shape[0] if wh.dim() == 3 else 0
    prec = dot_precision()
    pcs = [contiguous(p) for p in params]
    items = [
        (pc, g, m, r, v, tuple(g.shape), fd, aux)
        for pc, g, m, r, v, fd, aux in zip(pcs, grads, moms, rmss, fulls, fdims, auxes, strict=True)
    ]
    for (dtype, fact), idx in by_group(params, fdims).items():
        ptr_t, info_t, aux_t, blk_t_t, blk_s_t, _ = pack_group([items[i] for i in idx], device)
        sc_t = torch.tensor([scales[i] for i in idx], dtype=torch.float32).to(device, non_blocking=True)
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
            write_back(params[i], pcs[i])
        del ptr_t, info_t, blk_t_t, blk_s_t, sc_t, aux_t
