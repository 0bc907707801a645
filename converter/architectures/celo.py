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
from typing import Any

import numpy as np

from pylo_runtime.celo import CELO_DEFAULTS
from pylo_runtime.celo_adam import CELO_ADAM_DEFAULTS

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, few, float32_tensors, lookup
from .velo import FF, ff_shapes, ff_table, lstm_shapes, rnn_table
from .velo import ff_input_widths as ff_input_widths  # re-exported: Celo's MLP inputs are HyperV2's

#: Number of LSTM inputs: 9 tanh embeddings of the fraction trained + 9 loss features (+1 validation flag).
LSTM_BASE_INPUTS = 18


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
    base_defaults: Mapping[str, Any]
    has_ff: bool

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument with the value ``factory.get_optimizer`` gives it."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.base_defaults.items()}

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
        """Validate theta against the config, infer unbound sizes from shapes, name tensors by the table."""
        unknown = sorted(set(bindings) - set(self.base_defaults))
        if unknown:
            raise ConversionError(source, f"{self.name}: unknown constructor argument(s) {few(unknown)}")
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        config = self.defaults()
        config.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in bindings.items()})
        self._infer_sizes(tree, bindings, config, source)

        check_shapes(tree, self._expected_shapes(config), source, self.name)
        tensors, source_paths = float32_tensors(tree, self._table(config), source)
        return ArchSpec(self.name, config, tensors, source_paths)

    # ----------------------------------------------------------------------------------------------------
    def _infer_sizes(
        self, tree: Mapping[str, Any], bindings: Mapping[str, Any], config: dict[str, Any], source: str
    ) -> None:
        """Fill sizes not given in ``bindings`` from the shapes (theta.state carries no config)."""
        hidden = _shape(tree, ("lstm_init_state", "hidden"))
        if "lstm_hidden_size" not in bindings and hidden is not None and len(hidden) == 2:
            config["lstm_hidden_size"] = hidden[1]
        rows = _shape(tree, ("rnn_params", "linear_2", "w"))
        if "with_validation_feature_dim" not in bindings and rows is not None and len(rows) == 2:
            config["with_validation_feature_dim"] = rows[0] == LSTM_BASE_INPUTS + 1
        if self.has_ff:
            b0 = _shape(tree, (*FF, "b0"))
            if b0 is not None and len(b0) == 2:
                if "param_inits" not in bindings:
                    config["param_inits"] = b0[0]
                if "ff_hidden_size" not in bindings:
                    config["ff_hidden_size"] = b0[1]
            ff = lookup(tree, FF)
            if "ff_hidden_layers" not in bindings and isinstance(ff, Mapping):
                layers = [k for k in ff if k.startswith("w") and k[1:].isdigit()]
                if layers:
                    config["ff_hidden_layers"] = len(layers)
        for key in ("lstm_hidden_size", "param_inits", "ff_hidden_size", "ff_hidden_layers"):
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConversionError(source, f"{self.name}: {key} must be a positive int, got {value!r}")

    def _expected_shapes(self, config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
        """theta path -> shape the reference's ``init`` would give for ``config`` (HyperV2's layout)."""
        n_in = LSTM_BASE_INPUTS + (1 if config["with_validation_feature_dim"] else 0)
        shapes = lstm_shapes(config["lstm_hidden_size"], n_in, config["mix_layers"])
        return {**shapes, **ff_shapes(config)} if self.has_ff else shapes

    def _table(self, config: Mapping[str, Any]) -> dict[str, Keys]:
        """runtime tensor name -> theta path for ``config`` (HyperV2's names, velo.py)."""
        return {**rnn_table(config), **ff_table(config)} if self.has_ff else rnn_table(config)


CELO = _Celo("celo", ("celo.optimizers.celo.Celo",), CELO_DEFAULTS, has_ff=True)
CELO_ADAM = _Celo("celo_adam", ("celo.optimizers.celo_adam.Celo",), CELO_ADAM_DEFAULTS, has_ff=False)

ARCHITECTURES = [CELO, CELO_ADAM]
