"""VeLO's fused per-element step in Triton: all tensors of a call in two launches per parameter dtype.

The per-tensor part stays in torch and runs once for all tensors: LSTM inputs (``pylo_runtime.velo``'s own
functions), one batched LSTM step, one matrix product interpolating the ``param_inits`` MLP copies for every
tensor, and the factored row/column accumulators (reductions over whole tensors). Pass A updates momentum,
rms and the diagonal second moment in place and sums each tensor's 30 feature squares (atomics); pass B
rebuilds the features, normalises them, runs each tensor's own 30 -> h -> h -> 3 MLP (weights from a table)
and writes ``p - lr * lr_mult * step``. All math is fp32; params may be fp32, bf16 or fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import features as feat
from .. import velo as ref
from .triton_common import BLOCK, TL_DTYPES, block_of, factored_aux, load_state, pack_group
from .velo_cpu import interpolate_all

N_FEAT = 30


@triton.jit
def _velo_features(g, p, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, FACT: tl.constexpr):
    """The 30 un-normalised per-element inputs of ``HyperV2._ff_mod`` (default feature flags, same order)."""
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


def velo_impl_triton(params, grads, lrs, states, ctx) -> None:
    """Drop-in for ``velo._single_tensor_velo(params, grads, lrs, states, ctx)`` with the Triton kernels."""
    cfg = ctx.cfg
    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    pfs, rows = [], []
    for p, s in zip(params, states, strict=True):
        pf = p.detach().to(torch.float32)
        pfs.append(pf)
        rank = ref._rank_feature(p.shape, device)
        rows.append(
            ref.lstm_features_for_tensor(
                pf, s["mom"], s["rms"], ctx.fraction_left, ctx.loss_features, rank, cfg
            )
        )
    controls, lr_mult = ref._run_lstm(rows, states, ctx)
    w_names, b_names = ref.ff_layer_names(cfg)
    n_first = len(w_names) - cfg.ff_hidden_layers
    mixed = interpolate_all(controls, [ctx.theta[k] for k in w_names + b_names])
    n_t = len(params)
    hidden = cfg.ff_hidden_size
    if hidden & (hidden - 1):
        raise ValueError(f"VeLO: the Triton kernels need a power-of-two ff_hidden_size, not {hidden}")
    w2 = torch.nn.functional.pad(mixed[n_first + 1], (0, 1))  # (T, H, 4): 3 outputs padded to 4
    b2 = torch.nn.functional.pad(mixed[len(w_names) + 2], (0, 1))
    wt = torch.cat(
        [
            torch.cat(mixed[:n_first], dim=1).reshape(n_t, -1),  # w0 (30, H)
            mixed[len(w_names)],  # b0
            mixed[n_first].reshape(n_t, -1),  # w1 (H, H)
            mixed[len(w_names) + 1],  # b1
            w2.reshape(n_t, -1),
            b2,
        ],
        dim=1,
    ).contiguous()
    mom_d, rms_d, fac_d = (d.to(device) for d in ctx.decays)
    dec = torch.cat([mom_d, torch.clamp(rms_d, 0.0, 1.0), torch.clamp(fac_d, 0.0, 1.0)]).to(**f32)
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    work = []
    for i, (p, g, s) in enumerate(zip(params, grads, states, strict=True)):
        shape = tuple(p.shape) or (1,)
        fdims = feat.factored_dims(tuple(p.shape))
        pc = p.detach() if p.is_contiguous() else p.detach().contiguous()
        gc = g.reshape(shape).to(torch.float32).contiguous()
        aux = None
        if fdims is not None:
            aux = factored_aux(s, "fac_row", "fac_col", gc, fac_d, fdims)
        for k in ("mom", "rms", "fac_full"):
            if not s[k].is_contiguous():
                s[k] = s[k].contiguous()
        work.append((p, pc, gc, s, shape, fdims, aux))
        groups.setdefault((p.dtype, fdims is not None), []).append(i)

    items = [(w[1], w[2], w[3]["mom"], w[3]["rms"], w[3]["fac_full"], w[4], w[5], w[6]) for w in work]
    for (dtype, fact), idx in groups.items():
        if dtype not in TL_DTYPES:
            raise TypeError(f"VeLO: fused kernels take float32/bfloat16/float16 params, not {dtype}")
        ptr_t, info_t, aux_t, blk_t_t, blk_s_t, numels = pack_group([items[i] for i in idx], device)
        max_scale = []
        for n in numels:
            if cfg.clip_param_scale_amount is None:
                max_scale.append(float("inf"))
            else:
                v = cfg.clip_param_scale_amount * float(n) ** 0.5
                max_scale.append(float(torch.tensor(v, dtype=torch.float32)))
        sel = torch.tensor(idx, device=device)
        scal = torch.stack(
            [
                lr_mult.index_select(0, sel).to(**f32),
                torch.tensor([float(lrs[i]) for i in idx], **f32),
                torch.tensor(max_scale, **f32),
                torch.zeros(len(idx), **f32),
            ],
            dim=1,
        ).contiguous()
        wt_g = wt.index_select(0, sel).contiguous()
        stats = torch.zeros(len(idx) * N_FEAT, **f32)
        grid = (blk_t_t.numel(),)
        p_dt = TL_DTYPES[dtype]
        args = (ptr_t, info_t, aux_t, dec, blk_t_t, blk_s_t, stats)
        _velo_pass_a[grid](*args, P_DT=p_dt, FACT=fact, BLOCK=BLOCK)
        _velo_pass_b[grid](
            *args, wt_g, scal, float(cfg.exp_mult), float(cfg.step_mult),
            P_DT=p_dt, FACT=fact, H=hidden, W_STRIDE=wt.shape[1],
            PARAM_SCALE=bool(cfg.param_scale_mult), PRECOND=bool(cfg.precondition_output), BLOCK=BLOCK,
        )  # fmt: skip
        for i in idx:
            p, pc = work[i][0], work[i][1]
            if pc.data_ptr() != p.data_ptr():  # a non-contiguous param was stepped in a contiguous copy
                ref.write_param(p, pc.reshape(p.shape))
