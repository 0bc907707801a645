"""RNNMLPLOpt (learned_optimization ``learned_optimizers/rnn_mlp_lopt.py``; amoudgl/celo's copy).

learned_optimization saves ``params`` + ``config.gin`` (or a ``no_config`` checkpoint); celo saves a bare
``theta.state`` (``get_optimizer('rnn_mlp')`` = ``RNNMLPLOpt()``, the ``amoudgl/rnn-mlp-lopt`` file). The
two codes differ only in ``corrected_mean``'s epsilon, which the file's config records as
``corrected_mean_eps``: celo's 1e-7 for a ``theta.state`` source, learned_optimization's 1e-8 otherwise,
unless a binding says. Sizes are inferred from the shapes; ``decays`` (5 values) and the rates come from the
config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import rnn_mlp_lopt as spec

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, float32_tensors, lookup, table_shapes, tree_path, validated

#: The top-level keys of an RNNMLPLOpt theta.
KEYS = frozenset(
    {"ffmod_params", "initial_from_lstm", "initial_from_mlp", "lstm_init_state", "rnn_params"}
    | {"rnn_to_ff_params", "rnn_to_in_params"}
)
MLP = ("ffmod_params",)


def _layer(i: int) -> str:
    return f"mlp/~/linear_{i}"


def _dim(tree: Mapping[str, Any], keys: Keys, axis: int, rank: int) -> int | None:
    shape = np.shape(lookup(tree, keys)) if lookup(tree, keys) is not None else None
    return int(shape[axis]) if shape is not None and len(shape) == rank else None


class RNNMLPLOptArch:
    """The ``Architecture`` for ``RNNMLPLOpt``."""

    name = "rnn_mlp_lopt"
    gin_names = ("RNNMLPLOpt",)
    expects = "ffmod_params (mlp/~/linear_*), initial_from_lstm, initial_from_mlp, lstm_init_state, rnn_*"

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value (the spec's)."""
        return spec.validate({}).to_dict()

    def format_bindings(self, source_format: str) -> dict[str, Any]:
        """Bindings implied by the source format (the user's win): celo's epsilon for a theta.state."""
        if source_format == "theta_state":
            return {"corrected_mean_eps": spec.CELO_CORRECTED_MEAN_EPS}
        return {}

    def matches(self, tree: dict[str, Any]) -> bool:
        """Exactly RNNMLPLOpt's top-level keys."""
        return isinstance(tree, Mapping) and set(tree) == KEYS

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, then theta (sizes inferred from the shapes, checked); name tensors."""
        config = validated(spec.validate, bindings, source)  # unknown keys, types, bounds, 5 decays: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        found: dict[str, tuple[int, Keys]] = {}
        for key, keys, axis, rank in (
            ("lstm_hidden_size", ("lstm_init_state", "hidden"), 1, 2),
            ("from_lstm_size", ("initial_from_lstm",), 0, 1),
            ("from_mlp_size", ("initial_from_mlp",), 0, 1),
            ("lstm_to_ff", ("rnn_to_ff_params", "rnn_to_ff", "b"), 0, 1),
        ):
            value = _dim(tree, keys, axis, rank)
            if value is not None:
                found[key] = (value, keys)
        mlp = lookup(tree, MLP)
        n_layers = 0
        while (
            isinstance(mlp, Mapping) and _layer(n_layers) in mlp
        ):  # stops at a gap: the shape check names it
            n_layers += 1
        if n_layers:
            found["hidden_layer"] = (n_layers - 1, (*MLP, _layer(n_layers - 1)))
            width = _dim(tree, (*MLP, _layer(0), "b"), 0, 1)
            if n_layers > 1 and width is not None:
                found["hidden_size"] = (width, (*MLP, _layer(0), "b"))
        for key, (value, keys) in found.items():
            if key in bindings and config[key] != value:
                raise ConversionError(
                    source,
                    f"{self.name}: config says {key}={bindings[key]!r} but the theta has {key}={value} "
                    f"({tree_path(keys)})",
                )
        if found:
            config = validated(spec.validate, {**bindings, **{k: v for k, (v, _) in found.items()}}, source)
        table = spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)


ARCHITECTURES = [RNNMLPLOptArch()]
