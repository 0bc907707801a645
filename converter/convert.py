"""Source checkpoint -> validated ArchSpec -> ``.safetensors``; and ``verify`` of a written file.

Source formats (recognised from the decoded tree, not the file name):
  lo_params_gin   learned_optimization's pretrained folder: ``params`` = flax bytes of
                  ``ParameterCheckpoint(params=theta, gen_id, step)`` + ``config.gin`` beside it
  lo_no_config    ``pretrained_optimizers.py``'s ``no_config/*.checkpoint``: flax bytes of ``(theta, '', 0)``;
                  the architecture comes from the caller (subcommand, ``--set``, ``--config``)
  theta_state     Celo-style ``theta.state``: flax bytes of theta alone
  pickle          a Python pickle (muLO's meta-training output); only with ``allow_pickle=True``
Bindings are merged in this order, later winning: architecture defaults, ``config.gin``, ``--config``
file, ``--set key=value``.
"""

from __future__ import annotations

import hashlib
import json
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import architectures, files, flax_msgpack, gin_config, jax_pickle, sources, writer
from .architectures.base import Architecture, ArchSpec, apply_transform, lookup
from .errors import ConversionError

SOURCE_FORMATS = ("lo_params_gin", "lo_no_config", "theta_state", "pickle")
#: Set through ``--set architecture=NAME``: picks the family instead of a binding.
ARCH_KEY = "architecture"
_PICKLE_PROTOCOLS = (2, 3, 4, 5)


class VerifyError(Exception):
    """A converted file does not match its source (CLI exit code 1)."""


@dataclass
class LoadedSource:
    """A decoded source: its full tree, where theta sits in it, and the files it came from."""

    uri: str
    path: Path
    format: str
    tree: dict[str, Any]
    theta_keys: tuple[str, ...]
    sha256: str
    config_path: Path | None = None
    notes: dict[tuple[str, ...], str] = field(default_factory=dict)

    @property
    def theta(self) -> Any:
        node: Any = self.tree
        for key in self.theta_keys:
            node = node[key]
        return node


# ------------------------------------------------------------------------------------------------ reading


def is_pickle(data: bytes) -> bool:
    """Pickle protocol 2+ starts with PROTO (0x80) + version; flax never does (0x80 is msgpack's {})."""
    return len(data) >= 2 and data[0] == 0x80 and data[1] in _PICKLE_PROTOCOLS


def _load_pickle(path: Path, data: bytes) -> dict[str, Any]:
    try:
        # Only reached with an explicit --allow-pickle; even then only numpy / jax-array globals are allowed,
        # jax arrays are rebuilt as numpy without importing jax, and depth, object count, shared references
        # and array bytes are bounded (converter/jax_pickle.py).
        obj = jax_pickle.loads(data)
    except (jax_pickle.UnsupportedPickle, jax_pickle.PickleLimit) as e:
        raise ConversionError(path, str(e)) from None
    except ModuleNotFoundError as e:
        raise ConversionError(
            path, f"the pickle needs module {e.name!r}, which the converter does not import"
        ) from None
    except Exception as e:  # unpickling can fail in arbitrary ways
        msg = " ".join(str(e).split())[:200]
        raise ConversionError(path, f"cannot unpickle ({type(e).__name__}: {msg})") from None
    tree = jax_pickle.to_tree(obj)
    if not isinstance(tree, dict):
        raise ConversionError(path, f"the pickle holds a {type(obj).__name__}, not a tree of arrays")
    return tree


def _layout(tree: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(format, theta keys) from the top level of a decoded tree."""
    if set(tree) == {"params", "gen_id", "step"}:
        return "lo_params_gin", ("params",)
    if set(tree) == {"0", "1", "2"} and isinstance(tree["1"], str) and isinstance(tree["2"], int):
        return "lo_no_config", ("0",)
    return "theta_state", ()


def _weights_uri(source: str) -> str:
    """A folder source means the weights file inside it."""
    if sources.is_remote(source):
        return source + "params" if source.endswith("/") else source
    path = sources.local_path(source)
    if path.is_dir():
        for name in ("params", "theta.state"):
            if (path / name).is_file():
                return str(path / name)
        checkpoints = sorted(path.glob("*.checkpoint"))
        if len(checkpoints) == 1:
            return str(checkpoints[0])
        raise ConversionError(
            path, "folder holds no 'params', 'theta.state' or single '*.checkpoint' file to convert"
        )
    return source


def read_source(
    source: str,
    *,
    config_file: str | None = None,
    allow_pickle: bool = False,
    expected_sha256: str | None = None,
    progress: bool | None = None,
    need_config: bool = True,
    refresh: bool = False,
    max_bytes: int | None = None,
) -> LoadedSource:
    """Fetch (if remote) and decode ``source``; fetch ``config.gin`` beside it for ``lo_params_gin``.

    ``need_config=False`` skips the config.gin (verify uses the config recorded in the output).
    ``refresh`` re-asks servers for cached downloads; ``max_bytes`` caps the source size
    (default ``sources.max_source_bytes()``).
    """
    limit = sources.max_source_bytes() if max_bytes is None else max_bytes
    uri = _weights_uri(source)
    path = sources.fetch(uri, sha256=expected_sha256, progress=progress, refresh=refresh, max_bytes=limit)
    data = files.read_regular_file(path, max_bytes=limit, what="checkpoint file")
    sha = hashlib.sha256(data).hexdigest()
    shown = uri if sources.is_remote(uri) else str(path.resolve())
    notes: dict[tuple[str, ...], str] = {}
    if is_pickle(data) or path.suffix in (".pkl", ".pickle"):
        if not allow_pickle:
            raise ConversionError(
                path,
                "is a Python pickle; unpickling can run arbitrary code, so pass --allow-pickle "
                "only if you trust this file",
            )
        tree = _load_pickle(path, data)
        fmt, theta_keys = "pickle", _layout(tree)[1]
    else:
        tree = flax_msgpack.decode(data, source=str(path), notes=notes)
        fmt, theta_keys = _layout(tree)
    config_path = None
    if fmt == "lo_params_gin" and config_file is None and need_config:
        gin_uri = sources.sibling(uri, "config.gin")
        if sources.is_remote(gin_uri):
            config_path = sources.fetch(gin_uri, progress=progress, refresh=refresh, max_bytes=limit)
        else:
            config_path = Path(gin_uri)
            if not config_path.is_file():
                raise ConversionError(
                    config_path,
                    "missing: a pretrained 'params' file needs the config.gin written beside it "
                    "(or pass --config FILE.gin)",
                )
    return LoadedSource(shown, path, fmt, tree, theta_keys, sha, config_path, notes)


# ------------------------------------------------------------------------------------------------ bindings


def parse_sets(sets: Sequence[str] | Mapping[str, Any] | None, *, source: str = "--set") -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``; values use gin's literal syntax (``'str'``, ``(1, 2)``)."""
    if sets is None:
        return {}
    if isinstance(sets, Mapping):
        return dict(sets)
    out: dict[str, Any] = {}
    for item in sets:
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or not key:
            raise ConversionError(source, f"{item!r} is not key=value")
        if key == ARCH_KEY:
            out[key] = text
            continue
        out[key] = _parse_value(text, f"{source} {key}")
    return out


def _parse_value(text: str, where: str) -> Any:
    from gin import config_parser

    try:
        parser = config_parser.ConfigParser(text, gin_config._Delegate())
        value = parser.parse_value()
        if parser.current_token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
            raise ValueError(f"unexpected {parser.current_token.string!r} after the value")
    except (SyntaxError, ValueError) as e:
        raise ConversionError(
            where, f"cannot parse value {text!r} ({getattr(e, 'msg', e)}); quote strings: 'text'"
        ) from None
    except Exception as e:  # tokenize errors
        raise ConversionError(where, f"cannot parse value {text!r} ({e})") from None
    return value


def _class_prefixed(key: str, arch: Architecture) -> str:
    """``HyperV2.lstm_hidden_size`` -> ``lstm_hidden_size`` when the class is the architecture's."""
    selector, dot, arg = key.rpartition(".")
    if dot and any(gin_config._same_configurable(selector, g) for g in arch.gin_names):
        return arg
    return key


def _config_file_bindings(path: str, arch_hint: str | None) -> tuple[str | None, dict[str, Any]]:
    """(class name or None, bindings) from a user ``--config`` file."""
    p = Path(path)
    data = files.read_regular_file(p, max_bytes=gin_config.MAX_GIN_BYTES, what="gin file", hint="")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(p, "cannot read as text (not UTF-8)") from None
    if "run_train.lopt" in text:
        opt = gin_config.parse_optimizer(text, source=str(p), known_classes=architectures.gin_names())
        return opt.selector, opt.bindings
    by_selector = gin_config.parse_bindings(text, source=str(p))
    candidates = [architectures.by_name(arch_hint)] if arch_hint else list(architectures.all_architectures())
    selectors = list(by_selector)
    owner: Architecture | None = None
    for arch in candidates:
        if selectors and all(
            any(gin_config._same_configurable(s, g) for g in arch.gin_names) for s in selectors
        ):
            owner = arch
            break
    if owner is None:
        names = ", ".join(sorted({g for a in candidates for g in a.gin_names}))
        raise ConversionError(
            p,
            f"bindings for {', '.join(selectors) or 'nothing'} do not select one learned optimizer ({names})",
        )
    merged: dict[str, Any] = {}
    for values in by_selector.values():
        merged.update(values)
    return owner.gin_names[0], merged


@dataclass
class Plan:
    """The architecture and bindings a source will be built with, and where each came from."""

    architecture: Architecture
    bindings: dict[str, Any]


def plan(
    loaded: LoadedSource,
    *,
    architecture: str | None = None,
    sets: Sequence[str] | Mapping[str, Any] | None = None,
    config_file: str | None = None,
) -> Plan:
    """Choose the architecture and merge the bindings (defaults < config.gin < --config < --set)."""
    set_values = parse_sets(sets)
    arch_names: list[tuple[str, Architecture]] = []  # (where it was named, architecture)
    if architecture:
        arch_names.append(("the command", architectures.by_name(architecture, source=loaded.uri)))
    if ARCH_KEY in set_values:
        arch_names.append(("--set", architectures.by_name(set_values.pop(ARCH_KEY), source="--set")))
    bindings: dict[str, Any] = {}
    if loaded.config_path is not None:
        opt = gin_config.load_optimizer_config(loaded.config_path, known_classes=architectures.gin_names())
        arch_names.append(
            (str(loaded.config_path), architectures.by_gin_name(opt.selector, source=str(loaded.config_path)))
        )
        bindings.update(opt.bindings)
    if config_file is not None:
        hint = arch_names[0][1].name if arch_names else None
        cls, values = _config_file_bindings(config_file, hint)
        if cls is not None:
            arch_names.append((config_file, architectures.by_gin_name(cls, source=config_file)))
        bindings.update(values)
    chosen = {a.name for _, a in arch_names}
    if len(chosen) > 1:
        said = "; ".join(f"{where} says {a.name}" for where, a in arch_names)
        raise ConversionError(loaded.uri, f"conflicting architectures: {said}")
    if not arch_names and loaded.format == "lo_no_config":
        raise ConversionError(
            loaded.path,
            "a no_config checkpoint carries no config: name the architecture "
            "(a registry subcommand, --set architecture=NAME or --config FILE.gin)",
        )
    arch = arch_names[0][1] if arch_names else architectures.detect(loaded.theta, source=str(loaded.path))
    for key, value in set_values.items():
        bindings[_class_prefixed(key, arch)] = value
    return Plan(arch, bindings)


def _with_provenance_paths(spec: ArchSpec, loaded: LoadedSource) -> ArchSpec:
    """Make source paths absolute in the file (prefix ``params`` / ``0``) and record bf16 widening."""
    paths: dict[str, dict[str, Any]] = {}
    for name, entry in spec.source_paths.items():
        keys = list(entry.get("keys") or entry["path"].split("/"))
        full = [*loaded.theta_keys, *keys]
        transform = entry.get("transform")
        note = loaded.notes.get(tuple(full))
        if note:
            transform = f"{note}; {transform}" if transform else note
        paths[name] = {**entry, "path": "/".join(full), "keys": full, "transform": transform}
    return ArchSpec(spec.name, spec.config, spec.tensors, paths)


def build(arch: Architecture, theta: Mapping[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
    """``arch.build`` with any error a malformed tree or config can raise turned into one ConversionError
    line (the architecture modules validate what they know; this is the net under them)."""
    try:
        return arch.build(theta, bindings, source=source)
    except ConversionError:
        raise
    except RecursionError:
        raise ConversionError(source, f"theta or config nests too deeply for {arch.name}") from None
    except MemoryError:
        raise ConversionError(source, f"the config asks {arch.name} for more memory than there is") from None
    except (
        TypeError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        ZeroDivisionError,
    ) as e:
        msg = " ".join(str(e).split())[:200]
        raise ConversionError(
            source, f"theta or config does not fit {arch.name} ({type(e).__name__}: {msg})"
        ) from None


def load_source(
    source: str,
    *,
    architecture: str | None = None,
    sets: Sequence[str] | Mapping[str, Any] | None = None,
    config_file: str | None = None,
    allow_pickle: bool = False,
    expected_sha256: str | None = None,
    progress: bool | None = None,
    fallback_sets: Sequence[str] = (),
    refresh: bool = False,
    max_bytes: int | None = None,
) -> tuple[ArchSpec, writer.Provenance]:
    """Read ``source`` and build its validated ArchSpec plus the provenance to record.

    ``fallback_sets`` (a registry entry's ``sets``) apply before ``sets`` and only to config-less
    formats: a ``params`` + ``config.gin`` source is described by its config.gin.
    """
    loaded = read_source(
        source,
        config_file=config_file,
        allow_pickle=allow_pickle,
        expected_sha256=expected_sha256,
        progress=progress,
        refresh=refresh,
        max_bytes=max_bytes,
    )
    if fallback_sets and loaded.format != "lo_params_gin":
        sets = {**parse_sets(list(fallback_sets), source="registry sets"), **parse_sets(sets)}
    p = plan(loaded, architecture=architecture, sets=sets, config_file=config_file)
    theta = loaded.theta
    if not isinstance(theta, Mapping):
        raise ConversionError(loaded.path, f"theta is a {type(theta).__name__}, not a tree of arrays")
    bindings = p.bindings
    implied = getattr(p.architecture, "format_bindings", None)  # e.g. which code wrote a theta.state
    if implied is not None:
        bindings = {**implied(loaded.format), **bindings}
    spec = build(p.architecture, theta, bindings, source=str(loaded.path))
    spec = _with_provenance_paths(spec, loaded)
    return spec, writer.Provenance(loaded.uri, loaded.sha256, loaded.format)


def convert_source(
    source: str,
    output: str | Path,
    *,
    architecture: str | None = None,
    sets: Sequence[str] | Mapping[str, Any] | None = None,
    config_file: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    expected_sha256: str | None = None,
    progress: bool | None = None,
    fallback_sets: Sequence[str] = (),
    refresh: bool = False,
    max_bytes: int | None = None,
) -> Path:
    """Convert ``source`` into ``output`` (.safetensors); returns the output path.

    Raises ConversionError (bad input; nothing written) or sources.DownloadError (network).
    """
    output = files.check_output(output, force=force)  # fail before any download or decode
    spec, provenance = load_source(
        source,
        architecture=architecture,
        sets=sets,
        config_file=config_file,
        allow_pickle=allow_pickle,
        expected_sha256=expected_sha256,
        progress=progress,
        fallback_sets=fallback_sets,
        refresh=refresh,
        max_bytes=max_bytes,
    )
    return writer.write(spec, output, provenance, force=force, allow_nonfinite=allow_nonfinite)


# ------------------------------------------------------------------------------------------------ verify


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def verify(
    output: str | Path,
    source: str,
    *,
    allow_pickle: bool = False,
    progress: bool | None = None,
    refresh: bool = False,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Re-read ``source`` and check ``output`` against it bit for bit; return a summary.

    Two independent checks: (1) each output tensor equals its recorded source path with the recorded
    transform applied; (2) the architecture module, rebuilt from the source with the recorded config,
    gives the same tensor names, bits and config. Raises VerifyError listing what differs.
    """
    conv = writer.read(output)
    loaded = read_source(
        source, allow_pickle=allow_pickle, progress=progress, need_config=False, refresh=refresh,
        max_bytes=max_bytes,
    )  # fmt: skip
    problems: list[str] = []
    if loaded.format != conv.metadata.get("source_format"):
        problems.append(
            f"source format is {loaded.format}, file records {conv.metadata.get('source_format')}"
        )
    if loaded.sha256 != conv.metadata.get("source_sha256"):
        problems.append(
            f"source sha256 {loaded.sha256} differs from the recorded {conv.metadata.get('source_sha256')}"
        )
    differ: list[str] = []
    for name, arr in conv.tensors.items():
        entry = conv.source_paths.get(name)
        if entry is None:
            differ.append(f"{name} (no recorded source path)")
            continue
        leaf = lookup(loaded.tree, tuple(entry.get("keys") or entry["path"].split("/")))
        if leaf is None:
            differ.append(f"{name} (source has no {entry['path']})")
            continue
        try:
            want = apply_transform(leaf, entry.get("transform"))
        except (ValueError, TypeError, IndexError, OverflowError):
            differ.append(f"{name} (transform {str(entry.get('transform'))[:60]!r} does not apply)")
            continue
        if not _same_bits(arr, want):
            differ.append(f"{name} (!= {entry['path']})")
    if differ:
        problems.append(f"{len(differ)} tensor(s) differ from the source: {', '.join(differ[:6])}")
    # (2) rebuild through the architecture module with the recorded config.
    try:
        arch = architectures.by_name(conv.architecture, source=str(output))
        theta = loaded.theta
        if not isinstance(theta, Mapping):
            raise ConversionError(loaded.path, f"theta is a {type(theta).__name__}, not a tree of arrays")
        rebuilt = _with_provenance_paths(
            build(arch, theta, dict(conv.config), source=str(loaded.path)), loaded
        )
    except ConversionError as e:
        problems.append(f"rebuilding as {conv.architecture} failed: {e.problem}")
    else:
        if set(rebuilt.tensors) != set(conv.tensors):
            problems.append(
                "tensor names differ from a fresh conversion: "
                f"{sorted(set(rebuilt.tensors) ^ set(conv.tensors))}"
            )
        bad = [
            k
            for k in set(rebuilt.tensors) & set(conv.tensors)
            if not _same_bits(rebuilt.tensors[k], conv.tensors[k])
        ]
        if bad:
            problems.append(f"fresh conversion gives different values for {', '.join(sorted(bad)[:6])}")
        # Options added to a family after the file was written (VeLO's ff_mult) take their defaults.
        recorded = {**json.loads(writer.config_json(arch.defaults(), source=str(output))), **conv.config}
        if json.loads(writer.config_json(rebuilt.config, source=str(output))) != recorded:
            problems.append("the recorded config differs from the one the architecture builds from it")
        if {k: v.get("transform") for k, v in rebuilt.source_paths.items()} != {
            k: v.get("transform") for k, v in conv.source_paths.items()
        }:
            problems.append("recorded transforms differ from a fresh conversion")
    if problems:
        raise VerifyError(f"{output}: verify failed against {source}: " + "; ".join(problems))
    return {
        "file": str(output),
        "source": loaded.uri,
        "architecture": conv.architecture,
        "tensors": len(conv.tensors),
        "values": int(sum(a.size for a in conv.tensors.values())),
        "source_sha256": loaded.sha256,
    }
