"""Celo2 and Celo2Base references (``amoudgl/celo`` ``celo/optimizers/celo2.py`` + ``celo2_optax.py``).

Needs ``amoudgl/celo`` and ``google/learned_optimization`` on PYTHONPATH (never learned_optimization's own
gin configurables of the same names in the same process). Theta is ``lopt.init`` perturbed, written as a bare
flax ``theta.state`` (``flax.serialization.to_bytes``, what the celo code saves) and loaded back with
``celo.utils.load_state`` before recording, as users of the published weights do.

Celo2 routes each parameter leaf by a regex over its tree path (``"module/leaf"``, flattened by celo2.py's
``_path_flat_str``): matches go to its Adam branch (``step_mult * mult_1d``), the rest to the learned MLP
update. The synthetic task's tensors are flat names, so the reference is given them as a two-level tree whose
paths are ``options["tree_paths"]`` (task name -> path); ``options["routing"]`` records which branch the
reference's own ``_mask_1d_from_regex`` chose for each tensor, for our side's replay.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks import SHAPES
from .perturb import perturb_theta, perturbation_note

CELO_REPO = "amoudgl/celo"
CELO_COMMIT = "66d976116f39da286951f0c5e0a18eee8d1fd66b"
LO_REPO = "google/learned_optimization"
LO_COMMIT = "32186aa46a96f26ba0625755f93c55659adcd523"

#: Haiku-style paths for the factory's default regex ``r"/b$"``: the 0-d and 1-D tensors are biases ("/b",
#: Adam branch), every other tensor a weight ("/w", learned branch).
HAIKU_PATHS: dict[str, str] = {n: (f"{n}/b" if len(s) <= 1 else f"{n}/w") for n, s in SHAPES.items()}
#: PyTorch-style paths for the class default ``r".*bias.*|.*embed.*"``: Adam gets the 0-d tensor (a "bias")
#: and a 2-D tensor (an "embedding"); the 1-D tensor ("scale") goes to the learned branch.
TORCH_STYLE_PATHS: dict[str, str] = {
    **{n: f"{n}/weight" for n in SHAPES},
    "a_scalar": "a_scalar/bias",
    "b_vec": "b_vec/scale",
    "d_wide": "embed/d_wide",
}
#: Celo2 exactly as ``celo.factory.get_optimizer("celo2")`` builds it (absl FLAGS defaults: step_mult 0.001,
#: weight_decay 0.0, regex_1d r"/b$").
FACTORY_CELO2: dict[str, Any] = dict(
    regex_1d=r"/b$",
    step_mult=0.001,
    weight_decay=0.0,
    orthogonalize=True,
    initial_momentum_decays=(0.9, 0.99, 0.999),
    initial_rms_decays=(0.95,),
    initial_adafactor_decays=(0.9, 0.99, 0.999),
    ns_coeffs=(3.4445, -4.7750, 2.0315),
    ns_iters=5,
    ns_eps=1e-8,
    mlp_activation="relu",
    ff_hidden_size=8,
    normalize_input=True,
    normalize_output=True,
    adam_b1=0.9,
    adam_b2=0.95,
    adam_epsilon=1e-8,
    mult_1d=20.0,
)
#: Celo2Base exactly as ``celo.factory.get_optimizer("celo2base")`` builds it. It is Celo2's learned update
#: on every leaf: the same as ``Celo2(regex_1d="", **this)`` (checked bit for bit, see D-math.md), so the
#: converter gets it as a Celo2 configuration with ``regex_1d=""``.
FACTORY_CELO2BASE: dict[str, Any] = dict(
    step_mult=0.001,
    weight_decay=0.0,
    orthogonalize=False,
    initial_momentum_decays=(0.9, 0.99, 0.999),
    initial_rms_decays=(0.95,),
    initial_adafactor_decays=(0.9, 0.99, 0.999),
    mlp_activation="relu",
    ff_hidden_size=8,
    normalize_input=True,
    normalize_output=True,
)
FACTORY: dict[str, dict[str, Any]] = {"celo2": FACTORY_CELO2, "celo2base": FACTORY_CELO2BASE}


def expected_routing(regex: str, paths: dict[str, str]) -> dict[str, str]:
    """Task tensor -> "adam" | "learned": celo2.py's rule (``re.search`` on the path; "" routes nothing)."""
    if not regex:
        return {n: "learned" for n in paths}
    pattern = re.compile(regex)
    return {n: ("adam" if pattern.search(p) else "learned") for n, p in paths.items()}


#: The per-element gradient features (g, clip(g), m, m * rsqrt, fac_g, g * rsqrt, fac_mom_mult: w0__i with
#: these i under the default flags) weighted x10 in the random theta (see scale_inputs for why).
GRADIENT_INPUTS_X10: dict[int, float] = {0: 10.0, 1: 10.0, 3: 10.0, 5: 10.0, 7: 10.0, 8: 10.0, 13: 10.0}


def _case(
    kind: str,
    name: str,
    overrides: dict[str, Any],
    paths: dict[str, str],
    input_scale: dict[int, float] | None = None,
) -> dict[str, Any]:
    """A case: how the reference is built, its full constructor arguments, tree paths and routing."""
    base = FACTORY[name] if kind == "factory" else {}
    config = {**base, **overrides}
    regex = config.get("regex_1d", "") if name != "celo2base" else ""
    sets = dict(config) if name != "celo2base" else {**config, "regex_1d": ""}
    return {
        kind: name,
        "config": config,
        "convert_sets": sets,
        "tree_paths": dict(paths),
        "routing": expected_routing(regex, paths),
        **({"input_scale": dict(input_scale)} if input_scale else {}),
    }


#: case -> {"factory" or "class": name, "config": constructor arguments, "convert_sets": the same for the
#: converter (theta.state carries no configuration), "tree_paths", "routing"} (see _case).
CASES: dict[str, dict[str, Any]] = {
    # The factory's Celo2, step_mult raised through its absl flag. Record with --init small: the learned
    # update has RMS step_mult per matrix (normalize_output), and parameters near zero make each update
    # thousands of float32 ulps (99% of step/tensor pairs resolve 1e-5). Random weights do not descend on
    # their own (the learned tensors random-walk, the Adam ones converge); the task's 1/(1 + 0.05 t) scale
    # makes the recorded loss fall x0.37. The gradient features are weighted x10 (scale_inputs): without it
    # the float32 reference is up to 8e-4 from float64 (measured, parity_tests.conditioning); with it every
    # tensor but the 3x3-block h_tied (2e-4: NS on nearly singular 3x3 matrices) and g_square is <= 5e-6.
    "celo2_random": _case("factory", "celo2", {"step_mult": 0.005}, HAIKU_PATHS, GRADIENT_INPUTS_X10),
    # The factory's Celo2Base: no Adam branch, no orthogonalisation; every tensor (0-d and 1-D too) takes the
    # learned update. Record with --init small (as celo2_random).
    "celo2base_random": _case(
        "factory", "celo2base", {"step_mult": 0.005}, {n: n for n in SHAPES}, GRADIENT_INPUTS_X10
    ),
    # Celo2 with every numeric option away from its default and the class's default regex: tanh MLP, a
    # magnitude output that matters (exp_mult), parameter-scale multiplier, aggregated magnitude, bias
    # correction on both branches, other decays and NS settings, weight decay, rmsmult, mult_1d. Unit init
    # (param_scale_mult scales steps by the parameters' RMS); this random MLP descends (loss x0.016).
    "celo2_options": _case(
        "class",
        "Celo2",
        {
            "regex_1d": r".*bias.*|.*embed.*",
            "step_mult": 0.03,
            "weight_decay": 0.01,
            "adam_b1": 0.8,
            "adam_b2": 0.99,
            "adam_epsilon": 1e-6,
            "ff_hidden_size": 6,
            "ff_hidden_layers": 3,
            "initial_momentum_decays": (0.5, 0.95),
            "initial_rms_decays": (0.9, 0.999),
            "initial_adafactor_decays": (0.8, 0.99),
            "exp_mult": 0.5,
            "rmsmult": 1.5,
            "param_scale_mult": True,
            "aggregate_mag": True,
            "bias_correction": True,
            "adam_bias_correction": True,
            "mlp_activation": "tanh",
            "ns_coeffs": (3.0, -3.2, 1.2),
            "ns_iters": 3,
            "ns_eps": 1e-7,
            "mult_1d": 10.0,
        },
        TORCH_STYLE_PATHS,
        GRADIENT_INPUTS_X10,
    ),
    # Ablation flags (each drops an MLP input group, so the w0__i numbering shifts), raw inputs and outputs
    # (no second-moment normalisation), rms-preconditioned output. Unit init. Raw inputs are dominated by
    # rsqrt(rms) ~ 1e4, so its direction matrices are nearly constant and Newton-Schulz leaves the float32
    # reference up to 5e-5 from float64 on some steps (x64.npz in the fixture has the float64 updates).
    "celo2_ablate": _case(
        "class",
        "Celo2",
        {
            "regex_1d": r"/b$",
            "step_mult": 0.0002,  # the rsqrt(rms) preconditioner makes steps ~1/|g| larger
            "with_grad_clip_feat": False,
            "with_rms": False,
            "with_fac_rms": False,
            "with_fac_mom_mult": False,
            "normalize_input": False,
            "normalize_output": False,
            "precondition_output": True,
        },
        HAIKU_PATHS,
    ),
}


def _nest(flat: dict[str, Any], paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Task tensors as the reference's two-level tree ``{module: {leaf: array}}`` named by ``paths``."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        module, _, leaf = paths[name].rpartition("/")
        if not module:
            out[leaf] = value  # a top-level leaf: the path is the name itself
        else:
            out.setdefault(module, {})[leaf] = value
    return out


def _unnest(tree: dict[str, Any], paths: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for name, path in paths.items():
        module, _, leaf = path.rpartition("/")
        out[name] = np.asarray(tree[leaf] if not module else tree[module][leaf], dtype=np.float32)
    return out


def make_lopt(options: dict[str, Any]) -> tuple[Any, str]:
    """(lopt, how it was constructed): the factory with its absl flags set, or the class with the config."""
    from celo.optimizers import celo2

    config = dict(options["config"])
    if "factory" in options:
        from absl import flags
        from celo.factory import get_optimizer

        name = options["factory"]
        fl = flags.FLAGS
        if not fl.is_parsed():
            fl(["lopt-parity"])  # absl defaults: step_mult 0.001, weight_decay 0.0, regex_1d r"/b$"
        changed = {k: v for k, v in config.items() if k in ("step_mult", "weight_decay", "regex_1d")}
        for k, v in changed.items():
            setattr(fl, k, v)
        lopt = get_optimizer(name)
        for k, v in config.items():  # the factory must have built exactly the recorded configuration
            got = getattr(lopt, k, None)
            if got is None and hasattr(lopt, "_celo2d_config"):
                got = lopt._celo2d_config.get(k)
            if got is None and hasattr(lopt, "_celo2_config"):
                got = lopt._celo2_config.get(k)
            if got is not None and np.any(np.asarray(got) != np.asarray(v)):
                raise RuntimeError(f"get_optimizer({name!r}) built {k}={got!r}, recorded {v!r}")
        return lopt, f"celo.factory.get_optimizer({name!r}) with absl FLAGS {changed}"
    return getattr(celo2, options["class"])(**config), f"celo.optimizers.celo2.{options['class']}(**config)"


class Celo2Reference:
    """``lopt.opt_fn(theta)`` of Celo2 / Celo2Base behind the recorder contract (tree paths applied)."""

    architecture = "celo2"
    source_format = "theta_state"

    def __init__(
        self, opt: Any, paths: dict[str, str], convert_sets: dict[str, Any], provenance: dict[str, Any]
    ) -> None:
        self.opt = opt
        self.paths = paths
        self.source = "random_theta.state"
        self.convert_sets = convert_sets
        self.provenance = provenance

    def init(self, params: dict[str, np.ndarray], num_steps: int) -> Any:
        import jax.numpy as jnp

        p = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()}
        return self.opt.init(_nest(p, self.paths), num_steps=num_steps)

    def update(self, state: Any, grads: dict[str, np.ndarray], loss: float) -> Any:
        import jax.numpy as jnp

        g = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in grads.items()}
        return self.opt.update(state, _nest(g, self.paths), loss=jnp.asarray(loss, dtype=jnp.float32))

    def params(self, state: Any) -> dict[str, np.ndarray]:
        return _unnest(self.opt.get_params(state), self.paths)


def reference_routing(lopt: Any, paths: dict[str, str]) -> dict[str, str]:
    """Task tensor -> "adam" | "learned", decided by the reference's own ``_mask_1d_from_regex``."""
    import jax
    from celo.optimizers import celo2

    regex = getattr(lopt, "regex_1d", None)  # Celo2Base has no Adam branch
    if regex is None:
        return {n: "learned" for n in paths}
    tree = _nest({n: np.zeros(SHAPES[n], np.float32) for n in paths}, paths)
    mask = celo2._mask_1d_from_regex(tree, regex)
    leaf_paths = [celo2._path_flat_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    by_path = dict(zip(leaf_paths, mask, strict=True))
    return {n: ("adam" if by_path[paths[n]] else "learned") for n in paths}


def scale_inputs(theta: Any, scales: dict[int, float]) -> tuple[Any, str]:
    """``theta`` with the first-layer weights ``w0__i`` of the MLP input groups ``i`` times ``scales[i]``.

    Why: with random weights most of Celo2's input groups are nearly constant over a matrix (rsqrt(rms +
    1e-8) saturates for small gradients, the factored features vary along one axis only), so the direction
    matrix is a constant plus a small variation, and Newton-Schulz maps that small variation to an O(1)
    output: the float32 reference is then ~1e-4 from a float64 evaluation of itself (measured with
    parity_tests.conditioning). Weighting the per-element gradient features up makes the direction vary."""
    import jax.numpy as jnp

    inner = dict(theta["ff_mod_stack"]["~"])
    for i, s in scales.items():
        inner[f"w0__{int(i)}"] = jnp.asarray(np.asarray(inner[f"w0__{i}"], np.float32) * np.float32(s))
    note = ", ".join(f"w0__{i} *= {s}" for i, s in scales.items())
    return {**theta, "ff_mod_stack": {**theta["ff_mod_stack"], "~": inner}}, note


def make_reference(options: dict[str, Any], ckpt_dir: Path, seed: int) -> Celo2Reference:
    """Perturbed Celo2 / Celo2Base theta, written as ``random_theta.state`` and loaded back from it."""
    import jax
    from celo.utils import load_state
    from flax import serialization

    lopt, desc = make_lopt(options)
    paths = dict(options["tree_paths"])
    route = reference_routing(lopt, paths)
    if route != options["routing"]:
        raise RuntimeError(f"the reference routes {route}, the case records {options['routing']}")
    theta = perturb_theta(lopt.init(jax.random.PRNGKey(seed)), seed)
    how = perturbation_note(f"lopt.init(jax.random.PRNGKey({seed}))", seed)
    if options.get("input_scale"):
        theta, note = scale_inputs(theta, options["input_scale"])
        how += "; then " + note
    path = Path(ckpt_dir) / "random_theta.state"
    path.write_bytes(serialization.to_bytes(theta))
    loaded = load_state(str(path), lopt.init(jax.random.PRNGKey(0)))  # as celo.utils.init_lopt_from_ckpt
    prov = {
        "repo": CELO_REPO,
        "commit": CELO_COMMIT,
        "learned_optimization": {"repo": LO_REPO, "commit": LO_COMMIT},
        "constructor": desc,
        "theta": {
            "kind": "random",
            "how": how + "; written with flax.serialization.to_bytes, loaded back with celo.utils.load_state",
        },
        "tree_paths": "the reference sees task tensor n at options.tree_paths[n] (a {module: {leaf: x}} "
        "tree); options.routing is the branch its _mask_1d_from_regex chose",
    }
    return Celo2Reference(lopt.opt_fn(loaded), paths, dict(options["convert_sets"]), prov)
