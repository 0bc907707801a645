"""muLO = ``MuAdafacMLPLOpt`` (bentherien/mu_learned_optimization @e160d548): the family spec.

Its theta is exactly small_fc_lopt's (``specs/adafac.py``); the class adds ``clip_grad`` and ``mup_lrs``
(stored, unused by the update: the per-tensor muP scales come from the model at run time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import adafac
from .common import MAX_TENSORS, Config, SpecError, TensorSpec, Validator, boolean
from .common import check_theta as _check_theta

ARCH = "mulo"
REFERENCE = "MuAdafacMLPLOpt"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.mulo:MuLO"

#: Every constructor argument of ``MuAdafacMLPLOpt`` with its default (mu_learned_optimization @e160d548).
#: ``mup_lrs`` is stored by the reference but unused: the scales come from the model's state at each step.
DEFAULTS: dict[str, Any] = {**adafac.DEFAULTS, "clip_grad": False, "mup_lrs": None}

#: Deepest nesting accepted in ``mup_lrs`` (the reference's are per-module dicts, two or three levels).
MAX_MUP_LRS_DEPTH = 16


def mup_lrs(who: str, key: str, v: Any) -> Any:
    """None, or numbers in (nested) lists / string-keyed dicts, at most ``MAX_TENSORS`` of them."""
    count = 0
    stack: list[tuple[Any, int]] = [(v, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if node is None and depth == 0:
            continue
        if depth > MAX_MUP_LRS_DEPTH or count > MAX_TENSORS:
            raise SpecError(f"{who}: option {key} nests deeper than {MAX_MUP_LRS_DEPTH} or is too large", key)
        if isinstance(node, Mapping) and all(isinstance(k, str) for k in node):
            stack += [(x, depth + 1) for x in node.values()]
        elif isinstance(node, list | tuple):
            stack += [(x, depth + 1) for x in node]
        elif isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
            raise SpecError(
                f"{who}: option {key} must be None or finite numbers in lists / dicts, got {node!r:.60}", key
            )
    return v if not isinstance(v, tuple) else list(v)


_KINDS: dict[str, Validator] = {**adafac.KINDS, "clip_grad": boolean, "mup_lrs": mup_lrs}

n_inputs = adafac.n_inputs


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, decay counts); SpecError names it."""
    return adafac.validate_family(config, who, ARCH, REFERENCE, DEFAULTS, _KINDS)


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape): small_fc_lopt's."""
    return adafac.tensor_table(config)


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)
