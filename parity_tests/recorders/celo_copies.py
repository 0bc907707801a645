"""amoudgl/celo's copies of other families: its HyperV2 (VeLO with ``ff_mult``), RNNMLPLOpt and NNAdam.

Needs ``amoudgl/celo`` and ``google/learned_optimization`` on PYTHONPATH; never learned_optimization's own
``HyperV2`` / ``RNNMLPLOpt`` / ``NNAdam`` in the same process (celo registers gin configurables of the same
names; learned_optimization's versions are recorded by recorders/velo.py, rnn_mlp_lopt.py and nn_adam.py).

Theta is ``lopt.init`` perturbed (plus the VeLO conditioning of recorders/velo.py where a case says so),
written as a bare flax ``theta.state`` (what the celo code saves and the Celo authors publish on the hub) and
loaded back with ``celo.utils.load_state`` before recording. theta.state carries no configuration: the
converter gets it from ``convert_sets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adafac import LOReference
from .perturb import perturb_theta, perturbation_note
from .velo import SIGNED_STEP_SIZE_SCALE, VeLOReference, scale_final_layer, scale_step_size

CELO_REPO = "amoudgl/celo"
CELO_COMMIT = "66d976116f39da286951f0c5e0a18eee8d1fd66b"
LO_REPO = "google/learned_optimization"
LO_COMMIT = "32186aa46a96f26ba0625755f93c55659adcd523"

#: celo.factory.get_optimizer("velo_s") and ("velo_4000"): celo's HyperV2 with these arguments.
VELO_S: dict[str, Any] = dict(
    use_bugged_next_lstm_state=False,
    use_bugged_loss_features=False,
    lstm_hidden_size=64,
    param_inits=32,
    ff_mult=1.0,
)
VELO_4000: dict[str, Any] = dict(
    use_bugged_next_lstm_state=False,
    use_bugged_loss_features=False,
    lstm_hidden_size=512,
    param_inits=256,
    ff_mult=100.0,
)

#: case -> {"arch": runtime architecture, "class": celo module.class, "config": constructor arguments,
#: "factory": the celo.factory name whose arguments "config" reproduces (checked) or None, "overrides":
#: arguments changed from "config" (step sizes for random weights), + VeLO conditioning (recorders/velo.py)}.
CASES: dict[str, dict[str, Any]] = {
    # VeLO-S: the factory's configuration (the published amoudgl/velo-s one, a 185 kB theta). Random weights
    # with ff_mult=1 step about one ulp, so: every MLP copy x10, the last MLP layer x0.3 (without it the
    # 0-d tensor's direction nearly cancels on a few steps: 4e-5 from float64 in float32), the step-size head
    # made one-signed (+1, the sign with which it descends; recorders/velo.py explains why) at full scale,
    # step_mult 0.03. Loss x0.24, 89% of step/tensor pairs resolve 1e-5, the float32 reference is <= 5.2e-6
    # from float64 everywhere.
    "velo_s_random": {
        "arch": "velo",
        "class": "velo.HyperV2",
        "config": dict(VELO_S),
        "factory": "velo_s",
        "overrides": {"step_mult": 0.03},
        "ff_scale": 10.0,
        "final_layer_scale": 0.3,
        "step_size_sign": 1,
        "step_size_scale": 1.0,
    },
    # velo_4000's configuration (ff_mult 100: what Google's HyperV2 hard-codes) with the sizes shrunk so the
    # fixture stays small (512/256 is a 9 MB theta); exercises ff_mult through celo's code path. Conditioned
    # as recorders/velo.py's cases (last MLP layer x0.1, one-signed head x0.01; +1 descends here).
    "velo_4000_small": {
        "arch": "velo",
        "class": "velo.HyperV2",
        "config": {**VELO_4000, "lstm_hidden_size": 32, "param_inits": 8},
        "factory": None,
        "overrides": {"step_mult": 0.003},
        "final_layer_scale": 0.1,
        "step_size_sign": 1,
        "step_size_scale": SIGNED_STEP_SIZE_SCALE,
    },
    # celo.factory.get_optimizer("rnn_mlp"): RNNMLPLOpt() (the published amoudgl/rnn-mlp-lopt configuration)
    # but a larger step_multiplier so each update is thousands of float32 ulps (record with --init small).
    "rnn_mlp_lopt_celo": {
        "arch": "rnn_mlp_lopt",
        "class": "rnn_mlp_lopt.RNNMLPLOpt",
        "config": {},
        "factory": "rnn_mlp",
        "overrides": {"step_multiplier": 0.01},
    },
    # celo.factory.get_optimizer("nnadam"): NNAdam(lstm_hidden_size=64) (record with --init small), theta
    # drawn with initial_beta2=0.99 (init-only argument): near beta2 = 0.999 the reference's hparam round
    # trip 0.1 * log(1 - (1 - exp(10 x))) cancels, and the float32 reference is 7e-5 from float64 (measured).
    "nn_adam_celo": {
        "arch": "nn_adam",
        "class": "nn_adam.NNAdam",
        "config": {"lstm_hidden_size": 64},
        "factory": "nnadam",
        "overrides": {"initial_beta2": 0.99},
    },
}


def scale_ff_stack(theta: Any, scale: float) -> Any:
    """``theta`` with every per-element MLP copy (``ff_mod_stack``) times ``scale``.

    With ``ff_mult=1`` the interpolated MLP is ``mean(ff_p * c)``, 100 times weaker than Google's ``100 *
    mean(...)``: random weights then give steps of about one float32 ulp (nothing to compare). Scaling the
    copies stands in for trained weights of the size ff_mult=1 training produces."""
    import jax

    return {**theta, "ff_mod_stack": jax.tree_util.tree_map(lambda x: x * scale, theta["ff_mod_stack"])}


def constructor_args(options: dict[str, Any]) -> dict[str, Any]:
    """The factory's arguments (``config``) with the case's ``overrides`` (random-weight step sizes)."""
    return {**options["config"], **options.get("overrides", {})}


def make_lopt(options: dict[str, Any]) -> Any:
    """The celo class with the case's arguments (checked against the factory where the case says so)."""
    import importlib

    module, _, cls = options["class"].rpartition(".")
    lopt = getattr(importlib.import_module(f"celo.optimizers.{module}"), cls)(**constructor_args(options))
    if options.get("factory"):
        from celo.factory import get_optimizer

        ref = get_optimizer(options["factory"])
        for k, v in vars(ref).items():
            if k in options.get("overrides", {}):
                continue
            if type(v) in (int, float, bool, str, tuple) and getattr(lopt, k) != v:  # not namedtuples
                got = getattr(lopt, k)
                raise RuntimeError(
                    f"get_optimizer({options['factory']!r}).{k} = {v!r}, the case builds {got!r}"
                )
    return lopt


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> Any:
    """Perturbed theta of the celo class, written as ``random_theta.state`` and loaded back from it."""
    import jax
    from celo.utils import load_state
    from flax import serialization

    lopt = make_lopt(options)
    theta = perturb_theta(lopt.init(jax.random.PRNGKey(seed)), seed)
    how = perturbation_note(f"lopt.init(jax.random.PRNGKey({seed}))", seed)
    if options["arch"] == "velo":
        scale = float(options.get("final_layer_scale", 1.0))
        sign = int(options.get("step_size_sign", 0))
        head = float(options["step_size_scale"])
        ff_scale = float(options.get("ff_scale", 1.0))
        if ff_scale != 1.0:
            theta = scale_ff_stack(theta, ff_scale)
            how += f"; then every ff_mod_stack leaf *= {ff_scale}"
        if scale != 1.0:
            theta = scale_final_layer(theta, lopt.ff_hidden_layers, scale)
            how += f"; then ff_mod_stack/~/w{lopt.ff_hidden_layers} *= {scale}"
        theta = scale_step_size(theta, head, sign)
        if sign:
            how += f"; rnn_params/step_size/b = {sign} * (|b| + sum(|w|, axis=0))"
        how += f"; rnn_params/step_size/{{w,b}} *= {head}"
    path = Path(ckpt_dir) / "random_theta.state"
    path.write_bytes(serialization.to_bytes(theta))
    loaded = load_state(str(path), lopt.init(jax.random.PRNGKey(0)))  # as celo.utils.init_lopt_from_ckpt
    factory = options.get("factory")
    prov: dict[str, Any] = {
        "repo": CELO_REPO,
        "commit": CELO_COMMIT,
        "learned_optimization": {"repo": LO_REPO, "commit": LO_COMMIT},
        "class": f"celo.optimizers.{options['class']}",
        "config": dict(options["config"]),
        "constructor": f"as celo.factory.get_optimizer({factory!r})"
        if factory
        else "celo class, config above",
        "theta": {
            "kind": "random",
            "how": how + "; written with flax.serialization.to_bytes, loaded back with celo.utils.load_state",
        },
    }
    sets = constructor_args(options)
    opt = lopt.opt_fn(loaded)
    if options["arch"] == "velo":
        return VeLOReference(opt, path.name, "theta_state", sets, prov)
    return LOReference(options["arch"], opt, path.name, "theta_state", sets, prov)
