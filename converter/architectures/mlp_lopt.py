"""MLPLOpt (learned_optimization ``learned_optimizers/mlp_lopt.py``): a haiku ``hk.nets.MLP`` over 19 inputs.

Theta: ``mlp/~/linear_{i}`` with ``w`` (in, out) and ``b`` (out,) for layers
``[hidden_size] * hidden_layers + [2]``; the first layer reads 19 features (g, p, six momenta, 11 time).
Runtime names: ``linear_{i}.w`` / ``linear_{i}.b``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pylo_runtime.mlp_lopt import DEFAULTS as MLP_LOPT_DEFAULTS  # one source of truth: the runtime's

from ..errors import ConversionError
from .base import ArchSpec, check_shapes, few, float32_tensors, lookup

#: g, p, momenta at 6 fixed decays, 11 tanh time features.
N_INPUTS = 19


def _layer(i: int) -> str:
    return f"mlp/~/linear_{i}"


class MLPLOptArch:
    """The ``Architecture`` for ``MLPLOpt``."""

    name = "mlp_lopt"
    gin_names = ("MLPLOpt",)
    expects = "mlp/~/linear_0 .. linear_N with w (19, h) ... (h, 2) and b"

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value."""
        return dict(MLP_LOPT_DEFAULTS)

    def matches(self, tree: dict[str, Any]) -> bool:
        """Only ``mlp/~/linear_{i}`` modules, the first reading 19 inputs."""
        if not isinstance(tree, Mapping) or not tree or _layer(0) not in tree:
            return False
        if any(not str(k).startswith("mlp/~/linear_") for k in tree):
            return False
        return np.shape(lookup(tree, (_layer(0), "w")))[:1] == (N_INPUTS,)

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate theta (hidden sizes inferred from shapes, checked against bindings) and name tensors."""
        unknown = sorted(set(bindings) - set(MLP_LOPT_DEFAULTS))
        if unknown:
            raise ConversionError(source, f"{self.name}: unknown constructor argument(s) {few(unknown)}")
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        config = self.defaults()
        config.update(bindings)
        for key in ("exp_mult", "step_mult"):
            if isinstance(config[key], bool) or not isinstance(config[key], (int, float)):
                raise ConversionError(source, f"{self.name}: {key} must be a number, got {config[key]!r}")
        n_layers = sum(1 for i in range(len(tree)) if _layer(i) in tree)
        if n_layers:
            inferred = {"hidden_layers": n_layers - 1}
            if n_layers > 1:
                shape = np.shape(lookup(tree, (_layer(0), "b")))
                if len(shape) == 1:
                    inferred["hidden_size"] = shape[0]
            for key, value in inferred.items():
                if key in bindings and int(bindings[key]) != value:
                    raise ConversionError(
                        source,
                        f"{self.name}: config says {key}={bindings[key]!r} but theta's MLP has {value}",
                    )
                config[key] = value
        for key in ("hidden_size", "hidden_layers"):
            v = config[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "hidden_size" else 0):
                raise ConversionError(source, f"{self.name}: {key} must be a positive int, got {v!r}")

        sizes = [config["hidden_size"]] * config["hidden_layers"] + [2]
        expected: dict[tuple[str, ...], tuple[int, ...]] = {}
        n_in = N_INPUTS
        for i, out in enumerate(sizes):
            expected[(_layer(i), "w")] = (n_in, out)
            expected[(_layer(i), "b")] = (out,)
            n_in = out
        check_shapes(tree, expected, source, self.name)
        table = {f"{keys[0].rsplit('/', 1)[1]}.{keys[1]}": keys for keys in expected}
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config, tensors, source_paths)


ARCHITECTURES = [MLPLOptArch()]
