"""NNAdam (learned_optimization ``learned_optimizers/nn_adam.py``; amoudgl/celo's identical copy).

Published as learned_optimization ``params`` + ``config.gin`` (or a ``no_config`` checkpoint) and as celo's
bare ``theta.state`` (``get_optimizer('nnadam')`` = ``NNAdam(lstm_hidden_size=64)``); the tensor table is the
spec's (``pylo_runtime/specs/nn_adam.py``), ``lstm_hidden_size`` is inferred from the shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import nn_adam as spec

from ..errors import ConversionError
from .base import ArchSpec, check_shapes, float32_tensors, lookup, table_shapes, validated

#: The top-level keys of an NNAdam theta.
KEYS = frozenset(
    {"lstm_init_state", "rnn_params", "rnn_to_controls_params"} | {f"per_layer_{n}" for n in spec.HPARAMS}
)


class NNAdamArch:
    """The ``Architecture`` for ``NNAdam``."""

    name = "nn_adam"
    gin_names = ("NNAdam",)
    expects = "lstm_init_state, rnn_params (an LSTM over 19 inputs), rnn_to_controls_params and per_layer_*"

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value (the spec's)."""
        return spec.validate({}).to_dict()

    def matches(self, tree: dict[str, Any]) -> bool:
        """Exactly NNAdam's top-level keys (the LSTM, its 4-output head and the four scaled hparams)."""
        return isinstance(tree, Mapping) and set(tree) == KEYS

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, then theta (LSTM size inferred from the shapes, checked); name tensors."""
        config = validated(spec.validate, bindings, source)  # unknown keys, types, bounds: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        hidden = np.shape(lookup(tree, ("lstm_init_state", "hidden")))
        if len(hidden) == 2:
            if "lstm_hidden_size" in bindings and config["lstm_hidden_size"] != hidden[1]:
                raise ConversionError(
                    source,
                    f"{self.name}: config says lstm_hidden_size={bindings['lstm_hidden_size']!r} but theta's "
                    f"lstm_init_state/hidden has shape {tuple(hidden)}",
                )
            config = validated(spec.validate, {**bindings, "lstm_hidden_size": int(hidden[1])}, source)
        table = spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)


ARCHITECTURES = [NNAdamArch()]
