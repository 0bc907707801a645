"""MLPLOpt references (learned_optimization ``learned_optimizers/mlp_lopt.py``), written as ``params`` +
``config.gin`` with the reference's own code and loaded back with ``opt_from_checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adafac import LO_COMMIT, LO_REPO, LOReference, save_lo_checkpoint
from .perturb import perturb_theta

#: case -> {"form": checkpoint format, "config": MLPLOpt constructor arguments}.
CASES: dict[str, dict[str, Any]] = {
    "mlp_lopt_default": {"form": "lo_params_gin", "config": {}},
    # A 100x larger step, as a no_config file: updates large enough in ulps that the metric resolves 1e-5.
    "mlp_lopt_resolved": {"form": "lo_no_config", "config": {"step_mult": 0.1}},
}


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``MLPLOpt(**config)`` theta, written in the case's format and loaded back from it."""
    import jax
    from learned_optimization.learned_optimizers import mlp_lopt

    config = dict(options["config"])
    form = options["form"]
    lopt = mlp_lopt.MLPLOpt(**config)
    theta = perturb_theta(lopt.init(jax.random.PRNGKey(seed)), seed)
    loaded, source, how = save_lo_checkpoint(lopt, theta, "MLPLOpt", config, form, Path(ckpt_dir))
    prov = {
        "repo": LO_REPO,
        "commit": LO_COMMIT,
        "class": "learned_optimization.learned_optimizers.mlp_lopt.MLPLOpt",
        "config": config,
        "theta": f"MLPLOpt(**config).init(jax.random.PRNGKey({seed})), every leaf x -> "
        f"x * (1 + 0.3 z1) + 0.1 z2 with z ~ N(0, 1) from numpy default_rng([{seed}, 1234])",
        "checkpoint": how,
    }
    sets = dict(config) if form == "lo_no_config" else {}
    return LOReference("mlp_lopt", loaded, source, form, sets, prov)
