"""VeLO = learned_optimization's ``HyperV2`` (research/general_lopt/hyper_v2.py): theta validation and naming.

The family knowledge (defaults, option validation, the tensor table: runtime name -> tree path + shape) is
the torch-free spec ``pylo_runtime/specs/velo.py``, shared with the runtime. This module adds what only
a converter needs: recognising a HyperV2 tree, inferring sizes a ``no_config`` checkpoint does not state
from the shapes (bound ones must agree), and reading the leaves. Values are written unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import velo as spec
from lopt_bridge.pylo_runtime.specs.velo import FF

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, lookup, table_shapes, tree_path, validated


def expected_shapes(config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
    """theta path -> shape that ``HyperV2(**config).init`` produces (from the spec's tensor table)."""
    return table_shapes(spec.tensor_table(config))


# ----------------------------------------------------------------------------------------------------
def _shape(tree: Any, keys: Keys) -> tuple[int, ...] | None:
    leaf = lookup(tree, keys)
    if leaf is None or isinstance(leaf, Mapping) or not hasattr(leaf, "shape"):
        return None
    return tuple(leaf.shape)


def _infer_sizes(
    tree: Mapping[str, Any], bindings: Mapping[str, Any], config: Mapping[str, Any], source: str
) -> dict:
    """Sizes not bound in ``bindings``, from the shapes; a bound size that disagrees is an error naming both.

    ``config`` is the validated bindings (defaults filled); returns the inferred options.
    """
    inferred: dict[str, Any] = {}
    found: dict[str, tuple[Any, Keys, tuple[int, ...]]] = {}
    hidden = _shape(tree, ("lstm_init_state", "hidden"))
    if hidden is not None and len(hidden) == 2:
        found["lstm_hidden_size"] = (hidden[1], ("lstm_init_state", "hidden"), hidden)
    b0 = _shape(tree, (*FF, "b0"))
    if b0 is not None and len(b0) == 2:
        found["param_inits"] = (b0[0], (*FF, "b0"), b0)
        found["ff_hidden_size"] = (b0[1], (*FF, "b0"), b0)
    ff = lookup(tree, FF)
    if isinstance(ff, Mapping):
        layers = sorted(k for k in ff if k.startswith("w") and k[1:].isdigit())
        if layers:
            found["ff_hidden_layers"] = (len(layers), FF, (len(layers),))
    for key, (value, keys, shape) in found.items():
        if key in bindings and bindings[key] != value:
            what = (
                f"{len(layers)} layers w1..w{len(layers)}" if key == "ff_hidden_layers" else f"shape {shape}"
            )
            raise ConversionError(
                source,
                f"velo: config sets {key} = {bindings[key]!r} but the theta has {key} = {value} "
                f"({tree_path(keys)}: {what})",
            )
        if key not in bindings:
            inferred[key] = int(value)
    if "with_validation_feature_dim" not in bindings:
        rows = _shape(tree, ("rnn_params", "linear_2", "w")) if config["mix_layers"] else None
        if (
            rows is not None
            and len(rows) == 2
            and rows[0] == spec.lstm_input_size({**config, "with_validation_feature_dim": True})
        ):
            inferred["with_validation_feature_dim"] = True
    return inferred


# ----------------------------------------------------------------------------------------------------
class _VeLO:
    """The ``Architecture`` for HyperV2 (module-level ``VELO``)."""

    name = "velo"
    gin_names: tuple[str, ...] = ("HyperV2",)

    def defaults(self) -> dict[str, Any]:
        """Every HyperV2 constructor argument with its default (the spec's)."""
        return spec.validate({}).to_dict()

    def matches(self, tree: dict[str, Any]) -> bool:
        """A HyperV2 theta: three top-level groups, a controls head, more LSTM inputs than Celo's 18/19."""
        if not isinstance(tree, Mapping) or set(tree) != {"lstm_init_state", "rnn_params", "ff_mod_stack"}:
            return False
        hidden = _shape(tree, ("lstm_init_state", "hidden"))
        if hidden is None or len(hidden) != 2:
            return False
        if _shape(tree, ("rnn_params", "rnn_to_controls", "w")) is None:
            return False
        if _shape(tree, ("rnn_params", "step_size", "w")) is None or _shape(tree, (*FF, "w0__0")) is None:
            return False
        rows = _shape(tree, ("rnn_params", "linear_2", "w"))
        if rows is None:
            lstm = _shape(tree, ("rnn_params", "rnn/linear", "w"))
            rows = None if lstm is None else (lstm[0] - hidden[1],)
        return rows is not None and rows[0] > 19  # Celo reads 18 (+1) global features only

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, then theta against the config; name its tensors by the spec's table."""
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"velo: theta is a {type(tree).__name__}, not a tree")
        config = validated(spec.validate, bindings, source)  # types, bounds, combinations: before any table
        inferred = _infer_sizes(tree, bindings, config, source)
        if inferred:
            config = validated(spec.validate, {**bindings, **inferred}, source)
        table = spec.tensor_table(config)
        order = ("wrong shape", "missing", "unexpected")
        check_shapes(tree, table_shapes(table), source, "VeLO (HyperV2)", order)

        tensors: dict[str, np.ndarray] = {}
        source_paths: dict[str, dict[str, Any]] = {}
        for out_name, ts in table.items():
            leaf = lookup(tree, ts.keys)
            arr = np.asarray(leaf) if isinstance(leaf, np.ndarray | np.generic) else None
            if arr is None or arr.dtype.kind != "f":
                what = type(leaf).__name__ if arr is None else f"dtype {arr.dtype}"
                raise ConversionError(source, f"velo: {ts.path} is {what}, expected a floating-point array")
            tensors[out_name] = arr
            source_paths[out_name] = {"path": ts.path, "keys": list(ts.keys), "transform": None}
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)


VELO = _VeLO()
ARCHITECTURES = [VELO]
