"""muLO in PyLO's format: ``btherien/mulo`` (``MetaMLP``), run by PyLO's ``MuLO_naive`` / ``AdafacLO_naive``.

``MetaMLP(input_size=39, hidden_size=32, hidden_layers=1)`` (``pylo/models/Meta_MLP.py``) is a torch
``Sequential`` of ``Linear`` layers: ``network.input``, ``network.linear_0 .. linear_{k-1}``,
``network.output`` (2 outputs); each ``weight`` is haiku's ``nn/~/w{i}`` transposed. PyLO's ``hidden_layers``
counts the hidden-to-hidden layers, so ``MetaMLP(hidden_layers=k)`` is ``MuAdafacMLPLOpt(hidden_layers=k+1)``.

The file does not carry muLO's meta-learned decay offsets (theta's ``momentum_decays``, ``rms_decays``,
``adafactor_decays``): PyLO passes them as ``AdafacLO_naive`` arguments whose defaults are muLO's learned
values, so a conversion takes them from there (or from the ``pylo_optimizer.json`` export-pylo wrote) and
records that in ``source_paths``. ``step_mult`` (0.01), ``exp_mult`` and the initial decays are
``AdafacLO_naive`` arguments too. muP: ``MuLO_naive`` divides a group's ``lr`` by the width multiplier of
matrix-like tensors; our runtime's ``mup_scale`` group option is that ``lr``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import SpecError
from lopt_bridge.pylo_runtime.specs import mulo as spec
from lopt_bridge.pylo_runtime.specs.adafac import DECAY_OFFSETS

from ..architectures.base import ArchSpec
from ..errors import ConversionError
from ..pylo_format import KWARGS_FILE, Key, PyloFile, PyloMap, check_keys, config_ints, place, take

REPO = "btherien/mulo"
#: ``MetaMLP.__init__`` has no defaults; these are btherien/mulo's values (AdafacLO_naive's arguments).
MODEL_DEFAULTS: dict[str, Any] = {"input_size": 39, "hidden_size": 32, "hidden_layers": 1}
#: ``AdafacLO_naive``'s defaults for its theta-like arguments: muLO's meta-learned decay offsets.
PYLO_DECAY_OFFSETS: dict[str, list[float]] = {
    "momentum_decays": [0.15216392, 0.14245212, 0.06812963],
    "rms_decays": [0.01079706],
    "adafactor_decays": [0.18621896, -0.10864615, -0.06185547],
}
#: AdafacLO_naive arguments that are MuAdafacMLPLOpt options, with AdafacLO_naive's defaults.
KWARG_OPTIONS: dict[str, Any] = {
    "step_mult": 0.01,
    "exp_mult": 0.001,
    "initial_momentum_decays": [0.9, 0.99, 0.999],
    "initial_rms_decays": [0.999],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "split_weights": False,
}
OPTIMIZER = "pylo.optim.MuLO_naive"
#: MuLO_naive needs ``lr`` (mup's param-group processing reads it); 1.0 is the reference's step and our
#: runtime's default, so export-pylo records it; on import it is not part of the config.
LR = "lr"


def matches(files: list[PyloFile]) -> bool:
    """One MetaMLP state dict (``network.input`` ... ``network.output``)."""
    return len(files) == 1 and {"network.input.weight", "network.output.weight"} <= set(files[0].tensors)


def _layers(f: PyloFile) -> list[str]:
    names = ["network.input"]
    k = 0
    while f"network.linear_{k}.weight" in f.tensors:
        names.append(f"network.linear_{k}")
        k += 1
    return [*names, "network.output"]


def key_rows(cfg: Any) -> list[Key]:
    """Our MLP tensors <- MetaMLP keys (the decay offsets are not in the file)."""
    layers = [
        "network.input",
        *(f"network.linear_{k}" for k in range(cfg["hidden_layers"] - 1)),
        "network.output",
    ]
    rows = [Key(f"nn.w{i}", 0, f"{layer}.weight", "transpose:1,0") for i, layer in enumerate(layers)]
    return rows + [Key(f"nn.b{i}", 0, f"{layer}.bias") for i, layer in enumerate(layers)]


def pylo_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """MetaMLP key -> shape for a validated muLO config."""
    sizes = [spec.n_inputs(cfg), *([cfg["hidden_size"]] * cfg["hidden_layers"]), 2]
    layers = [
        "network.input",
        *(f"network.linear_{k}" for k in range(cfg["hidden_layers"] - 1)),
        "network.output",
    ]
    out: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(layers):
        out |= {f"{layer}.weight": (sizes[i + 1], sizes[i]), f"{layer}.bias": (sizes[i + 1],)}
    return out


def _kwargs(f: PyloFile, source: str) -> tuple[dict[str, Any], dict[str, list[float]], str]:
    """(muLO options, decay offsets, where the offsets came from) from AdafacLO_naive's arguments."""
    kw = f.kwargs
    unknown = sorted(set(kw) - set(KWARG_OPTIONS) - set(PYLO_DECAY_OFFSETS) - {LR})
    if unknown:
        raise ConversionError(
            source, f"{KWARGS_FILE}: AdafacLO_naive argument(s) {', '.join(unknown)[:200]} not understood "
            f"(known: {', '.join([*KWARG_OPTIONS, *PYLO_DECAY_OFFSETS])})",
        )  # fmt: skip
    options = {k: kw.get(k, v) for k, v in KWARG_OPTIONS.items()}
    offsets = {k: kw.get(k, v) for k, v in PYLO_DECAY_OFFSETS.items()}
    for key, value in offsets.items():
        if not (
            isinstance(value, list)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ConversionError(
                source, f"{KWARGS_FILE}: {key} must be a list of numbers, got {str(value)[:60]}"
            )
    origin = "pylo_optimizer.json" if any(k in kw for k in PYLO_DECAY_OFFSETS) else "default"
    return options, offsets, origin


def to_ours(files: list[PyloFile], source: str) -> ArchSpec:
    """MetaMLP (+ AdafacLO_naive's decay offsets) -> our mulo tensors."""
    (f,) = files
    first = f.tensors["network.input.weight"]
    if first.ndim != 2:
        raise ConversionError(source, f"{f.name}: network.input.weight has shape {first.shape}, expected 2-D")
    layers = _layers(f)
    options, offsets, origin = _kwargs(f, source)
    bindings = {**options, "hidden_size": int(first.shape[0]), "hidden_layers": len(layers) - 1}
    try:
        cfg = spec.validate(bindings)
    except SpecError as e:
        raise ConversionError(source, str(e)) from None
    model = {
        "input_size": spec.n_inputs(cfg),
        "hidden_size": cfg["hidden_size"],
        "hidden_layers": len(layers) - 2,
    }
    config_ints(f, model, MODEL_DEFAULTS, source, "MetaMLP")
    check_keys(
        f,
        pylo_shapes(cfg),
        source,
        f"MetaMLP (input_size {spec.n_inputs(cfg)}, hidden_size {cfg['hidden_size']})",
    )
    mlp, paths = take(files, (REPO,), key_rows(cfg))
    tensors: dict[str, np.ndarray] = {}
    for leaf, init in DECAY_OFFSETS:
        value = np.asarray(offsets[leaf], dtype=np.float32)
        if value.shape != (len(cfg[init]),):
            raise ConversionError(
                source, f"{leaf} has {value.size} offsets but {init} has {len(cfg[init])} decays"
            )
        tensors[leaf] = value
        where = "AdafacLO_naive's default" if origin == "default" else f"{KWARGS_FILE} kwargs"
        paths[leaf] = {
            "path": f"pylo.optim.AdafacLO_naive:{leaf}",
            "keys": ["pylo.optim.AdafacLO_naive", leaf],
            "transform": f"constant: {where} {leaf} as float32 ({REPO}'s file does not carry the offsets)",
        }
    tensors |= mlp
    table = spec.tensor_table(cfg)
    if set(table) != set(tensors) or any(tuple(tensors[k].shape) != ts.shape for k, ts in table.items()):
        raise RuntimeError("PyLO mulo map: the key map does not give the spec's tensor table")
    tensors = {k: tensors[k] for k in table}  # the runtime's order
    return ArchSpec("mulo", cfg.to_dict(), tensors, paths)


def to_pylo(arch: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[PyloFile]:
    """Our mulo tensors -> MetaMLP state dict, config.json contents and AdafacLO_naive arguments."""
    from lopt_bridge.pylo_runtime.specs.adafac import separate_weights

    if separate_weights(config) or not config["concat_weights"]:
        raise ConversionError(None, "concat_weights=False: PyLO's MetaMLP holds weight matrices only")
    if config["hidden_layers"] < 1:
        raise ConversionError(None, "hidden_layers=0: PyLO's MetaMLP has at least one hidden layer")
    if config["clip_grad"]:
        raise ConversionError(None, "clip_grad=True: PyLO's AdafacLO_naive takes clip_grad but never clips")
    sd: dict[str, np.ndarray] = {}
    place(sd, pylo_shapes(config), key_rows(config), tensors, 0)
    model = {"hidden_layers": config["hidden_layers"] - 1, "hidden_size": config["hidden_size"],
             "input_size": spec.n_inputs(config)}  # fmt: skip
    kwargs: dict[str, Any] = {LR: 1.0, **{k: config[k] for k, v in KWARG_OPTIONS.items() if config[k] != v}}
    for leaf, _ in DECAY_OFFSETS:
        values = [float(v) for v in np.asarray(tensors[leaf], dtype=np.float32)]
        if (
            np.asarray(values, np.float32).tobytes()
            != np.asarray(PYLO_DECAY_OFFSETS[leaf], np.float32).tobytes()
        ):
            kwargs[leaf] = values
    return [PyloFile("mulo", sd, model, "", kwargs)]


MAPS = [
    PyloMap(
        "mulo", (REPO,), ("MetaMLP",), matches, to_ours, to_pylo, optimizer=OPTIMIZER, hf_key_args=("hf_key",)
    )
]
