"""What the Triton steps of small_fc_lopt and VeLO share: tensor tables, state loading, group packing.

Kernel entry points take tensors and numbers (the family modules prepare them); nothing here imports a
family module.

Both address a group of tensors through a table of data pointers (param, grad, momentum (n, 3), rms,
diagonal second moment (n, 3) or 0), an ``INFO`` row of 12 int64 per tensor (numel, factored?, strides and
sizes of the factored dims, offsets of the row / column aux in ``AUX``) and a list of (tensor, start)
blocks; ``DEC`` holds the 3 momentum, 1 rms and 3 adafactor decays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 256
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: One tensor of a group: (param, fp32 grad, momentum, rms, diagonal second moment or None, shape,
#: factored dims or None, (row aux, col aux) or None); param and grad contiguous, as stepped.
GroupItem = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    tuple[int, ...],
    tuple[int, int] | None,
    tuple[torch.Tensor, torch.Tensor] | None,
]


@triton.jit
def _load_tensor_info(t, INFO):
    base = INFO + t * 12
    return (
        tl.load(base + 0),  # numel
        tl.load(base + 1),  # factored?
        tl.load(base + 2),  # stride of d0
        tl.load(base + 3),  # size of d0
        tl.load(base + 4),  # stride of d1
        tl.load(base + 5),  # size of d1
        tl.load(base + 6),  # offset of row aux (6 floats per row)
        tl.load(base + 7),  # offset of col aux (6 floats per col)
    )


@triton.jit
def block_of(BLK_T, BLK_S, INFO, BLOCK: tl.constexpr):
    """(tensor index, element offsets, mask, element count) of this program's block of the pointer table."""
    t = tl.load(BLK_T + tl.program_id(0))
    offs = tl.load(BLK_S + tl.program_id(0)) + tl.arange(0, BLOCK)
    n = tl.load(INFO + t * 12)
    return t, offs, offs < n, n


@triton.jit
def load_state(t, offs, mask, PTRS, INFO, AUX, DEC, P_DT: tl.constexpr, FACT: tl.constexpr,
                UPDATE: tl.constexpr):  # fmt: skip
    """Load (and in pass A update) one block's state; returns what the ``_features`` functions take.

    The updates restate ``accumulators.momentum_update`` / ``rms_update`` and, for the diagonal second moment
    of tensors of rank <= 1, ``accumulators.factored_update``'s ``v_full`` branch.
    """
    pp = tl.load(PTRS + t * 5 + 0).to(tl.pointer_type(P_DT))
    gp = tl.load(PTRS + t * 5 + 1).to(tl.pointer_type(tl.float32))
    mp = tl.load(PTRS + t * 5 + 2).to(tl.pointer_type(tl.float32))
    rp = tl.load(PTRS + t * 5 + 3).to(tl.pointer_type(tl.float32))
    vp = tl.load(PTRS + t * 5 + 4).to(tl.pointer_type(tl.float32))
    n, fact, st0, s0, st1, s1, row_off, col_off = _load_tensor_info(t, INFO)
    g = tl.load(gp + offs, mask=mask, other=0.0)
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    m0 = tl.load(mp + offs * 3 + 0, mask=mask, other=0.0)
    m1 = tl.load(mp + offs * 3 + 1, mask=mask, other=0.0)
    m2 = tl.load(mp + offs * 3 + 2, mask=mask, other=0.0)
    r = tl.load(rp + offs, mask=mask, other=0.0)
    if UPDATE:
        dm0 = tl.load(DEC + 0)
        dm1 = tl.load(DEC + 1)
        dm2 = tl.load(DEC + 2)
        dr = tl.load(DEC + 3)
        m0 = dm0 * m0 + (1.0 - dm0) * g
        m1 = dm1 * m1 + (1.0 - dm1) * g
        m2 = dm2 * m2 + (1.0 - dm2) * g
        r = dr * r + (1.0 - dr) * (g * g)
        tl.store(mp + offs * 3 + 0, m0, mask=mask)
        tl.store(mp + offs * 3 + 1, m1, mask=mask)
        tl.store(mp + offs * 3 + 2, m2, mask=mask)
        tl.store(rp + offs, r, mask=mask)
    if FACT:
        ri = (offs // (st0 * s0)) * st0 + offs % st0
        ci = (offs // (st1 * s1)) * st1 + offs % st1
        rs0 = tl.load(AUX + row_off + ri * 6 + 0, mask=mask, other=1.0)
        rs1 = tl.load(AUX + row_off + ri * 6 + 1, mask=mask, other=1.0)
        rs2 = tl.load(AUX + row_off + ri * 6 + 2, mask=mask, other=1.0)
        v0 = tl.load(AUX + col_off + ci * 6 + 0, mask=mask, other=1.0)
        v1 = tl.load(AUX + col_off + ci * 6 + 1, mask=mask, other=1.0)
        v2 = tl.load(AUX + col_off + ci * 6 + 2, mask=mask, other=1.0)
        f0 = tl.load(AUX + row_off + ri * 6 + 3, mask=mask, other=0.0) * tl.load(
            AUX + col_off + ci * 6 + 3, mask=mask, other=0.0
        )
        f1 = tl.load(AUX + row_off + ri * 6 + 4, mask=mask, other=0.0) * tl.load(
            AUX + col_off + ci * 6 + 4, mask=mask, other=0.0
        )
        f2 = tl.load(AUX + row_off + ri * 6 + 5, mask=mask, other=0.0) * tl.load(
            AUX + col_off + ci * 6 + 5, mask=mask, other=0.0
        )
    else:
        v0 = tl.load(vp + offs * 3 + 0, mask=mask, other=1.0)
        v1 = tl.load(vp + offs * 3 + 1, mask=mask, other=1.0)
        v2 = tl.load(vp + offs * 3 + 2, mask=mask, other=1.0)
        if UPDATE:
            df0 = tl.load(DEC + 4)
            df1 = tl.load(DEC + 5)
            df2 = tl.load(DEC + 6)
            gs = g * g + 1e-30
            v0 = df0 * v0 + (1.0 - df0) * gs
            v1 = df1 * v1 + (1.0 - df1) * gs
            v2 = df2 * v2 + (1.0 - df2) * gs
            tl.store(vp + offs * 3 + 0, v0, mask=mask)
            tl.store(vp + offs * 3 + 1, v1, mask=mask)
            tl.store(vp + offs * 3 + 2, v2, mask=mask)
        rs0, rs1, rs2 = v0, v1, v2
        f0, f1, f2 = v0, v1, v2
    return pp, p, g, m0, m1, m2, r, rs0, rs1, rs2, v0, v1, v2, f0, f1, f2, n


def contig_info(shape: tuple[int, ...], fdims: tuple[int, int] | None) -> tuple[int, int, int, int]:
    if fdims is None:
        return 1, 1, 1, 1
    d1, d0 = fdims
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return stride[d0], shape[d0], stride[d1], shape[d1]


def pack_group(
    items: Sequence[GroupItem], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``(PTRS, INFO, AUX, BLK_T, BLK_S)`` on ``device`` for one launch over ``items``, and their numels."""
    ptrs, info, aux_parts, blk_t, blk_s, numels = [], [], [], [], [], []
    aux_len = 0
    for j, (pc, gc, mom, rms, vdiag, shape, fdims, aux) in enumerate(items):
        n = pc.numel()
        vptr = vdiag.data_ptr() if fdims is None else 0
        ptrs += [pc.data_ptr(), gc.data_ptr(), mom.data_ptr(), rms.data_ptr(), vptr]
        st0, s0, st1, s1 = contig_info(shape, fdims)
        row_off = col_off = 0
        if aux is not None:
            row_off = aux_len
            aux_len += aux[0].numel()
            col_off = aux_len
            aux_len += aux[1].numel()
            aux_parts += list(aux)
        info += [n, int(fdims is not None), st0, s0, st1, s1, row_off, col_off, 0, 0, 0, 0]
        for b in range(0, n, BLOCK):
            blk_t.append(j)
            blk_s.append(b)
        numels.append(n)
    i64 = dict(dtype=torch.int64)
    ptr_t = torch.tensor(ptrs, **i64).to(device, non_blocking=True)
    info_t = torch.tensor(info, **i64).to(device, non_blocking=True)
    blk_t_t = torch.tensor(blk_t, dtype=torch.int32).to(device, non_blocking=True)
    blk_s_t = torch.tensor(blk_s, **i64).to(device, non_blocking=True)
    aux_t = (
        torch.cat(aux_parts).contiguous() if aux_parts else torch.zeros(1, dtype=torch.float32, device=device)
    )
    return ptr_t, info_t, aux_t, blk_t_t, blk_s_t, numels


def aux_rows(
    v_row: torch.Tensor, v_col: torch.Tensor, row_factor: torch.Tensor, col_factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``AUX`` rows of one factored tensor: (row values | row factors, column values | column factors),
    flattened (the factored accumulators are reductions over the whole tensor: torch ops, before pass A)."""
    return torch.cat([v_row, row_factor], -1).reshape(-1), torch.cat([v_col, col_factor], -1).reshape(-1)


def by_group(params: Sequence[torch.Tensor], fdims: Sequence[Any]) -> dict[tuple[Any, bool], list[int]]:
    """Indices of ``params`` by (dtype, factored?): one pair of launches each."""
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    for i, (p, fd) in enumerate(zip(params, fdims, strict=True)):
        if p.dtype not in TL_DTYPES:
            raise TypeError(f"the fused kernels take float32/bfloat16/float16 params, not {p.dtype}")
        groups.setdefault((p.dtype, fd is not None), []).append(i)
    return groups


def contiguous(p: torch.Tensor) -> torch.Tensor:
    """What the kernels step: ``p`` itself, or a contiguous copy written back by :func:`write_back`."""
    return p.detach() if p.is_contiguous() else p.detach().contiguous()


def write_back(p: torch.Tensor, pc: torch.Tensor) -> None:
    """Store a contiguous copy's result into a non-contiguous param."""
    if pc.data_ptr() != p.data_ptr():
        with torch.no_grad():
            p.copy_(pc.reshape(p.shape))
