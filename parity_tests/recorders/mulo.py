"""muLO references (bentherien/mu_learned_optimization ``src/mup_adafac_mlp_lopt.py``), saved as muLO does.

Needs ``google/learned_optimization`` and muLO's ``src/`` folder on PYTHONPATH. muLO's meta-training writes
theta with ``pickle.dump`` (``helpers.save_checkpoint``: ``global_step{N}.pickle``, a dict of jax arrays, no
config); its test-time code loads it with ``pickle.load`` into ``MuAdafacMLPLOpt(...).opt_fn``. The per-tensor
muP scales reach ``update`` as ``model_state['mup_lrs_to_use']`` (float32 scalars per tensor); the case
records them under ``options['param_group_options']`` as the ``mup_scale`` param-group option our MuLO takes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .adafac import LO_COMMIT, LO_REPO, LOReference
from .perturb import perturb_theta, perturbation_note

MULO_REPO = "bentherien/mu_learned_optimization"
MULO_COMMIT = "e160d5481c5445f30996f308009ab07ba3d339e7"


def mup_scales(shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Nontrivial per-tensor scales: ``1 / width_mult`` with ``width_mult = shape[0] / 4`` for rank >= 2."""
    return {n: float(np.float32(4.0 / s[0])) if len(s) >= 2 else 1.0 for n, s in shapes.items()}


def _case(config: dict[str, Any], shape_set: str = "default") -> dict[str, Any]:
    from ..tasks import shapes

    scales = mup_scales(shapes(shape_set))
    return {"config": config, "param_group_options": {n: {"mup_scale": s} for n, s in scales.items()}}


#: case -> {"config": MuAdafacMLPLOpt arguments, "param_group_options": tensor -> {"mup_scale": s}}.
CASES: dict[str, dict[str, Any]] = {
    # muLO's meta-training form (config_base.py: hidden_size 32, two layers); step_mult as PyLO's MuLO.
    "mulo_pylo": _case({"hidden_size": 32, "step_mult": 0.01}),
    # clip_grad=True: optax.clip_by_global_norm(1.0) before the accumulators; record with --seed 7, whose
    # gradients have global norm 3.9 at the start (seed 0: 0.7, never clipped).
    "mulo_clip": _case({"hidden_size": 32, "step_mult": 0.01, "clip_grad": True}),
}


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``MuAdafacMLPLOpt(**config)`` theta, pickled as muLO saves it and loaded back with pickle."""
    import jax
    import jax.numpy as jnp
    from mup_adafac_mlp_lopt import MuAdafacMLPLOpt

    config = dict(options["config"])
    lopt = MuAdafacMLPLOpt(**config)
    theta = perturb_theta(lopt.init(jax.random.PRNGKey(seed)), seed)
    path = Path(ckpt_dir) / "global_step1.pickle"
    with open(path, "wb") as f:  # helpers.save_checkpoint: pickle.dump(theta_opt_state.params, f)
        pickle.dump(theta, f)
    with open(path, "rb") as f:  # optimizers._default_lopt: meta_params = pickle.load(f)
        loaded = pickle.load(f)  # noqa: S301 - our own file, just written
    scales = {
        n: jnp.asarray(o["mup_scale"], dtype=jnp.float32) for n, o in options["param_group_options"].items()
    }
    prov = {
        "repo": MULO_REPO,
        "commit": MULO_COMMIT,
        "learned_optimization": {"repo": LO_REPO, "commit": LO_COMMIT},
        "class": "mup_adafac_mlp_lopt.MuAdafacMLPLOpt",
        "config": config,
        "theta": perturbation_note(f"MuAdafacMLPLOpt(**config).init(jax.random.PRNGKey({seed}))", seed),
        "checkpoint": "pickle.dump(theta, open('global_step1.pickle', 'wb')) as helpers.save_checkpoint "
        "does; "
        "reference loaded with pickle.load as optimizers._default_lopt does",
        "mup_scales": "model_state={'mup_lrs_to_use': {tensor: float32 scale}} at init and every update",
    }
    return LOReference(
        "mulo", lopt.opt_fn(loaded), path.name, "pickle", dict(config), prov, {"mup_lrs_to_use": scales}
    )
