"""MLPLOpt (learned_optimization ``learned_optimizers/mlp_lopt.py`` @32186aa4): the family spec.

Theta: a haiku ``hk.nets.MLP`` ``mlp/~/linear_{i}`` with ``w`` (in, out) and ``b`` (out,) for layers
``[hidden_size] * hidden_layers + [2]``; the first layer reads 19 features (g, p, six momenta, 11 time).
Runtime names: ``linear_{i}.w`` / ``linear_{i}.b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import (
    MAX_LAYERS,
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

ARCH = "mlp_lopt"
REFERENCE = "MLPLOpt"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.mlp_lopt:MLPLOpt"

#: Every constructor argument of ``MLPLOpt`` with its default (learned_optimization @32186aa4).
DEFAULTS: dict[str, Any] = {
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "hidden_size": 32,
    "hidden_layers": 2,
    "compute_summary": True,
}
#: The momentum decays are fixed in the reference, not meta-learned.
DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
#: g, p, momenta at the 6 fixed decays, 11 tanh time features.
N_INPUTS = 2 + len(DECAYS) + 11

_KINDS = kinds_for(
    DEFAULTS,
    {
        "exp_mult": finite_float,
        "step_mult": finite_float,
        "hidden_size": sized(MAX_WIDTH),
        "hidden_layers": sized(MAX_LAYERS, low=0),
    },
)


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds); SpecError names it."""
    return Config(ARCH, normalise(who, check_options(who, config, DEFAULTS, REFERENCE), _KINDS))


def layer(i: int) -> str:
    """The haiku module name of layer ``i``."""
    return f"mlp/~/linear_{i}"


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape): ``linear_{i}.w`` then ``linear_{i}.b``, layer by layer."""
    sizes = [config["hidden_size"]] * config["hidden_layers"] + [2]
    table: dict[str, TensorSpec] = {}
    n_in = N_INPUTS
    for i, out in enumerate(sizes):
        note = (
            f"the first layer reads {N_INPUTS} inputs: g, p, {len(DECAYS)} momenta, 11 time" if i == 0 else ""
        )
        table[f"linear_{i}.w"] = TensorSpec((layer(i), "w"), (n_in, out), note)
        table[f"linear_{i}.b"] = TensorSpec((layer(i), "b"), (out,))
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
