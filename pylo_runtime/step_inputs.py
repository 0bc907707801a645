"""What a step reads besides the gradients: the training loss, and the guard against non-finite numbers.

The loss (docs/integrations.md): ``set_loss(optimizer, loss)`` records one loss; the next ``step()`` uses the
mean of the losses recorded since the previous step, so a framework that calls ``step()`` with no argument
(Accelerate's ``AcceleratedOptimizer``, ``GradScaler.step``, Lightning, the HF Trainer) still feeds VeLO and
Celo the loss, averaged over gradient-accumulation micro-batches like the gradients are. ``step(loss=...)``
and ``step(closure)`` keep working. Under torch.distributed the loss is averaged over the ranks inside the
step (one all-reduce of one scalar), so every replica feeds its learned optimizer the same number.

The guard (``nonfinite=``): one fused reduction over all gradients per step (the 2-norm of each tensor,
stacked, one host sync) decides whether the step runs; "skip" leaves parameters and state untouched.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: ``nonfinite=`` choices: skip the step (default), raise, or let the numbers through as the reference does.
NONFINITE_MODES = ("skip", "raise", "propagate")
#: ``loss_reduction=`` choices: the mean over the ranks of torch.distributed's default group, or as given.
LOSS_REDUCTIONS = ("mean", "none")


class NonFiniteError(FloatingPointError):
    """A step saw a NaN or Inf loss or gradient with ``nonfinite="raise"``; nothing was changed."""


@dataclass
class StepInputs:
    """Per-optimizer mutable record (one object, shared by wrappers that copy the optimizer's ``__dict__``,
    as Lightning's ``LightningOptimizer`` does): the losses recorded since the last step, and flags."""

    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    warned_nonfinite: bool = False
    #: Set by a wrapper (ShardedOptimizer) that has already reduced the loss and checked every gradient.
    checked_outside: bool = False

    def record(self, loss: Any) -> None:
        """Add one loss (a float, or a tensor with one element; detached, float32, no host sync)."""
        device = self.loss_sum.device if self.loss_sum is not None else None
        value = as_loss_tensor(loss, device)
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.loss_count += 1

    def take(self) -> torch.Tensor | None:
        """The mean of the recorded losses (None if none was recorded), and forget them."""
        total, count = self.loss_sum, self.loss_count
        self.loss_sum, self.loss_count = None, 0
        if total is None:
            return None
        return total if count == 1 else total / count


def as_loss_tensor(loss: Any, device: torch.device | None) -> torch.Tensor:
    """``loss`` as a detached float32 0-d tensor (on ``device``, or where it already is)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(()).to(device=device or loss.device, dtype=torch.float32)
    try:
        value = float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"loss must be a number or a one-element tensor, got {type(loss).__name__}") from None
    return torch.tensor(value, dtype=torch.float32, device=device)


def find_learned_optimizer(optimizer: Any) -> Any:
    """The pylo_runtime optimizer inside ``optimizer`` or the wrappers around it (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, ``ShardedOptimizer``)."""
    from .base import LearnedOptimizer

    current = optimizer
    for _ in range(8):
        inner = getattr(current, "_optimizer", None)  # Lightning: the wrapper copies the optimizer's __dict__
        if isinstance(inner, LearnedOptimizer):
            return inner
        if isinstance(current, LearnedOptimizer):
            return current
        current = getattr(current, "optimizer", None)
        if current is None:
            break
    raise TypeError(
        f"set_loss: {type(optimizer).__name__} is not a pylo_runtime optimizer and does not wrap one "
        "(looked through .optimizer and ._optimizer)"
    )


def set_loss(optimizer: Any, loss: Any) -> None:
    """Record the training loss of one forward/backward pass for the next ``optimizer.step()``.

    ``optimizer`` may be a pylo_runtime optimizer or a wrapper around one (Accelerate, Lightning,
    ShardedOptimizer). Call it once per micro-batch with the loss as computed (not divided by the number of
    accumulation steps, not scaled by a GradScaler); the step uses the mean of the losses recorded since the
    previous step and, under torch.distributed, the mean over the ranks. Families that do not read the
    loss ignore it, so the same training loop works for all of them.
    """
    find_learned_optimizer(optimizer).set_loss(loss)


# ------------------------------------------------------------------------------------------------------------
def loss_world_size() -> int:
    """The size of torch.distributed's default group, or 1 when it is not initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def is_compiling() -> bool:
    """Whether torch.compile is tracing (the guard's data-dependent branch would break the graph)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def count_nonfinite_tensors(
    grads: Sequence[torch.Tensor], device: torch.device, *, exact: bool = False
) -> torch.Tensor:
    """How many of ``grads`` hold a NaN or Inf, as a float32 0-d tensor on ``device``, without a host sync.

    Fast (default): one ``_foreach_norm(grads, 2)`` per device (NaN and Inf propagate into the norm; on the
    CPU the inf-norm is ~50x slower). A finite gradient whose squares overflow float32 (|g| above ~1e19) also
    counts here, so a caller that sees a count confirms it with ``exact=True`` (``isfinite`` per tensor).
    Empty tensors (an empty FSDP2 shard) are left out.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if g.numel() > 0:
            by_device.setdefault(g.device, []).append(g)
    count = torch.zeros((), dtype=torch.float32, device=device)
    for gs in by_device.values():
        if exact:
            finite = torch.stack([torch.isfinite(g).all() for g in gs])
        else:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(gs, 2)))
        count = count + torch.logical_not(finite).sum().to(device=device, dtype=torch.float32)
    return count


def describe_nonfinite(
    names: Sequence[str], grads: Sequence[torch.Tensor], loss: torch.Tensor | None, limit: int = 3
) -> str:
    """What was non-finite, for the warning or error (only called on a bad step: it syncs per tensor)."""
    parts = []
    if loss is not None and not bool(torch.isfinite(loss)):
        parts.append(f"the loss is {float(loss)}")
    bad = []
    for name, g in zip(names, grads, strict=True):
        if g.numel() == 0:
            continue
        finite = torch.isfinite(g)
        if bool(finite.all()):
            continue
        n_nan = int(torch.isnan(g).sum())
        n_inf = int(g.numel() - int(finite.sum()) - n_nan)
        kinds = (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "")
        what = " and ".join(s for s in kinds if s)
        bad.append(f"the gradient of {name} (shape {tuple(g.shape)}) has {what} of {g.numel()} elements")
    parts += bad[:limit]
    if len(bad) > limit:
        parts.append(f"and {len(bad) - limit} more gradients")
    if not parts:
        parts.append("a gradient (shard) on another rank is non-finite")
    return "; ".join(parts)


def closure_loss_problem(closure: Any) -> str | None:
    """Why the value of ``closure`` is not the step's loss, or None.

    Lightning's automatic optimization steps with a closure (``functools.partial(Precision._wrap_closure,
    module, optimizer, closure)``) whose value is the LAST micro-batch's loss divided by
    ``accumulate_grad_batches``: with accumulation that is not the loss the gradients belong to.
    """
    if "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules:
        return None
    if not isinstance(closure, functools.partial) or not closure.args:
        return None
    trainer = getattr(closure.args[0], "_trainer", None)
    k = getattr(trainer, "accumulate_grad_batches", 1)
    if isinstance(k, int) and k > 1:
        return (
            f"Lightning accumulates {k} batches per step and its closure returns only the last one's "
            f"loss / {k}: "
            "call lopt_bridge.set_loss(self.optimizers(), loss) in training_step (docs/integrations.md)"
        )
    return None
