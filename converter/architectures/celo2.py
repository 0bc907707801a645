"""Celo2 and Celo2Base (``amoudgl/celo`` ``celo/optimizers/celo2.py``): one architecture, ``celo2``.

theta is ``{"ff_mod_stack": {"~": {w0__0.., b0.., w1..}}}`` (the per-element MLP alone; no LSTM, no decay
offsets), written by ``flax.serialization.to_bytes(theta)`` as ``theta.state``; it carries no config. The
MLP sizes are read from the shapes; everything else is the class's defaults unless bound (``--set``, or a
registry entry's ``sets``: ``celo2`` = ``celo.factory.get_optimizer("celo2")``, ``celo2-base`` =
``get_optimizer("celo2base")`` = ``Celo2(regex_1d="", orthogonalize=False)``).

Gin: ``celo.optimizers.celo2.Celo2`` selects it. ``Celo2Base`` bindings are not claimed (their defaults
differ: ``orthogonalize=False`` and no Adam branch); convert those with ``--set regex_1d="''"
--set orthogonalize=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import celo2 as spec
from lopt_bridge.pylo_runtime.specs.celo2 import FF

from ..errors import ConversionError
from .base import ArchSpec, check_shapes, float32_tensors, lookup, table_shapes, validated


class Celo2Architecture:
    """The ``celo2`` architecture (module-level ``CELO2``)."""

    name = "celo2"
    gin_names = ("celo.optimizers.celo2.Celo2",)
    expects = "ff_mod_stack/~/w0__0.. b0.. w1.. alone (Celo2's per-element MLP, no LSTM, no decay offsets)"

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of ``celo.optimizers.celo2.Celo2`` with its class default."""
        return spec.validate({}).to_dict()

    def matches(self, tree: dict[str, Any]) -> bool:
        """Only ``ff_mod_stack/~`` with 2-D first-layer weights ``w0__i`` and a 1-D ``b0`` (Celo / VeLO keep
        a leading axis of MLP copies and an LSTM beside it)."""
        if not isinstance(tree, Mapping) or set(tree) != {"ff_mod_stack"}:
            return False
        ff = lookup(tree, FF)
        if not isinstance(ff, Mapping) or set(lookup(tree, ("ff_mod_stack",))) != {"~"}:
            return False
        w0, b0 = ff.get("w0__0"), ff.get("b0")
        return (
            w0 is not None and b0 is not None and not isinstance(w0, Mapping) and not isinstance(b0, Mapping)
            and np.ndim(w0) == 2 and np.ndim(b0) == 1
        )  # fmt: skip

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, infer the MLP sizes from the shapes, check theta, name the tensors."""
        config = validated(spec.validate, bindings, source)  # unknown keys, types, bounds: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        inferred = self._infer_sizes(tree, bindings, config, source)
        if inferred:
            config = validated(spec.validate, {**bindings, **inferred}, source)
        table = spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)

    def _infer_sizes(
        self, tree: Mapping[str, Any], bindings: Mapping[str, Any], config: Mapping[str, Any], source: str
    ) -> dict[str, Any]:
        """``ff_hidden_layers`` (the number of ``w1..``) and ``ff_hidden_size`` (``b0``) from theta; a bound
        value that disagrees is refused here, naming both."""
        ff = lookup(tree, FF)
        if not isinstance(ff, Mapping):
            return {}
        found: dict[str, Any] = {}
        layers = [k for k in ff if isinstance(k, str) and k[:1] == "w" and k[1:].isdigit() and k != "w0"]
        found["ff_hidden_layers"] = len(layers)
        b0 = np.shape(ff.get("b0")) if "b0" in ff and not isinstance(ff["b0"], Mapping) else ()
        if layers and len(b0) == 1:
            found["ff_hidden_size"] = int(b0[0])
        out = {}
        for key, value in found.items():
            if key in bindings and config[key] != value:
                raise ConversionError(
                    source, f"{self.name}: config says {key}={bindings[key]!r} but theta's MLP has {value}"
                )
            out[key] = value
        return out


CELO2 = Celo2Architecture()

ARCHITECTURES = [CELO2]
