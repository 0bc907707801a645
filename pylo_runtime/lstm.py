"""haiku's ``hk.LSTM`` cell, the per-tensor scheduler every LSTM family (VeLO, RNNMLPLOpt, NNAdam) runs.

``hk.LSTM(H, name="rnn")`` keeps one linear ``rnn/linear`` with ``w (in + H, 4H)`` and ``b (4H,)``:
``gates = concat([x, h]) @ w + b`` split in the order i, g, f, o, with +1 on the forget gate at run time.
"""

from __future__ import annotations

import torch


def lstm_step(
    x: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on rows ``x`` (T, in) with state ``hidden`` / ``cell`` (T, H): the new ``(h, c)``; haiku
    returns ``h`` as the output too."""
    gated = torch.cat([x, hidden], dim=-1) @ w + b
    i, g, f, o = torch.chunk(gated, 4, dim=-1)
    f = torch.sigmoid(f + 1.0)
    c = f * cell + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c
