"""MLPLOpt references (learned_optimization ``learned_optimizers/mlp_lopt.py``), written as ``params`` +
``config.gin`` with the reference's own code and loaded back with ``opt_from_checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adafac import LOReference, lo_reference

#: case -> {"form": checkpoint format, "config": MLPLOpt constructor arguments}.
CASES: dict[str, dict[str, Any]] = {
    "mlp_lopt_default": {"form": "lo_params_gin", "config": {}},
    # A 100x larger step, as a no_config file: updates large enough in ulps that the metric resolves 1e-5.
    "mlp_lopt_resolved": {"form": "lo_no_config", "config": {"step_mult": 0.1}},
}


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``MLPLOpt(**config)`` theta, written in the case's format and loaded back from it."""
    from learned_optimization.learned_optimizers import mlp_lopt

    return lo_reference("mlp_lopt", mlp_lopt.MLPLOpt, options, ckpt_dir, seed)
