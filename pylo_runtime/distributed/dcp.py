"""Optimizer state as ``torch.distributed.checkpoint`` (DCP) needs it, for every family, with no family code.

``LearnedOptimizer.state_dict()`` is what DCP's ``get_optimizer_state_dict`` reads. For DCP it must be keyed
by parameters only, and each FSDP2 parameter's per-element state must be a DTensor (so that a checkpoint
saved on one sharding loads on another). This module does the per-parameter part:

- :func:`state_axes`: how each state tensor of an FSDP2 shard follows the parameter's sharded dim, found by
  calling the family's own ``_init_param`` twice on the meta device (the shard's size on the sharded dim
  changed, everything else the same): a state axis that changes with it is sharded like the parameter
  (``mom``, ``rms``, ``fac_full``, one of ``fac_row`` / ``fac_col``, ``grad_accum``); a state tensor that does
  not change is the same on every rank (a factored statistic over the sharded dim, VeLO's per-tensor LSTM
  state) and is saved as a plain tensor, which DCP treats as replicated. New families need no code here.
- :func:`saved_state` wraps a shard's local state into DTensors; :func:`local_state` turns what was loaded
  (DTensors of any sharding, this rank's plain shard state as c91f35a saved it, or a whole tensor from one
  process) back into this rank's local state.
- :func:`initialising_state`: DCP creates the state of a fresh optimizer by stepping it with zero gradients
  and ``lr=0`` (``_init_optim_state``); a learned optimizer would advance its iteration, loss statistics and
  LSTM on that step (and VeLO / Celo would refuse it, having no loss), so ``step`` only creates the state
  then.

The optimizer-wide state (iteration, loss buffer, Celo's LSTM state, ``skipped_steps``, ...) is the base
class's part: it travels under the first trainable parameter's state (docs/distributed.md#checkpointing).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .fsdp import is_dtensor, local_slices, shard_spec
from .reducer import ShardReducer, ShardSpec, TensorReducer

#: ``init_param(p, state, red)``: a family's ``_init_param`` (plus the base class's accumulation buffer).
InitParam = Callable[[torch.Tensor, dict, TensorReducer], None]
#: The module of get_optimizer_state_dict / set_optimizer_state_dict.
_DSD = "torch.distributed.checkpoint.state_dict"


def called_from(function: str) -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict.<function>`` is among this call's callers (a few
    frames up: torch's optimizer hooks and ``torch.no_grad`` wrappers sit in between)."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return False
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == _DSD:
            return True
        frame = frame.f_back
    return False


def initialising_state() -> bool:
    """Whether DCP's ``_init_optim_state`` is the caller of this ``step``: it steps a fresh optimizer with
    zero gradients and ``lr=0`` only to make it create its state."""
    return called_from("_init_optim_state")


def rank_local_spec(p: torch.Tensor, shard_local: bool) -> ShardSpec | None:
    """The spec of DTensor ``p`` if the step runs on its local shard (its state has the shard's shape); None
    if it is all-gathered and stepped whole (its state is whole on every rank). Its gradient is taken to be
    placed like it (FSDP2 does that; ``LearnedOptimizer.step`` checks the gradient itself)."""
    return shard_spec(p, p) if shard_local else None


def state_axes(
    init_param: InitParam, p: torch.Tensor, spec: ShardSpec, cache: dict
) -> dict[str, tuple[int | None, tuple[int, ...]]]:
    """For each state tensor ``init_param`` makes for a shard of ``p``: ``(axis, whole shape)``, ``axis`` the
    one that follows ``p``'s sharded dim (None: the tensor is the same on every rank), ``whole shape`` its
    shape for the whole parameter. Found on the meta device (no memory, no collectives: the same answer on
    every rank), cached in ``cache`` per (global shape, sharded dim, dtype)."""
    key = (spec.shape, spec.dim, p.dtype)
    if key in cache:
        return cache[key]
    shape, d = spec.shape, spec.dim
    probes = []
    for size in (shape[d], shape[d] + 1):
        local = list(shape)
        local[d] = size
        st: dict[str, Any] = {}
        try:
            init_param(torch.empty(local, dtype=p.dtype, device="meta"), st, ShardReducer(spec))
        except Exception as exc:  # a family whose _init_param reads the values: say what is needed
            raise ValueError(
                f"cannot tell how the optimizer state of a {_shape(shape)} FSDP2 parameter is sharded: "
                f"its _init_param failed on the meta device ({type(exc).__name__}: {exc}); it must build "
                "the state from the parameter's shape, dtype and device"
            ) from exc
        probes.append({k: tuple(v.shape) for k, v in st.items() if isinstance(v, torch.Tensor)})
    whole, other = probes
    out: dict[str, tuple[int | None, tuple[int, ...]]] = {}
    for k, a in whole.items():
        b = other.get(k)
        same_rank = b is not None and len(a) == len(b)
        changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y] if same_rank else []
        if same_rank and not changed:
            out[k] = (None, a)
        elif len(changed) == 1 and a[changed[0]] == shape[d] and b[changed[0]] == shape[d] + 1:
            out[k] = (changed[0], a)
        else:
            raise ValueError(
                f"optimizer state {k!r} of a {_shape(shape)} FSDP2 parameter sharded on dim {d} is "
                f"neither sharded like it nor the same on every rank (shapes {list(a)} and {list(b or ())} "
                f"for shards of {shape[d]} and {shape[d] + 1}); it cannot be checkpointed as a DTensor"
            )
    cache[key] = out
    return out


def saved_state(
    p: torch.Tensor, state: Mapping[str, Any], axes: Mapping[str, tuple[int | None, tuple[int, ...]]]
) -> dict[str, Any]:
    """``state`` of rank-local FSDP2 shard ``p`` for a state dict: per-element tensors as DTensors sharded
    like ``p`` (global shape: the whole parameter's state), the others as they are (plain: replicated)."""
    from torch.distributed.tensor import DTensor, Shard

    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or is_dtensor(v):
            out[k] = v
            continue
        if k not in axes:
            raise ValueError(
                f"optimizer state {k!r} of an FSDP2 parameter was not made by the family's _init_param, so "
                "how it is sharded is unknown; create it in _init_param"
            )
        axis, whole = axes[k]
        if axis is None:
            _check(k, v, whole)
            out[k] = v
            continue
        local = _local_shape(p, axis, whole)
        _check(k, v, local)
        out[k] = DTensor.from_local(
            v, p.device_mesh, [Shard(axis)], run_check=False, shape=torch.Size(whole), stride=_strides(whole)
        )
    return out


def local_state(
    p: torch.Tensor,
    state: Mapping[str, Any],
    spec: ShardSpec | None,
    axes: Mapping[str, tuple[int | None, tuple[int, ...]]],
    name: str,
) -> dict[str, Any]:
    """Loaded ``state`` of parameter ``p`` as the step keeps it: this rank's local state for a rank-local
    FSDP2 shard (``spec``), else whole plain tensors. Accepts DTensors of any sharding, plain local shard
    state (c91f35a's per-rank files) and whole plain tensors (saved by one process)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        axis, whole = axes.get(k, (None, None)) if spec is not None else (None, None)
        if is_dtensor(v):
            if (
                axis is not None
                and v.device_mesh == p.device_mesh
                and len(v.placements) == 1
                and v.placements[0] == _shard(axis)
            ):
                out[k] = v.to_local()
                continue
            v = v.full_tensor()  # another sharding: every rank takes part (state dicts load on every rank)
        if axis is None:
            out[k] = v
            continue
        local = _local_shape(p, axis, whole)
        if tuple(v.shape) == local:  # this rank's shard (c91f35a's per-rank state dicts)
            out[k] = v
        elif tuple(v.shape) == tuple(whole):  # the whole tensor (one process): take this rank's part
            part = local_slices(p)[spec.dim]
            out[k] = v.narrow(axis, part.start, part.stop - part.start)
        else:
            raise ValueError(
                f"optimizer state {k!r} of parameter {name}: shape {list(v.shape)} is neither this rank's "
                f"shard {list(local)} nor the whole state {list(whole)}"
            )
    return out


def _local_shape(p: torch.Tensor, axis: int, whole: tuple[int, ...]) -> tuple[int, ...]:
    local = list(whole)
    local[axis] = p.to_local().shape[p.placements[0].dim % p.dim()]
    return tuple(local)


def _check(key: str, v: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(v.shape) != tuple(shape):
        raise ValueError(
            f"optimizer state {key!r} of an FSDP2 shard has shape {list(v.shape)}, expected {list(shape)}"
        )


def _shard(axis: int) -> Any:
    from torch.distributed.tensor import Shard

    return Shard(axis)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "0-d"


__all__ = ["called_from", "initialising_state", "local_state", "rank_local_spec", "saved_state", "state_axes"]
