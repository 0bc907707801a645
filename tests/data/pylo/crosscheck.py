"""How far PyLO's recorded updates (make.py) are from the JAX reference given the same weights, per tensor.

Maps each PyLO file to the reference's theta with the key maps written below (the ones a converter needs),
checks every shape against the reference's own ``lopt.init`` tree, then replays PyLO's recorded steps
through the reference with the parameters reset to PyLO's before every step, and writes
``<name>/agreement.json``: per tensor, the max relative update error of PyLO against the reference
(parity_tests.compare.update_error, one ulp forgiven) and where it is not within 1e-5, why.

Run in the JAX reference venv, one family per process (celo and learned_optimization register gin
configurables of the same names)::

    PYTHONPATH=$REPO:$LO_SRC python tests/data/pylo/crosscheck.py velo
    PYTHONPATH=$REPO:$LO_SRC:$MULO_SRC/src python tests/data/pylo/crosscheck.py mulo
    PYTHONPATH=$REPO:$CELO_SRC:$LO_SRC python tests/data/pylo/crosscheck.py celo2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE, resolution, update_error  # noqa: E402
from lopt_bridge.parity_tests.fixture import load_fixture  # noqa: E402

#: HyperV2's per-element MLP input widths (w0__0 .. w0__13) with the default flags and decays (3, 1, 3):
#: g, clip(g), p, m, rms, m*rsqrt, rsqrt, fac_g, g*rsqrt, row, col, rsqrt(row), rsqrt(col), fac_mom_mult.
VELO_FF_WIDTHS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
#: AdafacLO_naive's default decay offsets (muLO's learned ones; btherien/mulo's file does not carry them).
MULO_DECAY_OFFSETS = {
    "momentum_decays": [0.15216392, 0.14245212, 0.06812963],
    "rms_decays": [0.01079706],
    "adafactor_decays": [0.18621896, -0.10864615, -0.06185547],
}


def load_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def velo_theta(rnn: dict[str, np.ndarray], mlp: dict[str, np.ndarray]) -> dict[str, Any]:
    """PyLO VeLORNN + VeLOMLP state dicts -> HyperV2 theta (haiku tree, flax state-dict form)."""

    def lin(prefix: str) -> dict[str, np.ndarray]:  # torch Linear (out, in) -> haiku (in, out)
        return {"w": rnn[f"{prefix}.weight"].T.copy(), "b": rnn[f"{prefix}.bias"].copy()}

    theta: dict[str, Any] = {
        "lstm_init_state": {"hidden": rnn["lstm_init_state.0"], "cell": rnn["lstm_init_state.1"]},
        "rnn_params": {
            "linear": lin("mix_layer1"),  # computed then overwritten by the reference (dead weights)
            "linear_1": lin("mix_layer2"),
            "linear_2": lin("final_mix_layer"),
            # one (2H, 4H) matrix over [x, h], gates i, g, f, o: the same layout as haiku's LSTM
            "rnn/linear": lin("lstm.linear"),
            "rnn_to_controls": lin("rnn_to_controls"),
            "step_size": lin("step_size"),
        },
    }
    ff: dict[str, np.ndarray] = {}
    w_in = mlp["input_weights_"]  # (P, hidden, sum of widths): all w0__i side by side, transposed
    off = 0
    for i, width in enumerate(VELO_FF_WIDTHS):
        ff[f"w0__{i}"] = np.ascontiguousarray(w_in[:, :, off : off + width].transpose(0, 2, 1))
        off += width
    if off != w_in.shape[-1]:
        raise ValueError(f"input_weights_ has {w_in.shape[-1]} inputs, HyperV2 uses {off}")
    ff["b0"] = mlp["input_bias_"]
    k = 0
    while f"hidden_weights_.{k}" in mlp:
        ff[f"w{k + 1}"] = np.ascontiguousarray(mlp[f"hidden_weights_.{k}"].transpose(0, 2, 1))
        ff[f"b{k + 1}"] = mlp[f"hidden_bias_.{k}"]
        k += 1
    ff[f"w{k + 1}"] = np.ascontiguousarray(mlp["output_weights_"].transpose(0, 2, 1))
    ff[f"b{k + 1}"] = mlp["output_bias_"]
    theta["ff_mod_stack"] = {"~": ff}
    return theta


def mulo_theta(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """PyLO MetaMLP state dict (+ AdafacLO_naive's default decay offsets) -> MuAdafacMLPLOpt theta."""
    layers = ["network.input"]
    k = 0
    while f"network.linear_{k}.weight" in sd:
        layers.append(f"network.linear_{k}")
        k += 1
    layers.append("network.output")
    nn = {}
    for i, name in enumerate(layers):
        nn[f"w{i}"] = sd[f"{name}.weight"].T.copy()
        nn[f"b{i}"] = sd[f"{name}.bias"].copy()
    theta: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in MULO_DECAY_OFFSETS.items()}
    theta["nn"] = {"~": nn}
    return theta


def celo2_theta(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """PyLO CELO2MLP state dict -> celo Celo2 theta (no transposes: CELO2MLP multiplies x @ w)."""
    ff = {}
    i = 0
    while f"w0.{i}" in sd:
        ff[f"w0__{i}"] = sd[f"w0.{i}"]
        i += 1
    ff["b0"] = sd["b0"]
    k = 0
    while f"dense_w.{k}" in sd:
        ff[f"w{k + 1}"] = sd[f"dense_w.{k}"]
        ff[f"b{k + 1}"] = sd[f"dense_b.{k}"]
        k += 1
    return {"ff_mod_stack": {"~": ff}}


def check_against(template: Any, theta: Any) -> Any:
    """``theta`` in ``template``'s tree structure (jax leaves), every shape asserted equal."""
    import flax
    import jax.numpy as jnp
    from flax import serialization

    want = flax.traverse_util.flatten_dict(serialization.to_state_dict(template), sep="/")
    got = flax.traverse_util.flatten_dict(theta, sep="/")
    if set(want) != set(got):
        raise ValueError(f"theta keys differ: missing {set(want) - set(got)}, extra {set(got) - set(want)}")
    for k, v in want.items():
        if tuple(np.shape(v)) != tuple(got[k].shape):
            raise ValueError(f"{k}: reference shape {np.shape(v)}, mapped {got[k].shape}")
    restored = serialization.from_state_dict(template, theta)
    import jax

    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), restored)


def replay(
    fx: Any, opt: Any, tree: Any, untree: Any, update_kwargs: dict[str, Any], init_kwargs: dict[str, Any]
):
    """PyLO's recorded steps through the reference (params reset to PyLO's before each): errors, res."""
    import jax.numpy as jnp

    names = fx.names
    p0 = {n: jnp.asarray(fx.params[n][0]) for n in names}
    state = opt.init(tree(p0), num_steps=int(fx.meta["num_steps"]), **init_kwargs)
    errors = np.zeros((fx.steps, len(names)))
    res = np.zeros_like(errors)
    for t in range(fx.steps):
        before = {n: jnp.asarray(fx.params[n][t]) for n in names}
        grads = {n: jnp.asarray(fx.grads[n][t]) for n in names}
        state = state.replace(params=tree(before))
        state = opt.update(state, tree(grads), loss=jnp.asarray(fx.loss[t], jnp.float32), **update_kwargs)
        after = untree(opt.get_params(state))
        for i, n in enumerate(names):
            ref_a = np.asarray(after[n], np.float32)
            errors[t, i] = update_error(fx.params[n][t], fx.params[n][t + 1], fx.params[n][t], ref_a)
            res[t, i] = resolution(fx.params[n][t + 1], ref_a, fx.params[n][t])
    return errors, res


def write_agreement(
    name: str,
    fx: Any,
    errors: np.ndarray,
    res: np.ndarray,
    how: dict[str, Any],
    why: dict[str, str] | None = None,
) -> None:
    per = {}
    for i, n in enumerate(fx.names):
        worst = int(errors[:, i].argmax())
        per[n] = {
            "max_rel_update_error": float(errors[:, i].max()),
            "worst_step": worst,
            "within_1e-5": bool(errors[:, i].max() <= FLOAT32_TOLERANCE),
            "median_resolution": float(np.median(res[:, i])),
        }
        if (why or {}).get(n):
            per[n]["why_not_faithful"] = why[n]
    doc = {
        "what": "PyLO's recorded update vs the JAX reference's on the same weights and inputs (params reset "
        "to PyLO's before each step), max over steps of lopt_bridge.parity_tests.compare.update_error",
        "tolerance": FLOAT32_TOLERANCE,
        "tensors": per,
        "reference": how,
        "script": "tests/data/pylo/crosscheck.py",
    }
    (HERE / name / "agreement.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(name, {n: f"{v['max_rel_update_error']:.2e}" for n, v in per.items()})


def run_velo() -> None:
    import jax
    from learned_optimization.research.general_lopt import hyper_v2

    fx = load_fixture(HERE / "velo")
    rnn, mlp = load_safetensors(HERE / "velo" / "rnn"), load_safetensors(HERE / "velo" / "mlp")
    config = dict(
        lstm_hidden_size=rnn["step_size.weight"].shape[1],
        param_inits=rnn["rnn_to_controls.weight"].shape[0],
        use_bugged_loss_features=False,  # PyLO's loss buffer uses num_steps (not 10)
        use_bugged_next_lstm_state=False,
    )
    lopt = hyper_v2.HyperV2(**config)
    theta = check_against(lopt.init(jax.random.PRNGKey(0)), velo_theta(rnn, mlp))
    key = {"key": jax.random.PRNGKey(0)}
    errors, res = replay(fx, lopt.opt_fn(theta), lambda d: d, lambda d: d, key, key)
    write_agreement("velo", fx, errors, res, {"class": "learned_optimization HyperV2", "config": config})


def run_mulo() -> None:
    import jax
    import jax.numpy as jnp
    from mup_adafac_mlp_lopt import MuAdafacMLPLOpt

    fx = load_fixture(HERE / "mulo")
    sd = load_safetensors(HERE / "mulo" / "model")
    kw = fx.meta["options"]["pylo_kwargs"]
    config = dict(hidden_size=sd["network.input.weight"].shape[0], step_mult=0.01, exp_mult=0.001)
    lopt = MuAdafacMLPLOpt(**config)
    theta = check_against(lopt.init(jax.random.PRNGKey(0)), mulo_theta(sd))
    scales = {
        n: jnp.asarray(o["mup_scale"] * kw["lr"], jnp.float32)
        for n, o in fx.meta["options"]["param_group_options"].items()
    }
    ms = {"model_state": {"mup_lrs_to_use": scales}}
    errors, res = replay(fx, lopt.opt_fn(theta), lambda d: d, lambda d: d, ms, ms)
    how = {"class": "mu_learned_optimization MuAdafacMLPLOpt", "config": config, "decays": MULO_DECAY_OFFSETS}
    write_agreement("mulo", fx, errors, res, how)


def run_celo2() -> None:
    import jax
    from celo.optimizers import celo2

    from lopt_bridge.parity_tests.recorders.celo2 import FACTORY_CELO2, _nest, _unnest

    fx = load_fixture(HERE / "celo2")
    sd = load_safetensors(HERE / "celo2" / "model")
    kw = fx.meta["options"]["pylo_kwargs"]
    paths = {n: (f"{n}/b" if r == "adam" else f"{n}/w") for n, r in fx.meta["options"]["routing"].items()}
    config = {
        **FACTORY_CELO2,
        "step_mult": kw["lr"],
        "mult_1d": kw["adam_lr_mult"],
        "adam_bias_correction": True,  # PyLO's AdamW is bias-corrected (eps placed outside the sqrt)
    }
    lopt = celo2.Celo2(**config)
    theta = check_against(lopt.init(jax.random.PRNGKey(0)), celo2_theta(sd))
    errors, res = replay(
        fx, lopt.opt_fn(theta), lambda d: _nest(d, paths), lambda d: _unnest(d, paths), {}, {}
    )
    why = {
        n: "PyLO sends 1-D tensors to its own AdamW (bias-corrected, eps outside the sqrt, grads clamped to "
        "+-1000); celo's Celo2 Adam branch computes m * rsqrt(v + eps) (eps inside, no bias correction "
        "by default): with adam_bias_correction=True the eps placement alone leaves ~1e-3 here"
        for n, r in fx.meta["options"]["routing"].items()
        if r == "adam"
    }
    how = {"class": "celo Celo2", "config": config, "tree_paths": paths}
    write_agreement("celo2", fx, errors, res, how, why)


RUNS = {"velo": run_velo, "mulo": run_mulo, "celo2": run_celo2}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        RUNS[name]()
