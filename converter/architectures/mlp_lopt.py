"""MLPLOpt (learned_optimization ``learned_optimizers/mlp_lopt.py``): a haiku ``hk.nets.MLP`` over 19 inputs.

Theta: ``mlp/~/linear_{i}`` with ``w`` (in, out) and ``b`` (out,) for layers
``[hidden_size] * hidden_layers + [2]``; the first layer reads 19 features (g, p, six momenta, 11 time).
Runtime names: ``linear_{i}.w`` / ``linear_{i}.b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import mlp_lopt as spec
from lopt_bridge.pylo_runtime.specs.mlp_lopt import N_INPUTS, layer

from ..errors import ConversionError
from .base import ArchSpec, check_shapes, float32_tensors, lookup, table_shapes, validated


class MLPLOptArch:
    """The ``Architecture`` for ``MLPLOpt``."""

    name = "mlp_lopt"
    gin_names = ("MLPLOpt",)
    expects = "mlp/~/linear_0 .. linear_N with w (19, h) ... (h, 2) and b"

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value (the spec's)."""
        return spec.validate({}).to_dict()

    def matches(self, tree: dict[str, Any]) -> bool:
        """Only ``mlp/~/linear_{i}`` modules, the first reading 19 inputs."""
        if not isinstance(tree, Mapping) or not tree or layer(0) not in tree:
            return False
        if any(not str(k).startswith("mlp/~/linear_") for k in tree):
            return False
        return np.shape(lookup(tree, (layer(0), "w")))[:1] == (N_INPUTS,)

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, then theta (hidden sizes inferred from shapes, checked) and name tensors."""
        config = validated(spec.validate, bindings, source)  # unknown keys, types, bounds: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        n_layers = 0
        while layer(n_layers) in tree:  # stops at the first gap: the shape check names what is left over
            n_layers += 1
        inferred: dict[str, Any] = {}
        if n_layers:
            inferred["hidden_layers"] = n_layers - 1
            if n_layers > 1:
                shape = np.shape(lookup(tree, (layer(0), "b")))
                if len(shape) == 1:
                    inferred["hidden_size"] = shape[0]
            for key, value in inferred.items():
                if key in bindings and config[key] != value:
                    raise ConversionError(
                        source,
                        f"{self.name}: config says {key}={bindings[key]!r} but theta's MLP has {value}",
                    )
            config = validated(spec.validate, {**bindings, **inferred}, source)
        table = spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)


ARCHITECTURES = [MLPLOptArch()]
