"""NNAdam (learned_optimization ``learned_optimizers/nn_adam.py`` @32186aa4): the family spec.

amoudgl/celo's copy (``celo/optimizers/nn_adam.py`` @66d9761) is the same code (measured bit-identical), so
one architecture id serves both; celo's ``get_optimizer('nnadam')`` is ``NNAdam(lstm_hidden_size=64)``.

Theta (a FrozenDict; runtime name, source keys, shape; H = lstm_hidden_size)::

    lstm_init.{hidden,cell}      lstm_init_state/{hidden,cell}                  (1, H)
    rnn.lstm.{w,b}               rnn_params/rnn/linear/{w,b}                    (19 + H, 4H), (4H,)
    rnn.to_controls.{w,b}        rnn_to_controls_params/rnn_to_controls/{w,b}   (H, 4), (4,)
    per_layer_{lr,beta1,beta2,epsilon}                                          ()  (scaled hparams)

The ``initial_*`` arguments only set the four 0-d hparams at ``init``; the update reads them from theta.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import (
    MAX_WIDTH,
    Config,
    TensorSpec,
    check_options,
    finite_float,
    kinds_for,
    normalise,
    sized,
)
from .common import check_theta as _check_theta

ARCH = "nn_adam"
REFERENCE = "NNAdam"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.nn_adam:NNAdam"

#: Every constructor argument of ``NNAdam`` with its default (learned_optimization @32186aa4 = celo @66d9761).
DEFAULTS: dict[str, Any] = {
    "output_scale": 0.01,
    "initial_learning_rate": 1e-4,
    "initial_beta1": 0.9,
    "initial_beta2": 0.999,
    "initial_epsilon": 1e-8,
    "decay_strength": 0.0,
    "lstm_hidden_size": 32,
}
#: Per-tensor LSTM inputs (the reference hard-codes ``rnn_input_features = 19``).
N_LSTM_INPUTS = 19
#: The four hparams the LSTM moves, in the order of its ``rnn_to_controls`` outputs.
HPARAMS = ("lr", "beta1", "beta2", "epsilon")

_KINDS = kinds_for(
    DEFAULTS,
    {
        "output_scale": finite_float,
        "initial_learning_rate": finite_float,
        "initial_beta1": finite_float,
        "initial_beta2": finite_float,
        "initial_epsilon": finite_float,
        "decay_strength": finite_float,
        "lstm_hidden_size": sized(MAX_WIDTH),
    },
)


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds); SpecError names it."""
    return Config(ARCH, normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS))


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape) for a validated config, in the runtime's order."""
    h = config["lstm_hidden_size"]
    note = f"{N_LSTM_INPUTS} tensor features + {h} hidden"
    t = {
        "lstm_init.hidden": TensorSpec(("lstm_init_state", "hidden"), (1, h)),
        "lstm_init.cell": TensorSpec(("lstm_init_state", "cell"), (1, h)),
        "rnn.lstm.w": TensorSpec(("rnn_params", "rnn/linear", "w"), (N_LSTM_INPUTS + h, 4 * h), note),
        "rnn.lstm.b": TensorSpec(("rnn_params", "rnn/linear", "b"), (4 * h,)),
        "rnn.to_controls.w": TensorSpec(("rnn_to_controls_params", "rnn_to_controls", "w"), (h, 4)),
        "rnn.to_controls.b": TensorSpec(("rnn_to_controls_params", "rnn_to_controls", "b"), (4,)),
    }
    for name in HPARAMS:
        t[f"per_layer_{name}"] = TensorSpec((f"per_layer_{name}",), ())
    return t


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
