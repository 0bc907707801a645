"""Reading a converted ``.safetensors`` file: its tensors and the metadata the converter wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    "source_format",  # "lo_params_gin" | "lo_no_config" | "theta_state" | "pickle"
    "converter_version",
    "source_paths",  # JSON: output tensor name -> {"path": ..., "keys": [...], "transform": ...}
)


@dataclass
class Checkpoint:
    """A converted learned optimizer: architecture id, full config, theta tensors and provenance."""

    path: str
    architecture: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a file written by lopt-convert; raise ValueError naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
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
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata 'config' missing or not JSON ({e})") from None
    return Checkpoint(path, metadata.get("architecture", ""), config, tensors, metadata)
