"""Reducers: how one step reduces over a tensor's elements and over tensors, passed explicitly (no globals).

A learned optimizer reads whole-tensor statistics (means over a tensor, row / column second moments, factored
dims chosen from the full shape, the tensor's size) and a few statistics over tensors (VeLO's mix-layer max,
muLO's global gradient norm). ``LearnedOptimizer.step`` gives the family one :class:`TensorReducer` per
tensor and one :class:`TensorsReducer` for the step, and every reduction goes through them:

- :data:`WHOLE`: the tensor is whole on this process: plain torch ops;
- :class:`ShardReducer`: an FSDP2 shard stepped rank-locally: local sums, one ``all_reduce(SUM)`` over the
  shard group, divided by the global count; ``global_shape`` / ``numel`` give the unsharded size;
- :data:`ALL_TENSORS`: this process steps every tensor: reductions over tensors are the identity;
- :class:`GroupTensors`: each rank steps some tensors (``ShardedOptimizer``): all-reduced over its group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ShardSpec:
    """How one rank-local tensor is split: along ``dim`` of the global ``shape``, over ``group``."""

    dim: int
    shape: tuple[int, ...]
    group: Any


class TensorReducer:
    """Reductions over the elements of a tensor that is whole on this process (plain torch ops)."""

    is_shard = False

    def global_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The tensor's unsharded shape (``shape`` itself here)."""
        return tuple(shape)

    def numel(self, t: torch.Tensor) -> int:
        """The tensor's unsharded number of elements."""
        return t.numel()

    def mean(
        self,
        x: torch.Tensor,
        dim: int | tuple[int, ...] | None = None,
        keepdim: bool = False,
        *,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """``torch.mean(x, dim, keepdim)``; ``x``'s leading axes are the tensor's, less ``dropped`` (the
        tensor axis ``x`` lacks, e.g. a factored row statistic)."""
        return torch.mean(x) if dim is None else torch.mean(x, dim=dim, keepdim=keepdim)

    def means(
        self, xs: list[torch.Tensor], dim: tuple[int, ...], keepdim: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`mean` of each of ``xs`` over the same ``dim``."""
        return [self.mean(x, dim, keepdim) for x in xs]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.sum(x)`` over every element of the tensor."""
        return torch.sum(x)

    def column_sums(
        self, partial: torch.Tensor, shape: tuple[int, ...], dropped: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """Complete ``partial``, sums per column over the leading axes of an array of ``shape`` (leading axes:
        the tensor's, less ``dropped``; then a column axis): ``(sums, element count)``."""
        return partial, math.prod(shape[:-1])


#: The reducer of every tensor that is whole on this process.
WHOLE = TensorReducer()


class ShardReducer(TensorReducer):
    """Reductions over all the shards of an FSDP2 tensor stepped rank-locally (this rank holds one)."""

    is_shard = True

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec

    def global_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.spec.shape

    def numel(self, t: torch.Tensor) -> int:
        return math.prod(self.spec.shape)

    def _axis(self, dropped: int | None) -> int | None:
        """The sharded axis among ``x``'s leading axes (None: ``x`` lacks it, its values are whole)."""
        d = self.spec.dim
        if dropped is None:
            return d
        if dropped == d:
            return None
        return d - 1 if dropped < d else d

    def mean(self, x, dim=None, keepdim=False, *, dropped=None):  # noqa: D102 - as TensorReducer.mean
        axis = self._axis(dropped)
        dims = tuple(range(x.dim())) if dim is None else tuple(d % x.dim() for d in _as_tuple(dim))
        if axis is None or axis not in dims:  # the sharded axis is kept: the local mean is the mean
            return torch.mean(x) if dim is None else torch.mean(x, dim=dim, keepdim=keepdim)
        total = torch.sum(x, dim=dims, keepdim=keepdim)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.spec.group)
        count = math.prod(x.shape[d] for d in dims if d != axis) * self.spec.shape[self.spec.dim]
        return total / count

    def means(self, xs, dim, keepdim=False):  # noqa: D102 - one all-reduce for all of ``xs``
        spec = self.spec
        if not xs or spec.dim not in tuple(d % xs[0].dim() for d in dim):
            return [self.mean(x, dim, keepdim) for x in xs]
        sums = [torch.sum(x, dim=dim, keepdim=keepdim) for x in xs]
        flat = torch.cat([s.reshape(-1) for s in sums])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=spec.group)
        out = []
        for x, s, part in zip(xs, sums, torch.split(flat, [s.numel() for s in sums]), strict=True):
            count = (
                math.prod(x.shape[d % x.dim()] for d in dim if d % x.dim() != spec.dim) * spec.shape[spec.dim]
            )
            out.append(part.reshape(s.shape) / count)
        return out

    def sum(self, x):  # noqa: D102
        total = torch.sum(x)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.spec.group)
        return total

    def column_sums(self, partial, shape, dropped=None):  # noqa: D102
        axis = self._axis(dropped)
        if axis is None:
            return partial, math.prod(shape[:-1])
        torch.distributed.all_reduce(partial, op=torch.distributed.ReduceOp.SUM, group=self.spec.group)
        count = math.prod(s for i, s in enumerate(shape[:-1]) if i != axis) * self.spec.shape[self.spec.dim]
        return partial, count


class TensorsReducer:
    """Reductions over TENSORS (not elements) when this process steps every tensor: the identity."""

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Max over tensors (VeLO's mix layer)."""
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over tensors (muLO's global gradient norm)."""
        return x


#: This process steps every tensor of the step.
ALL_TENSORS = TensorsReducer()


class GroupTensors(TensorsReducer):
    """Each rank of ``group`` steps some of the tensors (``ShardedOptimizer``): all-reduced over the group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def max(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return out

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return out


def _as_tuple(dim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)
