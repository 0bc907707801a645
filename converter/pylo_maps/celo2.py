"""PyLO's Celo2 (``DiamondXL/celo2``: ``CELO2MLP``) <-> our ``celo2`` architecture.

PyLO's ``CELO2MLP`` (Belilovsky-Lab/pylo d05c6c1, ``pylo/models/CELO2_MLP.py``) is celo's ``_ff_mod`` MLP with
the haiku ``(in, out)`` weights kept as they are (it multiplies ``x @ w``); PyLO's own
``scripts/convert_celo2_checkpoint.py`` maps a celo theta the same way. Per tensor (no transposes)::

    PyLO key        ours        celo theta              shape
    w0.i            ff.w0.i     ff_mod_stack/~/w0__i    (feature_dims[i], hidden_size)
    b0              ff.b0       ff_mod_stack/~/b0       (hidden_size,)
    dense_w.k       ff.w{k+1}   ff_mod_stack/~/w{k+1}   (hidden_size, hidden_size | 3)
    dense_b.k       ff.b{k+1}   ff_mod_stack/~/b{k+1}   (hidden_size | 3,)

``config.json`` holds CELO2MLP's arguments (feature_dims, hidden_size, hidden_layers, output_size,
activation; older huggingface_hub versions wrote only some of them): sizes are read from the shapes and
config.json is a cross-check. What CELO2MLP does not describe comes from ``CELO2_naive``'s arguments, which
are not in the file: PyLO hard-wires every input group, normalised inputs and outputs, no output
preconditioning, no bias correction and no aggregated magnitude, and its defaults are celo's
``get_optimizer("celo2")`` (decays 0.9/0.99/0.999, 0.95, 0.9/0.99/0.999; NS coefficients; Adam betas (0.9,
0.95); its README runs ``adam_lr_mult=20`` = ``mult_1d``). So a PyLO file converts to the factory's Celo2
configuration (``regex_1d="/b$"``: biases take the Adam branch), with the file's sizes and activation.

Differences a PyLO user should know (docs/families.md, Celo2): PyLO routes rank <= 1 tensors (and groups
flagged ``is_embedding``) to its own AdamW (bias-corrected, eps outside the root, own betas), not to celo's
Adam branch; ``lr`` is our ``step_mult``; ``adam_lr_mult`` our ``mult_1d``.

``to_pylo`` writes the other way for any Celo2 config PyLO's code can run, and stores our full config in
config.json under ``"lopt_bridge"`` (PyTorchModelHubMixin passes only CELO2MLP's own arguments to it, so
PyLO ignores the key); ``to_ours`` takes that config back when present, so ours -> PyLO -> ours is exact.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_bridge.pylo_runtime.specs import SpecError
from lopt_bridge.pylo_runtime.specs import celo2 as spec

from ..architectures.base import ArchSpec
from ..errors import ConversionError
from . import PyloFile, PyloMap

ARCH = "celo2"
REPO = "DiamondXL/celo2"
MODEL_CLASS = "CELO2MLP"
#: config.json key under which ``to_pylo`` keeps our architecture id and full config (PyLO ignores it).
EMBED_KEY = "lopt_bridge"
#: What CELO2_naive hard-wires: a config that differs cannot run in PyLO.
PYLO_FIXED: dict[str, Any] = {
    **spec.FEATURE_SWITCHES,
    "normalize_input": True,
    "normalize_output": True,
    "precondition_output": False,
    "bias_correction": False,
    "aggregate_mag": False,
}
#: The config a PyLO file converts to when it carries none of ours: celo's get_optimizer("celo2").
PYLO_DEFAULT_CONFIG: dict[str, Any] = dict(spec.FACTORY_CELO2)
#: CELO2_naive's decay defaults (= the class's): the file states only their counts.
PYLO_DECAYS = {k: spec.DEFAULTS[k] for k in spec.DECAY_KEYS}

_KEY = re.compile(r"^(?:w0\.(\d+)|b0|dense_w\.(\d+)|dense_b\.(\d+))$")


def matches(files: list[PyloFile]) -> bool:
    """One CELO2MLP state dict: keys ``w0.i``, ``b0``, ``dense_w.k``, ``dense_b.k`` only."""
    if len(files) != 1:
        return False
    keys = set(files[0].tensors)
    return {"w0.0", "b0"} <= keys and all(_KEY.match(k) for k in keys)


def _numbered(tensors: Mapping[str, Any], prefix: str) -> int:
    """How many of ``prefix.0``, ``prefix.1``, ... there are (consecutive from 0)."""
    n = 0
    while f"{prefix}.{n}" in tensors:
        n += 1
    return n


def _shape(tensors: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(int(s) for s in np.shape(tensors[key]))


def _structure(f: PyloFile) -> tuple[list[int], int, int]:
    """(first-layer widths, hidden_size, hidden_layers) from the state dict's shapes; ConversionError if it
    is not a CELO2MLP's."""
    t = f.tensors
    unexpected = sorted(k for k in t if not _KEY.match(k))
    n_in, n_dense = _numbered(t, "w0"), _numbered(t, "dense_w")
    counted = {f"w0.{i}" for i in range(n_in)} | {f"dense_w.{k}" for k in range(n_dense)}
    counted |= {f"dense_b.{k}" for k in range(n_dense)} | {"b0"}
    stray = sorted(set(t) - counted)
    missing = sorted(counted - set(t))
    if unexpected or stray or missing or n_in == 0:
        what = unexpected or stray or missing or ["w0.0"]
        verb = "missing" if missing or n_in == 0 else "unexpected"
        raise ConversionError(f.name, f"not a {MODEL_CLASS} state dict: {verb} {', '.join(what[:6])}")
    for k, v in t.items():
        if np.asarray(v).dtype != np.float32:
            raise ConversionError(f.name, f"{k}: dtype {np.asarray(v).dtype}, expected float32")
    b0 = _shape(t, "b0")
    if len(b0) != 1:
        raise ConversionError(f.name, f"b0 has shape {b0}, expected (hidden_size,)")
    hidden = b0[0]
    widths = []
    for i in range(n_in):
        s = _shape(t, f"w0.{i}")
        if len(s) != 2 or s[1] != hidden:
            raise ConversionError(f.name, f"w0.{i} has shape {s}, expected (feature_dim, {hidden})")
        widths.append(s[0])
    if n_dense == 0:
        raise ConversionError(
            f.name,
            f"{MODEL_CLASS} with hidden_layers=0 applies its activation to a hidden_size output: not celo's "
            "Celo2 MLP (which maps the inputs straight to 3 outputs)",
        )
    sizes = [hidden] * n_dense + [3]
    for k in range(n_dense):
        want_w, want_b = (sizes[k], sizes[k + 1]), (sizes[k + 1],)
        for key, want in ((f"dense_w.{k}", want_w), (f"dense_b.{k}", want_b)):
            if _shape(t, key) != want:
                raise ConversionError(
                    f.name, f"{key} has shape {_shape(t, key)}, expected {want} (3 outputs: Celo2's)"
                )
    return widths, hidden, n_dense


def _cross_check(f: PyloFile, widths: list[int], hidden: int, layers: int) -> str:
    """config.json against the shapes (keys it lacks are not checked); returns the activation."""
    c = f.config
    if not isinstance(c, Mapping):
        raise ConversionError(f.name, f"config.json is a {type(c).__name__}, not an object")
    found = {"hidden_size": hidden, "hidden_layers": layers, "output_size": 3, "feature_dims": widths}
    for key, value in found.items():
        if (
            key in c
            and (list(c[key]) if key == "feature_dims" and isinstance(c[key], list) else c[key]) != value
        ):
            raise ConversionError(
                f.name, f"config.json says {key}={str(c[key])[:60]} but the weights have {value}"
            )
    act = c.get("activation", "relu")
    if act not in spec.ACTIVATIONS:
        raise ConversionError(f.name, f"config.json activation {str(act)[:40]!r} is not relu or tanh")
    return str(act)


def _config_from_pylo(f: PyloFile, widths: list[int], hidden: int, layers: int, act: str) -> dict[str, Any]:
    """Our config: the one ``to_pylo`` embedded, else the factory's Celo2 with the file's sizes."""
    embedded = f.config.get(EMBED_KEY)
    if embedded is not None:
        if not isinstance(embedded, Mapping) or embedded.get("architecture") != ARCH:
            raise ConversionError(f.name, f"config.json {EMBED_KEY!r} is not a {ARCH} config")
        config = embedded.get("config")
        if not isinstance(config, Mapping):
            raise ConversionError(f.name, f"config.json {EMBED_KEY}.config is not an object")
        return dict(config)
    n = len(spec.FEATURE_SWITCHES) + 2  # 14 input groups: PyLO builds every one of them
    counts = (widths[3], widths[4], widths[7]) if len(widths) == n else None
    if counts != tuple(len(PYLO_DECAYS[k]) for k in spec.DECAY_KEYS):
        raise ConversionError(
            f.name,
            f"{MODEL_CLASS} feature_dims {widths} do not describe CELO2_naive's inputs with its default "
            "decays (3 momentum, 1 rms, 3 Adafactor); the decays are optimizer arguments, not in the file: "
            "convert with the config they were meta-trained with",
        )
    return {
        **PYLO_DEFAULT_CONFIG,
        "ff_hidden_size": hidden,
        "ff_hidden_layers": layers,
        "mlp_activation": act,
    }


def to_ours(files: list[PyloFile], source: str) -> ArchSpec:
    """PyLO's CELO2MLP files (one) -> our ``celo2`` ArchSpec, every tensor's shape checked."""
    if len(files) != 1:
        raise ConversionError(source, f"{ARCH}: expected one PyLO repo ({REPO}), got {len(files)}")
    (f,) = files
    widths, hidden, layers = _structure(f)
    act = _cross_check(f, widths, hidden, layers)
    try:
        cfg = spec.validate(_config_from_pylo(f, widths, hidden, layers, act))
    except SpecError as e:
        raise ConversionError(f.name, str(e)) from None
    table = spec.tensor_table(cfg)
    if (cfg["ff_hidden_size"], cfg["ff_hidden_layers"], cfg["mlp_activation"]) != (hidden, layers, act):
        raise ConversionError(f.name, f"config.json {EMBED_KEY} config disagrees with the weights' sizes")
    tensors: dict[str, np.ndarray] = {}
    source_paths: dict[str, dict[str, Any]] = {}
    for name, ts in table.items():
        key = pylo_key(name)
        if key not in f.tensors:
            raise ConversionError(f.name, f"lacks {key} (the config has {len(table)} tensors)")
        arr = np.asarray(f.tensors[key])
        if arr.shape != ts.shape:
            raise ConversionError(f.name, f"{key} has shape {arr.shape}, expected {ts.shape} ({ts.note})")
        tensors[name] = arr
        source_paths[name] = {"path": key, "keys": [key], "transform": None, "repo": f.name}
    extra = sorted(set(f.tensors) - {pylo_key(n) for n in table})
    if extra:
        raise ConversionError(f.name, f"has tensors the config does not use: {', '.join(extra[:6])}")
    return ArchSpec(ARCH, cfg.to_dict(), tensors, source_paths)


def pylo_key(name: str) -> str:
    """Our tensor name -> PyLO's key (``ff.w0.3`` -> ``w0.3``, ``ff.w2`` -> ``dense_w.1``, ...)."""
    rest = name.removeprefix("ff.")
    if rest.startswith("w0.") or rest == "b0":
        return rest
    kind, k = rest[0], int(rest[1:])
    return f"dense_{kind}.{k - 1}"


def pylo_incompatibilities(cfg: Mapping[str, Any]) -> list[str]:
    """The options PyLO's CELO2_naive cannot run (it hard-wires them), as ``key=value`` strings."""
    out = [f"{k}={cfg[k]!r} (PyLO: {v!r})" for k, v in PYLO_FIXED.items() if cfg[k] != v]
    if cfg["ff_hidden_layers"] < 1:
        out.append("ff_hidden_layers=0 (PyLO's CELO2MLP needs a hidden layer)")
    return out


def to_pylo(arch: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[PyloFile]:
    """Our ``celo2`` file -> one PyLO CELO2MLP folder's contents (``sha256`` of ``safetensors_bytes``)."""
    if arch != ARCH:
        raise ConversionError(arch, f"the {ARCH} PyLO map cannot write a {arch!r} optimizer")
    try:
        cfg = spec.validate(config)
    except SpecError as e:
        raise ConversionError(ARCH, str(e)) from None
    bad = pylo_incompatibilities(cfg)
    if bad:
        raise ConversionError(ARCH, f"PyLO's CELO2_naive cannot run this config: {', '.join(bad)}")
    table = spec.tensor_table(cfg)
    if set(tensors) != set(table):
        raise ConversionError(ARCH, f"tensors {sorted(set(tensors) ^ set(table))[:6]} do not fit the config")
    out: dict[str, np.ndarray] = {}
    for name, ts in table.items():
        arr = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
        if arr.shape != ts.shape:
            raise ConversionError(ARCH, f"{name} has shape {arr.shape}, expected {ts.shape}")
        out[pylo_key(name)] = arr
    pylo_config = {
        "activation": cfg["mlp_activation"],
        "feature_dims": spec.ff_input_widths(cfg),
        "hidden_layers": cfg["ff_hidden_layers"],
        "hidden_size": cfg["ff_hidden_size"],
        "output_size": 3,
        EMBED_KEY: {"architecture": ARCH, "config": cfg.to_dict()},
    }
    return [PyloFile("celo2", out, pylo_config, hashlib.sha256(safetensors_bytes(out)).hexdigest())]


def safetensors_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``model.safetensors`` bytes as PyLO's ``save_pretrained`` wrote tests/data/pylo/celo2 (huggingface_hub
    2.4, safetensors 0.4.5: no metadata; the format sorts the keys): byte for byte the same file."""
    from safetensors.numpy import save

    return save(dict(tensors))


MAPS: list[PyloMap] = [
    PyloMap(
        architecture=ARCH,
        repos=(REPO,),
        model_classes=(MODEL_CLASS,),
        matches=matches,
        to_ours=to_ours,
        to_pylo=to_pylo,
        optimizer="pylo.optim.CELO2_naive",
        hf_key_args=("hf_key",),
    )
]
