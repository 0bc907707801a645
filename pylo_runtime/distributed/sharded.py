"""A sharded optimizer step, as ``ZeroRedundancyOptimizer`` does, for replicated (DDP) and FSDP2 params.

Each rank steps only the tensors it owns (balanced by size, so it holds only their state and does only their
share of the work), then every tensor is broadcast from its owner. An FSDP2 (DTensor) parameter is
all-gathered on every rank, stepped whole by its owner, broadcast, and each rank keeps its shard. The few
statistics a family takes over several tensors (VeLO's mix-layer max, muLO's global gradient norm) go
through the step's ``reducer.GroupTensors`` (all-reduced), so the result equals the unsharded step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..base import LearnedOptimizer
from . import fsdp
from .reducer import GroupTensors


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each tensor: largest first, each to the least-loaded rank (same on every rank)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += max(sizes[i], 1)
    return owners


class ShardedOptimizer:
    """Wraps a :class:`LearnedOptimizer` over replicated params; ``step`` updates this rank's tensors only.

    Example::

        model = DistributedDataParallel(model)
        opt = ShardedOptimizer(VeLO.from_checkpoint(path, model.parameters(), num_steps=N))
        loss.backward(); pylo_runtime.set_loss(opt, loss); opt.step()

    Every rank must call ``step`` with the same gradients (DDP does that); the loss is averaged over the ranks
    here (``loss_reduction`` of the wrapped optimizer), and ``nonfinite=`` is decided here over every tensor's
    gradient, so all ranks skip or step together. Optimizer state lives on the owning rank only:
    ``state_dict()`` is this rank's part.
    """

    def __init__(self, optimizer: LearnedOptimizer, process_group: Any = None) -> None:
        if not isinstance(optimizer, LearnedOptimizer):
            raise TypeError(
                f"ShardedOptimizer wraps a pylo_runtime optimizer, got {type(optimizer).__name__}"
            )
        if not dist.is_initialized():
            raise RuntimeError("ShardedOptimizer needs torch.distributed to be initialised")
        self.optimizer = optimizer
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Step the owned tensors (the others' grads are hidden meanwhile), then broadcast every tensor."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        opt = self.optimizer
        loss = opt._take_loss(loss, closure, closure_loss)
        live = [(p, g) for g in opt.param_groups for p in g["params"] if p.grad is not None and p.numel() > 0]
        if len(live) < self.world:  # too few tensors to give every rank one: step all of them everywhere
            opt.step(loss=loss)
            return closure_loss
        owners = assign_owners([p.numel() for p, _ in live], self.world)
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its grad) hidden from the base
        swapped: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]] = []  # as in the base
        targets: list[torch.Tensor] = []  # what each owner broadcasts: the param, or a DTensor's full copy
        all_grads: list[torch.Tensor] = []  # every tensor's whole gradient (the same on every rank)
        wd_loss = None
        try:
            for (p, group), owner in zip(live, owners, strict=True):
                value, g = p, p.grad
                if fsdp.is_dtensor(p):  # FSDP2: every rank joins the all-gather, the owner steps the copy
                    value, g = fsdp.gather_param(p, p.grad.detach())
                    if owner == self.rank:
                        value.grad = g
                        i = next(i for i, q in enumerate(group["params"]) if q is p)
                        swapped.append((p, value, group["params"], i))
                        opt.state[value] = opt.state[p]
                        group["params"][i] = value
                targets.append(value)
                all_grads.append(g)
                if owner == self.rank:
                    continue
                # The base adds wd * |p|^2 of the params it steps to the loss; add the others' here.
                if loss is not None and group["weight_decay"] != 0.0:
                    pf = value.detach().to(torch.float32)
                    term = group["weight_decay"] * torch.sum(pf * pf)
                    wd_loss = term if wd_loss is None else wd_loss + term
                hidden.append((p, p.grad))
                p.grad = None
            # The global loss and the nonfinite= decision over every tensor (the base sees only this rank's).
            loss, skip = opt._loss_and_guard(targets, all_grads, loss)
            if skip:
                return closure_loss
            if wd_loss is not None:
                loss = LearnedOptimizer._as_loss(loss, wd_loss.device) + wd_loss
            opt._inputs.checked_outside = True  # the loss and nonfinite= were decided here, over every tensor
            try:
                opt.step(loss=loss, across=GroupTensors(self.group))  # reductions over tensors: all ranks
            finally:
                opt._inputs.checked_outside = False
        finally:
            for p, g in hidden:
                p.grad = g
            for p, full, group_params, i in swapped:
                group_params[i] = p
                del opt.state[full]
                full.grad = None
        self._broadcast(targets, owners)
        for (p, _), value in zip(live, targets, strict=True):
            if value is not p:
                fsdp.scatter_back(p, value)
        return closure_loss

    def _broadcast(self, params: list[torch.Tensor], owners: list[int]) -> None:
        """One broadcast per (owner, dtype, device) of the owner's tensors, flattened."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p, owner in zip(params, owners, strict=True):
            buckets.setdefault((owner, p.dtype, p.device), []).append(p)
        for (owner, _, _), ps in buckets.items():
            flat = _flatten_dense_tensors([p.detach() for p in ps])
            dist.broadcast(
                flat, src=dist.get_global_rank(self.group, owner) if self.group else owner, group=self.group
            )
            if owner != self.rank:
                for p, v in zip(ps, _unflatten_dense_tensors(flat, ps), strict=True):
                    p.copy_(v)
