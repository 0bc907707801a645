"""NNAdam: Adam whose per-tensor hyper-parameters a learned LSTM moves every step, in PyTorch.

Reproduces learned_optimization's ``learned_optimizers/nn_adam.py`` at 32186aa4 (and amoudgl/celo's
identical copy) exactly: gradients clipped to +-1000; per tensor the PREVIOUS step's scaled hparams mapped
to ``lr``, ``beta1``, ``beta2``, ``epsilon``; momentum and second moment with those betas; the step
``(lr * (1 + eps)) * 1.0 / (eps + sqrt(rms + 1e-10)) * m``; then 19 features per tensor (parameter before
the step, clipped gradient, new moments, previous scaled hparams) through one haiku LSTM step, whose
``rnn_to_controls`` output times ``output_scale`` moves the scaled hparams, optionally pulled back to theta's
(``decay_strength``), then clamped by a round trip through their transforms, computed as the reference
computes it (``0.1 * log(1 - (1 - exp(clip(10 h, -10, 0))))`` for a beta, not simplified). The loss is not
read. Per-parameter state: ``mom``, ``rms``, ``lstm_hidden``, ``lstm_cell`` and ``hparams`` (the scaled
``[lr, beta1, beta2, epsilon]``, float32).

Shape follows ``torch/optim/adam.py``: ``_single_tensor_nn_adam`` is the reference path (one tensor at a
time), ``_multi_tensor_nn_adam`` the foreach path (tensors flattened into one vector, per-tensor statistics
by segment sums); both run the LSTM once on all tensors' rows.
"""

from __future__ import annotations

from typing import Any

import torch

from . import specs
from .base import LearnedOptimizer, write_param
from .distributed.reducer import TensorReducer
from .features import clip_log_abs
from .lstm import lstm_step

#: Every constructor argument of ``NNAdam`` with its default: the family spec's.
DEFAULTS = specs.nn_adam.DEFAULTS
#: Gradients are clipped to this magnitude first (nn_adam update).
GRAD_CLIP = 1000.0
#: Cap on the elements one batch of the foreach path flattens together (bounds its temporary memory).
FOREACH_MAX_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------------
# The hparam transforms (nn_adam._scaled_lr, _scaled_epsilon, _scaled_one_minus_log), float32 op for op.
def lr_inverse(h: torch.Tensor) -> torch.Tensor:
    """``clip(exp(10 h), 1e-8, 1e3)``: the learning rate of the scaled hparam ``h``."""
    return torch.clamp(torch.exp(10.0 * h), 1e-8, 1e3)


def epsilon_inverse(h: torch.Tensor) -> torch.Tensor:
    """``clip(exp(10 h), 1e-11, 1e4)``: epsilon of the scaled hparam ``h``."""
    return torch.clamp(torch.exp(10.0 * h), 1e-11, 1e4)


def beta_inverse(h: torch.Tensor) -> torch.Tensor:
    """``1 - exp(clip(10 h, -10, 0))``: a beta of the scaled hparam ``h``."""
    return 1.0 - torch.exp(torch.clamp(10.0 * h, -10.0, 0.0))


def log_forward(x: torch.Tensor) -> torch.Tensor:
    """``0.1 * log(x)``: the scaled form of a learning rate or epsilon."""
    return 0.1 * torch.log(x)


def beta_forward(x: torch.Tensor) -> torch.Tensor:
    """``0.1 * log(1 - x)``: the scaled form of a beta."""
    return 0.1 * torch.log(1.0 - x)


def round_trip(h: torch.Tensor) -> torch.Tensor:
    """``forward(inverse(h))`` of each column of ``h`` (..., 4) = scaled ``[lr, beta1, beta2, epsilon]``:
    the reference's clamp of the new hparams (``tree_inverse_forward``)."""
    lr, b1, b2, eps = h.unbind(-1)
    return torch.stack(
        [
            log_forward(lr_inverse(lr)),
            beta_forward(beta_inverse(b1)),
            beta_forward(beta_inverse(b2)),
            log_forward(epsilon_inverse(eps)),
        ],
        dim=-1,
    )


def next_hparams(
    prev: torch.Tensor, deltas: torch.Tensor, initial: torch.Tensor, decay_strength: float
) -> torch.Tensor:
    """The new scaled hparams (T, 4): ``prev + deltas``, pulled towards theta's ``initial`` (4,) by
    ``decay_strength`` (``new - (new - initial) * decay_strength``) when it is > 0, then clamped."""
    new = prev + deltas
    if decay_strength > 0:
        new = new - (new - initial) * decay_strength
    return round_trip(new)


# ----------------------------------------------------------------------------------------------------
# One tensor (nn_adam: compute_step_for_tensor and _Opt.lstm_features_for_tensor).
def adam_step(m: torch.Tensor, rms: torch.Tensor, lr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``(lr * (1 + eps)) * 1.0 / (eps + sqrt(rms + 1e-10)) * m``, left to right (``p_new = p - step``)."""
    return (lr * (1.0 + eps)) * 1.0 / (eps + torch.sqrt(rms + 1e-10)) * m


def lstm_features_for_tensor(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    rms: torch.Tensor,
    hparams: torch.Tensor,
    rank: int,
    red: TensorReducer,
) -> torch.Tensor:
    """The 19 LSTM inputs of one tensor (sorted by the reference's keys); ``p`` before the step, ``g``
    clipped, ``m`` / ``rms`` updated, ``hparams`` the previous scaled ``[lr, beta1, beta2, epsilon]``,
    ``rank`` the tensor's number of axes (``red``: means over all shards of an FSDP2 shard)."""
    stats = {}
    for name, x in (("m", m), ("rms", rms), ("p", p), ("g", g)):
        mean = red.mean(x)
        stats[name] = (mean, red.mean(torch.square(x - mean)))
    mean_gabs = red.mean(torch.abs(g))
    one = torch.ones((), dtype=torch.float32, device=p.device)
    h = torch.clamp(hparams, -5.0, 5.0) * 0.2
    parts = [
        h[1],  # beta1
        h[2],  # beta2
        h[3],  # epsilon
        one if rank == 1 else -one,  # is_bias
        one if rank == 0 else -one,  # is_scalar
        h[0],  # lr
        clip_log_abs(stats["g"][0]),  # mean_g_mag
        torch.sign(stats["g"][0]),  # mean_g_sign
        clip_log_abs(mean_gabs),  # mean_gabs_mag
        clip_log_abs(stats["m"][0]),  # mean_m_mag
        torch.sign(stats["m"][0]),  # mean_m_sign
        clip_log_abs(stats["p"][0]),  # mean_p_mag
        torch.sign(stats["p"][0]),  # mean_p_sign
        clip_log_abs(stats["rms"][0]),  # mean_rms
        torch.sign(stats["rms"][0]),  # mean_sign
        clip_log_abs(stats["g"][1]),  # var_g
        clip_log_abs(stats["m"][1]),  # var_m
        clip_log_abs(stats["p"][1]),  # var_p
        clip_log_abs(stats["rms"][1]),  # var_rms
    ]
    return torch.stack([x.reshape(()) for x in parts])


def _single_tensor_nn_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
) -> list[torch.Tensor]:
    """Reference path: each tensor's moments, step and LSTM row, one tensor at a time; returns the rows.

    A path FSDP2 shards take: ``reducers[i]`` reduces over all the shards of ``params[i]``."""
    rows = []
    for p, g, lr_group, s, red in zip(params, grads, lrs, states, reducers, strict=True):
        pf = p.detach().to(torch.float32)
        hp = s["hparams"]
        lr, b1, b2, eps = lr_inverse(hp[0]), beta_inverse(hp[1]), beta_inverse(hp[2]), epsilon_inverse(hp[3])
        m = b1 * s["mom"] + (1.0 - b1) * g
        rms = b2 * s["rms"] + (1.0 - b2) * (g * g)
        step = adam_step(m, rms, lr, eps)
        rows.append(lstm_features_for_tensor(pf, g, m, rms, hp, len(red.global_shape(p.shape)), red))
        s["mom"], s["rms"] = m, rms
        write_param(p, pf - step if lr_group == 1.0 else pf - lr_group * step)
    return rows


def _batches(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of params in order, grouped by device, each group at most ``FOREACH_MAX_ELEMENTS`` elements
    (a larger tensor alone)."""
    out: list[list[int]] = []
    size = 0
    for i, p in enumerate(params):
        n = p.numel()
        if out and out[-1] and params[out[-1][0]].device == p.device and size + n <= FOREACH_MAX_ELEMENTS:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size = n
    return out


def _multi_tensor_nn_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
) -> list[torch.Tensor]:
    """Foreach path (torch ops, any device): ``_single_tensor_nn_adam`` on batches of tensors flattened
    into one vector, per-element hparams by segment, per-tensor means by ``torch.segment_reduce`` (whole
    tensors only: ``dispatch`` keeps FSDP2 shards on the reference). Returns the LSTM rows in order."""
    rows: list[torch.Tensor] = []
    for idx in _batches(params):
        dev = params[idx[0]].device
        counts = torch.tensor([params[i].numel() for i in idx], device=dev)
        seg = torch.repeat_interleave(torch.arange(len(idx), device=dev), counts)
        hp = torch.stack([states[i]["hparams"] for i in idx])  # (k, 4)
        lr, b1, b2, eps = (
            lr_inverse(hp[:, 0]),
            beta_inverse(hp[:, 1]),
            beta_inverse(hp[:, 2]),
            epsilon_inverse(hp[:, 3]),
        )
        pf = torch.cat([params[i].detach().to(torch.float32).reshape(-1) for i in idx])
        g = torch.cat([grads[i].reshape(-1) for i in idx])
        b1e, b2e = b1[seg], b2[seg]
        m = b1e * torch.cat([states[i]["mom"].reshape(-1) for i in idx]) + (1.0 - b1e) * g
        rms = b2e * torch.cat([states[i]["rms"].reshape(-1) for i in idx]) + (1.0 - b2e) * (g * g)
        step = adam_step(m, rms, lr[seg], eps[seg])
        cnt = counts.to(torch.float32).unsqueeze(1)
        x = torch.stack([m, rms, pf, g], dim=1)
        means = torch.segment_reduce(x, "sum", lengths=counts, axis=0) / cnt  # (k, 4)
        var = torch.segment_reduce(torch.square(x - means[seg]), "sum", lengths=counts, axis=0) / cnt
        gabs = torch.segment_reduce(torch.abs(g), "sum", lengths=counts, axis=0) / cnt[:, 0]
        h = torch.clamp(hp, -5.0, 5.0) * 0.2
        rank = torch.tensor([params[i].dim() for i in idx], device=dev)
        one = torch.ones(len(idx), dtype=torch.float32, device=dev)
        (mm, mr, mp, mg), (vm, vr, vp, vg) = means.unbind(1), var.unbind(1)
        cla = clip_log_abs
        cols = [h[:, 1], h[:, 2], h[:, 3], torch.where(rank == 1, one, -one)]  # beta1, beta2, eps, is_bias
        cols += [torch.where(rank == 0, one, -one), h[:, 0]]  # is_scalar, lr
        cols += [cla(mg), torch.sign(mg), cla(gabs), cla(mm), torch.sign(mm), cla(mp), torch.sign(mp)]
        cols += [cla(mr), torch.sign(mr), cla(vg), cla(vm), cla(vp), cla(vr)]
        rows.append(torch.stack(cols, dim=1))
        group_lr = [lrs[i] for i in idx]
        if any(lr_i != 1.0 for lr_i in group_lr):
            step = step * torch.tensor(group_lr, dtype=torch.float32, device=dev)[seg]
        sizes = counts.tolist()
        for i, new_p, new_m, new_r in zip(
            idx, torch.split(pf - step, sizes), torch.split(m, sizes), torch.split(rms, sizes), strict=True
        ):
            shape = params[i].shape
            states[i]["mom"] = new_m.reshape(shape).clone()
            states[i]["rms"] = new_r.reshape(shape).clone()
            write_param(params[i], new_p.reshape(shape))
    return [r for batch in rows for r in batch.unbind(0)]


# ----------------------------------------------------------------------------------------------------
class NNAdam(LearnedOptimizer):
    """NNAdam as a torch optimizer: ``NNAdam.from_checkpoint(path, params, num_steps=N)``.

    The loss is not read (the reference ignores it); ``num_steps`` is required by the reference's init and
    unused. ``lr`` multiplies the step. Parameters whose ``.grad`` is None are skipped: not updated, their
    state (hparams and LSTM state included) untouched; the LSTM runs per tensor, so the others' steps do
    not depend on them.
    """

    architecture = "nn_adam"
    shard_local = True
    SPEC = specs.nn_adam

    def _init_global(self, device: torch.device) -> dict[str, Any]:
        return {"iteration": torch.zeros((), dtype=torch.int32, device=device)}

    def _initial_hparams(self, device: torch.device) -> torch.Tensor:
        """Theta's scaled ``[lr, beta1, beta2, epsilon]`` (the init value and the decay target)."""
        names = specs.nn_adam.HPARAMS
        return torch.stack([self.theta[f"per_layer_{n}"].reshape(()) for n in names]).to(device)

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        f32 = dict(dtype=torch.float32, device=p.device)
        state["mom"] = torch.zeros(p.shape, **f32)
        state["rms"] = torch.zeros(p.shape, **f32)
        state["lstm_hidden"] = self.theta["lstm_init.hidden"][0].to(**f32).clone()
        state["lstm_cell"] = self.theta["lstm_init.cell"][0].to(**f32).clone()
        state["hparams"] = self._initial_hparams(p.device).clone()

    def _update(self, params, grads, lrs, loss, global_state, *, path, reducers, across) -> None:
        device = params[0].device
        theta = self._theta_on(device)
        grads = [torch.clamp(g, -GRAD_CLIP, GRAD_CLIP) for g in grads]
        states = [self.state[p] for p in params]
        prev = torch.stack([s["hparams"] for s in states])
        fn = _multi_tensor_nn_adam if path == "foreach" else _single_tensor_nn_adam
        rows = fn(params, grads, lrs, states, reducers)
        hidden = torch.stack([s["lstm_hidden"] for s in states])
        cell = torch.stack([s["lstm_cell"] for s in states])
        h, c = lstm_step(torch.stack(rows), hidden, cell, theta["rnn.lstm.w"], theta["rnn.lstm.b"])
        deltas = (h @ theta["rnn.to_controls.w"] + theta["rnn.to_controls.b"]) * self.config["output_scale"]
        new = next_hparams(prev, deltas, self._initial_hparams(device), self.config["decay_strength"])
        for i, s in enumerate(states):
            s["lstm_hidden"], s["lstm_cell"], s["hparams"] = h[i], c[i], new[i]
        global_state["iteration"] = global_state["iteration"] + 1
