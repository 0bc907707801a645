"""Celo-Adam (``amoudgl/celo`` @66d9761, ``celo.optimizers.celo_adam.Celo``): the family spec.

Theta is Celo's LSTM scheduler alone (no controls head, no per-element MLP): the update is an Adam step.
The MLP-related options are constructor arguments the reference keeps but never reads; they are validated
and carried all the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .celo import SHARED_KINDS, lstm_input_size
from .common import Config, TensorSpec, check_options, finite_float, kinds_for, normalise
from .common import check_theta as _check_theta
from .velo import FEATURE_SWITCHES, lstm_table

ARCH = "celo_adam"
REFERENCE = "celo.optimizers.celo_adam.Celo"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.celo_adam:CeloAdam"

#: Constructor arguments of ``celo.optimizers.celo_adam.Celo`` as ``get_optimizer('celo_adam')`` sets them.
DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 64,
    "ff_hidden_size": 4,
    "ff_hidden_layers": 2,
    "initial_momentum_decays": [0.9],
    "initial_rms_decays": [0.999],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "param_inits": 64,
    "mix_layers": True,
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "validation_mode": False,
    "with_validation_feature_dim": False,
    "initial_epsilon": 1e-8,
    **FEATURE_SWITCHES,
    "param_scale_mult": False,
    "precondition_output": False,
    "reparam_decay": 10.0,
    "rnn_state_decay": 0.0,
    "mom_decay": True,
    "summarize_each_layer": False,
    "summarize_all_control": False,
    "constant_loss": False,
    "clip_param_scale_amount": None,
}

_KINDS = kinds_for(DEFAULTS, {**SHARED_KINDS, "initial_epsilon": finite_float})


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds); SpecError names it."""
    return Config(ARCH, normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS))


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape): the LSTM scheduler only."""
    return lstm_table(config["lstm_hidden_size"], lstm_input_size(config), config["mix_layers"], None)


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
