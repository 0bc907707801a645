"""RNNMLPLOpt's validation updates and dynamic gradient clip, recorded with both reference codes.

The parity fixtures (parity_tests/fixtures/rnn_mlp_lopt_*) only take training updates, and on the synthetic
task the dynamic clip never triggers. This records, for learned_optimization's ``RNNMLPLOpt`` (32186aa4)
and for amoudgl/celo's copy (66d9761), 50 updates on four small tensors (0-d, 1-D, 2-D, 3-D; scale 0.01):

- some updates are validation updates (``update(..., is_valid=True)``): only then does the one constant the
  two codes differ in (``corrected_mean``'s epsilon, 1e-8 vs 1e-7) reach the parameters;
- two training updates carry a gradient spike (one element far above the others), which the clip cuts.

Both codes start from the same theta: parity_tests/fixtures/rnn_mlp_lopt_celo's checkpoint (a celo theta.state
of the default configuration, ``step_multiplier=0.01``). Written: ``lo.npz`` / ``celo.npz`` (``is_valid``,
``loss``, ``grad.<name>``, ``params.<name>`` before every update and after the last, the clipper's
``clip_amount`` before every update) and ``provenance.json``. Run in the JAX reference venv, once per code
(celo registers gin configurables of the same names, so the two cannot share a process)::

    PYTHONPATH=$REPO:$LO_SRC /work/venvs/ref/bin/python tests/data/rnn_mlp_lopt/make.py lo
    PYTHONPATH=$REPO:$LO_SRC:$CELO_SRC /work/venvs/ref/bin/python tests/data/rnn_mlp_lopt/make.py celo

Bit-reproducible on one machine (run it twice and compare).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
THETA = ROOT / "parity_tests" / "fixtures" / "rnn_mlp_lopt_celo" / "checkpoint" / "random_theta.state"
STEP_MULTIPLIER = 0.01
SHAPES = {"a_scalar": (), "b_vec": (5,), "c_mat": (4, 3), "d_conv": (2, 3, 4)}
#: Update kinds in order: "t" training, "v" validation, "s" training with a gradient spike.
SCHEDULE = "ttvtsvtvvttstt" + "tttv" * 9
CODES = {
    "lo": ("learned_optimization.learned_optimizers.rnn_mlp_lopt", "google/learned_optimization",
           "32186aa46a96f26ba0625755f93c55659adcd523"),
    "celo": ("celo.optimizers.rnn_mlp_lopt", "amoudgl/celo", "66d976116f39da286951f0c5e0a18eee8d1fd66b"),
}  # fmt: skip


PACKAGES = ("jax", "jaxlib", "flax", "dm-haiku", "numpy")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], np.ndarray]:
    """Initial params, per-update gradients (zeros for validation updates) and losses (seeded)."""
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
    grads, losses = [], []
    for t, kind in enumerate(SCHEDULE):
        g = {k: (0.1 * rng.normal(0, 1, s)).astype(np.float32) for k, s in SHAPES.items()}
        if kind == "v":
            g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        if kind == "s":
            which = "c_mat" if SCHEDULE[:t].count("s") == 0 else "a_scalar"
            if which == "c_mat":
                g["c_mat"][1, 2] = 40.0
            else:
                g["a_scalar"] = np.float32(-25.0)
        grads.append(g)
        base = 2.0 * 0.93**t
        losses.append(base * (1.3 if kind == "v" else 1.0) + 0.05 * rng.normal())
    return params, grads, np.asarray(losses, np.float32)


def main(code: str) -> None:
    import importlib

    import jax
    import jax.numpy as jnp
    from flax import serialization

    module, repo, commit = CODES[code]
    lopt = importlib.import_module(module).RNNMLPLOpt(step_multiplier=STEP_MULTIPLIER)
    theta = serialization.from_bytes(lopt.init(jax.random.PRNGKey(0)), THETA.read_bytes())
    opt = lopt.opt_fn(theta)
    params, grads, losses = inputs()
    state = opt.init({k: jnp.asarray(v) for k, v in params.items()}, num_steps=100)
    out: dict[str, np.ndarray] = {
        "is_valid": np.array([k == "v" for k in SCHEDULE]),
        "loss": losses,
        "clip_amount": np.zeros(len(SCHEDULE), np.float32),
    }
    before = {k: [] for k in SHAPES}
    for t, kind in enumerate(SCHEDULE):
        for k in SHAPES:
            before[k].append(np.asarray(opt.get_params(state)[k], np.float32))
        clip = state.dynamic_clip
        out["clip_amount"][t] = np.asarray((clip.value / (1 - 0.99**clip.iteration)) * 10.0, np.float32)
        g = {k: jnp.asarray(v) for k, v in grads[t].items()}
        state = opt.update(state, g, loss=jnp.asarray(losses[t]), is_valid=kind == "v")
    for k in SHAPES:
        before[k].append(np.asarray(opt.get_params(state)[k], np.float32))
        out[f"params.{k}"] = np.stack(before[k])
        out[f"grad.{k}"] = np.stack([g[k] for g in grads])
    np.savez_compressed(HERE / f"{code}.npz", **out)
    prov_path = HERE / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    prov[code] = {
        "reference": {"repo": repo, "commit": commit, "class": f"{module}.RNNMLPLOpt",
                      "arguments": {"step_multiplier": STEP_MULTIPLIER}},
        "theta": {"file": str(THETA.relative_to(ROOT)), "sha256": sha256(THETA)},
        "schedule": SCHEDULE,
        "script": {"path": "tests/data/rnn_mlp_lopt/make.py",
                   "sha256": sha256(Path(__file__))},
        "command": f"python tests/data/rnn_mlp_lopt/make.py {code}",
        "packages": {p: importlib.metadata.version(p) for p in PACKAGES},
        "platform": platform.platform(),
        "npz_sha256": sha256(HERE / f"{code}.npz"),
    }  # fmt: skip
    prov_path.write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HERE / f'{code}.npz'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lo")
