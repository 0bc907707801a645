"""PyLO's Hugging Face format (huggingface_hub ``PyTorchModelHubMixin``), read and written without torch.

A PyLO repo (``Pauljanson002/VeLO_RNN``, ``btherien/mulo``, ...) or a folder written by PyLO's
``save_pretrained`` holds ``model.safetensors`` (the model's ``state_dict``, float32, written by
safetensors' ``save_model``) and ``config.json`` (the model class's ``__init__`` arguments,
``json.dumps(config, sort_keys=True, indent=2)``), plus a ``README.md`` model card nobody reads. Which PyLO
model class a file belongs to is recorded nowhere: the maps in ``converter/pylo_maps/`` recognise it from the
key set.

This module reads such repos (hostile input: sizes, header, dtypes, JSON checked, one-line errors), finds
the map that fits the given repos, turns them into an ``ArchSpec`` (``lopt-convert pylo``, ``auto``,
registry entries of format ``pylo``), verifies a converted file against them, and writes the other
direction (``lopt-convert export-pylo``). ``export-pylo`` also writes ``pylo_optimizer.json`` beside the
files: the PyLO optimizer and the keyword arguments it needs to run the checkpoint exactly as our runtime
does (options PyLO takes as optimizer arguments, not from the files); ``to_ours`` reads it back when present.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import itertools
import json
import math
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, files, sources, writer
from .architectures.base import ArchSpec, apply_transform
from .errors import ConversionError

SOURCE_FORMAT = "pylo"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: lopt-bridge's own addition to a PyLO folder: the PyLO optimizer call that runs it (PyLO ignores it).
KWARGS_FILE = "pylo_optimizer.json"
#: Largest config.json / pylo_optimizer.json read (PyLO's are under 300 bytes).
MAX_JSON_BYTES = 1 << 20
#: JSON nesting accepted in config.json / pylo_optimizer.json.
MAX_JSON_DEPTH = 16
#: Largest safetensors header (PyLO's VeLO_MLP, the largest key set, has a 1.4 kB header).
MAX_HEADER_BYTES = 1 << 20
#: Most tensors in one PyLO file (VeLO_MLP with 1 hidden layer has 12).
MAX_TENSORS = 4096
MAX_KEY_CHARS = 256
MAX_RANK = 8
#: Most repos one conversion reads (VeLO needs two).
MAX_SOURCES = 4
#: PyLO hub repos whose model class another PyLO family shares, with why lopt-convert refuses them.
UNSUPPORTED_REPOS = {
    "DiamondXL/elo": "PyLO's ELO (ELO_naive: MetaMLP weights, but raw decays and its own update rule) "
    "has no lopt-bridge architecture",
    "DiamondXL/elo-celo2": "PyLO's ELO-CELO2 (ELO_CELO2_naive) has no lopt-bridge architecture",
}
#: Architectures PyLO has no port of, with the reason export-pylo gives.
NO_PYLO_PORT = {
    "celo": "Celo has no PyLO port (PyLO's CELO2 is a different optimizer, Celo2)",
    "celo_adam": "Celo-Adam has no PyLO port",
}
_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


# ------------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class PyloFile:
    """One PyLO hub repo / folder: model.safetensors + config.json."""

    name: str  # repo id or path, for messages and provenance (to_pylo: the folder name to write)
    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    sha256: str  # of model.safetensors
    #: PyLO optimizer keyword arguments recorded beside the files (pylo_optimizer.json); {} for hub repos.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PyloMap:
    """How one of our architectures is stored as PyLO repos, both ways."""

    architecture: str  # our architecture id, e.g. "velo"
    repos: tuple[str, ...]  # PyLO hub repos in the order to_ours takes them
    model_classes: tuple[str, ...]  # PyLO model class per repo, e.g. ("VeLORNN", "VeLOMLP")
    matches: Callable[[list[PyloFile]], bool]  # files in repos order
    to_ours: Callable[[list[PyloFile], str], ArchSpec]  # (files in repos order, source label) -> ArchSpec
    to_pylo: Callable[[str, dict[str, Any], dict[str, np.ndarray]], list[PyloFile]]  # (arch, config, tensors)
    optimizer: str = ""  # the PyLO optimizer that loads these repos, e.g. "pylo.optim.VeLO_naive"
    hf_key_args: tuple[str, ...] = ()  # its argument per repo, e.g. ("hf_key_rnn", "hf_key_mlp")


# ------------------------------------------------------------------------------------------------ maps


@functools.cache
def all_maps() -> tuple[PyloMap, ...]:
    """Every map of every module in ``converter/pylo_maps`` (each exposes ``MAPS``), module-name order."""
    from . import pylo_maps

    found: list[PyloMap] = []
    for info in sorted(pkgutil.iter_modules(pylo_maps.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pylo_maps.__name__}.{info.name}")
        for m in getattr(module, "MAPS", ()):
            if any(o.architecture == m.architecture for o in found):
                raise RuntimeError(f"two PyLO maps for architecture {m.architecture!r} ({module.__name__})")
            found.append(m)
    return tuple(found)


def maps_for(architecture: str) -> list[PyloMap]:
    """The maps that produce ``architecture``."""
    return [m for m in all_maps() if m.architecture == architecture.replace("-", "_")]


def _describe_map(m: PyloMap) -> str:
    parts = [f"{c} ({r})" for c, r in zip(m.model_classes, m.repos, strict=True)]
    return f"{m.architecture}: {len(m.repos)} repo{'s' if len(m.repos) > 1 else ''} {' + '.join(parts)}"


def _describe_file(f: PyloFile, limit: int = 6) -> str:
    keys = sorted(f.tensors)
    more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return f"{f.name} [{', '.join(keys[:limit])}{more}]"


def detect(found: Sequence[PyloFile], architecture: str | None = None) -> tuple[PyloMap, list[PyloFile]]:
    """The one map (of ``architecture`` if given) that accepts the files in some order; that order.

    ConversionError listing what every map expects and what was found otherwise.
    """
    candidates = maps_for(architecture) if architecture else list(all_maps())
    label = " + ".join(f.name for f in found)
    if architecture and not candidates:
        have = ", ".join(sorted({m.architecture for m in all_maps()}))
        raise ConversionError(label, f"no PyLO format for architecture {architecture!r} (PyLO maps: {have})")
    hits: list[tuple[PyloMap, list[PyloFile]]] = []
    for m in candidates:
        if len(m.repos) != len(found):
            continue
        for order in itertools.permutations(found):
            try:
                ok = bool(m.matches(list(order)))
            except Exception:  # a hostile file must not become a traceback here
                ok = False
            if ok:
                hits.append((m, list(order)))
                break
    if len(hits) == 1:
        return hits[0]
    if hits:
        names = ", ".join(m.architecture for m, _ in hits)
        raise ConversionError(
            label, f"the PyLO files fit several maps ({names}); name one with --set architecture="
        )
    expected = "; ".join(_describe_map(m) for m in candidates)
    got = "; ".join(_describe_file(f) for f in found)
    raise ConversionError(
        label, f"no PyLO map accepts these {len(found)} repo(s): expected {expected}; found {got}"
    )


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Location:
    """Where a PyLO repo's files are: hf:// URIs or local paths."""

    name: str  # hf://owner/repo[@rev][/sub] or the folder's absolute path
    model: str
    config: str
    kwargs: str
    remote: bool
    repo_id: str = ""  # hf only


def _hf_parts(src: str) -> list[str] | None:
    """Path parts of an hf:// source naming a repo (or a PyLO file in it); None if it names another file."""
    parts = src[len("hf://") :].rstrip("/").split("/")
    if parts and parts[0] in ("datasets", "spaces"):
        return None
    if parts and parts[-1] in (MODEL_FILE, CONFIG_FILE, KWARGS_FILE):
        parts = parts[:-1]
    elif len(parts) > 2:  # hf://owner/repo/theta.state and the like: not PyLO's format
        return None
    return parts


def is_pylo_source(src: str) -> bool:
    """``hf://owner/repo[@rev]``, a PyLO file in a repo, or a local folder / file ``model.safetensors``."""
    if src.lower().startswith("hf://"):
        return _hf_parts(src) is not None
    if sources.is_remote(src):
        return False
    path = sources.local_path(src)
    try:
        return (path.is_dir() and (path / MODEL_FILE).exists()) or (path.name == MODEL_FILE)
    except OSError:
        return False


def locate(src: str) -> Location:
    """Check a PyLO source and say where its files are; ConversionError (one line) if it cannot be one."""
    if src.lower().startswith("hf://"):
        parts = _hf_parts(src)
        if parts is None or len(parts) < 2:
            raise ConversionError(src, "a PyLO repo is hf://owner/repo[@revision] (or a local folder)")
        base = "hf://" + "/".join(parts)
        model = sources.parse_remote(f"{base}/{MODEL_FILE}")  # checks owner, repo, revision, segments
        return Location(
            base,
            f"{base}/{MODEL_FILE}",
            f"{base}/{CONFIG_FILE}",
            f"{base}/{KWARGS_FILE}",
            True,
            model.repo_id,
        )
    if sources.is_remote(src):
        raise ConversionError(src, "a PyLO repo is read from hf://owner/repo or a local folder, not a URL")
    path = sources.local_path(src)
    if path.name in (MODEL_FILE, CONFIG_FILE, KWARGS_FILE) and not path.is_dir():
        path = path.parent
    if not path.exists():
        hint = ""
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", src):
            hint = f" (for the hub repo write hf://{src})"
        raise ConversionError(path, f"no such folder{hint}")
    if not path.is_dir():
        raise ConversionError(path, f"is not a folder; a PyLO repo is a folder holding {MODEL_FILE}")
    folder = path.resolve()
    return Location(
        str(folder), str(folder / MODEL_FILE), str(folder / CONFIG_FILE), str(folder / KWARGS_FILE), False
    )


@dataclass(frozen=True)
class LoadedRepo:
    """A read PyLO repo and what provenance records about it."""

    file: PyloFile
    source: str  # as the user gave it (normalised for hf://)
    config_sha256: str | None
    kwargs_sha256: str | None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(node, dict):
            stack += [(v, d + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, d + 1) for v in node]
    return deepest


def parse_json_object(data: bytes, where: str, what: str) -> dict[str, Any]:
    """A JSON object (UTF-8, no NaN/Infinity, no duplicate keys, nesting limited); ConversionError if not."""
    try:
        value = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
        )
    except UnicodeDecodeError:
        raise ConversionError(where, f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise ConversionError(where, f"{what} nests too deeply") from None
    except ValueError as e:
        raise ConversionError(where, f"{what} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(value, dict):
        raise ConversionError(where, f"{what} holds a JSON {type(value).__name__}, not an object")
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ConversionError(where, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def parse_safetensors(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The float32 tensors of a safetensors file, its header checked before anything is allocated."""
    if len(data) < 8:
        raise ConversionError(where, f"{len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise ConversionError(
            where, f"safetensors header length {n} is over the file ({len(data)} bytes) or {MAX_HEADER_BYTES}"
        )
    header = parse_json_object(data[8 : 8 + n], where, "the safetensors header")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ConversionError(where, "safetensors __metadata__ is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise ConversionError(where, f"{len(header)} tensors (at most {MAX_TENSORS})")
    body = len(data) - 8 - n
    spans: list[tuple[int, int]] = []
    for key, info in header.items():
        shown = repr(key[:60])
        if len(key) > MAX_KEY_CHARS or not _KEY.fullmatch(key):
            raise ConversionError(where, f"tensor name {shown} is not a PyTorch state-dict key")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ConversionError(
                where, f"tensor {shown}: header entry is not {{dtype, shape, data_offsets}}"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype != "F32":
            raise ConversionError(
                where, f"tensor {shown} is {str(dtype)[:20]}; PyLO's files hold float32 (F32)"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ConversionError(where, f"tensor {shown}: shape {str(shape)[:60]} is not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise ConversionError(where, f"tensor {shown}: data_offsets {str(offsets)[:60]} outside the data")
        if offsets[1] - offsets[0] != 4 * math.prod(shape):
            raise ConversionError(
                where, f"tensor {shown}: {offsets[1] - offsets[0]} bytes for shape {tuple(shape)} of float32"
            )
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        raise ConversionError(where, "tensors overlap in the safetensors data")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise ConversionError(where, f"not a safetensors file ({str(e).splitlines()[0][:160]})") from None
    if set(tensors) != set(header) or any(a.dtype != np.float32 for a in tensors.values()):
        raise ConversionError(where, "safetensors gave other tensors than its header lists")
    return {k: np.asarray(v) for k, v in tensors.items()}


def _read(uri: str, *, remote: bool, limit: int, what: str, refresh: bool, progress: bool | None) -> bytes:
    path = sources.fetch(uri, max_bytes=limit, refresh=refresh, progress=progress) if remote else Path(uri)
    return files.read_regular_file(path, max_bytes=limit, what=what)


def _read_optional(
    uri: str, *, remote: bool, refresh: bool, progress: bool | None, what: str
) -> bytes | None:
    """An optional small file: None when the repo / folder does not have it."""
    if not remote:
        p = Path(uri)
        if not p.exists() and not p.is_symlink():
            return None
        return files.read_regular_file(p, max_bytes=MAX_JSON_BYTES, what=what, hint="")
    try:
        return _read(uri, remote=True, limit=MAX_JSON_BYTES, what=what, refresh=refresh, progress=progress)
    except ConversionError as e:
        if e.problem.startswith("no such file"):
            return None
        raise


def read_repo(
    src: str, *, max_bytes: int | None = None, refresh: bool = False, progress: bool | None = None
) -> LoadedRepo:
    """Read one PyLO repo / folder: model.safetensors (size-capped, header checked), config.json and
    pylo_optimizer.json if present (1 MiB each, JSON objects)."""
    loc = locate(src)
    if loc.repo_id in UNSUPPORTED_REPOS:
        raise ConversionError(loc.name, UNSUPPORTED_REPOS[loc.repo_id])
    limit = sources.max_source_bytes() if max_bytes is None else max_bytes
    try:
        data = _read(
            loc.model, remote=loc.remote, limit=limit, what=MODEL_FILE, refresh=refresh, progress=progress
        )
    except ConversionError as e:
        if e.problem.startswith("no such file"):
            hint = " (for another file in the repo write hf://owner/repo/FILE)" if loc.remote else ""
            legacy = "; PyLO's legacy pytorch_model.bin is a pickle and is not read"
            raise ConversionError(loc.name, f"holds no {MODEL_FILE}: not a PyLO repo{hint}{legacy}") from None
        raise
    tensors = parse_safetensors(data, loc.model)
    sha = hashlib.sha256(data).hexdigest()
    raw_config = _read_optional(
        loc.config, remote=loc.remote, refresh=refresh, progress=progress, what=CONFIG_FILE
    )
    config = {} if raw_config is None else parse_json_object(raw_config, loc.config, CONFIG_FILE)
    raw_kwargs = _read_optional(
        loc.kwargs, remote=loc.remote, refresh=refresh, progress=progress, what=KWARGS_FILE
    )
    kwargs: dict[str, Any] = {}
    if raw_kwargs is not None:
        doc = parse_json_object(raw_kwargs, loc.kwargs, KWARGS_FILE)
        kwargs = doc.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ConversionError(loc.kwargs, "'kwargs' is not a JSON object")
    return LoadedRepo(
        PyloFile(loc.name, tensors, config, sha, kwargs),
        loc.name,
        None if raw_config is None else hashlib.sha256(raw_config).hexdigest(),
        None if raw_kwargs is None else hashlib.sha256(raw_kwargs).hexdigest(),
    )


# ------------------------------------------------------------------------------------------------ map helpers


@dataclass(frozen=True)
class Key:
    """One row of a key map: our tensor ``name`` is PyLO ``repo``'s ``key`` with ``transform`` applied."""

    name: str
    repo: int  # index into the map's repos
    key: str
    transform: str | None = None


def check_keys(
    f: PyloFile,
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    who: str,
    optional: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Every expected key present with its shape, optional ones with theirs if present, nothing else."""
    optional = optional or {}
    missing = sorted(set(expected) - set(f.tensors))
    extra = sorted(set(f.tensors) - set(expected) - set(optional))
    wrong = [
        f"{k} {tuple(f.tensors[k].shape)} (expected {want})"
        for k, want in {**expected, **optional}.items()
        if k in f.tensors and tuple(f.tensors[k].shape) != tuple(want)
    ]
    problems = []
    if wrong:
        problems.append("wrong shape " + ", ".join(sorted(wrong)[:6]))
    if missing:
        problems.append("missing " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if extra:
        problems.append("unexpected " + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    if problems:
        raise ConversionError(source, f"{f.name} is not a {who} for these sizes: " + "; ".join(problems))


def config_ints(
    f: PyloFile, inferred: Mapping[str, Any], defaults: Mapping[str, Any], source: str, who: str
) -> None:
    """config.json against what the shapes say: a known key must hold the same value; unknown keys are
    ignored (as PyLO's from_pretrained does)."""
    for key in defaults:
        if key not in f.config:
            continue
        value = f.config[key]
        want = inferred.get(key, defaults[key])
        same_type = type(value) is type(want) or (isinstance(want, int) and type(value) is int)
        if not same_type or value != want:
            raise ConversionError(
                source,
                f"{f.name}: {CONFIG_FILE} says {key}={str(value)[:40]} but {who}'s tensors need {want!r}",
            )


def take(files_: Sequence[PyloFile], repos: Sequence[str], rows: Sequence[Key]) -> tuple[
    dict[str, np.ndarray], dict[str, dict[str, Any]]
]:  # fmt: skip
    """Our tensors from a key map, with ``source_paths`` naming the PyLO repo, key and transform."""
    tensors: dict[str, np.ndarray] = {}
    paths: dict[str, dict[str, Any]] = {}
    for row in rows:
        arr = apply_transform(files_[row.repo].tensors[row.key], row.transform)
        tensors[row.name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(arr.shape)
        repo = repos[row.repo]
        paths[row.name] = {"path": f"{repo}:{row.key}", "keys": [repo, row.key], "transform": row.transform}
    return tensors, paths


def place(target: dict[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], rows: Sequence[Key],
          tensors: Mapping[str, np.ndarray], repo: int) -> None:  # fmt: skip
    """The inverse of ``take`` for one repo: write our tensors into PyLO keys (``shapes`` gives each key's
    shape); transforms are inverted (``transpose`` by the inverse permutation, ``slice`` by assignment)."""
    for row in rows:
        if row.repo != repo:
            continue
        if row.key not in target:
            target[row.key] = np.zeros(shapes[row.key], dtype=np.float32)
        value = np.asarray(tensors[row.name], dtype=np.float32)
        steps = [s.strip() for s in (row.transform or "").split(";") if s.strip()]
        index: tuple[slice, ...] = ()
        for step in reversed(steps):
            op, _, args = step.partition(":")
            nums = [int(a) for a in args.split(",")]
            if op == "transpose":
                value = np.transpose(value, np.argsort(nums))
            elif op == "slice" and step == steps[0]:
                index = (slice(None),) * nums[0] + (slice(nums[1], nums[2]),)
            else:
                raise ValueError(f"place: cannot invert transform {step!r}")
        target[row.key][index] = value


# ------------------------------------------------------------------------------------------------ to ours


def _family(arch: str, source: str) -> Any:
    from lopt_bridge.pylo_runtime import specs

    fam = specs.family(arch)
    if fam is None:
        raise ConversionError(source, f"architecture {arch!r} has no family spec")
    return fam


def checked(spec: ArchSpec, bindings: Mapping[str, Any], source: str) -> ArchSpec:
    """``spec`` with ``bindings`` applied to its config, validated by the family spec, theta checked."""
    from lopt_bridge.pylo_runtime.specs import SpecError

    fam = _family(spec.name, source)
    try:
        cfg = fam.validate({**spec.config, **bindings})
        fam.check_theta(
            cfg,
            {k: tuple(v.shape) for k, v in spec.tensors.items()},
            {k: str(v.dtype) for k, v in spec.tensors.items()},
        )
    except SpecError as e:
        raise ConversionError(source, str(e)) from None
    return ArchSpec(spec.name, cfg.to_dict(), spec.tensors, spec.source_paths)


def _run_map(fn: Callable[..., Any], source: str, what: str, *args: Any) -> Any:
    """A map function with anything but a ConversionError turned into one line (the net under the maps)."""
    try:
        return fn(*args)
    except ConversionError:
        raise
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
        raise ConversionError(source, f"{what} failed ({type(e).__name__}: {msg})") from None


def _provenance(m: PyloMap, loaded: Sequence[LoadedRepo]) -> writer.Provenance:
    record = [
        {
            "repo": repo,
            "model_class": cls,
            "source": lr.source,
            "model_sha256": lr.file.sha256,
            "config_sha256": lr.config_sha256,
            "config": lr.file.config,
            **(
                {"optimizer_kwargs_sha256": lr.kwargs_sha256, "optimizer_kwargs": lr.file.kwargs}
                if lr.kwargs_sha256
                else {}
            ),
        }
        for repo, cls, lr in zip(m.repos, m.model_classes, loaded, strict=True)
    ]
    return writer.Provenance(
        " + ".join(lr.source for lr in loaded),
        " + ".join(lr.file.sha256 for lr in loaded),
        SOURCE_FORMAT,
        {"pylo_sources": json.dumps(record, sort_keys=True)},
    )


def load(
    srcs: Sequence[str],
    *,
    architecture: str | None = None,
    sets: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
    refresh: bool = False,
    progress: bool | None = None,
) -> tuple[ArchSpec, writer.Provenance]:
    """Read PyLO repos, find their map, convert: (ArchSpec with ``sets`` applied, provenance)."""
    if not srcs:
        raise ConversionError(None, "no PyLO source given")
    if len(srcs) > MAX_SOURCES:
        raise ConversionError(
            " + ".join(srcs[:3]) + " ...", f"{len(srcs)} sources (a PyLO map reads at most {MAX_SOURCES})"
        )
    bindings = dict(sets or {})
    arch = bindings.pop("architecture", None) or architecture
    if architecture and arch and arch.replace("-", "_") != architecture.replace("-", "_"):
        raise ConversionError("--set", f"architecture={arch} conflicts with the command's {architecture}")
    loaded = [read_repo(s, max_bytes=max_bytes, refresh=refresh, progress=progress) for s in srcs]
    m, ordered = detect([lr.file for lr in loaded], arch)
    by_id = {id(lr.file): lr for lr in loaded}
    loaded = [by_id[id(f)] for f in ordered]
    label = " + ".join(f.name for f in ordered)
    spec = _run_map(m.to_ours, label, f"PyLO map {m.architecture}", ordered, label)
    if not isinstance(spec, ArchSpec) or spec.name != m.architecture:
        raise RuntimeError(f"PyLO map {m.architecture} returned {type(spec).__name__}")
    return checked(spec, bindings, label), _provenance(m, loaded)


# ------------------------------------------------------------------------------------------------ verify


def verify(output: str | Path, srcs: Sequence[str], *, max_bytes: int | None = None, refresh: bool = False,
           progress: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Re-read the PyLO repos and check ``output`` against them bit for bit (tensors, transforms, config)."""
    from .convert import VerifyError

    conv = writer.read(output)
    loaded = [read_repo(s, max_bytes=max_bytes, refresh=refresh, progress=progress) for s in srcs]
    problems: list[str] = []
    try:
        m, ordered = detect([lr.file for lr in loaded], conv.architecture)
    except ConversionError as e:
        raise VerifyError(f"{output}: verify failed: {e}") from None
    shas = " + ".join(f.sha256 for f in ordered)
    if shas != conv.metadata.get("source_sha256"):
        problems.append(
            f"model.safetensors sha256 {shas} differs from the recorded {conv.metadata.get('source_sha256')}"
        )
    if conv.metadata.get("source_format") != SOURCE_FORMAT:
        problems.append(
            f"file records source format {conv.metadata.get('source_format')}, not {SOURCE_FORMAT}"
        )
    differ: list[str] = []
    for name, arr in conv.tensors.items():  # (1) each tensor = its recorded PyLO key, transform re-applied
        keys = conv.source_paths.get(name, {}).get("keys") or []
        if len(keys) != 2 or keys[0] not in m.repos:
            continue  # not from a file (a PyLO default such as muLO's decay offsets): checked by (2)
        f = ordered[m.repos.index(keys[0])]
        if keys[1] not in f.tensors:
            differ.append(f"{name} ({keys[0]} has no {keys[1]})")
            continue
        try:
            want = apply_transform(f.tensors[keys[1]], conv.source_paths[name].get("transform"))
        except (ValueError, TypeError, IndexError, OverflowError):
            differ.append(f"{name} (its transform does not apply)")
            continue
        if want.dtype != arr.dtype or want.shape != arr.shape or want.tobytes() != arr.tobytes():
            differ.append(f"{name} (!= {keys[0]}:{keys[1]})")
    label = " + ".join(f.name for f in ordered)
    try:  # (2) the map again, with the recorded config
        rebuilt = checked(
            _run_map(m.to_ours, label, f"PyLO map {m.architecture}", ordered, label), conv.config, label
        )
    except ConversionError as e:
        problems.append(f"rebuilding as {conv.architecture} failed: {e.problem}")
    else:
        if set(rebuilt.tensors) != set(conv.tensors):
            problems.append(
                "tensor names differ from a fresh conversion: "
                f"{sorted(set(rebuilt.tensors) ^ set(conv.tensors))[:6]}"
            )
        for k in sorted(set(rebuilt.tensors) & set(conv.tensors)):
            a, b = rebuilt.tensors[k], conv.tensors[k]
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                differ.append(f"{k} (!= a fresh conversion)")
        if json.loads(writer.config_json(rebuilt.config, source=label)) != conv.config:
            problems.append("the recorded config differs from the one the map builds from it")
        if {k: v.get("transform") for k, v in rebuilt.source_paths.items()} != {
            k: v.get("transform") for k, v in conv.source_paths.items()
        }:
            problems.append("recorded transforms differ from a fresh conversion")
    if differ:
        problems.append(f"{len(differ)} tensor(s) differ: {', '.join(sorted(set(differ))[:6])}")
    if problems:
        raise VerifyError(f"{output}: verify failed against {label}: " + "; ".join(problems))
    return {
        "file": str(output),
        "source": label,
        "architecture": conv.architecture,
        "tensors": len(conv.tensors),
        "values": int(sum(a.size for a in conv.tensors.values())),
        "source_sha256": shas,
    }


def recorded_sources(conv: writer.Converted) -> list[str]:
    """The PyLO sources a converted file records (``pylo_sources``), in repos order."""
    try:
        record = json.loads(conv.metadata.get("pylo_sources", "[]"))
    except (json.JSONDecodeError, RecursionError):
        raise ConversionError(conv.path, "metadata 'pylo_sources' is not JSON") from None
    if not isinstance(record, list) or not all(
        isinstance(e, dict) and isinstance(e.get("source"), str) for e in record
    ):
        raise ConversionError(conv.path, "metadata 'pylo_sources' is not a list of {source, ...}")
    if not 1 <= len(record) <= MAX_SOURCES:
        raise ConversionError(conv.path, f"metadata 'pylo_sources' names {len(record)} sources")
    return [e["source"] for e in record]


# ------------------------------------------------------------------------------------------------ export


def serialize(tensors: Mapping[str, np.ndarray]) -> bytes:
    """model.safetensors bytes as PyLO's save_pretrained writes them (safetensors ``save_model``: float32,
    no header metadata when no tensor is shared): byte for byte PyLO's file for the same state dict."""
    from safetensors.numpy import save

    return save(
        {k: np.ascontiguousarray(v, dtype=np.float32).reshape(np.shape(v)) for k, v in tensors.items()}
    )


def config_text(config: Mapping[str, Any]) -> str:
    """config.json as PyTorchModelHubMixin.save_pretrained writes it (sorted keys, indent 2, no newline)."""
    return json.dumps(dict(config), sort_keys=True, indent=2)


def _call(m: PyloMap, folders: Sequence[Path], kwargs: Mapping[str, Any]) -> str:
    args = [f"{a}={str(p)!r}" for a, p in zip(m.hf_key_args, folders, strict=False)]
    args += [f"{k}={v!r}" for k, v in sorted(kwargs.items())]
    name = m.optimizer or "(the PyLO optimizer)"
    return f"{name}(params, {', '.join(args)})"


@dataclass(frozen=True)
class Exported:
    """What export wrote: one folder per PyLO repo, and the PyLO call that runs them."""

    architecture: str
    folders: tuple[Path, ...]
    model_classes: tuple[str, ...]
    call: str


def to_pylo_files(conv: writer.Converted) -> tuple[PyloMap, list[PyloFile]]:
    """Our converted file as PyLO files (in memory), after checking they convert back to exactly it."""
    arch = conv.architecture
    where = str(conv.path)
    if arch in NO_PYLO_PORT:
        raise ConversionError(where, f"cannot export to PyLO's format: {NO_PYLO_PORT[arch]}")
    candidates = maps_for(arch)
    if not candidates:
        have = ", ".join(sorted(m.architecture for m in all_maps()))
        raise ConversionError(where, f"cannot export {arch} to PyLO's format: PyLO has ports of {have} only")
    m = candidates[0]
    spec = checked(ArchSpec(arch, dict(conv.config), dict(conv.tensors), dict(conv.source_paths)), {}, where)
    try:
        made = _run_map(
            m.to_pylo,
            where,
            f"export to PyLO ({m.architecture})",
            arch,
            dict(spec.config),
            dict(spec.tensors),
        )
    except ConversionError as e:
        if e.source is not None:
            raise
        raise ConversionError(where, f"cannot export to PyLO's format: {e.problem}") from None
    if (
        not isinstance(made, list)
        or len(made) != len(m.repos)
        or not all(isinstance(f, PyloFile) for f in made)
    ):
        raise RuntimeError(f"PyLO map {m.architecture}: to_pylo must return {len(m.repos)} PyloFile(s)")
    made = [
        PyloFile(
            f.name, f.tensors, f.config, hashlib.sha256(serialize(f.tensors)).hexdigest(), dict(f.kwargs)
        )
        for f in made
    ]
    # Self-check: PyLO's files read back through the map must give this file's config and bits exactly.
    label = " + ".join(f.name for f in made)
    try:
        back = _run_map(m.to_ours, label, f"PyLO map {m.architecture}", made, label)
        back = checked(back, {}, where)
    except ConversionError as e:
        raise ConversionError(where, f"cannot export to PyLO's format: {e.problem}") from None
    differ = sorted(
        k for k in set(back.config) | set(spec.config) if back.config.get(k) != spec.config.get(k)
    )
    if differ:
        shown = ", ".join(
            f"{k}={spec.config.get(k)!r} (PyLO runs {back.config.get(k)!r})" for k in differ[:6]
        )
        raise ConversionError(where, f"PyLO cannot run this checkpoint as its reference does: {shown}")
    bad = sorted(
        k for k in spec.tensors
        if k not in back.tensors or back.tensors[k].shape != spec.tensors[k].shape
        or back.tensors[k].astype(np.float32).tobytes() != spec.tensors[k].astype(np.float32).tobytes()
    )  # fmt: skip
    if bad or set(back.tensors) != set(spec.tensors):
        raise RuntimeError(f"PyLO map {m.architecture}: to_pylo/to_ours do not round-trip {bad[:6]}")
    return m, made


def export(path: str | Path, out_dir: str | Path, *, force: bool = False) -> Exported:
    """Write ``path`` (a lopt-convert file) as PyLO repo folders under ``out_dir``: model.safetensors,
    config.json (exactly as PyLO's save_pretrained), pylo_optimizer.json and a README.md card."""
    conv = writer.read(path)
    out = Path(out_dir)
    if str(out_dir).strip() == "":
        raise ConversionError("-o/--output", "empty output folder")
    if out.exists() and not out.is_dir():
        raise ConversionError(out, "exists and is not a folder")
    m, made = to_pylo_files(conv)
    folders = []
    for f in made:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", f.name):
            raise RuntimeError(f"PyLO map {m.architecture}: folder name {f.name!r}")
        folders.append(out / f.name)
    names = (MODEL_FILE, CONFIG_FILE, KWARGS_FILE, "README.md")
    for folder in folders:  # everything refused before anything is written
        if folder.exists() and not folder.is_dir():
            raise ConversionError(folder, "exists and is not a folder")
        for name in names:
            target = folder / name
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise ConversionError(target, "exists and is not a regular file; refusing it")
            if target.exists() and not force:
                raise ConversionError(target, "already exists; pass --force to overwrite")
        files.check_folder(folder)
    kwargs = made[0].kwargs
    call = _call(m, folders, kwargs)
    for folder, f, cls in zip(folders, made, m.model_classes, strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        sidecar = {
            "optimizer": m.optimizer,
            "kwargs": f.kwargs,
            "call": call,
            "model_class": cls,
            "written_by": f"lopt-convert {__version__} export-pylo",
            "from": {
                "file": str(conv.path),
                "architecture": conv.architecture,
                "source_uri": conv.metadata.get("source_uri"),
                "source_sha256": conv.metadata.get("source_sha256"),
            },
        }
        card = (
            "---\ntags:\n- learned-optimizer\n- lopt-bridge\n---\n\n"
            f"PyLO `{cls}` weights written by `lopt-convert export-pylo` from `{conv.path.name}` "
            f"(architecture {conv.architecture}, source {conv.metadata.get('source_uri')}).\n\n"
            f"Run with PyLO:\n\n```python\n{call}\n```\n\nThe licence is the source checkpoint's.\n"
        )
        files.atomic_write_bytes(folder / MODEL_FILE, serialize(f.tensors))
        files.atomic_write_bytes(folder / CONFIG_FILE, config_text(f.config).encode())
        files.atomic_write_bytes(
            folder / KWARGS_FILE, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
        )
        files.atomic_write_bytes(folder / "README.md", card.encode())
    return Exported(conv.architecture, tuple(folders), m.model_classes, call)
