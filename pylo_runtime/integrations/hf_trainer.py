"""``attach(trainer)``: a pylo_runtime optimizer inside a Hugging Face ``transformers.Trainer``, no subclass.

The Trainer computes the loss inside ``Trainer.training_step`` and then calls ``optimizer.step()`` with no
argument (through Accelerate's wrapper, and its GradScaler under fp16). ``attach``:

- wraps ``trainer.training_step`` on this instance to collect what it returns for each micro-batch: the
  micro-batch's share of the update's loss (divided by the accumulation steps, or normalised by the tokens of
  the whole update for models that take ``num_items_in_batch``), so their sum over the update is the loss the
  gradients belong to, the same number the Trainer logs as ``loss``;
- hands that sum to the optimizer just before each optimizer step (``on_pre_optimizer_step``), dropping
  anything left from a step the GradScaler skipped;
- sets ``num_steps`` to the number of optimizer updates the Trainer will make (``TrainerState.max_steps``:
  ``args.max_steps``, or epochs x ceil(batches per epoch / gradient_accumulation_steps)), before the first
  step, with a warning if that changes the value the optimizer was built with.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..step_inputs import find_learned_optimizer


class _UpdateLoss:
    """The sum of the losses ``training_step`` returned since the last optimizer step (no host sync)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def add(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(()).to(torch.float32)
            self.total = value if self.total is None else self.total + value.to(self.total.device)

    def pop(self) -> torch.Tensor | None:
        total, self.total = self.total, None
        return total


def attach(trainer: Any) -> Any:
    """Make ``trainer`` (built with ``optimizers=(pylo_optimizer, scheduler)``) feed the optimizer its loss
    and ``num_steps``; returns the trainer. Calling it twice is harmless."""
    from transformers import TrainerCallback

    if getattr(trainer, "_pylo_runtime_attached", False):
        return trainer
    if trainer.optimizer is None:
        raise ValueError(
            "attach: this Trainer has no optimizer yet; build it with "
            "Trainer(..., optimizers=(pylo_optimizer, scheduler)) and call attach(trainer) before train()"
        )
    learned = find_learned_optimizer(trainer.optimizer)
    update_loss = _UpdateLoss()
    inner_step = trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        loss = inner_step(*args, **kwargs)
        update_loss.add(loss)
        return loss

    class _Feed(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _adopt_num_steps(learned, int(state.max_steps))

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            learned._inputs.take()  # whatever a GradScaler-skipped step left behind
            total = update_loss.pop()
            if total is not None:
                learned.set_loss(total)

    schedule = str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type))
    if trainer.lr_scheduler is None and schedule != "constant":
        warnings.warn(
            f"attach: the Trainer will build a '{schedule}' schedule on lr, which here "
            "multiplies the learned step (1.0 = the meta-trained rule); pass lr_scheduler_type='constant' "
            "or optimizers=(opt, your_scheduler) unless you mean to scale it",
            UserWarning,
            stacklevel=2,
        )
    trainer.training_step = training_step
    trainer.add_callback(_Feed())
    trainer._pylo_runtime_attached = True
    return trainer


def _adopt_num_steps(learned: Any, max_steps: int) -> None:
    """Tell the optimizer the Trainer's number of updates (it can change only before the first step)."""
    if max_steps <= 0 or learned.num_steps == max_steps:
        return
    name = type(learned).__name__
    if "global" in learned.state:
        warnings.warn(
            f"{name} has already stepped with num_steps={learned.num_steps}, but the Trainer will make "
            f"{max_steps} updates; the state keeps the old length",
            UserWarning,
            stacklevel=2,
        )
        return
    warnings.warn(
        f"{name}: num_steps {learned.num_steps} -> {max_steps}, the number of optimizer updates this Trainer "
        "will make (args.max_steps, or epochs x updates per epoch)",
        UserWarning,
        stacklevel=2,
    )
    learned.set_num_steps(max_steps)
