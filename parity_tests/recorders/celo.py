"""Celo and Celo-Adam references (``amoudgl/celo``): the published weights, or perturbed random ones.

Needs ``amoudgl/celo`` and ``google/learned_optimization`` on PYTHONPATH (celo imports the latter's base
classes). Do not load learned_optimization's own ``HyperV2`` / ``AdafacMLPLOpt`` in the same process: the
celo repo registers gin configurables of the same names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .perturb import perturb_theta, perturbation_note

#: The reference commits this recorder was written against (recorded in every fixture's provenance).
CELO_REPO = "amoudgl/celo"
CELO_COMMIT = "66d976116f39da286951f0c5e0a18eee8d1fd66b"
LO_REPO = "google/learned_optimization"
LO_COMMIT = "32186aa46a96f26ba0625755f93c55659adcd523"

#: ``weights``: "real" (``../shared/checkpoints/<arch>/theta.state``) or "random" (``lopt.init`` perturbed).
CASES: dict[str, dict[str, Any]] = {
    "celo_real": {"arch": "celo", "weights": "real"},
    "celo_adam_real": {"arch": "celo_adam", "weights": "real"},
    # Random weights take far smaller steps than the published ones: a larger step_mult (the converter gets
    # the same value with --set) makes each update tens of thousands of float32 ulps of the parameter, so
    # the parity metric's one-ulp allowance hides little, while the task's loss still falls by half.
    "celo_random": {"arch": "celo", "weights": "random", "overrides": {"step_mult": 0.3}},
    "celo_adam_random": {"arch": "celo_adam", "weights": "random", "overrides": {"step_mult": 0.5}},
    # Random weights with 3 interpolated MLP copies: exercises the (learned) control softmax. Its random
    # scheduler takes small steps (a few thousand ulps): larger step_mult values stop the loss falling.
    "celo_random_inits3": {
        "arch": "celo",
        "weights": "random",
        "overrides": {"param_inits": 3, "step_mult": 1.0},
    },
}


def shared_checkpoint(arch: str) -> Path:
    """``<repo>/../shared/checkpoints/<arch>/theta.state`` (the published weights; never copied in)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "checkpoints" / arch / "theta.state"


def make_lopt(arch: str, overrides: dict[str, Any] | None = None) -> Any:
    """The reference learned optimizer exactly as ``celo.factory.get_optimizer(arch)`` builds it."""
    if not overrides:
        from celo.factory import get_optimizer

        return get_optimizer(arch)
    # Same arguments as factory.py, plus overrides (only for the random-weight cases).
    if arch == "celo":
        from celo.optimizers import celo as celo_lopt

        kwargs: dict[str, Any] = dict(
            lstm_hidden_size=64,
            initial_momentum_decays=(0.9, 0.99, 0.999),
            initial_rms_decays=(0.999,),
            initial_adafactor_decays=(0.9, 0.99, 0.999),
            param_inits=1,
            train_phase=2,
            summarize_each_layer=False,
        )
        return celo_lopt.Celo(**{**kwargs, **overrides})
    from celo.optimizers import celo_adam

    kwargs = dict(
        lstm_hidden_size=64, initial_epsilon=1e-8, initial_momentum_decays=(0.9,), initial_rms_decays=(0.999,)
    )
    return celo_adam.Celo(**{**kwargs, **overrides})


class CeloReference:
    """The reference optimizer (``lopt.opt_fn(theta)``) behind the recorder contract."""

    source_format = "theta_state"

    def __init__(
        self, arch: str, lopt: Any, theta: Any, source: str, provenance: dict[str, Any], sets: dict[str, Any]
    ) -> None:
        self.architecture = arch
        self.lopt = lopt
        self.theta = theta
        self.opt = lopt.opt_fn(theta)
        self.source = source
        self.convert_sets = dict(sets)
        self.provenance = provenance

    def init(self, params: dict[str, np.ndarray], num_steps: int) -> Any:
        import jax.numpy as jnp

        p = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()}
        return self.opt.init(p, num_steps=num_steps)

    def update(self, state: Any, grads: dict[str, np.ndarray], loss: float) -> Any:
        import jax.numpy as jnp

        g = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in grads.items()}
        return self.opt.update(state, g, loss=jnp.asarray(loss, dtype=jnp.float32))

    def params(self, state: Any) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.opt.get_params(state).items()}


def load_reference(arch: str, *, weights: str, seed: int = 0, overrides: dict[str, Any] | None = None):
    """(lopt, theta, theta bytes or None, provenance) for ``weights`` "real" or "random"."""
    import jax
    from flax import serialization

    lopt = make_lopt(arch, overrides)
    template = lopt.init(jax.random.PRNGKey(seed))
    constructor = f"celo.factory.get_optimizer({arch!r})" + (f" with {overrides}" if overrides else "")
    prov: dict[str, Any] = {
        "repo": CELO_REPO,
        "commit": CELO_COMMIT,
        "learned_optimization": {"repo": LO_REPO, "commit": LO_COMMIT},
        "constructor": constructor,
    }
    if weights == "real":
        path = shared_checkpoint(arch)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the published {arch} weights are needed for this case")
        data = path.read_bytes()
        # celo.utils.load_state: flax from_bytes into lopt.init's tree, then its leaves in tree order.
        restored = serialization.from_bytes(template, data)
        theta = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(template), jax.tree_util.tree_leaves(restored)
        )
        prov["theta"] = {
            "kind": "published weights (celo.utils.load_state)",
            "file": f"../shared/checkpoints/{arch}/theta.state",
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        return lopt, theta, None, prov
    if weights == "random":
        theta = perturb_theta(template, seed)
        prov["theta"] = {
            "kind": "random",
            "how": perturbation_note(f"lopt.init(jax.random.PRNGKey({seed}))", seed)
            + "; written with flax.serialization.to_bytes",
        }
        return lopt, theta, serialization.to_bytes(theta), prov
    raise ValueError(f"weights must be 'real' or 'random', got {weights!r}")


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> CeloReference:
    """Build the case's reference; random weights go to ``ckpt_dir/random_theta.state``."""
    arch = options["arch"]
    lopt, theta, blob, prov = load_reference(
        arch, weights=options["weights"], seed=seed, overrides=options.get("overrides")
    )
    if blob is None:
        source = str(shared_checkpoint(arch))
    else:
        # Named apart from the published ``theta.state`` files, which never enter the repository.
        (Path(ckpt_dir) / "random_theta.state").write_bytes(blob)
        source = "random_theta.state"
    return CeloReference(arch, lopt, theta, source, prov, options.get("overrides") or {})


# ----------------------------------------------------------------------------------------------------------
# Closed loop on a real task: the digits classifier trained by the published weights (issue 6).
CLASSIFIER_FIXTURE = Path(__file__).resolve().parents[1] / "closed_loop" / "celo_digits.json"


def _jax_forward(model: str):
    import jax
    import jax.numpy as jnp

    def mlp(p, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    def cnn(p, x):
        dn = ("NCHW", "OIHW", "NCHW")
        h = jax.lax.conv_general_dilated(x, p["c1"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        h = jax.nn.relu(h + p["c1b"].reshape(1, -1, 1, 1))
        h = jax.lax.conv_general_dilated(h, p["c2"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
        h = jax.nn.relu(h + p["c2b"].reshape(1, -1, 1, 1))
        return h.reshape(x.shape[0], -1) @ p["fc"] + p["fcb"]

    fwd = {"mlp": mlp, "cnn": cnn}[model]

    def loss_fn(p, x, y):
        logp = jax.nn.log_softmax(fwd(p, x), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss_fn))


def run_classifier_reference(
    arch: str, model: str, *, steps: int = 100, batch_size: int = 64, seed: int = 0
) -> list[float]:
    """Training losses of ``model`` on the digits with the published ``arch`` weights, in JAX (float32)."""
    import jax.numpy as jnp

    from lopt_bridge.parity_tests.digits import MODELS, batch_indices, load_digits_split

    lopt, theta, _, _ = load_reference(arch, weights="real")
    opt = lopt.opt_fn(theta)
    data = load_digits_split(seed)
    idx = batch_indices(seed, steps, batch_size, len(data.y_train))
    params = {k: jnp.asarray(v) for k, v in MODELS[model][1](seed).items()}
    state = opt.init(params, num_steps=steps)
    value_and_grad = _jax_forward(model)
    losses = []
    for t in range(steps):
        x, y = jnp.asarray(data.x_train[idx[t]]), jnp.asarray(data.y_train[idx[t]])
        loss, grads = value_and_grad(opt.get_params(state), x, y)
        state = opt.update(state, grads, loss=loss)
        losses.append(float(np.float32(loss)))
    return losses


def record_classifier(
    out: Path = CLASSIFIER_FIXTURE, *, steps: int = 100, batch_size: int = 64, seed: int = 0
):
    """Write the JAX loss curves (celo / celo_adam x mlp / cnn) with provenance as a small JSON fixture."""
    import json

    from lopt_bridge.parity_tests.record import harness_commit, package_versions

    curves = {
        f"{arch}/{model}": run_classifier_reference(
            arch, model, steps=steps, batch_size=batch_size, seed=seed
        )
        for arch in ("celo", "celo_adam")
        for model in ("mlp", "cnn")
    }
    doc = {
        "task": "sklearn digits 8x8 (lopt_bridge.parity_tests.digits): seeded split, init, batches; float32",
        "steps": steps,
        "num_steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "curves": curves,
        "provenance": {
            "reference": {
                "repo": CELO_REPO,
                "commit": CELO_COMMIT,
                "learned_optimization": {"repo": LO_REPO, "commit": LO_COMMIT},
                "weights": {
                    a: {
                        "file": f"../shared/checkpoints/{a}/theta.state",
                        "sha256": hashlib.sha256(shared_checkpoint(a).read_bytes()).hexdigest(),
                    }
                    for a in ("celo", "celo_adam")
                },  # fmt: skip
                "how": "celo.factory.get_optimizer + celo.utils.load_state; jax.value_and_grad of the same "
                "model; opt.update(state, grads, loss=loss) each step (parity_tests/recorders/celo.py)",
            },
            "packages": package_versions(),
            "harness_commit": harness_commit(),
            "command": "python -m lopt_bridge.parity_tests.recorders.celo classifier",
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lopt_bridge.converter.files import atomic_write_bytes

    atomic_write_bytes(out, json.dumps(doc, indent=1).encode())
    return out


# python -m lopt_bridge.parity_tests.recorders.celo classifier [OUT]
if __name__ == "__main__":  # pragma: no cover
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "classifier":
        raise SystemExit("usage: python -m lopt_bridge.parity_tests.recorders.celo classifier [OUT.json]")
    print(record_classifier(Path(sys.argv[2]) if len(sys.argv) > 2 else CLASSIFIER_FIXTURE))
