"""The synthetic multi-tensor task both sides of the parity harness run, defined once (numpy, torch, jax).

Loss at step ``t`` (``sum`` over tensors, ``mean`` over each tensor's elements)::

    L_t(p) = s_t * sum_i mean( w_i * (p_i - c_i)**2 + A * sin(F * (p_i - c_i))**2 )      s_t = 1 / (1 + R t)

with per-tensor constants ``w_i`` in [0.25, 1) and targets ``c_i`` drawn from the seed. The ``sin**2`` term
makes it smooth and nonconvex (its curvature ``2 A F**2 cos(2 F x)`` reaches -1.8, more than ``2 w`` can
offset where ``w < 0.9``) and keeps the loss non-negative. The deterministic decay ``s_t`` makes the loss
fall by a factor ``1 + R t`` over the run whatever the optimizer does: random-weight learned optimizers
barely move the parameters, and VeLO's loss features divide by differences of running loss statistics, which
are only well conditioned in float32 when the loss falls meaningfully (see REFERENCE_NOTES.md).

Initial parameters: ``init="unit"`` (the default) is ``c_i + N(0, 1)``. ``init="small"`` is
``1e-3 * N(0, 1)``: the one-ulp allowance of the parity metric is ``ulp(p) / |u|`` relative to the update,
about ``1.2e-7 * |p| / |u|``, so parameters no larger than a few updates let it resolve errors far below
1e-5 for optimizers whose step does not scale with ``|p|`` (see compare.resolution).

Tensors in ``LARGE`` use the quadratic term only, so their gradient ``(2 s_t / n) * w * (p - c)`` is made of
correctly rounded float32 operations in a fixed order: it is reproducible bit for bit from the parameters,
which lets fixtures store those tensors sparsely (see record.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The default parameter set: ranks 0 to 4, a size-1 dimension, tied sizes (factored-dim tie breaking).
#: Names sort in the order listed, so "sorted by name" (flax / jax tree order) is this order.
SHAPES: dict[str, tuple[int, ...]] = {
    "a_scalar": (),
    "b_vec": (7,),
    "c_mat": (16, 9),
    "d_wide": (3, 40),
    "e_conv": (3, 3, 4, 8),
    "f_mat": (64, 32),
    "g_square": (8, 8),
    "h_tied": (4, 4, 3, 3),
    "i_col": (5, 1),
}
#: Extra tensor large enough that factored second moments are used (both dims >= 128).
LARGE: dict[str, tuple[int, ...]] = {"z_large": (512, 384)}
#: The default set without the tensors PyLO's ports are known to get wrong: the 0-d tensor (its VeLO
#: crashes, its AdafacLO normalises over the feature axis too) and the tied ones (its VeLO's own tie rule).
#: Used by the PyLO recordings in tests/data/pylo/ (same values as in the default set: draws are per name).
PYLO_SHAPES: dict[str, tuple[int, ...]] = {
    n: s for n, s in SHAPES.items() if n not in ("a_scalar", "g_square", "h_tied")
}
#: Named shape sets accepted by ``shapes()`` / ``record_case(shapes=...)``.
SHAPE_SETS: dict[str, dict[str, tuple[int, ...]]] = {
    "default": SHAPES,
    "large": {**SHAPES, **LARGE},
    "pylo": PYLO_SHAPES,
}

AMPLITUDE = 0.1  # A: weight of the nonconvex sin**2 term
FREQUENCY = 3.0  # F
DECAY_RATE = 0.05  # R: s_t = 1 / (1 + R t)
#: Initial-parameter variants (see the module docstring).
INITS = ("unit", "small")
SMALL_INIT_SCALE = 1e-3


def shapes(name: str = "default") -> dict[str, tuple[int, ...]]:
    """The shape set called ``name`` ("default" or "large"), as name -> shape in sorted-name order."""
    try:
        return dict(SHAPE_SETS[name])
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}; known: {', '.join(SHAPE_SETS)}") from None


def loss_scale(step: int) -> float:
    """``s_t``: the deterministic per-step scale that makes the loss fall whatever the optimizer does."""
    return 1.0 / (1.0 + DECAY_RATE * step)


def _rng(seed: int, name: str, what: str) -> np.random.Generator:
    """A generator per (seed, tensor, purpose): a tensor's draws do not depend on which set it is in."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(what.encode())])


@dataclass
class Task:
    """The synthetic task for one shape set and seed: initial parameters and the loss in three frameworks."""

    shape_set: str = "default"
    seed: int = 0
    init: str = "unit"
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    weights: dict[str, np.ndarray] = field(init=False, repr=False)
    targets: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")
        self.shapes = shapes(self.shape_set)
        self.weights, self.targets = {}, {}
        for name, shape in self.shapes.items():
            self.weights[name] = _rng(self.seed, name, "w").uniform(0.25, 1.0, shape).astype(np.float32)
            self.targets[name] = (0.5 * _rng(self.seed, name, "c").standard_normal(shape)).astype(np.float32)

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def quadratic_only(self, name: str) -> bool:
        """Whether tensor ``name`` has the quadratic term only (bit-reproducible gradient)."""
        return name in LARGE

    def init_params(self) -> dict[str, np.ndarray]:
        """Initial parameters (float32): targets plus unit noise ("unit") or 1e-3 noise ("small")."""
        out = {}
        for name, shape in self.shapes.items():
            z = _rng(self.seed, name, "p0").standard_normal(shape)
            p = SMALL_INIT_SCALE * z if self.init == "small" else self.targets[name] + z
            out[name] = np.asarray(p, dtype=np.float32)
        return out

    # ----------------------------------------------------------------------------------------------------
    def loss_and_grads(
        self, params: Mapping[str, np.ndarray], step: int
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and analytic gradients in numpy float32 (what the recorder feeds both optimizers)."""
        s = np.float32(loss_scale(step))
        total = np.float32(0.0)
        grads: dict[str, np.ndarray] = {}
        for name in self.names:
            p = np.asarray(params[name], dtype=np.float32)
            w, c = self.weights[name], self.targets[name]
            n = np.float32(max(p.size, 1))
            d = p - c
            if self.quadratic_only(name):
                term = w * d * d
                g = np.float32(2.0 * float(s) / float(n)) * (w * d)
            else:
                x = np.float32(FREQUENCY) * d
                sx = np.sin(x)
                term = w * d * d + np.float32(AMPLITUDE) * sx * sx
                dterm = np.float32(2.0) * w * d + np.float32(2.0 * AMPLITUDE * FREQUENCY) * sx * np.cos(x)
                g = (s / n) * dterm
            total = total + np.float32(np.mean(term, dtype=np.float32))
            grads[name] = np.asarray(g, dtype=np.float32).reshape(p.shape)
        return float(s * total), grads

    def grad_quadratic(self, name: str, p: np.ndarray, step: int) -> np.ndarray:
        """The bit-reproducible gradient of a quadratic-only tensor (same expression as loss_and_grads)."""
        if not self.quadratic_only(name):
            raise ValueError(f"tensor {name!r} is not quadratic-only")
        s = np.float32(loss_scale(step))
        n = np.float32(max(p.size, 1))
        d = np.asarray(p, dtype=np.float32) - self.targets[name]
        return (np.float32(2.0 * float(s) / float(n)) * (self.weights[name] * d)).astype(np.float32)

    def loss_torch(self, params: Mapping[str, Any], step: int) -> Any:
        """The same loss as a torch expression (float32) of tensors ``params``, for autograd."""
        import torch

        s = loss_scale(step)
        total = None
        for name in self.names:
            p = params[name].to(torch.float32)
            w = torch.as_tensor(self.weights[name], device=p.device)
            c = torch.as_tensor(self.targets[name], device=p.device)
            d = p - c
            term = w * d * d
            if not self.quadratic_only(name):
                term = term + AMPLITUDE * torch.sin(FREQUENCY * d) ** 2
            m = term.mean()
            total = m if total is None else total + m
        return s * total

    def loss_jax(self, params: Mapping[str, Any], step: int) -> Any:
        """The same loss in jax.numpy (float32), for ``jax.grad`` on the reference side."""
        import jax.numpy as jnp

        s = loss_scale(step)
        total = 0.0
        for name in self.names:
            p = jnp.asarray(params[name], jnp.float32)
            d = p - jnp.asarray(self.targets[name])
            term = jnp.asarray(self.weights[name]) * d * d
            if not self.quadratic_only(name):
                term = term + AMPLITUDE * jnp.sin(FREQUENCY * d) ** 2
            total = total + jnp.mean(term)
        return s * total
