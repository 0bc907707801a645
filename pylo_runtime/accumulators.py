"""Gradient and loss accumulators shared by the learned-optimizer families: small pure torch functions.

Like optax's ``scale_by_adam``, each accumulator is an ``init`` and an ``update`` over plain tensors;
they mirror learned_optimization's ``common.py`` (vmapped over several decays, kept on the LAST axis)
and hyper_v2's ``BufferLossAccumulators``. Everything is float32.
"""

from __future__ import annotations

import math

import torch

from .distributed.reducer import TensorReducer
from .features import safe_rsqrt


# ----------------------------------------------------------------------------------------------------
# Momentum / second moment over several decays (common.vec_rolling_mom / vec_rolling_rms).
def momentum_update(m: torch.Tensor, g: torch.Tensor, decays: torch.Tensor) -> torch.Tensor:
    """``decay * m + (1 - decay) * g`` per decay; ``m`` is ``g.shape + (n,)``, ``decays`` is ``(n,)``."""
    return decays * m + (1.0 - decays) * g.unsqueeze(-1)


def rms_update(v: torch.Tensor, g: torch.Tensor, decays: torch.Tensor) -> torch.Tensor:
    """``d * v + (1 - d) * g**2`` with ``d = clip(decay, 0, 1)``; ``v`` is ``g.shape + (n,)``."""
    d = torch.clamp(decays, 0.0, 1.0)
    return d * v + (1.0 - d) * (g * g).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------------
# Adafactor-style factored second moments (common.vec_factored_rolling).
def factored_state_shapes(
    shape: tuple[int, ...], fdims: tuple[int, int] | None, n: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(v_row, v_col, v_full)`` for ``shape``; unused slots are ``(0, n)`` as in the reference."""
    if fdims is None:
        return (0, n), (0, n), (*shape, n)
    d1, d0 = fdims
    v_row = tuple(s for i, s in enumerate(shape) if i != d0)
    v_col = tuple(s for i, s in enumerate(shape) if i != d1)
    return (*v_row, n), (*v_col, n), (0, n)


def row_col_factors(
    v_row: torch.Tensor, v_col: torch.Tensor, fdims: tuple[int, int], red: TensorReducer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Adafactor row and column factors of the factored second moments ``v_row`` / ``v_col``:
    ``safe_rsqrt(v_row / (mean of v_row over its remaining axis + 1e-9))`` and ``safe_rsqrt(v_col)``."""
    d1, d0 = fdims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_col_mean = red.mean(v_row, reduced_d1, keepdim=True, dropped=d0)
    return safe_rsqrt(v_row / (row_col_mean + 1e-9)), safe_rsqrt(v_col)


def factored_rolling(
    v_row: torch.Tensor,
    v_col: torch.Tensor,
    mean_d0: torch.Tensor,
    mean_d1: torch.Tensor,
    decays: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rolling row / column second moments: ``d * v + (1 - d) * m`` with ``d = clip(decay, 0, 1)`` and
    ``m`` this step's ``mean(g**2 + eps)`` over axis d0 (rows) / d1 (columns), decays on the last axis."""
    d = torch.clamp(decays, 0.0, 1.0)
    mixing = 1.0 - d
    return d * v_row + mixing * mean_d0.unsqueeze(-1), d * v_col + mixing * mean_d1.unsqueeze(-1)


def factored_update(
    v_row: torch.Tensor,
    v_col: torch.Tensor,
    v_full: torch.Tensor,
    g: torch.Tensor,
    decays: torch.Tensor,
    fdims: tuple[int, int] | None,
    red: TensorReducer,
    epsilon: float = 1e-30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the factored accumulator; returns ``(v_row, v_col, v_full, g_preconditioned)``.

    ``fdims = (d1, d0)`` from ``features.factored_dims`` (d0 the largest axis): ``v_row`` averages g**2
    over d0, ``v_col`` over d1 (:func:`factored_rolling`), and ``g`` is scaled by :func:`row_col_factors`.
    Without ``fdims`` a full diagonal ``v_full`` is kept and the output is ``g * safe_rsqrt(v + 1e-9)``.
    The decay axis is last everywhere. The means are ``red``'s (all-reduced when the axis is the sharded one
    of an FSDP2 shard stepped rank-locally; ``fdims`` must then come from ``red.global_shape``).
    """
    grad_sqr = g * g + epsilon
    if fdims is not None:
        d1, d0 = fdims
        mean_d0, mean_d1 = red.mean(grad_sqr, d0), red.mean(grad_sqr, d1)
        new_row, new_col = factored_rolling(v_row, v_col, mean_d0, mean_d1, decays)
        row_factor, col_factor = row_col_factors(new_row, new_col, fdims, red)
        y = g.unsqueeze(-1) * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
        return new_row, new_col, v_full, y
    d = torch.clamp(decays, 0.0, 1.0)
    new_v = d * v_full + (1.0 - d) * grad_sqr.unsqueeze(-1)
    y = g.unsqueeze(-1) * safe_rsqrt(new_v + 1e-9)
    return v_row, v_col, new_v, y


# ----------------------------------------------------------------------------------------------------
# Rolling loss statistics (hyper_v2.BufferLossAccumulators).
def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32, as XLA's CPU backend computes it (it contracts mul+add to FMA).

    The float32 product is exact in float64, so one float64 add and the final rounding emulate the FMA
    (double rounding differs only on exact float32 ties). Used where the reference's rounding is amplified:
    the loss features divide by differences of these running means.
    """
    return (a.double() * b.double() + c.double()).to(torch.float32)


def loss_buffer_init(
    num_steps: int, device: torch.device | None = None, n: int = 10
) -> dict[str, torch.Tensor]:
    """Means and running minima of the loss over ``n`` half-lives log-spaced from 10 to ``num_steps`` steps.

    The decays follow ``jnp.logspace(1, log10(num_steps), n)`` in float32, op for op.
    """
    f32 = torch.float32
    start = torch.tensor(1.0, dtype=f32)
    stop = torch.log(torch.tensor(float(num_steps), dtype=f32)) / torch.tensor(math.log(10.0), dtype=f32)
    div = n - 1
    step = torch.arange(div, dtype=f32) / torch.tensor(float(div), dtype=f32)
    lin = torch.cat([start * (1.0 - step) + stop * step, stop.reshape(1)])
    halflife = torch.pow(torch.tensor(10.0, dtype=f32), lin)
    decays = torch.exp(-1.0 / halflife)
    return {
        "means": torch.zeros(n, dtype=f32, device=device),
        "iteration": torch.zeros((), dtype=torch.int32, device=device),
        "running_min": 999999999999.0 * torch.ones(n, dtype=f32, device=device),
        "decays": decays.to(device),
    }


def loss_buffer_update(state: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fold in one loss (clipped to twice the largest bias-corrected mean) and update the running minima."""
    decays = state["decays"]
    it = state["iteration"]
    t1 = (it + 1).to(torch.float32)
    cor_mean = state["means"] / (1.0 - torch.pow(decays, t1))
    approx_max = torch.where(it == 0, loss, torch.max(cor_mean))
    loss = torch.minimum(torch.abs(approx_max) * 2.0, loss)
    means = fma_f32(state["means"], decays, loss * (1.0 - decays))
    cor_mean = means / (1.0 - torch.pow(decays, t1))
    running_min = torch.minimum(state["running_min"], cor_mean)
    return {"means": means, "iteration": it + 1, "running_min": running_min, "decays": decays}


def loss_buffer_features(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """``n - 1`` features in [-1, 1]: where each corrected mean sits between the minimum and a longer mean."""
    decays = state["decays"]
    it = state["iteration"]
    cor_mean = state["means"] / (1.0 - torch.pow(decays, it.to(torch.float32)))
    approx_max = cor_mean[1:]
    cor_mean = cor_mean[:-1]
    running_min = state["running_min"][:-1]
    den = torch.clamp(approx_max - running_min, min=1e-8)
    feature = torch.clamp((cor_mean - running_min) / den - 1.0, -1.0, 1.0)
    return torch.where(it <= 2, feature * 0.0, feature)
