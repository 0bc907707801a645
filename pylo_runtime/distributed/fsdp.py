"""DTensor (FSDP2) parameters: step each rank's shard, reducing the whole-tensor statistics over its group.

A learned optimizer reads whole-tensor statistics (means over a tensor, row/column second moments, factored
dims chosen from the full shape, the tensor's rank and size), so a shard alone does not define its update.

Rank-local path (a 1-D mesh and one ``Shard(d)`` placement, gradient alike, family with ``shard_local``):
the family code runs on the local shard; ``LearnedOptimizer.step`` gives it a ``reducer.ShardReducer`` for
that tensor (from :func:`shard_spec`), whose reductions cover the elements of the WHOLE tensor (local sum,
one ``all_reduce(SUM)`` over the shard group, divided by the global count). Paths that cannot reduce over
shards (the fused kernels, the vmapped / flattened batched paths) are not chosen then (``dispatch``).

Gather fallback (any other placement: Replicate/Partial, a mesh of more than one dim, a family without
``shard_local``): ``gather_param`` all-gathers the parameter and its gradient, the family runs on the full
tensors on every rank, and ``scatter_back`` copies this rank's slice of the result into the local shard.
"""

from __future__ import annotations

from typing import Any

import torch

from .reducer import ShardSpec


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
    must use the same global loss or the replicas' updates differ. ``LearnedOptimizer.step`` now does this
    itself (``loss_reduction="mean"``, the default); this is for loops that pass ``loss_reduction="none"``.
    One scalar all-reduce; identity when torch.distributed is not initialised.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    out = loss.detach().to(torch.float32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out / dist.get_world_size(group)


def shard_spec(p: torch.Tensor, g: Any) -> ShardSpec | None:
    """The spec if DTensor ``p`` (with gradient ``g``) can be stepped rank-locally, else None (gather)."""
    from torch.distributed.tensor import Shard

    if p.dim() == 0 or p.device_mesh.ndim != 1 or len(p.placements) != 1:
        return None
    placement = p.placements[0]
    if type(placement) is not Shard:  # Replicate, Partial, _StridedShard (FSDP2 + TP): gather
        return None
    if not is_dtensor(g) or tuple(g.placements) != tuple(p.placements):
        return None
    return ShardSpec(placement.dim % p.dim(), tuple(p.shape), p.device_mesh.get_group(0))
