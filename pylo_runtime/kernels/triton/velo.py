"""VeLO's fused per-element step in Triton: all tensors of a call in two launches per parameter dtype.

The per-tensor part stays in torch (``velo._triton_velo``) and runs once for all tensors: LSTM inputs, one
batched LSTM step, one matrix product interpolating the ``param_inits`` MLP copies for every tensor, and the
factored row/column accumulators (reductions over whole tensors). Pass A updates momentum,
rms and the diagonal second moment in place and sums each tensor's 30 feature squares (atomics); pass B
rebuilds the features, normalises them, runs each tensor's own 30 -> h -> h -> 3 MLP (weights from a table)
and writes ``p - lr * lr_mult * step``. All math is fp32; params may be fp32, bf16 or fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import BLOCK, TL_DTYPES, block_of, by_group, contiguous, load_state, pack_group, write_back

N_FEAT = 30


@triton.jit
def _velo_features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT: tl.constexpr):
    """The 30 un-normalised per-element inputs of ``velo.ff_inputs`` (default feature flags, same order)."""
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
        fm0 = m0 / tl.sqrt(v0)
        fm1 = m1 / tl.sqrt(v1)
        fm2 = m2 / tl.sqrt(v2)
        a0, a1, a2 = v0, v1, v2
        b0, b1, b2 = v0, v1, v2
    return (
        g, tl.minimum(tl.maximum(g, -0.1), 0.1), p, m0, m1, m2, r, m0 * rsq, m1 * rsq, m2 * rsq, rsq,
        fg0, fg1, fg2, g * rsq,
        a0, a1, a2, b0, b1, b2,
        tl.math.rsqrt(a0 + 1e-8), tl.math.rsqrt(a1 + 1e-8), tl.math.rsqrt(a2 + 1e-8),
        tl.math.rsqrt(b0 + 1e-8), tl.math.rsqrt(b1 + 1e-8), tl.math.rsqrt(b2 + 1e-8),
        fm0, fm1, fm2,
    )  # fmt: skip


@triton.jit
def _velo_pass_a(PTRS, INFO, AUX, DEC, BLK_T, BLK_S, STATS, P_DT: tl.constexpr, FACT: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """Update the element-wise accumulators; add per-tensor feature sums of squares into STATS."""
    t, offs, mask, n = block_of(BLK_T, BLK_S, INFO, BLOCK)
    _, p, g, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, _ = load_state(
        t, offs, mask, PTRS, INFO, AUX, DEC, P_DT, FACT, True
    )
    feats = _velo_features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT)
    for k in tl.static_range(30):
        x = tl.where(mask, feats[k], 0.0)
        tl.atomic_add(STATS + t * 30 + k, tl.sum(x * x, 0))


@triton.jit
def _velo_pass_b(PTRS, INFO, AUX, DEC, BLK_T, BLK_S, STATS, WT, SCAL,
                 exp_mult, step_mult,
                 P_DT: tl.constexpr, FACT: tl.constexpr, H: tl.constexpr, W_STRIDE: tl.constexpr,
                 PARAM_SCALE: tl.constexpr, PRECOND: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Features -> normalise -> this tensor's MLP -> ``p - step`` for one block of one tensor."""
    t, offs, mask, n = block_of(BLK_T, BLK_S, INFO, BLOCK)
    pp, p, g, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, _ = load_state(
        t, offs, mask, PTRS, INFO, AUX, DEC, P_DT, FACT, False
    )
    feats = _velo_features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT)
    nf = n.to(tl.float32)
    hc = tl.arange(0, H)
    wt = WT + t * W_STRIDE  # [w0 (30, H) | b0 (H) | w1 (H, H) | b1 (H) | w2 (H, 4, last col 0) | b2 (4)]
    h = tl.zeros((BLOCK, H), tl.float32) + tl.load(wt + 30 * H + hc)[None, :]
    for k in tl.static_range(30):
        s = tl.math.rsqrt(1e-5 + tl.load(STATS + t * 30 + k) / nf)
        h += (feats[k] * s)[:, None] * tl.load(wt + k * H + hc)[None, :]
    h = tl.maximum(h, 0.0)
    off = 31 * H
    w1 = tl.load(wt + off + hc[:, None] * H + hc[None, :])
    h = tl.sum(h[:, :, None] * w1[None, :, :], axis=1) + tl.load(wt + off + H * H + hc)[None, :]
    h = tl.maximum(h, 0.0)
    off2 = off + H * H + H
    direction = tl.sum(h * tl.load(wt + off2 + hc * 4 + 0)[None, :], axis=1) + tl.load(wt + off2 + 4 * H + 0)
    magnitude = tl.sum(h * tl.load(wt + off2 + hc * 4 + 1)[None, :], axis=1) + tl.load(wt + off2 + 4 * H + 1)
    # The output head, velo.output_step (param scale: velo.param_scale; its cap in SCAL: param_scale_cap).
    mag_param = tl.exp(magnitude * exp_mult)
    if PARAM_SCALE:
        param_scale = tl.sqrt(tl.load(STATS + t * 30 + 2) / nf + 1e-9)
        param_scale = tl.minimum(param_scale, tl.load(SCAL + t * 4 + 2))
        step = direction * (param_scale * mag_param) * step_mult
    else:
        step = direction * mag_param * step_mult
    step = tl.load(SCAL + t * 4 + 0) * step  # lr_mult from the LSTM
    if PRECOND:
        step = step * tl.math.rsqrt(r + 1e-6)
    step = tl.load(SCAL + t * 4 + 1) * step  # the param group's lr
    tl.store(pp + offs, (p - step).to(P_DT), mask=mask)


def velo_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moms: list[torch.Tensor],
    rmss: list[torch.Tensor],
    fulls: list[torch.Tensor],
    fdims: list[tuple[int, int] | None],
    auxes: list[tuple[torch.Tensor, torch.Tensor] | None],
    weights: torch.Tensor,
    scalars: torch.Tensor,
    dec: torch.Tensor,
    *,
    hidden: int,
    exp_mult: float,
    step_mult: float,
    param_scale: bool,
    precondition: bool,
) -> None:
    """One VeLO step of ``params`` in place (the per-element math of ``velo.velo_tensor_update``).

    ``grads``: float32, contiguous, in the reference's shape (0-d as (1,)); ``moms`` / ``rmss`` / ``fulls``:
    contiguous state, updated in place; ``auxes[i]``: ``common.aux_rows`` of the (already updated) factored
    accumulators, else None; ``weights`` (T, W): each tensor's interpolated MLP, ``[w0 (30, H) | b0 | w1 (H,
    H) | b1 | w2 (H, 4, last column 0) | b2 (4)]``, H a power of two; ``scalars`` (T, 4): [LSTM lr_mult,
    group lr, param-scale cap (inf: none), 0]; ``dec``: 3 momentum, 1 rms, 3 adafactor decays (clipped).
    """
    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    pcs = [contiguous(p) for p in params]
    items = [
        (pc, g, m, r, v, tuple(g.shape), fd, aux)
        for pc, g, m, r, v, fd, aux in zip(pcs, grads, moms, rmss, fulls, fdims, auxes, strict=True)
    ]
    for (dtype, fact), idx in by_group(params, fdims).items():
        ptr_t, info_t, aux_t, blk_t_t, blk_s_t, _ = pack_group([items[i] for i in idx], device)
        sel = torch.tensor(idx, device=device)
        scal = scalars.index_select(0, sel).contiguous()
        wt_g = weights.index_select(0, sel).contiguous()
        stats = torch.zeros(len(idx) * N_FEAT, **f32)
        grid = (blk_t_t.numel(),)
        p_dt = TL_DTYPES[dtype]
        args = (ptr_t, info_t, aux_t, dec, blk_t_t, blk_s_t, stats)
        _velo_pass_a[grid](*args, P_DT=p_dt, FACT=fact, BLOCK=BLOCK)
        _velo_pass_b[grid](
            *args, wt_g, scal, float(exp_mult), float(step_mult),
            P_DT=p_dt, FACT=fact, H=hidden, W_STRIDE=weights.shape[1],
            PARAM_SCALE=bool(param_scale), PRECOND=bool(precondition), BLOCK=BLOCK,
        )  # fmt: skip
        for i in idx:
            write_back(params[i], pcs[i])
