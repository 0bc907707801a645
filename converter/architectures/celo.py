"""Celo and Celo-Adam (``amoudgl/celo``): a learned LSTM step-size scheduler over an MLP / Adam update rule.

Both are published as ``theta.state`` (flax bytes of theta, no config): the architecture comes from the
registry or ``--set``/structure, the sizes from the tensor shapes, everything else from ``factory.py``'s
``get_optimizer('celo')`` / ``get_optimizer('celo_adam')`` arguments (``defaults()``).

Gin names: both reference classes are called ``Celo`` (modules ``celo.optimizers.celo`` and
``celo.optimizers.celo_adam``), so only the module-qualified names select one; a bare ``Celo`` is ambiguous
and left to ``matches``. The celo repo's ``HyperV2`` / ``AdafacMLPLOpt`` are not claimed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import celo as celo_spec
from lopt_bridge.pylo_runtime.specs import celo_adam as celo_adam_spec
from lopt_bridge.pylo_runtime.specs.celo import LSTM_BASE_INPUTS
from lopt_bridge.pylo_runtime.specs.velo import FF

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, float32_tensors, lookup, table_shapes, validated


def _shape(tree: Mapping[str, Any], keys: Keys) -> tuple[int, ...] | None:
    leaf = lookup(tree, keys)
    if leaf is None or isinstance(leaf, Mapping):
        return None
    return tuple(np.shape(leaf))


@dataclass(frozen=True)
class _Celo:
    """One of the two reference classes; module-level ``CELO`` / ``CELO_ADAM`` are the instances."""

    name: str
    gin_names: tuple[str, ...]
    spec: ModuleType  # the family spec (pylo_runtime.specs.celo / celo_adam)
    has_ff: bool

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument with the value ``factory.get_optimizer`` gives it (the spec's)."""
        return self.spec.validate({}).to_dict()

    # ----------------------------------------------------------------------------------------------------
    def matches(self, tree: dict[str, Any]) -> bool:
        """Celo: LSTM over 18/19 global inputs plus an ``ff_mod_stack``; Celo-Adam: the LSTM alone."""
        if not isinstance(tree, Mapping) or set(tree) - {"lstm_init_state", "rnn_params", "ff_mod_stack"}:
            return False
        if _shape(tree, ("rnn_params", "step_size", "w")) is None:
            return False
        if _shape(tree, ("lstm_init_state", "hidden")) is None:
            return False
        rows = _shape(tree, ("rnn_params", "linear_2", "w"))
        if rows is not None and rows[0] not in (LSTM_BASE_INPUTS, LSTM_BASE_INPUTS + 1):
            return False  # VeLO's LSTM also reads per-tensor features: many more inputs
        has_ff = "ff_mod_stack" in tree
        has_controls = lookup(tree, ("rnn_params", "rnn_to_controls")) is not None
        if self.has_ff:
            return has_ff and has_controls
        return not has_ff and not has_controls

    # ----------------------------------------------------------------------------------------------------
    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, infer unbound sizes from shapes, check theta, name tensors by the table."""
        config = validated(self.spec.validate, bindings, source)  # unknown keys, types, bounds: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        inferred = self._infer_sizes(tree, bindings)
        if inferred:
            config = validated(self.spec.validate, {**bindings, **inferred}, source)
        table = self.spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)

    # ----------------------------------------------------------------------------------------------------
    def _infer_sizes(self, tree: Mapping[str, Any], bindings: Mapping[str, Any]) -> dict[str, Any]:
        """Sizes not given in ``bindings``, from the shapes (theta.state carries no config)."""
        out: dict[str, Any] = {}
        hidden = _shape(tree, ("lstm_init_state", "hidden"))
        if "lstm_hidden_size" not in bindings and hidden is not None and len(hidden) == 2:
            out["lstm_hidden_size"] = hidden[1]
        rows = _shape(tree, ("rnn_params", "linear_2", "w"))
        if "with_validation_feature_dim" not in bindings and rows is not None and len(rows) == 2:
            out["with_validation_feature_dim"] = rows[0] == LSTM_BASE_INPUTS + 1
        if self.has_ff:
            b0 = _shape(tree, (*FF, "b0"))
            if b0 is not None and len(b0) == 2:
                if "param_inits" not in bindings:
                    out["param_inits"] = b0[0]
                if "ff_hidden_size" not in bindings:
                    out["ff_hidden_size"] = b0[1]
            ff = lookup(tree, FF)
            if "ff_hidden_layers" not in bindings and isinstance(ff, Mapping):
                layers = [k for k in ff if k.startswith("w") and k[1:].isdigit()]
                if layers:
                    out["ff_hidden_layers"] = len(layers)
        return out


CELO = _Celo("celo", ("celo.optimizers.celo.Celo",), celo_spec, has_ff=True)
CELO_ADAM = _Celo("celo_adam", ("celo.optimizers.celo_adam.Celo",), celo_adam_spec, has_ff=False)

ARCHITECTURES = [CELO, CELO_ADAM]
