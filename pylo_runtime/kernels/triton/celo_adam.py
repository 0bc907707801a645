"""Celo-Adam's fused step in Triton: every tensor of one parameter dtype in one launch.

Element-wise: the gradient clipped to [-1000, 1000], the momentum and rms accumulators (any number of decay
slots, interleaved on the last axis) updated in place, the bias-corrected Adam step on the last slots and
``p - glr * step`` written (``celo_adam._single_tensor_celo_adam``). Correctly rounded division and square
root (``div_rn`` / ``sqrt_rn``). Params may be fp32, bf16 or fp16 (fp32 state and math, one rounding).
Tensors are addressed through a table of data pointers (param, grad, momentum, rms), so no flat copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import BLOCK, TL_DTYPES, contiguous, write_back


@triton.jit
def _celo_adam_kernel(PTRS, NUMEL, BLK_T, BLK_S, DEC, NUM, PER, P_DT: tl.constexpr, KM: tl.constexpr,
                      KR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One block of one tensor. DEC: KM momentum decays, KR rms decays (clipped); NUM: (c1, c2, lr, eps);
    PER: (param scale, group lr) per tensor."""
    t = tl.load(BLK_T + tl.program_id(0))
    offs = tl.load(BLK_S + tl.program_id(0)) + tl.arange(0, BLOCK)
    mask = offs < tl.load(NUMEL + t)
    pp = tl.load(PTRS + t * 4 + 0).to(tl.pointer_type(P_DT))
    gp = tl.load(PTRS + t * 4 + 1).to(tl.pointer_type(tl.float32))
    mp = tl.load(PTRS + t * 4 + 2).to(tl.pointer_type(tl.float32))
    vp = tl.load(PTRS + t * 4 + 3).to(tl.pointer_type(tl.float32))
    x = tl.load(gp + offs, mask=mask, other=0.0)
    g = tl.where(x < -1000.0, -1000.0, tl.where(x > 1000.0, 1000.0, x))  # torch.clamp: NaN stays
    m = g
    for k in tl.static_range(KM):  # accumulators.momentum_update
        d = tl.load(DEC + k)
        m = d * tl.load(mp + offs * KM + k, mask=mask, other=0.0) + (1.0 - d) * g
        tl.store(mp + offs * KM + k, m, mask=mask)
    v = g
    for k in tl.static_range(KR):  # accumulators.rms_update
        d = tl.load(DEC + KM + k)
        v = d * tl.load(vp + offs * KR + k, mask=mask, other=0.0) + (1.0 - d) * (g * g)
        tl.store(vp + offs * KR + k, v, mask=mask)
    # celo_adam.adam_step on the last slots: (m / c1) * (lr / (eps + sqrt(v / c2 + 1e-10))) * scale
    mh = tl.div_rn(m, tl.load(NUM + 0))
    vh = tl.div_rn(v, tl.load(NUM + 1))
    q = tl.div_rn(tl.zeros_like(vh) + tl.load(NUM + 2), tl.load(NUM + 3) + tl.sqrt_rn(vh + 1e-10))
    step = mh * q * tl.load(PER + t * 2 + 0)
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(pp + offs, (p - tl.load(PER + t * 2 + 1) * step).to(P_DT), mask=mask)


def celo_adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    moms: list[torch.Tensor],
    rmss: list[torch.Tensor],
    mom_d: torch.Tensor,
    rms_d: torch.Tensor,
    numbers: torch.Tensor,
    per_tensor: torch.Tensor,
) -> None:
    """One Celo-Adam step of ``params`` in place.

    ``grads``: float32, contiguous, unclipped; ``moms`` / ``rmss``: contiguous float32 state (decays on the
    last axis), updated in place; ``mom_d`` / ``rms_d``: the decays (rms clipped to [0, 1]); ``numbers``:
    float32 (c1, c2, lr, eps) on the device (c = 1: no bias correction); ``per_tensor`` (T, 2): param scale
    (1: none) and the group's lr.
    """
    device = params[0].device
    km, kr = mom_d.numel(), rms_d.numel()
    dec = torch.cat([mom_d.reshape(-1), rms_d.reshape(-1)]).to(torch.float32).contiguous()
    pcs = [contiguous(p) for p in params]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.dtype not in TL_DTYPES:
            raise TypeError(f"the fused kernels take float32/bfloat16/float16 params, not {p.dtype}")
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        ptrs, numel, blk_t, blk_s = [], [], [], []
        for j, i in enumerate(idx):
            n = pcs[i].numel()
            ptrs += [pcs[i].data_ptr(), grads[i].data_ptr(), moms[i].data_ptr(), rmss[i].data_ptr()]
            numel.append(n)
            for b in range(0, n, BLOCK):
                blk_t.append(j)
                blk_s.append(b)
        i64 = dict(dtype=torch.int64)
        ptr_t = torch.tensor(ptrs, **i64).to(device, non_blocking=True)
        numel_t = torch.tensor(numel, **i64).to(device, non_blocking=True)
        blk_t_t = torch.tensor(blk_t, dtype=torch.int32).to(device, non_blocking=True)
        blk_s_t = torch.tensor(blk_s, **i64).to(device, non_blocking=True)
        sel = torch.tensor(idx, device=per_tensor.device)
        per = per_tensor.index_select(0, sel).contiguous()
        grid = (len(blk_t),)
        _celo_adam_kernel[grid](ptr_t, numel_t, blk_t_t, blk_s_t, dec, numbers, per,
                                P_DT=TL_DTYPES[dtype], KM=km, KR=kr, BLOCK=BLOCK)  # fmt: skip
        for i in idx:
            write_back(params[i], pcs[i])
