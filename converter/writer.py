"""Write an ArchSpec as a ``.safetensors`` file with provenance metadata, and read such files back.

The metadata keys are those of ``pylo_runtime.checkpoint.META_KEYS``. Files appear atomically: the data
goes to a temp file in the output's folder, which is renamed over the output only when complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, files
from .architectures.base import ArchSpec
from .errors import ConversionError

#: Same values as pylo_runtime.checkpoint (kept in sync by tests; no torch import needed to convert).
FORMAT_NAME = "lopt-bridge"
FORMAT_VERSION = "1"

_FLOAT_KINDS = ("f",)
#: Same as pylo_runtime.checkpoint.OPTIONAL_META_KEYS: metadata some sources add (PyLO: every repo read).
OPTIONAL_META_KEYS = ("pylo_sources",)


@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint came from, as recorded in the output's metadata."""

    source_uri: str
    source_sha256: str
    source_format: str  # "lo_params_gin" | "lo_no_config" | "theta_state" | "pickle" | "pylo"
    #: Further metadata keys (``pylo_runtime.checkpoint.OPTIONAL_META_KEYS``), e.g. ``pylo_sources``.
    extra: dict[str, str] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value).__name__)


def config_json(config: dict[str, Any], *, source: str) -> str:
    """The config as JSON (tuples as lists, numpy scalars as numbers); ConversionError if not storable."""
    for key, value in config.items():
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError):
            raise ConversionError(
                source, f"config value {key}={value!r} cannot be stored as JSON (not a plain value)"
            ) from None
    return json.dumps(config, default=_json_default, sort_keys=True)


def check_tensors(spec: ArchSpec, *, source: str, allow_nonfinite: bool = False) -> None:
    """Refuse non-float tensors, tensors without a recorded source path, and NaN/Inf unless allowed."""
    for name, arr in spec.tensors.items():
        where = spec.source_paths.get(name, {}).get("path", "?")
        if not isinstance(arr, np.ndarray):
            raise ConversionError(source, f"{where}: a {type(arr).__name__} where a float array belongs")
        if arr.dtype.kind not in _FLOAT_KINDS:
            raise ConversionError(source, f"{where}: dtype {arr.dtype}, expected a float array")
        if not allow_nonfinite:
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ConversionError(
                    source,
                    f"{where}: {bad} of {arr.size} values are NaN/Inf (pass --allow-nonfinite to keep them)",
                )
    missing = sorted(set(spec.tensors) - set(spec.source_paths))
    if missing:
        raise RuntimeError(f"architecture {spec.name!r} gave no source path for {', '.join(missing)}")


def metadata(spec: ArchSpec, provenance: Provenance, *, source: str) -> dict[str, str]:
    """The string metadata header for ``spec`` (keys of pylo_runtime.checkpoint.META_KEYS)."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": spec.name,
        "config": config_json(spec.config, source=source),
        "source_uri": provenance.source_uri,
        "source_sha256": provenance.source_sha256,
        "source_format": provenance.source_format,
        "converter_version": __version__,
        "source_paths": json.dumps({k: spec.source_paths[k] for k in spec.tensors}, sort_keys=True),
    }
    clash = sorted(set(meta) & set(provenance.extra))
    if clash:
        raise RuntimeError(f"provenance extra keys {clash} would overwrite the standard metadata")
    return {**meta, **provenance.extra}


def write(
    spec: ArchSpec,
    output: str | Path,
    provenance: Provenance,
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``spec`` to ``output`` atomically; refuse an existing output unless ``force``."""
    from safetensors.numpy import save_file

    output = files.check_output(output, force=force)
    source = provenance.source_uri
    check_tensors(spec, source=source, allow_nonfinite=allow_nonfinite)
    meta = metadata(spec, provenance, source=source)
    # ascontiguousarray turns 0-d arrays into shape (1,): reshape back so scalars stay scalars.
    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in spec.tensors.items()}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(output) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as e:
        raise ConversionError(output, f"cannot write ({e.strerror or e})") from None
    return output


@dataclass
class Converted:
    """A file written by ``write``: tensors as numpy arrays plus the decoded metadata."""

    path: Path
    architecture: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    source_paths: dict[str, dict[str, Any]]
    metadata: dict[str, str]


def read(path: str | Path) -> Converted:
    """Read a lopt-convert ``.safetensors`` file; ConversionError naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ConversionError(path, "no such file")
    if not path.is_file():
        raise ConversionError(path, "is not a regular file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(path, f"not a safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT_NAME:
        raise ConversionError(
            path, f"not written by lopt-convert (metadata 'format' is {meta.get('format')!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            path, f"format version {meta.get('format_version')!r}, this converter reads {FORMAT_VERSION!r}"
        )
    try:
        config = json.loads(meta["config"])
        source_paths = json.loads(meta.get("source_paths", "{}"))
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise ConversionError(
            path, f"metadata 'config' or 'source_paths' missing or not JSON ({type(e).__name__})"
        ) from None
    _check_metadata(path, config, source_paths)
    return Converted(path, meta.get("architecture", ""), config, tensors, source_paths, meta)


def _check_metadata(path: Path, config: Any, source_paths: Any) -> None:
    """Refuse metadata a crafted file could hold: non-object JSON, source paths that are not
    ``{"path": str, "keys": [str, ...], "transform": str | None}``."""
    if not isinstance(config, dict):
        raise ConversionError(path, f"metadata 'config' is a JSON {type(config).__name__}, not an object")
    if not isinstance(source_paths, dict):
        raise ConversionError(
            path, f"metadata 'source_paths' is a JSON {type(source_paths).__name__}, not an object"
        )
    for name, entry in source_paths.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("keys", []), list)
            and all(isinstance(k, str) for k in entry.get("keys", []))
            and isinstance(entry.get("transform"), (str, type(None)))
        )
        if not ok:
            raise ConversionError(
                path, f"metadata 'source_paths' entry {name[:80]!r} is not {{path, keys, transform}}"
            )


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders digit runs by value: ``ff.w0.2`` before ``ff.w0.10``."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def describe(conv: Converted) -> dict[str, Any]:
    """A JSON-ready summary for ``lopt-convert inspect``: architecture, config, tensors (natural name order),
    provenance."""
    tensors = []
    total = 0
    for name in sorted(conv.tensors, key=natural_key):
        arr = conv.tensors[name]
        total += arr.size
        origin = conv.source_paths.get(name, {})
        tensors.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "numel": int(arr.size),
                "source_path": origin.get("path"),
                "transform": origin.get("transform"),
            }
        )
    return {
        "file": str(conv.path),
        "architecture": conv.architecture,
        "config": conv.config,
        "tensors": tensors,
        "num_parameters": int(total),
        "provenance": {
            k: conv.metadata.get(k)
            for k in ("source_uri", "source_sha256", "source_format", "converter_version", "format_version")
            + tuple(k for k in OPTIONAL_META_KEYS if k in conv.metadata)
        },
    }


def format_description(info: dict[str, Any]) -> str:
    """Human-readable text of ``describe``'s result."""
    lines = [f"{'file:':<19}{info['file']}", f"{'architecture:':<19}{info['architecture']}"]
    for key, value in info["provenance"].items():
        lines.append(f"{key + ':':<19}{value}")
    lines.append(f"{'parameters:':<19}{info['num_parameters']} in {len(info['tensors'])} tensors")
    lines.append("config:")
    for key, value in sorted(info["config"].items()):
        lines.append(f"  {key} = {json.dumps(value)}")
    lines.append("tensors:")
    width = max((len(t["name"]) for t in info["tensors"]), default=4)
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'dtype':<8} source path")
    for t in info["tensors"]:
        shape = "(" + ", ".join(map(str, t["shape"])) + ")"
        origin = t["source_path"] or "?"
        if t["transform"]:
            origin += f"  [{t['transform']}]"
        lines.append(f"  {t['name']:<{width}}  {shape:<16} {t['dtype']:<8} {origin}")
    return "\n".join(lines)
