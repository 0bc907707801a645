"""VeLO = learned_optimization's ``HyperV2`` (research/general_lopt/hyper_v2.py): theta validation and naming.

Theta (haiku params, flax state-dict form)::

    lstm_init_state/{hidden,cell}                  (1, H)
    rnn_params/linear/{w,b}                        (F, H), (H,)   first mix layer: computed, then overwritten
    rnn_params/linear_1/{w,b}, linear_2/{w,b}      (F, H), (H,)   only with mix_layers
    rnn_params/rnn/linear/{w,b}                    (H + H, 4H), (4H,)   the LSTM (input F without mix_layers)
    rnn_params/rnn_to_controls/{w,b}               (H, P), (P,)
    rnn_params/step_size/{w,b}                     (H, 1), (1,)
    ff_mod_stack/~/w0__i                           (P, width_i, ff_hidden)   one per per-element input
    ff_mod_stack/~/w1..wL, b0..bL                  (P, ff_hidden, ff_hidden | 3), (P, ff_hidden | 3)

with H = lstm_hidden_size, P = param_inits, F the number of per-tensor LSTM features. Sizes not bound in the
config are inferred from the shapes; bound ones must agree. Values are written unchanged (no transpose).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pylo_runtime.velo import HYPERV2_DEFAULTS  # one source of truth: the runtime owns the config

from ..errors import ConversionError
from .base import ArchSpec, Keys, check_shapes, few, lookup, tree_path

_SIZES = ("lstm_hidden_size", "param_inits", "ff_hidden_size", "ff_hidden_layers")
_DECAYS = ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays")
_FLOATS = ("exp_mult", "step_mult", "reparam_decay", "rnn_state_decay")
_BOOLS = tuple(k for k, v in HYPERV2_DEFAULTS.items() if isinstance(v, bool))

FF: Keys = ("ff_mod_stack", "~")  # haiku: parameters created outside any module

#: runtime tensor name -> theta path of the LSTM scheduler; shared with Celo / Celo-Adam (celo.py).
#: ``linear`` is the first mix layer: the reference computes it and overwrites the result (dead weights).
RNN_TABLE: dict[str, Keys] = {
    "lstm_init.hidden": ("lstm_init_state", "hidden"),
    "lstm_init.cell": ("lstm_init_state", "cell"),
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
_MIX_ONLY = ("rnn.mix_unused.", "rnn.mix.", "rnn.in.")


# ----------------------------------------------------------------------------------------------------
def lstm_input_size(config: Mapping[str, Any]) -> int:
    """Per-tensor LSTM inputs: time (9), loss (9), mean_rms, rank (5), var_m, var_rms (+ validation)."""
    n_m, n_r = len(config["initial_momentum_decays"]), len(config["initial_rms_decays"])
    return 9 + 9 + n_r + 5 + n_m + max(n_m, n_r) + int(bool(config["with_validation_feature_dim"]))


def ff_input_widths(config: Mapping[str, Any]) -> list[int]:
    """Width of each per-element MLP input (``w0__i``) in the reference's ``_ff_mod`` order."""
    n_m = len(config["initial_momentum_decays"])
    n_r = len(config["initial_rms_decays"])
    n_f = len(config["initial_adafactor_decays"])
    w: list[int] = []
    if config["with_g"]:
        w.append(1)
    if config["with_grad_clip_feat"]:
        w.append(1)
    if config["with_p"]:
        w.append(1)
    if config["with_m"] and config["with_m_feat"]:
        w.append(n_m)
    if config["with_rms"] and config["with_rms_feat"]:
        w.append(n_r)
    if config["with_rms_norm_g"]:
        w.append(max(n_m, n_r))
    if config["with_rsqrt_rms"]:
        w.append(n_r)
    if config["with_fac_norm_g"]:
        w.append(n_f)
    if config["with_rms_only_norm_g"]:
        w.append(n_r)
    if config["adafactor_accumulator"]:  # factored and diagonal branches have the same widths
        if config["with_fac_rms"]:
            w += [n_f, n_f]
        if config["with_fac_rsqrt"]:
            w += [n_f, n_f]
        if config["with_fac_mom_mult"]:
            w.append(max(n_m, n_f))
    return w


def lstm_shapes(h: int, n_in: int, mix_layers: bool) -> dict[Keys, tuple[int, ...]]:
    """theta path -> shape of the LSTM scheduler (hidden size ``h``, ``n_in`` inputs), without controls."""
    s: dict[Keys, tuple[int, ...]] = {
        ("lstm_init_state", "hidden"): (1, h),
        ("lstm_init_state", "cell"): (1, h),
    }
    if mix_layers:
        for layer in ("linear", "linear_1", "linear_2"):
            s[("rnn_params", layer, "w")] = (n_in, h)
            s[("rnn_params", layer, "b")] = (h,)
    lstm_in = h if mix_layers else n_in
    s[("rnn_params", "rnn/linear", "w")] = (lstm_in + h, 4 * h)
    s[("rnn_params", "rnn/linear", "b")] = (4 * h,)
    s[("rnn_params", "step_size", "w")] = (h, 1)
    s[("rnn_params", "step_size", "b")] = (1,)
    return s


def ff_shapes(config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
    """theta path -> shape of the controls head and the ``param_inits`` per-element MLPs."""
    h, p, hid = config["lstm_hidden_size"], config["param_inits"], config["ff_hidden_size"]
    s: dict[Keys, tuple[int, ...]] = {
        ("rnn_params", "rnn_to_controls", "w"): (h, p),
        ("rnn_params", "rnn_to_controls", "b"): (p,),
    }
    for i, width in enumerate(ff_input_widths(config)):
        s[(*FF, f"w0__{i}")] = (p, width, hid)
    sizes = [hid] * config["ff_hidden_layers"] + [3]
    for i, size in enumerate(sizes):
        s[(*FF, f"b{i}")] = (p, size)
        if i > 0:
            s[(*FF, f"w{i}")] = (p, sizes[i - 1], size)
    return s


def rnn_table(config: Mapping[str, Any]) -> dict[str, Keys]:
    """runtime tensor name -> theta path of the LSTM scheduler (mix layers only when ``mix_layers``)."""
    return {k: v for k, v in RNN_TABLE.items() if config["mix_layers"] or not k.startswith(_MIX_ONLY)}


def ff_table(config: Mapping[str, Any]) -> dict[str, Keys]:
    """runtime tensor name -> theta path of the controls head and MLPs; ``w0__i`` in numeric order."""
    table: dict[str, Keys] = {
        "rnn.to_controls.w": ("rnn_params", "rnn_to_controls", "w"),
        "rnn.to_controls.b": ("rnn_params", "rnn_to_controls", "b"),
    }
    for i in range(len(ff_input_widths(config))):  # as strings they would sort w0__10 < w0__2
        table[f"ff.w0.{i}"] = (*FF, f"w0__{i}")
    for i in range(config["ff_hidden_layers"] + 1):
        if i > 0:
            table[f"ff.w{i}"] = (*FF, f"w{i}")
        table[f"ff.b{i}"] = (*FF, f"b{i}")
    return table


def expected_shapes(config: Mapping[str, Any]) -> dict[Keys, tuple[int, ...]]:
    """theta path -> shape that ``HyperV2(**config).init`` produces."""
    h = config["lstm_hidden_size"]
    return {**lstm_shapes(h, lstm_input_size(config), config["mix_layers"]), **ff_shapes(config)}


def tensor_table(config: Mapping[str, Any]) -> dict[str, Keys]:
    """runtime tensor name -> theta path."""
    return {**rnn_table(config), **ff_table(config)}


# ----------------------------------------------------------------------------------------------------
def _shape(tree: Any, keys: Keys) -> tuple[int, ...] | None:
    leaf = lookup(tree, keys)
    if leaf is None or isinstance(leaf, Mapping) or not hasattr(leaf, "shape"):
        return None
    return tuple(leaf.shape)


def _normalise_config(bindings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Defaults + bindings, JSON-friendly (tuples as lists), with types checked; errors name the option."""
    unknown = sorted(set(bindings) - set(HYPERV2_DEFAULTS))
    if unknown:
        raise ConversionError(source, f"velo: unknown HyperV2 argument(s) {few(unknown)}")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in HYPERV2_DEFAULTS.items()}
    for k, v in bindings.items():
        if k in _DECAYS:
            if isinstance(v, int | float) and not isinstance(v, bool):
                v = [v]
            if (
                not isinstance(v, list | tuple)
                or not v
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            ):
                raise ConversionError(source, f"velo: {k} must be a non-empty list of numbers, got {v!r}")
            v = [float(x) for x in v]
        elif k in _BOOLS:
            if not isinstance(v, bool):
                raise ConversionError(source, f"velo: {k} must be True or False, got {v!r}")
        elif k in _FLOATS:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConversionError(source, f"velo: {k} must be a number, got {v!r}")
            v = float(v)
        elif k == "clip_param_scale_amount":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ConversionError(source, f"velo: {k} must be a number or None, got {v!r}")
        elif k in _SIZES:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConversionError(source, f"velo: {k} must be a positive int, got {v!r}")
        config[k] = v
    return config


def _check_supported(config: Mapping[str, Any], source: str) -> None:
    """Refuse option combinations the reference itself cannot run (so there is nothing to reproduce)."""
    has_rsqrt = config["with_rms_norm_g"] or (config["with_rsqrt_rms"] and config["with_rms_only_norm_g"])
    for k in ("with_rsqrt_rms", "with_rms_only_norm_g"):
        if config[k] and not has_rsqrt:
            raise ConversionError(
                source,
                f"velo: {k}=True with with_rms_norm_g=False and the other of with_rsqrt_rms / "
                "with_rms_only_norm_g False crashes in the reference (UnboundLocalError); refused",
            )
    n_m = len(config["initial_momentum_decays"])
    n_r = len(config["initial_rms_decays"])
    n_f = len(config["initial_adafactor_decays"])
    pairs = [("initial_rms_decays", n_r, n_m)]
    if config["adafactor_accumulator"] and config["with_fac_mom_mult"]:
        pairs.append(("initial_adafactor_decays", n_f, n_m))
    for key, a, b in pairs:
        if a != b and 1 not in (a, b):
            raise ConversionError(
                source,
                f"velo: {key} has {a} decays, initial_momentum_decays {b}: they do not broadcast in the "
                "reference's features; refused",
            )


def _infer_sizes(
    tree: Mapping[str, Any], bindings: Mapping[str, Any], config: dict[str, Any], source: str
) -> None:
    """Sizes from the shapes; a bound size that disagrees with the shapes is an error naming both."""
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
            config[key] = int(value)
    if "with_validation_feature_dim" not in bindings:
        rows = _shape(tree, ("rnn_params", "linear_2", "w")) if config["mix_layers"] else None
        if (
            rows is not None
            and len(rows) == 2
            and rows[0] == lstm_input_size({**config, "with_validation_feature_dim": True})
        ):
            config["with_validation_feature_dim"] = True


# ----------------------------------------------------------------------------------------------------
class _VeLO:
    """The ``Architecture`` for HyperV2 (module-level ``VELO``)."""

    name = "velo"
    gin_names: tuple[str, ...] = ("HyperV2",)

    def defaults(self) -> dict[str, Any]:
        """Every HyperV2 constructor argument with its default (lists for tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in HYPERV2_DEFAULTS.items()}

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
        """Validate theta against the HyperV2 config; name its tensors by the explicit table."""
        if not isinstance(tree, Mapping):
            raise ConversionError(source, f"velo: theta is a {type(tree).__name__}, not a tree")
        config = _normalise_config(bindings, source)
        _infer_sizes(tree, bindings, config, source)
        _check_supported(config, source)

        order = ("wrong shape", "missing", "unexpected")
        check_shapes(tree, expected_shapes(config), source, "VeLO (HyperV2)", order)

        tensors: dict[str, np.ndarray] = {}
        source_paths: dict[str, dict[str, Any]] = {}
        for out_name, keys in tensor_table(config).items():
            leaf = lookup(tree, keys)
            arr = np.asarray(leaf) if isinstance(leaf, np.ndarray | np.generic) else None
            if arr is None or arr.dtype.kind != "f":
                what = type(leaf).__name__ if arr is None else f"dtype {arr.dtype}"
                raise ConversionError(
                    source, f"velo: {tree_path(keys)} is {what}, expected a floating-point array"
                )
            tensors[out_name] = arr
            source_paths[out_name] = {"path": tree_path(keys), "keys": list(keys), "transform": None}
        return ArchSpec(self.name, config, tensors, source_paths)


VELO = _VeLO()
ARCHITECTURES = [VELO]
