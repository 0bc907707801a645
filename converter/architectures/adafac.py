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
from typing import Any

import numpy as np

from pylo_runtime.adafac import DEFAULTS as ADAFAC_DEFAULTS  # one source of truth: the runtime's

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, few, float32_tensors, lookup

#: Number of tanh time features appended to the normalised per-element features.
N_TIME_FEATURES = 11
_NN = ("nn", "~")
_DECAYS = (
    ("momentum_decays", "initial_momentum_decays"),
    ("rms_decays", "initial_rms_decays"),
    ("adafactor_decays", "initial_adafactor_decays"),
)
_BOOLS = ("concat_weights", "make_separate_weights", "split_weights")


def n_inputs(config: Mapping[str, Any]) -> int:
    """Width of the first MLP layer for ``config``: per-element features (broadcast as the reference) + 11."""
    n_mom = len(config["initial_momentum_decays"])
    n_rms = len(config["initial_rms_decays"])
    n_fac = len(config["initial_adafactor_decays"])

    def bc(a: int, b: int) -> int:
        return max(a, b) if a == b or min(a, b) == 1 else -1

    return (
        2 + n_mom + n_rms + bc(n_mom, n_rms) + n_rms + n_fac + 4 * n_fac + bc(n_mom, n_fac) + N_TIME_FEATURES
    )


def layer_sizes(config: Mapping[str, Any]) -> list[int]:
    """``[hidden_size] * hidden_layers + [2]``."""
    return [int(config["hidden_size"])] * int(config["hidden_layers"]) + [2]


def separate_weights(config: Mapping[str, Any]) -> bool:
    """Whether the reference stores the MLP as scalars (``w{i}_{v}_{o}``) rather than matrices."""
    return not config["concat_weights"] and bool(config["make_separate_weights"])


def _norm(value: Any) -> Any:
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class AdafacFamily:
    """One gin class of the AdafacMLPLOpt family (small_fc_lopt, muLO): same theta, different defaults."""

    name: str
    gin_names: tuple[str, ...]
    base_defaults: Mapping[str, Any]
    detectable: bool = True
    expects: str = field(
        default="momentum_decays, rms_decays, adafactor_decays and nn/~/w0.. nn/~/b0.. (an MLP ending in 2)"
    )

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value."""
        return {k: _norm(v) for k, v in self.base_defaults.items()}

    def matches(self, tree: dict[str, Any]) -> bool:
        """Decay offsets ``momentum_decays``/``rms_decays``/``adafactor_decays`` plus an ``nn/~`` MLP."""
        if not self.detectable or not isinstance(tree, Mapping):
            return False
        if set(tree) != {"momentum_decays", "rms_decays", "adafactor_decays", "nn"}:
            return False
        nn = lookup(tree, _NN)
        return isinstance(nn, Mapping) and ("b0" in nn or "b0_0" in nn)

    # ----------------------------------------------------------------------------------------------------
    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate theta against the config (sizes inferred from shapes, checked against bindings)."""
        unknown = sorted(set(bindings) - set(self.base_defaults))
        if unknown:
            raise ConversionError(source, f"{self.name}: unknown constructor argument(s) {few(unknown)}")
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        config = self.defaults()
        config.update({k: _norm(v) for k, v in bindings.items()})
        self._check_values(config, source)
        self._infer_sizes(tree, bindings, config, source)

        check_shapes(tree, self._expected_shapes(config), source, self.name)
        tensors, source_paths = float32_tensors(tree, self.table(config), source)
        return ArchSpec(self.name, config, tensors, source_paths)

    # ----------------------------------------------------------------------------------------------------
    def _check_values(self, config: Mapping[str, Any], source: str) -> None:
        for key in ("exp_mult", "step_mult"):
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConversionError(source, f"{self.name}: {key} must be a number, got {v!r}")
        for key in _BOOLS + tuple(k for k in ("clip_grad",) if k in config):
            if not isinstance(config[key], bool):
                raise ConversionError(
                    source, f"{self.name}: {key} must be True or False, got {config[key]!r}"
                )
        for _, init in _DECAYS:
            v = config[init]
            if not isinstance(v, list) or not v or not all(isinstance(d, (int, float)) for d in v):
                raise ConversionError(
                    source, f"{self.name}: {init} must be a non-empty list of numbers, got {v!r}"
                )
        if n_inputs(config) < 0:
            raise ConversionError(
                source,
                f"{self.name}: momentum, rms and adafactor decay counts do not broadcast "
                f"({len(config['initial_momentum_decays'])}, {len(config['initial_rms_decays'])}, "
                f"{len(config['initial_adafactor_decays'])}); the reference fails on it",
            )

    def _infer_sizes(
        self, tree: Mapping[str, Any], bindings: Mapping[str, Any], config: dict[str, Any], source: str
    ) -> None:
        """hidden_size / hidden_layers from the MLP shapes; decay counts checked against the offsets."""
        nn = lookup(tree, _NN)
        if isinstance(nn, Mapping):
            if separate_weights(config):
                layers = sorted({int(k[1:].split("_")[0]) for k in nn if k.startswith("b") and "_" in k})
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
        for leaf, init in _DECAYS:
            shape = np.shape(lookup(tree, (leaf,)))
            if len(shape) == 1 and shape[0] != len(config[init]):
                raise ConversionError(
                    source,
                    f"{self.name}: theta {leaf} has {shape[0]} decays but {init} has {len(config[init])} "
                    f"({config[init]}); set {init} to the values used in meta-training",
                )

    def _expected_shapes(self, config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
        shapes: dict[Keys, tuple[int, ...]] = {(leaf,): (len(config[init]),) for leaf, init in _DECAYS}
        n_in = n_inputs(config)
        for i, out in enumerate(layer_sizes(config)):
            if separate_weights(config):
                for v in range(n_in):
                    for o in range(out):
                        shapes[(*_NN, f"w{i}_{v}_{o}")] = ()
                for o in range(out):
                    shapes[(*_NN, f"b{i}_{o}")] = ()
            else:
                shapes[(*_NN, f"w{i}")] = (n_in, out)
                shapes[(*_NN, f"b{i}")] = (out,)
            n_in = out
        return shapes

    def table(self, config: Mapping[str, Any]) -> dict[str, Keys]:
        """Runtime name -> theta path: the decay offsets, ``nn.w{i}`` / ``nn.b{i}`` (or the scalars)."""
        table: dict[str, Keys] = {leaf: (leaf,) for leaf, _ in _DECAYS}
        for keys in self._expected_shapes(config):
            if keys[:2] == _NN:
                table[f"nn.{keys[2]}"] = keys
        return table


SMALL_FC_LOPT = AdafacFamily("small_fc_lopt", ("AdafacMLPLOpt",), ADAFAC_DEFAULTS)

ARCHITECTURES = [SMALL_FC_LOPT]
