"""RNNMLPLOpt (learned_optimization ``learned_optimizers/rnn_mlp_lopt.py`` @32186aa4): the family spec.

A per-tensor LSTM conditions a per-parameter MLP (https://arxiv.org/abs/2009.11243). amoudgl/celo's copy
(``celo/optimizers/rnn_mlp_lopt.py`` @66d9761, ``get_optimizer('rnn_mlp')`` = the class defaults) differs
only in ``_LossNormalizer.corrected_mean``'s epsilon (1e-7; learned_optimization 1e-8), read only after
validation updates. That constant is the option ``corrected_mean_eps`` (not a constructor argument: the
converter records which code the checkpoint came from).

Theta (runtime name, source keys, shape; H = lstm_hidden_size, L = from_lstm_size, M = from_mlp_size,
F = lstm_to_ff)::

    initial_from_lstm / initial_from_mlp      initial_from_lstm / initial_from_mlp        (L,) / (M,)
    lstm_init.{hidden,cell}                   lstm_init_state/{hidden,cell}               (1, H)
    rnn.lstm.{w,b}                            rnn_params/rnn/linear/{w,b}                 (18 + L + M + H, 4H)
    rnn_to_ff.{w,b}, rnn_to_in.{w,b}          rnn_to_{ff,in}_params/rnn_to_{ff,in}/{w,b}  (H, F), (H, L)
    mlp.linear_{i}.{w,b}                      ffmod_params/mlp/~/linear_{i}/{w,b}         widths 37 + F,
                                                                             hidden_size x hidden_layer, 2 + M
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
    check_options,
    decays,
    finite_float,
    kinds_for,
    normalise,
    sized,
)
from .common import check_theta as _check_theta

ARCH = "rnn_mlp_lopt"
REFERENCE = "RNNMLPLOpt"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.rnn_mlp_lopt:RNNMLPLOpt"

#: learned_optimization's ``_LossNormalizer.corrected_mean`` epsilon, and amoudgl/celo's.
LO_CORRECTED_MEAN_EPS = 1e-8
CELO_CORRECTED_MEAN_EPS = 1e-7

#: Every constructor argument of ``RNNMLPLOpt`` with its default (learned_optimization @32186aa4 = celo
#: @66d9761), then lopt-bridge's ``corrected_mean_eps`` (learned_optimization's value by default).
DEFAULTS: dict[str, Any] = {
    "step_multiplier": 0.001,
    "magnitude_rate": 0.001,
    "hidden_size": 32,
    "hidden_layer": 2,
    "from_mlp_size": 16,
    "from_lstm_size": 18,
    "lstm_to_ff": 17,
    "lstm_hidden_size": 64,
    "decays": [0.5, 0.9, 0.99, 0.999, 0.9999],
    "corrected_mean_eps": LO_CORRECTED_MEAN_EPS,
}
#: The reference's hard-coded input counts: 18 per-tensor LSTM features (+ from_lstm + from_mlp) and 37
#: per-element MLP features (g, p, log|p|, 4 x 5 accumulator columns, 11 time, 3 tensor-wide) (+ lstm_to_ff).
N_TENSOR_FEATURES = 18
N_FF_FEATURES = 37
N_DECAYS = 5

_KINDS = kinds_for(
    DEFAULTS,
    {
        "step_multiplier": finite_float,
        "magnitude_rate": finite_float,
        "hidden_size": sized(MAX_WIDTH),
        "hidden_layer": sized(MAX_LAYERS, low=0),
        "from_mlp_size": sized(MAX_WIDTH),
        "from_lstm_size": sized(MAX_WIDTH),
        "lstm_to_ff": sized(MAX_WIDTH),
        "lstm_hidden_size": sized(MAX_WIDTH),
        "decays": decays,
        "corrected_mean_eps": finite_float,
    },
)


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, 5 decays); SpecError names it."""
    values = normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS)
    if len(values["decays"]) != N_DECAYS:
        raise SpecError(
            f"{who}: option decays must have exactly {N_DECAYS} values, got {len(values['decays'])}: the "
            f"reference hard-codes {N_FF_FEATURES} MLP inputs (3 + 4 x {N_DECAYS} decays + 14) and fails "
            "at its first update with any other count",
            "decays",
        )
    return Config(ARCH, values)


def mlp_sizes(config: Mapping[str, Any]) -> list[int]:
    """Widths of the per-parameter ``hk.nets.MLP``: input, ``hidden_layer`` x hidden, output."""
    out = 2 + config["from_mlp_size"]
    return [N_FF_FEATURES + config["lstm_to_ff"]] + [config["hidden_size"]] * config["hidden_layer"] + [out]


def lstm_input_size(config: Mapping[str, Any]) -> int:
    """18 per-tensor features + the from_lstm and from_mlp conditioning vectors."""
    return N_TENSOR_FEATURES + config["from_lstm_size"] + config["from_mlp_size"]


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape) for a validated config, in the runtime's order."""
    h, n_in = config["lstm_hidden_size"], lstm_input_size(config)
    f_l, f_m, f_ff = config["from_lstm_size"], config["from_mlp_size"], config["lstm_to_ff"]
    t = {
        "initial_from_lstm": TensorSpec(("initial_from_lstm",), (f_l,)),
        "initial_from_mlp": TensorSpec(("initial_from_mlp",), (f_m,)),
        "lstm_init.hidden": TensorSpec(("lstm_init_state", "hidden"), (1, h)),
        "lstm_init.cell": TensorSpec(("lstm_init_state", "cell"), (1, h)),
        "rnn.lstm.w": TensorSpec(
            ("rnn_params", "rnn/linear", "w"),
            (n_in + h, 4 * h),
            f"{N_TENSOR_FEATURES} tensor features + from_lstm {f_l} + from_mlp {f_m} + {h} hidden",
        ),
        "rnn.lstm.b": TensorSpec(("rnn_params", "rnn/linear", "b"), (4 * h,)),
        "rnn_to_ff.w": TensorSpec(("rnn_to_ff_params", "rnn_to_ff", "w"), (h, f_ff)),
        "rnn_to_ff.b": TensorSpec(("rnn_to_ff_params", "rnn_to_ff", "b"), (f_ff,)),
        "rnn_to_in.w": TensorSpec(("rnn_to_in_params", "rnn_to_in", "w"), (h, f_l)),
        "rnn_to_in.b": TensorSpec(("rnn_to_in_params", "rnn_to_in", "b"), (f_l,)),
    }
    sizes = mlp_sizes(config)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        note = f"{N_FF_FEATURES} element features + lstm_to_ff {f_ff}" if i == 0 else ""
        t[f"mlp.linear_{i}.w"] = TensorSpec(("ffmod_params", f"mlp/~/linear_{i}", "w"), (a, b), note)
        t[f"mlp.linear_{i}.b"] = TensorSpec(("ffmod_params", f"mlp/~/linear_{i}", "b"), (b,))
    return t


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
