"""How far a fixture's float32 reference updates are from a float64 evaluation of the same reference.

REFERENCE_NOTES.md, "conditioning before bugs": where our float32 port misses the float32 reference, replay
the recorded steps through the reference in float64 (theta, parameters, gradients and loss in float64,
parameters reset to the recorded ones before every step) and score both float32 sides against it. This
module does the reference half: for every (step, tensor) the relative update error of the recorded float32
reference against the float64 one (parity_tests.compare.update_error, one ulp forgiven). A step where this is
near 1e-5 is float32-ill-conditioned: no float32 port can be expected closer to the recording than that.

    # REF: the reference sources (learned_optimization, celo) on PYTHONPATH
    PYTHONPATH=.:$REF python -m lopt_bridge.parity_tests.conditioning parity_tests/fixtures/velo_default
    PYTHONPATH=.:$REF python -m lopt_bridge.parity_tests.conditioning --write FIXTURE  # FIXTURE/x64.npz

Rebuilds the reference with the fixture's recorder (same case and seed: the same theta, checked against
the fixture's checkpoint), then switches ``jax_enable_x64`` on. Handles the reference objects of
recorders/celo2.py, velo.py, adafac.py (LOReference: mlp_lopt, mulo, rnn_mlp_lopt, nn_adam), celo_copies.py
and celo.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .compare import update_error
from .fixture import load_fixture


def x64_errors(
    fixture_dir: str | Path, afters: dict[str, list[np.ndarray]] | None = None
) -> tuple[list[str], np.ndarray]:
    """(tensor names, ``err[t, i]``): the recorded float32 update's error against a float64 reference.

    With ``afters`` (a dict), the float64 parameters after every step are appended to ``afters[name]``."""
    import jax

    from .fixture import sha256_file
    from .record import make_reference

    fx = load_fixture(fixture_dir)
    if fx.sample_index:
        raise ValueError(f"{fixture_dir}: sampled tensors are not supported here")
    # Theta first, in float32 mode: haiku's initialisers draw other numbers under x64. The checkpoint the
    # recorder writes must be the fixture's, byte for byte.
    with tempfile.TemporaryDirectory() as tmp:
        ref, _ = make_reference(fx.meta["family"], fx.meta["case"], Path(tmp), int(fx.meta["seed"]))
        src = Path(tmp) / Path(fx.meta["source"]).relative_to("checkpoint")
        if fx.meta.get("source_base") == "fixture" and sha256_file(src) != fx.meta["source_sha256"]:
            raise RuntimeError(f"{fixture_dir}: the recorder no longer writes the fixture's checkpoint")
    was_x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)  # then every update traced anew with float64 inputs
    try:
        return _replay_x64(fx, ref, afters)
    finally:  # a live run records more cases in this process, in float32
        jax.config.update("jax_enable_x64", was_x64)


def _replay_x64(
    fx: Any, ref: Any, afters: dict[str, list[np.ndarray]] | None
) -> tuple[list[str], np.ndarray]:
    """The float64 replay of ``x64_errors`` (x64 already on)."""
    import jax
    import jax.numpy as jnp

    opt = ref.opt
    names = fx.names
    paths = getattr(ref, "paths", None) or {n: n for n in names}  # Celo2Reference nests by tree path

    def f64(a: np.ndarray) -> Any:
        return jnp.asarray(np.asarray(a, np.float64))

    def tree(d: dict[str, Any]) -> Any:
        out: dict[str, Any] = {}
        for n, v in d.items():
            module, _, leaf = paths[n].rpartition("/")
            (out.setdefault(module, {}) if module else out)[leaf] = v
        return out

    def untree(t: Any) -> dict[str, np.ndarray]:
        out = {}
        for n in names:
            module, _, leaf = paths[n].rpartition("/")
            out[n] = np.asarray(t[module][leaf] if module else t[leaf], np.float64)
        return out

    kw: dict[str, Any] = {}
    init_kw: dict[str, Any] = {}
    if type(ref).__name__ == "VeLOReference":
        kw = init_kw = {"key": jax.random.PRNGKey(0)}
    elif getattr(ref, "model_state", None) is not None:
        ms = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), ref.model_state)
        kw = init_kw = {"model_state": ms}
    p0 = {n: f64(fx.params[n][0]) for n in names}
    state = opt.init(tree(p0), num_steps=int(fx.meta["num_steps"]), **init_kw)
    err = np.zeros((fx.steps, len(names)))
    for t in range(fx.steps):
        before = {n: f64(fx.params[n][t]) for n in names}
        grads = {n: f64(fx.grads[n][t]) for n in names}
        state = state.replace(params=tree(before))
        state = opt.update(state, tree(grads), loss=jnp.asarray(float(fx.loss[t]), jnp.float64), **kw)
        got = opt.get_params(state)
        if t == 0 and any(x.dtype != jnp.float64 for x in jax.tree_util.tree_leaves(got)):
            raise RuntimeError("the reference did not compute in float64")
        after = untree(got)
        if afters is not None:
            for n in names:
                afters.setdefault(n, []).append(after[n])
        for i, n in enumerate(names):
            # ours := the recorded float32 reference, ref := the float64 one (no rounding of p + u)
            err[t, i] = update_error(fx.params[n][t], fx.params[n][t + 1], fx.params[n][t], after[n])
    return names, err


def summary(fixture_dir: str | Path) -> dict[str, Any]:
    """Per tensor: max and median float32-vs-float64 error of the recorded reference, worst step."""
    names, err = x64_errors(fixture_dir)
    return {
        n: {
            "max": float(err[:, i].max()),
            "median": float(np.median(err[:, i])),
            "worst_step": int(err[:, i].argmax()),
        }
        for i, n in enumerate(names)
    }


X64_FILE = "x64.npz"


def write_x64(fixture_dir: str | Path) -> Path:
    """Store the float64 reference beside the fixture, so that a float32 miss can be judged without JAX.

    ``x64.npz``: ``after64_minus_recorded.<name>`` (T, *shape) float32 = float64 reference parameters after
    step t minus the recorded float32 ones (the float64 update is ``params[t+1] + that - params[t]``), and
    ``floor.<name>`` (T,) float64 = the recorded update's error against it (update_error, one ulp forgiven).
    """
    afters: dict[str, list[np.ndarray]] = {}
    names, err = x64_errors(fixture_dir, afters)
    fx = load_fixture(fixture_dir)
    arrays: dict[str, np.ndarray] = {}
    for i, n in enumerate(names):
        a64 = np.stack(afters[n])
        arrays[f"after64_minus_recorded.{n}"] = (a64 - fx.params[n][1:].astype(np.float64)).astype(np.float32)
        arrays[f"floor.{n}"] = err[:, i]
    out = Path(fixture_dir) / X64_FILE
    np.savez_compressed(out, **arrays)
    return out


# python -m lopt_bridge.parity_tests.conditioning [--write] FIXTURE ...
if __name__ == "__main__":  # pragma: no cover
    args = sys.argv[1:]
    write = "--write" in args
    for d in (a for a in args if a != "--write"):
        if write:
            print(write_x64(d))
            continue
        s = summary(d)
        worst = max(v["max"] for v in s.values())
        print(json.dumps({"fixture": d, "worst": worst, "tensors": s}))
