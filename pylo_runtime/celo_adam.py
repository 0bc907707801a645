"""Celo-Adam (``celo.optimizers.celo_adam.Celo``): Celo's learned LSTM scheduler driving an Adam step.

The step is ``lr_mult * step_mult * m_hat / (eps + sqrt(v_hat + 1e-10))`` on the LAST momentum / rms decay
slot, bias-corrected with the FIRST decays and the global iteration (as the reference does).

The reference also updates Adafactor accumulators (``fac_rolling``) it never reads: no output of its update
depends on them, and nothing else reads them either (its state is not a format we load or write). They are
not kept, on any path: keeping them would cost 3 floats per row and column plus a pass over every gradient
for numbers no step uses, and a state_dict without them resumes bit for bit (tests/test_celo_runtime.py).

Paths (``pylo_runtime.dispatch`` picks one; each takes the same arguments, unclipped gradients):
``_single_tensor_celo_adam`` (the specification), ``_multi_tensor_celo_adam`` (``torch._foreach_*`` ops, any
device, FSDP2 shards), the fused CPU pass (``kernels.cpu.passes.celo_adam_step``: clip, accumulators and
step in one pass over each tensor; accumulators bit for bit, the step to 1 ulp of a sqrt) and the Triton
kernel
(``kernels.triton.celo_adam``). The scheduler runs once per step in torch on every path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import dispatch, specs
from .accumulators import momentum_update, rms_update
from .base import write_param
from .celo import _apply, _CeloScheduler
from .distributed.reducer import TensorReducer
from .kernels.cpu import passes

#: Constructor arguments of ``celo.optimizers.celo_adam.Celo`` as ``get_optimizer('celo_adam')`` sets them:
#: the family spec's.
CELO_ADAM_DEFAULTS = specs.celo_adam.DEFAULTS

#: Gradients are clipped to this magnitude before anything else (as in Celo).
GRAD_CLIP = 1000.0


@dataclass
class AdamStep:
    """What every tensor's step reads at one step (the numbers the fused kernels take)."""

    lr: torch.Tensor  # () lr_mult * step_mult
    corr: tuple[torch.Tensor, torch.Tensor] | None  # bias corrections 1 - b**t, or None (mom_decay=False)
    mom_d: torch.Tensor
    rms_d: torch.Tensor
    cfg: Mapping[str, Any]

    def numbers(self) -> tuple[float, float, float, float]:
        """``(c1, c2, lr, eps)`` as float32 values (1 for no correction: dividing by 1 is exact)."""
        c1, c2 = (1.0, 1.0) if self.corr is None else (float(self.corr[0]), float(self.corr[1]))
        return c1, c2, float(self.lr), float(torch.tensor(self.cfg["initial_epsilon"], dtype=torch.float32))


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
        t = (global_state["iteration"] + 1).to(torch.float32)
        corr = None
        if cfg["mom_decay"]:
            b1 = torch.tensor(cfg["initial_momentum_decays"][0], dtype=torch.float32, device=device)
            b2 = torch.tensor(cfg["initial_rms_decays"][0], dtype=torch.float32, device=device)
            corr = (1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t))
        step = AdamStep(
            lr_mult * cfg["step_mult"], corr, self.mom_decays.to(device), self.rms_decays.to(device), cfg
        )
        states = [self.state[p] for p in params]

        def impl(name: str) -> Any:
            return functools.partial(_implementation(name), step=step)

        samples = _kernel_samples(path, params)
        path = dispatch.verified(self, path, samples, impl, params, grads, lrs, states, reducers)
        impl(path)(params, grads, lrs, states, reducers)
        global_state["iteration"] = global_state["iteration"] + 1


def _implementation(path: str) -> Any:
    """The function that runs ``path``: ``(params, grads, lrs, states, reducers, *, step)``."""
    if path == "reference":
        return _single_tensor_celo_adam
    if path == "foreach":
        return _multi_tensor_celo_adam
    if path == "fused-cpu":
        return _fused_cpu_celo_adam
    if path == "fused-triton":
        return _triton_celo_adam
    raise ValueError(f"Celo-Adam has no implementation {path!r}")


def _kernel_samples(path: str, params: list[torch.Tensor]) -> dict[tuple, int]:
    """For ``dispatch.verified``: the smallest tensor of each kernel variant ``path`` would run."""
    if not path.startswith("fused"):
        return {}
    out: dict[tuple, int] = {}
    for i, p in enumerate(params):
        key = (p.dtype,) if path == "fused-triton" else ("c-pass",)
        if key not in out or p.numel() < params[out[key]].numel():
            out[key] = i
    return out


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
        step = step * param_scale(p, red)
    return step


def param_scale(p32: torch.Tensor, red: TensorReducer) -> torch.Tensor:
    """``sqrt(mean(p**2) + 1e-9)`` over the tensor (all shards of an FSDP2 one), with param_scale_mult."""
    return torch.sqrt(red.mean(torch.square(p32)) + 1e-9)


def _single_tensor_celo_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: AdamStep,
) -> None:
    """Reference path, one tensor at a time: clip, accumulators, then the full slot arrays corrected and
    divided and the last slot taken (``adam_step``)."""
    for p, g, st, red, group_lr in zip(params, grads, states, reducers, lrs, strict=True):
        g = torch.clamp(g, -GRAD_CLIP, GRAD_CLIP)
        st["mom"] = momentum_update(st["mom"], g, step.mom_d)
        st["rms"] = rms_update(st["rms"], g, step.rms_d)
        p32 = p.detach().to(torch.float32)
        u = adam_step(p32, st["mom"], st["rms"], step.lr, step.corr, step.cfg, red)  # a shard: all-reduced
        _apply(p, u, group_lr)


def _scaled(xs: list[torch.Tensor], d: torch.Tensor) -> list[torch.Tensor]:
    """``d * x`` for every x (``d``: decays on the last axis; one decay: a float32 scalar, the fast path)."""
    if d.numel() == 1:
        return torch._foreach_mul(xs, float(d.reshape(())))
    return torch._foreach_mul(xs, [d] * len(xs))


def _scale_(xs: list[torch.Tensor], d: torch.Tensor) -> None:
    """``x *= d`` in place for every x (as :func:`_scaled`)."""
    if d.numel() == 1:
        torch._foreach_mul_(xs, float(d.reshape(())))
    else:
        torch._foreach_mul_(xs, [d] * len(xs))


def _multi_tensor_celo_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: AdamStep,
) -> None:
    """The foreach path (any device, FSDP2 shards: the one reduction goes through each tensor's reducer):
    ``_single_tensor_celo_adam``'s ops, in its order, on all tensors at once with ``torch._foreach_*``;
    the accumulators are updated in place (the same float32 values, op for op)."""
    gs = torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -GRAD_CLIP), GRAD_CLIP)
    gu = [g.unsqueeze(-1) if g.dim() else g.reshape(1) for g in gs]  # (..., 1) against (..., slots)
    moms = [st["mom"] for st in states]
    rmss = [st["rms"] for st in states]
    # accumulators.momentum_update / rms_update: d * m + (1 - d) * g, d * v + (1 - d) * g**2
    mom_d, rms_d = step.mom_d, torch.clamp(step.rms_d, 0.0, 1.0)
    _scale_(moms, mom_d)
    torch._foreach_add_(moms, _scaled(gu, 1.0 - mom_d))
    _scale_(rmss, rms_d)
    torch._foreach_add_(rmss, _scaled(torch._foreach_mul(gu, gu), 1.0 - rms_d))
    # adam_step on the last slots: m_hat * (lr / (eps + sqrt(v_hat + 1e-10)))
    m = [x[..., -1] for x in moms]
    v = [x[..., -1] for x in rmss]
    if step.corr is not None:
        m = torch._foreach_div(m, float(step.corr[0]))
        v = torch._foreach_div(v, float(step.corr[1]))
    den = torch._foreach_sqrt(torch._foreach_add(v, 1e-10))
    torch._foreach_add_(den, step.cfg["initial_epsilon"])
    u = torch._foreach_mul(m, torch._foreach_div([step.lr] * len(den), den))
    if step.cfg["param_scale_mult"]:
        scales = [
            param_scale(p.detach().to(torch.float32), red) for p, red in zip(params, reducers, strict=True)
        ]
        torch._foreach_mul_(u, scales)
    if any(lr != 1.0 for lr in lrs):
        torch._foreach_mul_(u, lrs)  # _apply: p - lr * step (lr = 1: p - step, exactly)
    p32 = [p.detach().to(torch.float32) for p in params]
    p32 = [x.reshape(1) if x.dim() == 0 else x for x in p32]
    torch._foreach_sub_(p32, [x.reshape(y.shape) for x, y in zip(u, p32, strict=True)])
    for p, x in zip(params, p32, strict=True):
        if x.data_ptr() != p.data_ptr() or p.dtype != torch.float32:
            write_param(p, x.reshape(p.shape))


def _fused_cpu_celo_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: AdamStep,
) -> None:
    """The fused CPU path: one C pass per tensor (``passes.celo_adam_step``: clip, accumulators, step),
    28 bytes per float32 parameter moved; the param scale (param_scale_mult) in torch, as the reference."""
    c1, c2, lr, eps = step.numbers()
    for p, g, st, red, lr_g in zip(params, grads, states, reducers, lrs, strict=True):
        pf = p.detach().to(torch.float32)
        pf = pf if pf.is_contiguous() and pf.dim() else pf.reshape(-1).contiguous()
        for k in ("mom", "rms"):
            if not st[k].is_contiguous():
                st[k] = st[k].contiguous()
        scale = float(param_scale(pf, red)) if step.cfg["param_scale_mult"] else 1.0
        gc = g.to(torch.float32).contiguous()
        passes.celo_adam_step(pf, gc, st["mom"], st["rms"], step.mom_d, step.rms_d, c1, c2, lr, eps, scale,
                              float(lr_g))  # fmt: skip
        if not (p.dtype == torch.float32 and p.data_ptr() == pf.data_ptr() and p.is_contiguous()):
            write_param(p, pf.reshape(p.shape))


def _triton_celo_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: AdamStep,
) -> None:
    """The fused CUDA path: every tensor of a parameter dtype in one launch (``kernels.triton.celo_adam``,
    the math of ``_single_tensor_celo_adam``); the param scale (param_scale_mult) in torch."""
    from .kernels.triton import celo_adam as kernel

    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    for st in states:
        for k in ("mom", "rms"):
            if not st[k].is_contiguous():
                st[k] = st[k].contiguous()
    if step.cfg["param_scale_mult"]:
        scales = torch.stack(
            [param_scale(p.detach().to(torch.float32), red) for p, red in zip(params, reducers, strict=True)]
        )
    else:
        scales = torch.ones(len(params), **f32)
    per_tensor = torch.stack([scales.to(**f32), torch.tensor(lrs, **f32)], dim=1).contiguous()
    c1, c2 = (1.0, 1.0) if step.corr is None else (step.corr[0], step.corr[1])
    numbers = torch.stack(
        [torch.as_tensor(x, **f32).reshape(()) for x in (c1, c2, step.lr, step.cfg["initial_epsilon"])]
    )
    kernel.celo_adam_step(
        params, [g.to(torch.float32).contiguous() for g in grads], [st["mom"] for st in states],
        [st["rms"] for st in states], step.mom_d.to(**f32), torch.clamp(step.rms_d.to(**f32), 0.0, 1.0),
        numbers, per_tensor,
    )  # fmt: skip
