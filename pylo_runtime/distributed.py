"""DTensor (FSDP2) parameters: give the learned update whole tensors, write back each rank's shard.

A learned optimizer reads whole-tensor statistics (means over a tensor, row/column second moments, factored
dims chosen from the full shape, the tensor's rank and size), so a shard alone does not define its update.
``gather_param`` all-gathers a sharded parameter and its gradient; the family code then runs on plain full
tensors exactly as in a single process, and ``scatter_back`` copies this rank's slice of the result into the
local shard. Cost per step: one all-gather of each sharded parameter and gradient (the same bytes FSDP2 moves
in its own forward all-gather), and optimizer state for the full tensor on every rank.
"""

from __future__ import annotations

from typing import Any

import torch


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed tensors
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameters)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def gather_param(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full plain copies of a DTensor parameter and its gradient (``g`` may be a DTensor or already full)."""
    full_p = p.detach().full_tensor()
    full_g = g.full_tensor() if is_dtensor(g) else g
    return full_p, full_g


def local_slices(p: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of DTensor ``p`` inside the full tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def scatter_back(p: torch.Tensor, full_p: torch.Tensor) -> None:
    """Copy this rank's slice of the updated full tensor into DTensor ``p``'s local shard."""
    local = p.to_local()
    if local.numel() == 0:
        return
    local.copy_(full_p[local_slices(p)])


def global_mean(loss: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean of ``loss`` over the ranks of ``group`` (default: all): the loss to give ``step`` under DDP/FSDP.

    VeLO and Celo read the training loss; with data parallelism each rank sees its own batch, so every rank
    must pass the same global loss or the replicas' updates differ. One scalar all-reduce; identity when
    torch.distributed is not initialised.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    out = loss.detach().to(torch.float32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


# ------------------------------------------------------------------------------------------------------------
# Reductions over TENSORS (not elements), for when each rank steps only some tensors (sharded.py).
# A family whose update combines several tensors (a max, a sum, a global norm) must route that reduction
# through these, or ShardedOptimizer silently computes it over this rank's tensors only.
#: The process group of the sharded step in progress; None: this process steps every tensor itself.
_TENSOR_GROUP: list[Any] = []


def tensors_max(x: torch.Tensor) -> torch.Tensor:
    """Max over tensors (VeLO's mix layer): all-reduced over ranks while they split the tensors."""
    if not _TENSOR_GROUP:
        return x
    out = x.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=_TENSOR_GROUP[-1])
    return out


def tensors_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over tensors (muLO's global gradient norm): all-reduced likewise."""
    if not _TENSOR_GROUP:
        return x
    out = x.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=_TENSOR_GROUP[-1])
    return out
