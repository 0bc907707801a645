"""Celo2 / Celo2Base (``amoudgl/celo`` @66d9761, ``celo/optimizers/celo2.py`` + ``celo2_optax.py``): the spec.

One architecture id covers both classes: ``Celo2Base(**kw)`` is ``Celo2(regex_1d="", orthogonalize=False,
**kw)`` (measured bit for bit identical, /work/scratch/notes/D-math.md), so a Celo2Base checkpoint converts
with those two options set (the registry entry ``celo2-base`` does that).

Theta (haiku params of ``Celo2Transformation._ff_mod``, flax state-dict form; runtime name, source keys,
shape)::

    ff.w0.i     ff_mod_stack/~/w0__i     (width_i, H)      one per enabled MLP input group (input_groups)
    ff.w1..wL   ff_mod_stack/~/w1..      (H, H), last (H, 3)
    ff.b0..bL   ff_mod_stack/~/b0..      (H,), last (3,)

with H = ff_hidden_size and L = ff_hidden_layers (L = 0: ``w0__i`` is ``(width_i, 3)``, ``b0`` is ``(3,)``).

DEFAULTS are the class's constructor defaults (``celo.optimizers.celo2.Celo2``), not ``factory.get_optimizer
("celo2")``'s: the factory reads absl flags (its ``regex_1d`` default ``r"/b$"`` is a haiku tree path) and
sets ``adam_b2=0.95``; a checkpoint meta-trained through the factory is converted with those values bound
(registry ``sets``). The class default regex ``r".*bias.*|.*embed.*"`` matches PyTorch parameter names as
they are (``fc.bias``, ``embed_tokens.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .common import (
    DECAY_KEYS,
    MAX_LAYERS,
    MAX_WIDTH,
    Config,
    SpecError,
    TensorSpec,
    _show,
    bounded_int,
    check_options,
    finite_float,
    kinds_for,
    normalise,
    sized,
)
from .common import check_theta as _check_theta

ARCH = "celo2"
REFERENCE = "celo.optimizers.celo2.Celo2"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.celo2:Celo2"

#: The per-element MLP input switches of ``Celo2Transformation`` (all on by default).
FEATURE_SWITCHES: dict[str, bool] = {
    "with_g": True,
    "with_m": True,
    "with_rms": True,
    "with_rms_norm_g": True,
    "with_rsqrt_rms": True,
    "with_p": True,
    "with_fac_norm_g": True,
    "with_fac_rms": True,
    "with_fac_rsqrt": True,
    "with_grad_clip_feat": True,
    "with_fac_mom_mult": True,
    "with_rms_only_norm_g": True,
}

#: The class default of ``regex_1d``: parameters whose tree path it matches (``re.search``) take the Adam
#: branch. It matches PyTorch ``named_parameters()`` names directly.
CLASS_REGEX_1D = r".*bias.*|.*embed.*"
#: ``celo.factory``'s absl flag default: a haiku path regex (haiku's Linear / Conv biases are leaves ``b``).
FACTORY_REGEX_1D = r"/b$"
#: Haiku path regexes and what they mean for PyTorch parameter names (``module.sub.bias``): the runtime
#: applies the right-hand side to names where the config holds the left-hand side. Only the factory's
#: default is translated; any other regex is applied to the names as written.
TORCH_NAME_REGEX: dict[str, str] = {FACTORY_REGEX_1D: r"(^|\.)bias$"}
#: Longest accepted regex (a config comes from a file; names are matched at construction).
MAX_REGEX = 512

#: Every constructor argument of ``celo.optimizers.celo2.Celo2`` with its class default.
DEFAULTS: dict[str, Any] = {
    "regex_1d": CLASS_REGEX_1D,
    "step_mult": 0.001,
    "weight_decay": 0.0,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "adam_epsilon": 1e-8,
    "ff_hidden_size": 8,
    "ff_hidden_layers": 2,
    "initial_momentum_decays": [0.9, 0.99, 0.999],
    "initial_rms_decays": [0.95],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "exp_mult": 0.0,
    "rmsmult": 1.0,
    **FEATURE_SWITCHES,
    "param_scale_mult": False,
    "precondition_output": False,
    "normalize_input": True,
    "normalize_output": True,
    "aggregate_mag": False,
    "bias_correction": False,
    "adam_bias_correction": False,
    "mlp_activation": "relu",
    "orthogonalize": True,
    "ns_coeffs": [3.4445, -4.7750, 2.0315],
    "ns_iters": 5,
    "ns_eps": 1e-8,
    "mult_1d": 20.0,
}

#: ``Celo2Base``'s options as ``Celo2`` options: no Adam branch, no orthogonalisation (its other defaults are
#: Celo2's). ``celo.factory.get_optimizer("celo2")`` adds ``FACTORY_CELO2``.
CELO2BASE: dict[str, Any] = {"regex_1d": "", "orthogonalize": False}
#: What ``celo.factory.get_optimizer("celo2")`` passes beyond the class defaults (absl flag defaults).
FACTORY_CELO2: dict[str, Any] = {"regex_1d": FACTORY_REGEX_1D, "adam_b2": 0.95}

#: Most Newton-Schulz iterations accepted (the reference uses 5; each is three matmuls per matrix).
MAX_NS_ITERS = 1000
ACTIVATIONS = ("relu", "tanh")


def check_regex(who: str, key: str, v: Any) -> str:
    """A Python regex (``""`` / None: no parameter takes the Adam branch) that compiles, is at most
    MAX_REGEX long and has no quantified group holding a quantifier (catastrophic backtracking)."""
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > MAX_REGEX:
        raise SpecError(f"{who}: option {key} must be a regex string of at most {MAX_REGEX} characters, "
                        f"got {_show(v)}", key)  # fmt: skip
    try:
        re.compile(v)
    except re.error as e:
        raise SpecError(f"{who}: option {key} is not a valid regex ({e}): {_show(v)}", key) from None
    if _NESTED_QUANTIFIER.search(v):
        raise SpecError(
            f"{who}: option {key} has a quantified group that holds a quantifier ({_show(v)}): it can "
            "backtrack for exponential time on a parameter name; write it without the nesting",
            key,
        )
    return v


#: ``( ... + or * ... )`` followed by ``+``, ``*`` or ``{``: the shape of catastrophic-backtracking patterns
#: (``(a+)+``, ``(.*a)*``). Conservative: it also refuses some harmless ones, never the reference's.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]")


def _activation(who: str, key: str, v: Any) -> str:
    if v not in ACTIVATIONS:
        raise SpecError(f"{who}: option {key} must be one of {', '.join(ACTIVATIONS)}, got {_show(v)}", key)
    return str(v)


def _ns_coeffs(who: str, key: str, v: Any) -> list[float]:
    if not isinstance(v, list | tuple) or len(v) != 3:
        raise SpecError(f"{who}: option {key} must be 3 finite numbers (a, b, c), got {_show(v)}", key)
    return [finite_float(who, key, x) for x in v]


_KINDS = kinds_for(
    DEFAULTS,
    {
        "regex_1d": check_regex,
        "step_mult": finite_float,
        "weight_decay": finite_float,
        "adam_b1": finite_float,
        "adam_b2": finite_float,
        "adam_epsilon": finite_float,
        "ff_hidden_size": sized(MAX_WIDTH),
        "ff_hidden_layers": sized(MAX_LAYERS, low=0),
        "exp_mult": finite_float,
        "rmsmult": finite_float,
        "mlp_activation": _activation,
        "ns_coeffs": _ns_coeffs,
        "ns_iters": lambda who, key, v: bounded_int(who, key, v, 0, MAX_NS_ITERS),
        "ns_eps": finite_float,
        "mult_1d": finite_float,
    },
)


def input_groups(config: Mapping[str, Any]) -> list[tuple[str, int, bool]]:
    """The MLP input groups the config enables, in ``_ff_mod``'s order: ``(name, width, factored_only)``.

    ``w0__i`` numbers exactly these (theta is built on a 2-D dummy, so every group has a weight); tensors of
    rank < 2 use the leading groups with ``factored_only`` False, under the same indices.
    """
    n_m, n_r, n_f = (len(config[k]) for k in DECAY_KEYS)
    groups = [
        ("g", 1, "with_g", False),
        ("clip_g", 1, "with_grad_clip_feat", False),
        ("p", 1, "with_p", False),
        ("m", n_m, "with_m", False),
        ("rms", n_r, "with_rms", False),
        ("m_rsqrt", max(n_m, n_r), "with_rms_norm_g", False),
        ("rsqrt", n_r, "with_rsqrt_rms", False),
        ("fac_g", n_f, "with_fac_norm_g", False),
        ("g_rsqrt", n_r, "with_rms_only_norm_g", False),
        ("row_feat", n_f, "with_fac_rms", True),
        ("col_feat", n_f, "with_fac_rms", True),
        ("row_rsqrt", n_f, "with_fac_rsqrt", True),
        ("col_rsqrt", n_f, "with_fac_rsqrt", True),
        ("fac_mom_mult", max(n_m, n_f), "with_fac_mom_mult", True),
    ]
    return [(name, width, fac) for name, width, flag, fac in groups if config[flag]]


def ff_input_widths(config: Mapping[str, Any]) -> list[int]:
    """Width of each first-layer weight ``w0__i`` (rows), in order."""
    return [w for _, w, _ in input_groups(config)]


def check_combinations(who: str, c: Mapping[str, Any]) -> None:
    """Refuse option combinations the reference cannot run (it fails building theta or at the first step)."""
    n_m, n_r, n_f = (len(c[k]) for k in DECAY_KEYS)
    for on, a, b, what, opt in (
        (c["with_rms_norm_g"], n_m, n_r, "m * rsqrt(rms)", "initial_rms_decays"),
        (c["with_fac_mom_mult"], n_m, n_f, "the fac_mom_mult input (m * adafactor factors)",
         "initial_adafactor_decays"),
    ):  # fmt: skip
        if on and a != b and a != 1 and b != 1:
            raise SpecError(
                f"{who}: option {opt}: {what} ({a} vs {b} decays) do not broadcast; the reference fails", opt
            )
    if not input_groups(c):
        raise SpecError(f"{who}: every MLP input group is switched off (with_* all False): the reference "
                        "builds no first layer", "with_g")  # fmt: skip


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, combinations); SpecError names it."""
    values = normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS)
    check_combinations(who, values)
    return Config(ARCH, values)


FF = ("ff_mod_stack", "~")  # haiku: parameters created outside any module


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """``ff.w0.i`` (numeric order), ``ff.w1..wL``, ``ff.b0..bL``: the MLP of ``_ff_mod``."""
    hid, n_layers = config["ff_hidden_size"], config["ff_hidden_layers"]
    sizes = [hid] * n_layers + [3]
    groups = input_groups(config)
    note = "rows: the width of MLP input group {} ({})"
    t: dict[str, TensorSpec] = {}
    for i, (name, width, _) in enumerate(groups):
        t[f"ff.w0.{i}"] = TensorSpec((*FF, f"w0__{i}"), (width, sizes[0]), note.format(i, name))
    for k in range(1, n_layers + 1):
        t[f"ff.w{k}"] = TensorSpec((*FF, f"w{k}"), (sizes[k - 1], sizes[k]))
    for k in range(n_layers + 1):
        t[f"ff.b{k}"] = TensorSpec((*FF, f"b{k}"), (sizes[k],))
    return t


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)


def torch_name_regex(regex: str) -> str:
    """The regex the runtime applies to PyTorch parameter names for the config's ``regex_1d``."""
    return TORCH_NAME_REGEX.get(regex, regex)
