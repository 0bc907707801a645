"""RNNMLPLOpt references (learned_optimization ``learned_optimizers/rnn_mlp_lopt.py``), written as ``params``
+ ``config.gin`` with the reference's own code and loaded back with ``opt_from_checkpoint``.

celo's copy (``celo/optimizers/rnn_mlp_lopt.py``) is recorded by recorders/celo_copies.py: it differs only in
the validation-loss path (see notes), which training updates never take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adafac import LOReference, lo_reference

#: case -> {"form": checkpoint format, "config": RNNMLPLOpt constructor arguments}.
CASES: dict[str, dict[str, Any]] = {
    # Every size and rate away from its default (so the converter must read them from config.gin), a larger
    # step so each update is thousands of float32 ulps. Record with --init small.
    "rnn_mlp_lopt_lo": {
        "form": "lo_params_gin",
        "config": {
            "step_multiplier": 0.01,
            "magnitude_rate": 0.5,
            "hidden_size": 12,
            "hidden_layer": 3,
            "from_mlp_size": 5,
            "from_lstm_size": 6,
            "lstm_to_ff": 7,
            "lstm_hidden_size": 24,
            # Five values: init hard-codes 37 MLP inputs (3 + 4 * 5 + 14), so any other count fails.
            "decays": (0.6, 0.9, 0.95, 0.99, 0.9995),
        },
    },
}


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``RNNMLPLOpt(**config)`` theta, written in the case's format and loaded back from it."""
    from learned_optimization.learned_optimizers import rnn_mlp_lopt

    return lo_reference("rnn_mlp_lopt", rnn_mlp_lopt.RNNMLPLOpt, options, ckpt_dir, seed)
