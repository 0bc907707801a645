"""VeLO in PyLO's format: ``Pauljanson002/VeLO_RNN`` (``VeLORNN``) + ``Pauljanson002/VeLO_MLP`` (``VeLOMLP``).

PyLO (Belilovsky-Lab/pylo d05c6c1, ``pylo/models/VeLO_RNN.py``, ``VeLO_MLP.py``, ``pylo/optim/Velo_naive.py``)
stores learned_optimization's ``HyperV2`` theta as two torch modules:

- ``VeLORNN``: torch ``Linear`` layers (``weight`` is haiku's ``w`` transposed); its ``LSTM.linear`` is one
  ``(4H, 2H)`` matrix over ``[x, h]`` with gates i, g, f, o and the forget gate's +1 added at run time:
  exactly haiku's LSTM layout, transposed. ``lstm_init_state.0`` / ``.1`` are hidden / cell.
- ``VeLOMLP``: the ``param_inits`` MLP copies as ``input_weights_ (P, hidden, 30)`` (haiku's 14 ``w0__i``
  ``(P, width_i, hidden)`` side by side along the last axis, each transposed), ``hidden_weights_.k``,
  ``output_weights_`` ``(P, out, in)``; the biases as they are. The unsuffixed ``input_weights`` ...
  ``output_bias`` are PyLO's scratch copy, overwritten every step (``update_params``): not read; written
  as zeros on export.

What PyLO runs (``VeLO_naive``): HyperV2 with every option at its default except
``use_bugged_loss_features=False`` (its loss buffer uses ``num_steps``) and the LSTM state advancing;
``step_mult``, ``exp_mult`` and the initial decays are ``VeLO_naive`` arguments (not in the files);
``ff_mult`` is PyLO's hard-coded 100. Agreement with the JAX reference and with our runtime: docs/formats.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import SpecError
from lopt_bridge.pylo_runtime.specs import velo as spec

from ..architectures.base import ArchSpec
from ..errors import ConversionError
from ..pylo_format import KWARGS_FILE, Key, PyloFile, PyloMap, check_keys, config_ints, place, take

RNN_REPO = "Pauljanson002/VeLO_RNN"
MLP_REPO = "Pauljanson002/VeLO_MLP"
REPOS = (RNN_REPO, MLP_REPO)
#: ``VeLORNN.__init__`` / ``VeLOMLP.__init__`` defaults (what config.json holds, all of them with
#: huggingface_hub >= 0.2x; older hub versions may have written none).
RNN_DEFAULTS: dict[str, Any] = {
    "input_size": 30,
    "lstm_hidden_size": 512,
    "param_inits": 256,
    "mix_layers": True,
}
MLP_DEFAULTS: dict[str, Any] = {
    "param_inits": 256,
    "input_size": 30,
    "hidden_size": 4,
    "hidden_layers": 1,
    "output_size": 3,
}
SIZES = ("lstm_hidden_size", "param_inits", "ff_hidden_size", "ff_hidden_layers")
#: VeLO_naive arguments that are HyperV2 options (same names, same defaults as HyperV2's).
KWARG_OPTIONS = (
    "step_mult",
    "exp_mult",
    "initial_momentum_decays",
    "initial_rms_decays",
    "initial_adafactor_decays",
)
#: VeLO_naive's decay offsets: HyperV2 has none, so only zeros (VeLO_naive's default) are accepted.
ZERO_KWARGS = ("momentum_decays", "rms_decays", "adafactor_decays")
#: VeLO_naive multiplies the step by the group's ``lr`` (default 1e-3); 1.0 is the reference's step and our
#: runtime's default ``lr``, so export-pylo records ``lr=1.0``; on import it is not part of the config.
LR = "lr"
VELO_NAIVE_DEFAULTS: dict[str, Any] = {k: spec.DEFAULTS[k] for k in KWARG_OPTIONS}
#: The HyperV2 options VeLO_naive always runs with (everything else at HyperV2's default).
PYLO_FIXED: dict[str, Any] = {
    **{k: v for k, v in spec.DEFAULTS.items() if k not in SIZES and k not in KWARG_OPTIONS},
    "use_bugged_loss_features": False,
    "use_bugged_next_lstm_state": False,
    "mix_layers": True,
    **({"ff_mult": 100.0} if "ff_mult" in spec.DEFAULTS else {}),
}
SCRATCH = "unsuffixed VeLOMLP tensors: PyLO's scratch copy, overwritten every step"


def _count(tensors: dict[str, np.ndarray], prefix: str) -> int:
    k = 0
    while f"{prefix}.{k}" in tensors:
        k += 1
    return k


def matches(files: list[PyloFile]) -> bool:
    """A VeLORNN state dict then a VeLOMLP one."""
    if len(files) != 2:
        return False
    rnn, mlp = files[0].tensors, files[1].tensors
    return {"lstm.linear.weight", "rnn_to_controls.weight", "lstm_init_state.0"} <= set(rnn) and {
        "input_weights_",
        "output_weights_",
        "input_bias_",
    } <= set(mlp)


def key_rows(cfg: Any) -> list[Key]:
    """Our tensor <- (repo 0 = VeLO_RNN, 1 = VeLO_MLP, PyLO key, transform), in the spec's table order."""
    rows = [Key("lstm_init.hidden", 0, "lstm_init_state.0"), Key("lstm_init.cell", 0, "lstm_init_state.1")]
    for name, layer in (
        ("rnn.mix_unused", "mix_layer1"),
        ("rnn.mix", "mix_layer2"),
        ("rnn.in", "final_mix_layer"),
    ):
        rows += [
            Key(f"{name}.w", 0, f"{layer}.weight", "transpose:1,0"),
            Key(f"{name}.b", 0, f"{layer}.bias"),
        ]
    for name, layer in (
        ("rnn.lstm", "lstm.linear"),
        ("rnn.to_controls", "rnn_to_controls"),
        ("rnn.step_size", "step_size"),
    ):
        rows += [
            Key(f"{name}.w", 0, f"{layer}.weight", "transpose:1,0"),
            Key(f"{name}.b", 0, f"{layer}.bias"),
        ]
    off = 0
    for i, width in enumerate(spec.ff_input_widths(cfg)):
        rows.append(Key(f"ff.w0.{i}", 1, "input_weights_", f"slice:2,{off},{off + width}; transpose:0,2,1"))
        off += width
    n = cfg["ff_hidden_layers"]
    for k in range(1, n):
        rows.append(Key(f"ff.w{k}", 1, f"hidden_weights_.{k - 1}", "transpose:0,2,1"))
    rows.append(Key(f"ff.w{n}", 1, "output_weights_", "transpose:0,2,1"))
    rows.append(Key("ff.b0", 1, "input_bias_"))
    rows += [Key(f"ff.b{k}", 1, f"hidden_bias_.{k - 1}") for k in range(1, n)]
    rows.append(Key(f"ff.b{n}", 1, "output_bias_"))
    return rows


def pylo_shapes(
    cfg: Any,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(VeLORNN keys, VeLOMLP keys, VeLOMLP scratch keys) -> shape for a validated HyperV2 config."""
    h, p, hid = cfg["lstm_hidden_size"], cfg["param_inits"], cfg["ff_hidden_size"]
    f_rnn, f_mlp, hidden = (
        spec.lstm_input_size(cfg),
        sum(spec.ff_input_widths(cfg)),
        cfg["ff_hidden_layers"] - 1,
    )
    rnn: dict[str, tuple[int, ...]] = {"lstm_init_state.0": (1, h), "lstm_init_state.1": (1, h)}
    for layer in ("mix_layer1", "mix_layer2", "final_mix_layer"):
        rnn |= {f"{layer}.weight": (h, f_rnn), f"{layer}.bias": (h,)}
    rnn |= {"lstm.linear.weight": (4 * h, 2 * h), "lstm.linear.bias": (4 * h,)}
    rnn |= {"rnn_to_controls.weight": (p, h), "rnn_to_controls.bias": (p,)}
    rnn |= {"step_size.weight": (1, h), "step_size.bias": (1,)}
    mlp: dict[str, tuple[int, ...]] = {"input_weights_": (p, hid, f_mlp), "input_bias_": (p, hid)}
    scratch: dict[str, tuple[int, ...]] = {"input_weights": (hid, f_mlp), "input_bias": (hid,)}
    for k in range(hidden):
        mlp |= {f"hidden_weights_.{k}": (p, hid, hid), f"hidden_bias_.{k}": (p, hid)}
        scratch |= {f"hidden_weights.{k}": (hid, hid), f"hidden_bias.{k}": (hid,)}
    mlp |= {"output_weights_": (p, 3, hid), "output_bias_": (p, 3)}
    scratch |= {"output_weights": (3, hid), "output_bias": (3,)}
    return rnn, mlp, scratch


def _kwargs(files: list[PyloFile], source: str) -> dict[str, Any]:
    """HyperV2 options from the VeLO_naive arguments export-pylo recorded (pylo_optimizer.json)."""
    kw = files[0].kwargs
    if any(f.kwargs != kw for f in files[1:]):
        raise ConversionError(source, f"the two repos' {KWARGS_FILE} give different VeLO_naive arguments")
    unknown = sorted(set(kw) - set(KWARG_OPTIONS) - set(ZERO_KWARGS) - {LR})
    if unknown:
        raise ConversionError(
            source, f"{KWARGS_FILE}: VeLO_naive argument(s) {', '.join(unknown)[:200]} not understood "
            f"(known: {', '.join(KWARG_OPTIONS + ZERO_KWARGS)})",
        )  # fmt: skip
    for key in ZERO_KWARGS:
        value = kw.get(key)
        if value is not None and not (isinstance(value, list) and all(v == 0 for v in value)):
            raise ConversionError(
                source,
                f"{KWARGS_FILE}: {key}={str(value)[:60]}: HyperV2 has no learned decay offsets (only zeros)",
            )
    return {k: kw[k] for k in KWARG_OPTIONS if k in kw}


def _shape(f: PyloFile, key: str, rank: int, source: str) -> tuple[int, ...]:
    arr = f.tensors.get(key)
    if arr is None or arr.ndim != rank:
        found = "missing" if arr is None else f"shape {tuple(arr.shape)}"
        raise ConversionError(source, f"{f.name}: {key} is {found}, expected a rank-{rank} tensor")
    return tuple(arr.shape)


def to_ours(files: list[PyloFile], source: str) -> ArchSpec:
    """VeLORNN + VeLOMLP -> our velo tensors (sizes from the shapes, config.json cross-checked)."""
    rnn, mlp = files
    if "mix_layers" in rnn.config and rnn.config["mix_layers"] is not True:
        raise ConversionError(
            source, f"{rnn.name}: mix_layers={rnn.config['mix_layers']!r}; PyLO's VeLO needs True"
        )
    h = _shape(rnn, "lstm_init_state.0", 2, source)[1]
    p = _shape(rnn, "rnn_to_controls.weight", 2, source)[0]
    hid = _shape(mlp, "input_bias_", 2, source)[1]
    hidden = _count(mlp.tensors, "hidden_weights_")
    bindings = {
        **PYLO_FIXED,
        "lstm_hidden_size": h,
        "param_inits": p,
        "ff_hidden_size": hid,
        "ff_hidden_layers": hidden + 1,
        **_kwargs(files, source),
    }
    try:
        cfg = spec.validate(bindings)
    except SpecError as e:
        raise ConversionError(source, str(e)) from None
    rnn_shapes, mlp_shapes, scratch = pylo_shapes(cfg)
    rnn_config = {"input_size": spec.lstm_input_size(cfg), "lstm_hidden_size": h, "param_inits": p}
    config_ints(rnn, rnn_config, RNN_DEFAULTS, source, "VeLORNN")
    mlp_config = {"param_inits": p, "input_size": sum(spec.ff_input_widths(cfg)), "hidden_size": hid,
                  "hidden_layers": hidden}  # fmt: skip
    config_ints(mlp, mlp_config, MLP_DEFAULTS, source, "VeLOMLP")
    check_keys(rnn, rnn_shapes, source, f"VeLORNN (lstm_hidden_size {h}, param_inits {p})")
    check_keys(mlp, mlp_shapes, source, f"VeLOMLP (param_inits {p}, hidden_size {hid})", optional=scratch)
    tensors, paths = take(files, REPOS, key_rows(cfg))
    table = spec.tensor_table(cfg)
    if set(table) != set(tensors) or any(tuple(tensors[k].shape) != ts.shape for k, ts in table.items()):
        raise RuntimeError("PyLO velo map: the key map does not give the spec's tensor table")
    tensors = {k: tensors[k] for k in table}  # the runtime's order
    return ArchSpec("velo", cfg.to_dict(), tensors, paths)


def to_pylo(arch: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[PyloFile]:
    """Our velo tensors -> VeLORNN + VeLOMLP state dicts, config.json contents and VeLO_naive arguments."""
    fixed = [k for k, v in PYLO_FIXED.items() if config.get(k) != v]
    if fixed:
        shown = ", ".join(f"{k}={config.get(k)!r} (PyLO runs {PYLO_FIXED[k]!r})" for k in fixed[:6])
        raise ConversionError(
            None, f"PyLO's VeLO_naive cannot run this checkpoint as its reference does: {shown}"
        )
    rnn_shapes, mlp_shapes, scratch = pylo_shapes(config)
    rows = key_rows(config)
    rnn: dict[str, np.ndarray] = {}
    mlp: dict[str, np.ndarray] = {}
    place(rnn, rnn_shapes, rows, tensors, 0)
    place(mlp, mlp_shapes, rows, tensors, 1)
    mlp |= {k: np.zeros(s, np.float32) for k, s in scratch.items()}
    h, p, hid = config["lstm_hidden_size"], config["param_inits"], config["ff_hidden_size"]
    rnn_config = {
        "input_size": spec.lstm_input_size(config),
        "lstm_hidden_size": h,
        "mix_layers": True,
        "param_inits": p,
    }
    mlp_config = {
        "hidden_layers": config["ff_hidden_layers"] - 1,
        "hidden_size": hid,
        "input_size": sum(spec.ff_input_widths(config)),
        "output_size": 3,
        "param_inits": p,
    }
    kwargs = {LR: 1.0, **{k: config[k] for k in KWARG_OPTIONS if config[k] != VELO_NAIVE_DEFAULTS[k]}}
    return [
        PyloFile("VeLO_RNN", rnn, rnn_config, "", kwargs),
        PyloFile("VeLO_MLP", mlp, mlp_config, "", dict(kwargs)),
    ]


MAPS = [
    PyloMap(
        "velo",
        REPOS,
        ("VeLORNN", "VeLOMLP"),
        matches,
        to_ours,
        to_pylo,
        optimizer="pylo.optim.VeLO_naive",
        hf_key_args=("hf_key_rnn", "hf_key_mlp"),
    )
]
