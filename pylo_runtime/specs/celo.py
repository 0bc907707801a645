"""Celo (``amoudgl/celo`` @66d9761, ``celo.optimizers.celo.Celo``): the family spec.

The tensors are HyperV2's (``specs/velo.py``) with an LSTM that reads global features only: 9 tanh
embeddings of the fraction trained + 9 loss features (+1 validation flag), the controls head over the
``param_inits`` copies of the per-element MLP, and that MLP (``ff.*``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import (
    MAX_LAYERS,
    MAX_WIDTH,
    Config,
    check_options,
    finite_float,
    kinds_for,
    normalise,
    optional_number,
    sized,
)
from .common import TensorSpec as TensorSpec
from .common import check_theta as _check_theta
from .velo import FEATURE_SWITCHES, check_feature_combinations, ff_table, lstm_table
from .velo import ff_input_widths as ff_input_widths  # Celo's MLP inputs are HyperV2's

ARCH = "celo"
REFERENCE = "celo.optimizers.celo.Celo"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.celo:Celo"
#: LSTM inputs: 9 tanh embeddings of the fraction trained + 9 loss features (+1 validation flag).
LSTM_BASE_INPUTS = 18

#: Constructor arguments of ``celo.optimizers.celo.Celo`` as ``get_optimizer('celo')`` sets them (phase 2,
#: the published meta-test configuration); the rest are the class defaults.
DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 64,
    "ff_hidden_size": 4,
    "ff_hidden_layers": 2,
    "initial_momentum_decays": [0.9, 0.99, 0.999],
    "initial_rms_decays": [0.999],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "param_inits": 1,
    "mix_layers": True,
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "validation_mode": False,
    "with_validation_feature_dim": False,
    "train_phase": 2,
    **FEATURE_SWITCHES,
    "param_scale_mult": True,
    "precondition_output": False,
    "reparam_decay": 10.0,
    "rnn_state_decay": 0.0,
    "summarize_each_layer": False,
    "summarize_all_control": False,
    "constant_loss": False,
    "clip_param_scale_amount": None,
}

#: Validators of the options both Celo classes share (sizes bounded as in ``specs/common.py``).
SHARED_KINDS = {
    "lstm_hidden_size": sized(MAX_WIDTH),
    "ff_hidden_size": sized(MAX_WIDTH),
    "ff_hidden_layers": sized(MAX_LAYERS),
    "param_inits": sized(MAX_WIDTH),
    "exp_mult": finite_float,
    "step_mult": finite_float,
    "reparam_decay": finite_float,
    "rnn_state_decay": finite_float,
    "clip_param_scale_amount": optional_number,
}
# The reference's phases are 1 (meta-training the update rule) and 2 (with the learned scheduler).
_KINDS = kinds_for(DEFAULTS, {**SHARED_KINDS, "train_phase": sized(2)})


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, combinations); SpecError names it."""
    values = normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS)
    check_feature_combinations(who, values, lstm_features=False)
    return Config(ARCH, values)


def lstm_input_size(config: Mapping[str, Any]) -> int:
    """18 global LSTM inputs, +1 with ``with_validation_feature_dim``."""
    return LSTM_BASE_INPUTS + int(bool(config["with_validation_feature_dim"]))


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape): the scheduler, its controls head and the MLP copies."""
    lstm = lstm_table(
        config["lstm_hidden_size"], lstm_input_size(config), config["mix_layers"], config["param_inits"]
    )
    return {**lstm, **ff_table(config)}


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
