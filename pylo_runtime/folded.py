"""The per-element MLP's first layer with the per-tensor feature normalisation folded into its weights: the
torch-ops pieces the foreach and fused-CPU paths of small_fc_lopt / muLO and VeLO share.

The reference normalises each feature column ``x`` over the tensor, ``x * rsqrt(1e-5 + mean(x**2))``
(``features.second_moment_normalizer``), then multiplies by the first-layer weights; these paths fold the
per-column scale into the weights instead (``diag(s) @ W``), and the Adafactor row / column features, which
are constant along one axis, enter the first layer once per row and once per column (``first_layer_shares``).
"""

from __future__ import annotations

import torch

from .distributed.reducer import TensorReducer

#: Elements per MLP chunk (activations of 2 x 32 floats each stay in a 1 MiB L2).
CHUNK = 8192


def rms_scale(sumsq: torch.Tensor, n: int) -> torch.Tensor:
    """``rsqrt(1e-5 + mean(x**2))`` per feature from sums of squares over ``n`` elements."""
    return torch.rsqrt(1e-5 + sumsq / n)


def shard_rms_scale(
    x: torch.Tensor, shape: tuple[int, ...], red: TensorReducer, dropped: int | None = None
) -> torch.Tensor:
    """``rms_scale`` of ``x`` (``shape``: leading axes the tensor's, less ``dropped``), over the whole tensor
    (``red``: all the shards of an FSDP2 tensor stepped rank-locally, one all-reduce per call)."""
    return rms_scale(*red.column_sums(sumsq(x), shape, dropped))


def sumsq(x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Sum of squares per column (last axis) over all other axes, in cache-sized row chunks.

    ``torch.sum`` (cascade summation) keeps about 1e-7 relative; ``linalg.vector_norm`` loses 1e-3 at 1M rows.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= chunk:
        return torch.sum(x * x, dim=0)
    acc = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for c0 in range(0, x.shape[0], chunk):
        xc = x[c0 : c0 + chunk]
        acc += torch.sum(xc * xc, dim=0)
    return acc


def first_layer_shares(v_row, v_col, w_row, w_col, bias, fdims, red) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layer's share of a factored tensor's row features ``[v_row, rsqrt(v_row + 1e-8)]`` and
    column features (each normalised over the tensor), bias in the row share: ``(per row, per column)``."""
    d1, d0 = fdims
    rowf = torch.cat([v_row, torch.rsqrt(v_row + 1e-8)], dim=-1)
    colf = torch.cat([v_col, torch.rsqrt(v_col + 1e-8)], dim=-1)
    a_row = rowf @ (shard_rms_scale(rowf, rowf.shape, red, d0).unsqueeze(1) * w_row) + bias
    a_col = colf @ (shard_rms_scale(colf, colf.shape, red, d1).unsqueeze(1) * w_col)
    return a_row, a_col
