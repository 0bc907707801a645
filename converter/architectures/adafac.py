"""small_fc_lopt: learned_optimization's ``AdafacMLPLOpt`` (also amoudgl's ``adafac-mlp-lopt``, same tree).

Theta (haiku, parameters made outside any module, hence ``~``)::

    momentum_decays (n_mom,)  rms_decays (n_rms,)  adafactor_decays (n_fac,)   meta-learned decay offsets
    nn/~/w{i} (in, out), nn/~/b{i} (out,)      layers [hidden_size] * hidden_layers + [2]
    nn/~/w{i}_{v}_{o} (), nn/~/b{i}_{o} ()     instead, when concat_weights=False and make_separate_weights

amoudgl/celo's ``celo/optimizers/adafac_mlp_lopt.py`` is a reformatted copy of the same class (same defaults,
same tree), so its ``theta.state`` converts with this architecture. ``split_weights`` has no effect in the
reference (its branch is unreachable) but is carried in the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import adafac as adafac_spec
from lopt_bridge.pylo_runtime.specs.adafac import DECAY_OFFSETS, NN, separate_weights

from ..errors import ConversionError
from .base import ArchSpec, check_shapes, float32_tensors, lookup, table_shapes, validated


@dataclass(frozen=True)
class AdafacFamily:
    """One gin class of the AdafacMLPLOpt family (small_fc_lopt, muLO): same theta, different defaults."""

    name: str
    gin_names: tuple[str, ...]
    spec: ModuleType  # the family spec (pylo_runtime.specs.adafac / mulo)
    detectable: bool = True
    expects: str = field(
        default="momentum_decays, rms_decays, adafactor_decays and nn/~/w0.. nn/~/b0.. (an MLP ending in 2)"
    )

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value (the spec's)."""
        return self.spec.validate({}).to_dict()

    def matches(self, tree: dict[str, Any]) -> bool:
        """Decay offsets ``momentum_decays``/``rms_decays``/``adafactor_decays`` plus an ``nn/~`` MLP."""
        if not self.detectable or not isinstance(tree, Mapping):
            return False
        if set(tree) != {"momentum_decays", "rms_decays", "adafactor_decays", "nn"}:
            return False
        nn = lookup(tree, NN)
        return isinstance(nn, Mapping) and ("b0" in nn or "b0_0" in nn)

    # ----------------------------------------------------------------------------------------------------
    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate the bindings, then theta against the config (sizes inferred from shapes, checked)."""
        config = validated(self.spec.validate, bindings, source)  # unknown keys, types, bounds: first
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        inferred = self._infer_sizes(tree, bindings, config, source)
        if inferred:
            config = validated(self.spec.validate, {**bindings, **inferred}, source)
        table = self.spec.tensor_table(config)
        check_shapes(tree, table_shapes(table), source, self.name)
        tensors, source_paths = float32_tensors(tree, table, source)
        return ArchSpec(self.name, config.to_dict(), tensors, source_paths)

    # ----------------------------------------------------------------------------------------------------
    def _infer_sizes(
        self, tree: Mapping[str, Any], bindings: Mapping[str, Any], config: Mapping[str, Any], source: str
    ) -> dict[str, Any]:
        """hidden_size / hidden_layers from the MLP shapes; decay counts checked against the offsets."""
        out: dict[str, Any] = {}
        nn = lookup(tree, NN)
        if isinstance(nn, Mapping):
            if separate_weights(config):
                layers = sorted({_int(k[1:].split("_")[0]) for k in nn if k.startswith("b") and "_" in k})
                hidden = sum(1 for k in nn if k.startswith("b0_"))
            else:
                layers = sorted(int(k[1:]) for k in nn if k.startswith("b") and k[1:].isdigit())
                b0 = np.shape(nn.get("b0"))
                hidden = b0[0] if len(b0) == 1 else None
            if layers:
                n_hidden = len(layers) - 1
                for key, value in (("hidden_layers", n_hidden), ("hidden_size", hidden)):
                    if value is None or (key == "hidden_size" and n_hidden == 0):
                        continue
                    if key in bindings and config[key] != value:
                        raise ConversionError(
                            source,
                            f"{self.name}: config says {key}={bindings[key]!r} but theta's MLP has {value}",
                        )
                    out[key] = value
        for leaf, init in DECAY_OFFSETS:
            shape = np.shape(lookup(tree, (leaf,)))
            if len(shape) == 1 and shape[0] != len(config[init]):
                raise ConversionError(
                    source,
                    f"{self.name}: theta {leaf} has {shape[0]} decays but {init} has {len(config[init])} "
                    f"({config[init]}); set {init} to the values used in meta-training",
                )
        return out


def _int(text: str) -> int:
    """A layer index from a leaf name; -1 when it is not a number (then the shape check names the leaf)."""
    return int(text) if text.isdigit() else -1


SMALL_FC_LOPT = AdafacFamily("small_fc_lopt", ("AdafacMLPLOpt",), adafac_spec)

ARCHITECTURES = [SMALL_FC_LOPT]
