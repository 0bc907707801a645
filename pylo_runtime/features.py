"""Feature construction shared by the learned-optimizer families: small pure torch functions.

Each mirrors one helper of the JAX reference (learned_optimization's hyper_v2 / common, Celo) op for op,
so that float32 results agree to rounding. Reductions over a tensor go through its reducer
(``distributed.reducer``: plain torch ops for a whole tensor, all-reduced for an FSDP2 shard).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .distributed.reducer import TensorReducer

#: Time scales of the tanh "fraction of training" embedding (hyper_v2._fractional_tanh_embed).
TANH_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)


def fractional_tanh_embed(x: torch.Tensor) -> torch.Tensor:
    """``tanh((x - t) * 10)`` for each time scale ``t``: shape ``x.shape + (9,)``, float32."""
    t = torch.tensor(TANH_TIMESCALES, dtype=torch.float32, device=x.device)
    return torch.tanh((x.to(torch.float32).unsqueeze(-1) - t) * 10.0)


def clip_log_abs(v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``clip(log(1e-8 + |v * scale|), -5, 5) * 0.5`` (hyper_v2._clip_log_abs)."""
    mag = torch.log(1e-8 + torch.abs(v * scale))
    return torch.clamp(mag, -5.0, 5.0) * 0.5


def second_moment_normalizer(
    x: torch.Tensor, dims: Sequence[int], red: TensorReducer, eps: float = 1e-5
) -> torch.Tensor:
    """``x * rsqrt(eps + mean(x**2 over dims))``; ``dims`` must be non-empty (reshape 0-d inputs to (1,)).

    The mean is ``red``'s: over all shards of an FSDP2 parameter stepped rank-locally.
    """
    return x * torch.rsqrt(eps + red.mean(torch.square(x), tuple(dims), keepdim=True))


def second_moment_normalizers(
    xs: Sequence[torch.Tensor], dims: Sequence[int], red: TensorReducer, eps: float = 1e-5
) -> list[torch.Tensor]:
    """``second_moment_normalizer`` of each of ``xs``; an FSDP2 shard's means take one all-reduce for all."""
    dims = tuple(dims)
    if not red.is_shard:  # a whole tensor: exactly second_moment_normalizer, input by input
        return [second_moment_normalizer(x, dims, red, eps) for x in xs]
    means = red.means([torch.square(x) for x in xs], dims, keepdim=True)
    return [x * torch.rsqrt(eps + m) for x, m in zip(xs, means, strict=True)]


def safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``rsqrt(max(x, 1e-9))`` (common.safe_rsqrt)."""
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """The two largest axes ``(d1, d0)`` (d0 the largest) or None below rank 2.

    Uses the very same ``numpy.argsort`` call as the reference: on tied sizes numpy's default sort does not
    keep index order (its result can depend on the CPU's SIMD sort), so any other tie rule differs.
    """
    if len(shape) < 2:
        return None
    return _top2_argsort(tuple(int(s) for s in shape))


@torch.compiler.assume_constant_result  # numpy on static sizes: torch.compile uses the value, no graph break
def _top2_argsort(shape: tuple[int, ...]) -> tuple[int, int]:
    order = np.argsort(shape)
    return int(order[-2]), int(order[-1])


def rank_one_hot(shape: Sequence[int], num: int = 5, device: torch.device | None = None) -> torch.Tensor:
    """One-hot (length ``num``, float32) of the number of axes of size > 1; zeros if that is >= ``num``."""
    n_rank = sum(1 for s in shape if s > 1)
    out = torch.zeros(num, dtype=torch.float32, device=device)
    if n_rank < num:
        out[n_rank] = 1.0
    return out


#: Time scales (in steps) of the tanh step embedding of AdafacMLPLOpt / MLPLOpt (``tanh_embedding``).
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


def step_tanh_embedding(iteration: torch.Tensor) -> torch.Tensor:
    """``tanh(t / timescale - 1)`` for the 11 step time scales; ``iteration`` is an integer 0-d tensor."""
    ts = torch.tensor(STEP_TIMESCALES, dtype=torch.float32, device=iteration.device)
    return torch.tanh(iteration.to(torch.float32) / ts - 1.0)
