"""NNAdam references (learned_optimization ``learned_optimizers/nn_adam.py``), written as ``params`` +
``config.gin`` with the reference's own code and loaded back with ``opt_from_checkpoint``.

celo's copy (``celo/optimizers/nn_adam.py``) is the same code (see notes); recorders/celo_copies.py records
it in its theta.state format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adafac import LOReference, lo_reference

#: case -> {"form": checkpoint format, "config": NNAdam constructor arguments}.
CASES: dict[str, dict[str, Any]] = {
    # Every argument away from its default: decay_strength > 0 pulls the hparams back to theta's; a larger
    # initial learning rate (theta's per_layer_lr) and output scale so the hparams move. --init small.
    "nn_adam_lo": {
        "form": "lo_params_gin",
        "config": {
            "output_scale": 0.05,
            "initial_learning_rate": 3e-3,
            "initial_beta1": 0.8,
            "initial_beta2": 0.99,
            "initial_epsilon": 1e-6,
            "decay_strength": 0.1,
            "lstm_hidden_size": 16,
        },
    },
}


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``NNAdam(**config)`` theta, written in the case's format and loaded back from it."""
    from learned_optimization.learned_optimizers import nn_adam

    return lo_reference("nn_adam", nn_adam.NNAdam, options, ckpt_dir, seed)
