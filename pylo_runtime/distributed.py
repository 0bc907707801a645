"""DTensor (FSDP2) parameters: step each rank's shard, reducing the whole-tensor statistics over its group.

A learned optimizer reads whole-tensor statistics (means over a tensor, row/column second moments, factored
dims chosen from the full shape, the tensor's rank and size), so a shard alone does not define its update.

Rank-local path (a 1-D mesh and one ``Shard(d)`` placement, gradient alike, family with ``shard_local``):
the family code runs on the local shard; ``LearnedOptimizer.step`` registers each shard here
(``register_shard``) and the family enters ``on_tensor(p)`` around each tensor's work. Inside it,
``tensor_mean`` / ``tensor_means`` / ``tensor_sum`` / ``column_sums`` reduce over the elements of the WHOLE
tensor (local sum, one ``all_reduce(SUM)`` over the shard group, divided by the global count) and
``global_shape`` / ``global_numel`` give the unsharded size. Outside a sharded step they are the plain torch
ops: one process computes exactly as before. Paths that cannot reduce over shards (the Triton kernels, the
vmapped / flattened batched paths) step aside while ``any_shard()``.

Gather fallback (any other placement: Replicate/Partial, a mesh of more than one dim, a family without
``shard_local``): ``gather_param`` all-gathers the parameter and its gradient, the family runs on the full
tensors on every rank, and ``scatter_back`` copies this rank's slice of the result into the local shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------------------
# Reductions over the ELEMENTS of one tensor, for the rank-local step of FSDP2 shards (see the module doc).
@dataclass(frozen=True)
class ShardSpec:
    """How one rank-local tensor is split: along ``dim`` of the global ``shape``, over ``group``."""

    dim: int
    shape: tuple[int, ...]
    group: Any


#: id(local shard) -> its ShardSpec, for the tensors of the step in progress (empty outside one).
_SHARDS: dict[int, ShardSpec] = {}
#: The spec of the tensor the family is working on (set by ``on_tensor``); None: a whole tensor.
_CURRENT: list[ShardSpec | None] = [None]


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


def register_shard(local: torch.Tensor, spec: ShardSpec) -> None:
    """Mark ``local`` (a DTensor's local shard) as a shard of ``spec`` until ``unregister_shard``."""
    _SHARDS[id(local)] = spec


def unregister_shard(local: torch.Tensor) -> None:
    _SHARDS.pop(id(local), None)
    _CURRENT[0] = None


class on_tensor:  # noqa: N801 - used like a function: ``with on_tensor(p):``
    """Context: the reductions below are over the elements of ``p`` (all its shards when it is one)."""

    __slots__ = ("spec", "prev")

    def __init__(self, p: torch.Tensor) -> None:
        self.spec = _SHARDS.get(id(p)) if _SHARDS else None

    def __enter__(self) -> None:
        self.prev = _CURRENT[0]
        _CURRENT[0] = self.spec

    def __exit__(self, *exc: Any) -> None:
        _CURRENT[0] = self.prev


def current_shard() -> ShardSpec | None:
    """The spec of the shard being stepped (inside ``on_tensor``), or None for a whole tensor."""
    return _CURRENT[0]


def global_shape(shape: Any) -> tuple[int, ...]:
    """The current tensor's unsharded shape (``shape`` itself outside a shard)."""
    spec = _CURRENT[0]
    return tuple(shape) if spec is None else spec.shape


def global_numel(t: torch.Tensor) -> int:
    """The current tensor's unsharded number of elements (``t.numel()`` outside a shard)."""
    spec = _CURRENT[0]
    return t.numel() if spec is None else math.prod(spec.shape)


def tensor_mean(
    x: torch.Tensor,
    dim: int | tuple[int, ...] | None = None,
    keepdim: bool = False,
    *,
    dropped: int | None = None,
) -> torch.Tensor:
    """``torch.mean(x, dim, keepdim)`` where ``x``'s leading axes are the current tensor's (``dropped``: the
    tensor axis ``x`` lacks, e.g. a factored row statistic); over a sharded axis: sum, all_reduce, divide."""
    spec = _CURRENT[0]
    if spec is None:
        return torch.mean(x) if dim is None else torch.mean(x, dim=dim, keepdim=keepdim)
    axis = _sharded_axis(spec, dropped)
    dims = tuple(range(x.dim())) if dim is None else tuple(d % x.dim() for d in _as_tuple(dim))
    if axis is None or axis not in dims:  # the sharded axis is kept: the local mean is the mean
        return torch.mean(x) if dim is None else torch.mean(x, dim=dim, keepdim=keepdim)
    total = torch.sum(x, dim=dims, keepdim=keepdim)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=spec.group)
    count = math.prod(x.shape[d] for d in dims if d != axis) * spec.shape[spec.dim]
    return total / count


def tensor_means(xs: list[torch.Tensor], dim: tuple[int, ...], keepdim: bool = False) -> list[torch.Tensor]:
    """``tensor_mean`` of each of ``xs`` (leading axes the current tensor's, reduced over the same ``dim``),
    with one all-reduce for all of them when the reduction crosses the sharded axis."""
    spec = _CURRENT[0]
    if spec is None or not xs or spec.dim not in tuple(d % xs[0].dim() for d in dim):
        return [tensor_mean(x, dim, keepdim) for x in xs]
    sums = [torch.sum(x, dim=dim, keepdim=keepdim) for x in xs]
    flat = torch.cat([s.reshape(-1) for s in sums])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=spec.group)
    out = []
    for x, s, part in zip(xs, sums, torch.split(flat, [s.numel() for s in sums]), strict=True):
        count = math.prod(x.shape[d % x.dim()] for d in dim if d % x.dim() != spec.dim) * spec.shape[spec.dim]
        out.append(part.reshape(s.shape) / count)
    return out


def column_sums(
    partial: torch.Tensor, shape: tuple[int, ...], dropped: int | None = None
) -> tuple[torch.Tensor, int]:
    """Complete ``partial``, sums per column over the leading axes of an array of ``shape`` (leading axes:
    the current tensor's, less ``dropped``; then a column axis): ``(sums, element count)`` over all shards."""
    spec = _CURRENT[0]
    axis = None if spec is None else _sharded_axis(spec, dropped)
    if axis is None:
        return partial, math.prod(shape[:-1])
    torch.distributed.all_reduce(partial, op=torch.distributed.ReduceOp.SUM, group=spec.group)
    count = math.prod(s for i, s in enumerate(shape[:-1]) if i != axis) * spec.shape[spec.dim]
    return partial, count


def any_shard() -> bool:
    """Whether the step in progress steps FSDP2 shards rank-locally (fast paths that cannot, step aside)."""
    return bool(_SHARDS)


def tensor_sum(x: torch.Tensor) -> torch.Tensor:
    """``torch.sum(x)`` over every element of the current tensor (all shards); compare ``tensors_sum``."""
    spec = _CURRENT[0]
    total = torch.sum(x)
    if spec is not None:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=spec.group)
    return total


def _sharded_axis(spec: ShardSpec, dropped: int | None) -> int | None:
    if dropped is None:
        return spec.dim
    if dropped == spec.dim:
        return None
    return spec.dim - 1 if dropped < spec.dim else spec.dim


def _as_tuple(dim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)
