"""small_fc_lopt references (learned_optimization's ``AdafacMLPLOpt``), written in Google's two formats.

- ``lo_params_gin``: ``params`` = ``checkpoints.save_state`` of ``ParameterCheckpoint(theta, gen_id, step)``
  plus ``config.gin`` = ``gin.config_str()`` after parsing ``run_train.lopt = @AdafacMLPLOpt()`` and the
  case's bindings; the reference is loaded back with ``opt_from_checkpoint``.
- ``lo_no_config``: ``<name>.checkpoint`` = ``checkpoints.save_state`` of ``(theta, '', 0)``; the converter
  gets the constructor arguments with ``--set``.
Theta is ``lopt.init`` perturbed (``x * (1 + 0.3 z1) + 0.1 z2``): the zero decay offsets become nonzero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .perturb import perturb_theta, perturbation_note

LO_REPO = "google/learned_optimization"
LO_COMMIT = "32186aa46a96f26ba0625755f93c55659adcd523"

#: case -> {"form": checkpoint format, "config": constructor arguments}.
CASES: dict[str, dict[str, Any]] = {
    # The "Practical tradeoffs" paper's small_fc_lopt: the class defaults (hidden_size=4, two layers).
    "small_fc_lopt_default": {"form": "lo_params_gin", "config": {}},
    # PyLO's / muLO's form: 39 -> 32 -> 32 -> 2, step_mult 0.01.
    "small_fc_lopt_pylo": {"form": "lo_params_gin", "config": {"hidden_size": 32, "step_mult": 0.01}},
    # The scalar-math path with separately stored scalar weights, as a no_config file (sizes inferred).
    # step_mult 0.1 keeps each update thousands of ulps of the parameter (the metric forgives one ulp).
    "small_fc_lopt_separate": {
        "form": "lo_no_config",
        "config": {
            "concat_weights": False,
            "make_separate_weights": True,
            "hidden_size": 3,
            "step_mult": 0.1,
        },
    },
    # PyLO's form with a 10x larger step: each update is thousands of float32 ulps of its parameter, so the
    # metric resolves errors below 1e-5 (with step_mult 0.01 the one-ulp allowance is ~5e-5 of an update).
    "small_fc_lopt_resolved": {"form": "lo_params_gin", "config": {"hidden_size": 32, "step_mult": 0.1}},
    # With a (512, 384) tensor where the factored moments dominate (record with --shapes large).
    "small_fc_lopt_large": {"form": "lo_params_gin", "config": {"hidden_size": 32, "step_mult": 0.01}},
}


def gin_value(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "(" + ", ".join(gin_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def write_config_gin(path: Path, class_name: str, config: dict[str, Any]) -> str:
    """``config.gin`` as ``outer_train.run_train`` writes it (``gin.config_str()``) + unrelated bindings."""
    import gin
    from learned_optimization import outer_train  # noqa: F401  (registers run_train)

    lines = [
        f"run_train.lopt = @{class_name}()",
        "run_train.num_steps = 10000",
        "run_train.num_estimators = 8",
    ]
    lines += [f"{class_name}.{k} = {gin_value(v)}" for k, v in sorted(config.items())]
    gin.clear_config()
    gin.parse_config(lines)
    text = gin.config_str()
    gin.clear_config()
    path.write_text(text)
    return text


class LOReference:
    """A learned_optimization optimizer (``opt_fn(theta)``) behind the recorder contract."""

    def __init__(
        self,
        architecture: str,
        opt: Any,
        source: str,
        source_format: str,
        convert_sets: dict[str, Any],
        provenance: dict[str, Any],
        model_state: Any = None,
    ) -> None:
        self.architecture = architecture
        self.opt = opt
        self.source = source
        self.source_format = source_format
        self.convert_sets = convert_sets
        self.provenance = provenance
        self.model_state = model_state

    def init(self, params: dict[str, np.ndarray], num_steps: int) -> Any:
        import jax.numpy as jnp

        p = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()}
        return self.opt.init(p, model_state=self.model_state, num_steps=num_steps)

    def update(self, state: Any, grads: dict[str, np.ndarray], loss: float) -> Any:
        import jax.numpy as jnp

        g = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in grads.items()}
        loss_j = jnp.asarray(loss, dtype=jnp.float32)
        if self.model_state is None:
            return self.opt.update(state, g, loss=loss_j)
        return self.opt.update(state, g, loss=loss_j, model_state=self.model_state)

    def params(self, state: Any) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.opt.get_params(state).items()}


def save_lo_checkpoint(
    lopt: Any, theta: Any, class_name: str, config: dict[str, Any], form: str, ckpt_dir: Path
) -> tuple[Any, str, str]:
    """Write theta in ``form`` with learned_optimization's code and load it back the way users do.

    Returns (the reference optimizer loaded from the file, source file name, how it was made).
    """
    import jax
    from learned_optimization import checkpoints
    from learned_optimization.outer_trainers import gradient_learner

    if form == "lo_params_gin":
        path = ckpt_dir / "params"
        checkpoints.save_state(str(path), gradient_learner.ParameterCheckpoint(theta, "parity", 0))
        write_config_gin(ckpt_dir / "config.gin", class_name, config)
        from learned_optimization.learned_optimizers import opt_from_checkpoint

        opt = opt_from_checkpoint.opt_from_checkpoint(str(path))
        for k, v in config.items():
            # AdafacMLPLOpt / MLPLOpt keep their arguments as ``_name``, RNNMLPLOpt / NNAdam as ``name``.
            got = np.asarray(
                getattr(opt.lopt, f"_{k}") if hasattr(opt.lopt, f"_{k}") else getattr(opt.lopt, k)
            )
            # (RNNMLPLOpt keeps its decays as a float32 jnp array: compare in the stored dtype)
            if np.any(got != np.asarray(v, dtype=got.dtype if got.dtype.kind == "f" else None)):
                raise RuntimeError(f"opt_from_checkpoint did not apply {class_name}.{k} = {v!r}")
        how = (
            "checkpoints.save_state('params', gradient_learner.ParameterCheckpoint(theta, 'parity', 0)); "
            f"config.gin = gin.config_str() after parsing run_train.lopt = @{class_name}() + its bindings + "
            "unrelated run_train bindings; reference loaded with opt_from_checkpoint('params')"
        )
        return opt, "params", how
    if form == "lo_no_config":
        path = ckpt_dir / f"{class_name}.checkpoint"
        checkpoints.save_state(str(path), (theta, "", 0))
        loaded, _, _ = checkpoints.load_state(str(path), (lopt.init(jax.random.PRNGKey(0)), "", 0))
        how = (
            f"checkpoints.save_state('{path.name}', (theta, '', 0)); loaded as "
            "pretrained_optimizers._pretrained_lopt_load_baseline does "
            "(load_state into (lopt.init(key), '', 0))"
        )
        return lopt.opt_fn(loaded), path.name, how
    raise ValueError(f"unknown checkpoint form {form!r}")


def lo_reference(
    architecture: str, cls: Any, options: dict[str, Any], ckpt_dir: Path, seed: int
) -> LOReference:
    """Perturbed ``cls(**config)`` theta (a learned_optimization class), written in the case's format and
    loaded back from it."""
    import jax

    config = dict(options["config"])
    form = options["form"]
    lopt = cls(**config)
    name = cls.__name__
    theta = perturb_theta(lopt.init(jax.random.PRNGKey(seed)), seed)
    loaded, source, how = save_lo_checkpoint(lopt, theta, name, config, form, Path(ckpt_dir))
    prov = {
        "repo": LO_REPO,
        "commit": LO_COMMIT,
        "class": f"{cls.__module__}.{name}",
        "config": config,
        "theta": perturbation_note(f"{name}(**config).init(jax.random.PRNGKey({seed}))", seed),
        "checkpoint": how,
    }
    sets = dict(config) if form == "lo_no_config" else {}
    return LOReference(architecture, loaded, source, form, sets, prov)


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> LOReference:
    """Perturbed ``AdafacMLPLOpt(**config)`` theta, written in the case's format and loaded back from it."""
    from learned_optimization.learned_optimizers import adafac_mlp_lopt

    return lo_reference("small_fc_lopt", adafac_mlp_lopt.AdafacMLPLOpt, options, ckpt_dir, seed)
