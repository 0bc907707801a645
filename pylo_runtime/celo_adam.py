"""Celo-Adam (``celo.optimizers.celo_adam.Celo``): Celo's learned LSTM scheduler driving an Adam step.

The step is ``lr_mult * step_mult * m_hat / (eps + sqrt(v_hat + 1e-10))`` on the LAST momentum / rms decay
slot, bias-corrected with the FIRST decays and the global iteration (as the reference does). The reference
also updates adafactor accumulators it never reads; they cannot change the result, so they are not kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import specs
from .accumulators import momentum_update, rms_update
from .celo import _apply, _CeloScheduler
from .distributed.reducer import WHOLE, TensorReducer

#: Constructor arguments of ``celo.optimizers.celo_adam.Celo`` as ``get_optimizer('celo_adam')`` sets them:
#: the family spec's.
CELO_ADAM_DEFAULTS = specs.celo_adam.DEFAULTS


class CeloAdam(_CeloScheduler):
    """Celo-Adam: ``CeloAdam.from_checkpoint(path, params, num_steps=N)``; ``step`` needs the loss."""

    architecture = "celo_adam"
    SPEC = specs.celo_adam

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        self._init_moments(p, state)

    def _update(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        lrs: list[float],
        loss: torch.Tensor | None,
        global_state: dict[str, Any],
        *,
        path: str,
        reducers: list[TensorReducer],
        across: Any,
    ) -> None:
        assert loss is not None
        device = params[0].device
        cfg = self.config
        lr_mult, _ = self._schedule(loss, global_state, device)
        lr = lr_mult * cfg["step_mult"]
        t = (global_state["iteration"] + 1).to(torch.float32)
        if cfg["mom_decay"]:
            b1 = torch.tensor(cfg["initial_momentum_decays"][0], dtype=torch.float32, device=device)
            b2 = torch.tensor(cfg["initial_rms_decays"][0], dtype=torch.float32, device=device)
            corr = (1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t))
        else:
            corr = None
        mom_d, rms_d = self.mom_decays.to(device), self.rms_decays.to(device)
        grads = [torch.clamp(g, -1000.0, 1000.0) for g in grads]
        states = [self.state[p] for p in params]
        for g, st in zip(grads, states, strict=True):
            st["mom"] = momentum_update(st["mom"], g, mom_d)
            st["rms"] = rms_update(st["rms"], g, rms_d)
        fn = _multi_tensor_celo_adam if path == "foreach" else _single_tensor_celo_adam
        fn(params, states, reducers, lrs, lr, corr, cfg)
        global_state["iteration"] = global_state["iteration"] + 1


def adam_step(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    corr: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: Mapping[str, Any],
    red: TensorReducer,
) -> torch.Tensor:
    """The reference's ``_ff_mod``: ``m_hat * (lr / (eps + sqrt(v_hat + 1e-10)))``, last slot (float32)."""
    if corr is not None:
        m = m / corr[0]
        v = v / corr[1]
    step = m * (lr * 1.0 / (cfg["initial_epsilon"] + torch.sqrt(v + 1e-10)))
    step = step[..., -1]
    if cfg["param_scale_mult"]:
        step = step * torch.sqrt(red.mean(torch.square(p)) + 1e-9)
    return step


def _single_tensor_celo_adam(
    params: list[torch.Tensor],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    lrs: list[float],
    lr: torch.Tensor,
    corr: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: Mapping[str, Any],
) -> None:
    """Reference path: the full slot arrays are corrected and divided, then the last slot is taken."""
    for p, st, red, group_lr in zip(params, states, reducers, lrs, strict=True):
        p32 = p.detach().to(torch.float32)
        step = adam_step(p32, st["mom"], st["rms"], lr, corr, cfg, red)  # a shard: param_scale all-reduced
        _apply(p, step, group_lr)


def _multi_tensor_celo_adam(
    params: list[torch.Tensor],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    lrs: list[float],
    lr: torch.Tensor,
    corr: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: Mapping[str, Any],
) -> None:
    """Batched path: last slots of every tensor flattened into one vector, the Adam step computed once
    (not with ``param_scale_mult``: each tensor's step then reads its own mean; ``dispatch`` knows)."""
    m = torch.cat([st["mom"][..., -1].reshape(-1) for st in states])
    v = torch.cat([st["rms"][..., -1].reshape(-1) for st in states])
    steps = adam_step(params[0], m.unsqueeze(-1), v.unsqueeze(-1), lr, corr, cfg, WHOLE)  # element-wise only
    sizes = [p.numel() for p in params]
    for p, s, group_lr in zip(params, torch.split(steps, sizes), lrs, strict=True):
        _apply(p, s.reshape(p.shape), group_lr)
