"""small_fc_lopt = learned_optimization's ``AdafacMLPLOpt`` (@32186aa4): the family spec.

Theta (haiku, parameters made outside any module, hence ``~``; runtime name -> source keys, shape)::

    momentum_decays, rms_decays, adafactor_decays   (n_mom,), (n_rms,), (n_fac,)   meta-learned decay offsets
    nn.w{i}, nn.b{i}    nn/~/w{i} (in, out), nn/~/b{i} (out,)   layers [hidden_size] * hidden_layers + [2]
    nn.w{i}_{v}_{o}, nn.b{i}_{o}   nn/~/... ()   instead, with concat_weights=False and make_separate_weights

amoudgl/celo's ``adafac_mlp_lopt.py`` is a reformatted copy of the class (same defaults, same tree), and
muLO's ``MuAdafacMLPLOpt`` (``specs/mulo.py``) has the same theta. ``split_weights`` has no effect in the
reference (its branch is unreachable) but is carried in the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import (
    MAX_LAYERS,
    MAX_WIDTH,
    Config,
    SpecError,
    TensorSpec,
    Validator,
    check_options,
    check_tensor_count,
    finite_float,
    kinds_for,
    normalise,
    sized,
)
from .common import check_theta as _check_theta

ARCH = "small_fc_lopt"
REFERENCE = "AdafacMLPLOpt"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.adafac:SmallFCLOpt"

#: Every constructor argument of ``AdafacMLPLOpt`` with its default (learned_optimization @32186aa4).
DEFAULTS: dict[str, Any] = {
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "hidden_size": 4,
    "hidden_layers": 2,
    "initial_momentum_decays": [0.9, 0.99, 0.999],
    "initial_rms_decays": [0.999],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "concat_weights": True,
    "make_separate_weights": False,
    "split_weights": False,
}

#: Number of tanh time features appended to the normalised per-element features
#: (``len(pylo_runtime.features.STEP_TIMESCALES)``).
N_TIME_FEATURES = 11
#: theta leaf of the decay offsets -> the config option whose length it has.
DECAY_OFFSETS = (
    ("momentum_decays", "initial_momentum_decays"),
    ("rms_decays", "initial_rms_decays"),
    ("adafactor_decays", "initial_adafactor_decays"),
)
NN = ("nn", "~")

KINDS: dict[str, Validator] = kinds_for(
    DEFAULTS,
    {
        "exp_mult": finite_float,
        "step_mult": finite_float,
        "hidden_size": sized(MAX_WIDTH),
        "hidden_layers": sized(MAX_LAYERS, low=0),
    },
)


def validate_family(
    config: Any,
    who: str,
    arch: str,
    reference: str,
    defaults: Mapping[str, Any],
    kinds: Mapping[str, Validator],
) -> Config:
    """``validate`` for any class of the AdafacMLPLOpt family (small_fc_lopt, muLO)."""
    values = normalise(who, check_options(who, config, defaults, reference), kinds)
    if n_inputs(values) < 0:
        raise SpecError(
            f"{who}: momentum, rms and adafactor decay counts do not broadcast "
            f"({len(values['initial_momentum_decays'])}, {len(values['initial_rms_decays'])}, "
            f"{len(values['initial_adafactor_decays'])}); the reference fails on it",
            "initial_rms_decays",
        )
    check_tensor_count(who, n_tensors(values), _describe(values))
    return Config(arch, values)


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, decay counts); SpecError names it."""
    return validate_family(config, who, ARCH, REFERENCE, DEFAULTS, KINDS)


# ----------------------------------------------------------------------------------------------------
def n_inputs(config: Mapping[str, Any]) -> int:
    """Width of the first MLP layer: per-element features (broadcast as the reference does) + 11 time.

    Negative when the decay counts do not broadcast (the reference fails on such a config).
    """
    n_mom, n_rms, n_fac = (len(config[init]) for _, init in DECAY_OFFSETS)

    def bc(a: int, b: int) -> int:
        return max(a, b) if a == b or min(a, b) == 1 else -(10**6)

    return (
        2 + n_mom + n_rms + bc(n_mom, n_rms) + n_rms + n_fac + 4 * n_fac + bc(n_mom, n_fac) + N_TIME_FEATURES
    )


def layer_sizes(config: Mapping[str, Any]) -> list[int]:
    """``[hidden_size] * hidden_layers + [2]``."""
    return [int(config["hidden_size"])] * int(config["hidden_layers"]) + [2]


def separate_weights(config: Mapping[str, Any]) -> bool:
    """Whether the reference stores the MLP as scalars (``w{i}_{v}_{o}``) rather than matrices."""
    return not config["concat_weights"] and bool(config["make_separate_weights"])


def n_tensors(config: Mapping[str, Any]) -> int:
    """How many theta tensors ``config`` describes (computed without building the table)."""
    h, layers = int(config["hidden_size"]), int(config["hidden_layers"])
    if not separate_weights(config):
        return len(DECAY_OFFSETS) + 2 * (layers + 1)
    n_in = n_inputs(config)
    if layers == 0:
        return len(DECAY_OFFSETS) + n_in * 2 + 2
    return len(DECAY_OFFSETS) + (n_in * h + h) + (layers - 1) * (h * h + h) + (h * 2 + 2)


def _describe(config: Mapping[str, Any]) -> str:
    kind = "scalar weights" if separate_weights(config) else "weight matrices"
    return f"{kind}, hidden_size={config['hidden_size']}, hidden_layers={config['hidden_layers']}"


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape): the decay offsets, then the MLP layer by layer."""
    table: dict[str, TensorSpec] = {
        leaf: TensorSpec((leaf,), (len(config[init]),), f"one meta-learned offset per {init} entry")
        for leaf, init in DECAY_OFFSETS
    }
    n_in = n_inputs(config)
    first = f"the first layer reads {n_in} inputs: {n_in - N_TIME_FEATURES} features + {N_TIME_FEATURES} time"
    for i, out in enumerate(layer_sizes(config)):
        if separate_weights(config):
            for v in range(n_in):
                for o in range(out):
                    table[f"nn.w{i}_{v}_{o}"] = TensorSpec((*NN, f"w{i}_{v}_{o}"), ())
            for o in range(out):
                table[f"nn.b{i}_{o}"] = TensorSpec((*NN, f"b{i}_{o}"), ())
        else:
            table[f"nn.w{i}"] = TensorSpec((*NN, f"w{i}"), (n_in, out), first if i == 0 else "")
            table[f"nn.b{i}"] = TensorSpec((*NN, f"b{i}"), (out,))
        n_in = out
    return table


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
