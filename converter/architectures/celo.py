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
from .base import ArchSpec

#: Number of LSTM inputs: 9 tanh embeddings of the fraction trained + 9 loss features (+1 validation flag).
LSTM_BASE_INPUTS = 18

#: runtime name -> (path in theta, transform) for the LSTM scheduler shared by both architectures.
#: ``linear`` is the first mix layer: the reference computes it and overwrites the result (dead weights).
_RNN_TABLE: dict[str, tuple[str, ...]] = {
    "lstm_init.cell": ("lstm_init_state", "cell"),
    "lstm_init.hidden": ("lstm_init_state", "hidden"),
    "rnn.mix_unused.w": ("rnn_params", "linear", "w"),
    "rnn.mix_unused.b": ("rnn_params", "linear", "b"),
    "rnn.mix.w": ("rnn_params", "linear_1", "w"),
    "rnn.mix.b": ("rnn_params", "linear_1", "b"),
    "rnn.in.w": ("rnn_params", "linear_2", "w"),
    "rnn.in.b": ("rnn_params", "linear_2", "b"),
    "rnn.lstm.w": ("rnn_params", "rnn/linear", "w"),
    "rnn.lstm.b": ("rnn_params", "rnn/linear", "b"),
    "rnn.step_size.w": ("rnn_params", "step_size", "w"),
    "rnn.step_size.b": ("rnn_params", "step_size", "b"),
}
#: Celo only: per-tensor controls that mix the ``param_inits`` MLP copies (no effect when param_inits == 1).
_CONTROLS_TABLE: dict[str, tuple[str, ...]] = {
    "rnn.to_controls.w": ("rnn_params", "rnn_to_controls", "w"),
    "rnn.to_controls.b": ("rnn_params", "rnn_to_controls", "b"),
}
_FF = ("ff_mod_stack", "~")  # haiku: parameters made outside any module


def ff_input_widths(config: Mapping[str, Any]) -> list[int]:
    """Channel count of each per-element MLP input of Celo's ``_ff_mod``, in the reference's order."""
    km = len(config["initial_momentum_decays"])
    kr = len(config["initial_rms_decays"])
    kf = len(config["initial_adafactor_decays"])
    widths: list[int] = []
    if config["with_g"]:
        widths.append(1)
    if config["with_grad_clip_feat"]:
        widths.append(1)
    if config["with_p"]:
        widths.append(1)
    if config["with_m"] and config["with_m_feat"]:
        widths.append(km)
    if config["with_rms"] and config["with_rms_feat"]:
        widths.append(kr)
    if config["with_rms_norm_g"]:
        widths.append(max(km, kr))
    if config["with_rsqrt_rms"]:
        widths.append(kr)
    if config["with_fac_norm_g"]:
        widths.append(kf)
    if config["with_rms_only_norm_g"]:
        widths.append(kr)
    if config["adafactor_accumulator"]:
        # The factored and the diagonal branch give the same widths (both appended twice).
        if config["with_fac_rms"]:
            widths += [kf, kf]
        if config["with_fac_rsqrt"]:
            widths += [kf, kf]
        if config["with_fac_mom_mult"]:
            widths.append(max(km, kf))
    return widths


Keys = tuple[str, ...]


def _lookup(tree: Mapping[str, Any], keys: Keys) -> Any:
    """The node at ``keys`` (haiku module names such as ``rnn/linear`` are single keys), or None."""
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _leaves(tree: Mapping[str, Any], prefix: Keys = ()) -> list[Keys]:
    out: list[Keys] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def _shape(tree: Mapping[str, Any], keys: Keys) -> tuple[int, ...] | None:
    leaf = _lookup(tree, keys)
    if leaf is None or isinstance(leaf, Mapping):
        return None
    return tuple(np.shape(leaf))


def _path(keys: Keys) -> str:
    return "/".join(keys)


def _few(items: list[str], limit: int = 6) -> str:
    """Join at most ``limit`` items, so an error stays one readable line."""
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


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
        has_controls = _lookup(tree, ("rnn_params", "rnn_to_controls")) is not None
        if self.has_ff:
            return has_ff and has_controls
        return not has_ff and not has_controls

    # ----------------------------------------------------------------------------------------------------
    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate theta against the config, infer unbound sizes from shapes, name tensors by the table."""
        unknown = sorted(set(bindings) - set(self.base_defaults))
        if unknown:
            raise ConversionError(source, f"{self.name}: unknown constructor argument(s) {_few(unknown)}")
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"{self.name}: theta is a {type(tree).__name__}, not a tree")
        config = self.defaults()
        config.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in bindings.items()})
        self._infer_sizes(tree, bindings, config, source)

        expected = self._expected_shapes(config)
        found = {keys: tuple(np.shape(_lookup(tree, keys))) for keys in _leaves(tree)}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append("missing " + _few([f"{_path(k)} {expected[k]}" for k in missing]))
            if extra:
                parts.append("unexpected " + _few([f"{_path(k)} {found[k]}" for k in extra]))
            if wrong:
                parts.append(
                    "wrong shape " + _few([f"{_path(k)} {found[k]} (expected {expected[k]})" for k in wrong])
                )
            raise ConversionError(source, f"not a {self.name} theta for this config: " + "; ".join(parts))

        tensors: dict[str, np.ndarray] = {}
        source_paths: dict[str, dict[str, Any]] = {}
        for out_name, keys in self._table(config).items():
            arr = np.asarray(_lookup(tree, keys))
            if arr.dtype != np.float32:
                raise ConversionError(source, f"{_path(keys)}: dtype {arr.dtype}, expected float32")
            tensors[out_name] = arr
            source_paths[out_name] = {"path": _path(keys), "keys": list(keys), "transform": None}
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
            b0 = _shape(tree, (*_FF, "b0"))
            if b0 is not None and len(b0) == 2:
                if "param_inits" not in bindings:
                    config["param_inits"] = b0[0]
                if "ff_hidden_size" not in bindings:
                    config["ff_hidden_size"] = b0[1]
            ff = _lookup(tree, _FF)
            if "ff_hidden_layers" not in bindings and isinstance(ff, Mapping):
                layers = [k for k in ff if k.startswith("w") and k[1:].isdigit()]
                if layers:
                    config["ff_hidden_layers"] = len(layers)
        for key in ("lstm_hidden_size", "param_inits", "ff_hidden_size", "ff_hidden_layers"):
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConversionError(source, f"{self.name}: {key} must be a positive int, got {value!r}")

    def _expected_shapes(self, config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
        """theta path -> shape the reference's ``init`` would give for ``config``."""
        h = config["lstm_hidden_size"]
        n_in = LSTM_BASE_INPUTS + (1 if config["with_validation_feature_dim"] else 0)
        lstm_in = h if config["mix_layers"] else n_in
        shapes: dict[Keys, tuple[int, ...]] = {
            ("lstm_init_state", "cell"): (1, h),
            ("lstm_init_state", "hidden"): (1, h),
            ("rnn_params", "rnn/linear", "w"): (lstm_in + h, 4 * h),
            ("rnn_params", "rnn/linear", "b"): (4 * h,),
            ("rnn_params", "step_size", "w"): (h, 1),
            ("rnn_params", "step_size", "b"): (1,),
        }
        if config["mix_layers"]:
            for layer in ("linear", "linear_1", "linear_2"):
                shapes[("rnn_params", layer, "w")] = (n_in, h)
                shapes[("rnn_params", layer, "b")] = (h,)
        if not self.has_ff:
            return shapes
        k = config["param_inits"]
        shapes[("rnn_params", "rnn_to_controls", "w")] = (h, k)
        shapes[("rnn_params", "rnn_to_controls", "b")] = (k,)
        hid = config["ff_hidden_size"]
        for i, width in enumerate(ff_input_widths(config)):
            shapes[(*_FF, f"w0__{i}")] = (k, width, hid)
        sizes = [hid] * config["ff_hidden_layers"] + [3]
        for i, size in enumerate(sizes):
            shapes[(*_FF, f"b{i}")] = (k, size)
            if i > 0:
                shapes[(*_FF, f"w{i}")] = (k, sizes[i - 1], size)
        return shapes

    def _table(self, config: Mapping[str, Any]) -> dict[str, Keys]:
        """runtime tensor name -> theta path for ``config`` (``w0__i`` in numeric, not string, order)."""
        mix_only = ("rnn.mix_unused.", "rnn.mix.", "rnn.in.")
        table = {k: v for k, v in _RNN_TABLE.items() if config["mix_layers"] or not k.startswith(mix_only)}
        if not self.has_ff:
            return table
        table.update(_CONTROLS_TABLE)
        for i in range(len(ff_input_widths(config))):
            table[f"ff.w0.{i}"] = (*_FF, f"w0__{i}")
        for i in range(config["ff_hidden_layers"] + 1):
            if i > 0:
                table[f"ff.w{i}"] = (*_FF, f"w{i}")
            table[f"ff.b{i}"] = (*_FF, f"b{i}")
        return table


CELO = _Celo("celo", ("celo.optimizers.celo.Celo",), CELO_DEFAULTS, has_ff=True)
CELO_ADAM = _Celo("celo_adam", ("celo.optimizers.celo_adam.Celo",), CELO_ADAM_DEFAULTS, has_ff=False)

ARCHITECTURES = [CELO, CELO_ADAM]
