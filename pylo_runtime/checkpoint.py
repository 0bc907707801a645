"""Reading a converted ``.safetensors`` file: its tensors and the metadata the converter wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import specs

#: Value of the ``format`` metadata key in every file lopt-convert writes.
FORMAT_NAME = "lopt-bridge"
#: Version of the metadata layout; bump on incompatible change.
FORMAT_VERSION = "1"

#: Metadata keys (all strings; JSON-encoded where the value is structured).
META_KEYS = (
    "format",  # FORMAT_NAME
    "format_version",  # FORMAT_VERSION
    "architecture",  # "velo" | "celo" | "celo_adam" | "small_fc_lopt" | "mlp_lopt" | "mulo"
    "config",  # JSON: every constructor argument of the reference class, defaults filled in
    "source_uri",  # where the source came from (path, https, gs://, hf://)
    "source_sha256",  # sha256 of the source file (the params / .checkpoint / theta.state bytes)
    "source_format",  # "lo_params_gin" | "lo_no_config" | "theta_state" | "pickle" | "pylo"
    "converter_version",
    "source_paths",  # JSON: output tensor name -> {"path": ..., "keys": [...], "transform": ...}
)
#: Metadata keys written for some sources only.
OPTIONAL_META_KEYS = (
    "pylo_sources",  # JSON list, source_format "pylo": per PyLO repo its source, model class, sha256s, config
)


@dataclass
class Checkpoint:
    """A converted learned optimizer: architecture id, full config, theta tensors and provenance."""

    path: str
    architecture: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


#: safetensors dtype codes -> the names the specs use (``torch.float32`` -> ``float32``).
_DTYPE_NAMES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "BOOL": "bool",
    **{f"I{b}": f"int{b}" for b in (8, 16, 32, 64)},
    **{f"U{b}": f"uint{b}" for b in (8, 16, 32, 64)},
}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a file written by lopt-convert; raise ValueError naming the file if it is not one.

    The config and the tensor names, shapes and dtypes (read from the header) are checked against the
    architecture's spec before any tensor is loaded: a config that does not fit its theta, or a tiny file
    whose config claims ``ff_hidden_layers: 1e9``, is one ValueError naming the file, the key and the bound.
    """
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            config = _checked_header(path, metadata, f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    return Checkpoint(path, metadata.get("architecture", ""), config, tensors, metadata)


def _checked_header(path: str, metadata: dict[str, str], f: Any) -> dict[str, Any]:
    """The file's config, after checking format, config and theta shapes/dtypes against the spec."""
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path}: not written by lopt-convert (metadata 'format' is {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {metadata.get('format_version')!r}, "
            f"this runtime reads {FORMAT_VERSION!r}"
        )
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: metadata 'config' missing or not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        what = "null" if config is None else f"a JSON {type(config).__name__}"
        raise ValueError(f"{path}: metadata 'config' must be a JSON object of option names, got {what}")
    arch = metadata.get("architecture", "")
    spec = specs.family(arch)
    if spec is not None:  # an unknown architecture is refused by load_optimizer, naming the known ones
        shapes, dtypes = {}, {}
        for k in f.keys():
            sl = f.get_slice(k)
            shapes[k] = tuple(sl.get_shape())
            dtypes[k] = _DTYPE_NAMES.get(sl.get_dtype(), sl.get_dtype().lower())
        try:
            spec.check_theta(spec.validate(config, arch), shapes, dtypes, arch)
        except specs.SpecError as e:
            raise ValueError(f"{path}: {e}") from None
    return config
