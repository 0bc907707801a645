"""What every architecture module produces: a validated, named set of theta tensors plus the full config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lopt_bridge.pylo_runtime.specs import Config, SpecError, TensorSpec
from lopt_bridge.pylo_runtime.specs.common import few as few  # re-exported: one-line lists in error messages

from ..errors import ConversionError


@dataclass
class ArchSpec:
    """A validated learned-optimizer checkpoint, ready to be written as safetensors.

    ``tensors`` maps the runtime's tensor names to arrays (values unchanged from the source);
    ``source_paths`` maps each of those names to ``{"path": "a/b/c", "transform": None | "..."}``,
    where ``path`` is the original flax tree path joined with "/" (haiku names keep their own "/" and "~"
    so the components are also stored as a list under ``"keys"``).
    ``config`` is every constructor argument of the reference class, defaults filled in, JSON-serialisable.
    """

    name: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    source_paths: dict[str, dict[str, Any]] = field(default_factory=dict)


class Architecture(Protocol):
    """One module per family implements this (module-level functions/attributes are fine).

    Each module lists its architectures in a module-level ``ARCHITECTURES: list[Architecture]``;
    ``converter.architectures`` discovers them (``by_name``, ``by_gin_name``, ``detect``).
    Optional attribute ``expects: str``: a one-line description of the theta this family accepts, shown
    by ``detect`` when a tree matches no family (default: first line of the ``matches`` docstring).
    """

    #: architecture id written to the safetensors metadata, e.g. "velo", "celo", "celo_adam"
    name: str
    #: gin configurable names that select this architecture, e.g. ("HyperV2",)
    gin_names: tuple[str, ...]

    def defaults(self) -> dict[str, Any]:
        """Every constructor argument of the reference class with its default value."""

    def matches(self, tree: dict[str, Any]) -> bool:
        """Cheap structural test used by ``lopt-convert auto``: does this theta look like ours?"""

    def build(self, tree: dict[str, Any], bindings: dict[str, Any], *, source: str) -> ArchSpec:
        """Validate ``tree`` (theta) against ``bindings`` (config overrides) and name its tensors.

        Raises ConversionError(source, ...) listing what was expected and what was found.
        """


#: Transforms an ArchSpec may record in ``source_paths[name]["transform"]`` (several joined with "; ",
#: applied left to right). ``verify`` re-applies them to the source leaf and compares bit for bit.
#:   None / ""                     the tensor is the source leaf as is
#:   "transpose:1,0"               ``np.transpose(leaf, (1, 0))`` (any axes permutation)
#:   "reshape:4,-1"                ``np.reshape(leaf, (4, -1))`` (same bytes, new shape)
#:   "slice:2,0,3"                 ``leaf[:, :, 0:3]`` (axis, start, stop: PyLO's VeLOMLP packs w0__i)
#:   "bfloat16->float32 (exact)"   recorded by the converter itself: flax_msgpack widens bf16 on decode
TRANSFORM_HELP = (
    "None | 'transpose:AXES' | 'reshape:DIMS' | 'slice:AXIS,START,STOP' | 'bfloat16->float32 (exact)', "
    "joined with '; '"
)


def apply_transform(leaf: Any, transform: str | None) -> np.ndarray:
    """Apply a recorded ``transform`` (see ``TRANSFORM_HELP``) to a source leaf; ValueError if unknown."""
    arr = np.asarray(leaf)
    for step in (s.strip() for s in (transform or "").split(";")):
        if not step or step == "bfloat16->float32 (exact)":  # the decoder already widened it
            continue
        op, _, args = step.partition(":")
        numbers = tuple(int(a) for a in args.split(",") if a.strip())
        if op == "transpose":
            arr = np.transpose(arr, numbers)
        elif op == "reshape":
            arr = np.reshape(arr, numbers)
        elif op == "slice" and len(numbers) == 3 and 0 <= numbers[0] < arr.ndim:
            axis, start, stop = numbers
            if not 0 <= start <= stop <= arr.shape[axis]:
                raise ValueError(f"transform {step!r} is outside axis {axis} of length {arr.shape[axis]}")
            arr = arr[(slice(None),) * axis + (slice(start, stop),)]
        else:
            raise ValueError(f"unknown transform {step!r} (known: {TRANSFORM_HELP})")
    return np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes 0-d arrays (1,)


# ----------------------------------------------------------------------------------------------------
# Theta-tree helpers shared by the architecture modules (a theta is nested dicts of numpy arrays).
Keys = tuple[str, ...]


def lookup(tree: Any, keys: Keys) -> Any:
    """The node at ``keys`` (haiku module names such as ``rnn/linear`` are single keys), or None."""
    node = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def leaves(tree: Mapping[str, Any], prefix: Keys = ()) -> list[Keys]:
    """Paths of every non-mapping node under ``tree``, in insertion order."""
    out: list[Keys] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += leaves(value, (*prefix, str(key)))
        else:
            out.append((*prefix, str(key)))
    return out


def tree_path(keys: Keys) -> str:
    """``keys`` joined with "/" (the ``path`` recorded in ``ArchSpec.source_paths``)."""
    return "/".join(keys)


def shape_problems(
    expected: Mapping[Keys, tuple[int, ...]], found: Mapping[Keys, tuple[int, ...]]
) -> dict[str, str]:
    """``"wrong shape"`` / ``"missing"`` / ``"unexpected"`` -> one-line list, for each kind present."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    problems: dict[str, str] = {}
    if wrong:
        problems["wrong shape"] = "wrong shape " + few(
            [f"{tree_path(k)} {found[k]} (expected {expected[k]})" for k in wrong]
        )
    if missing:
        problems["missing"] = "missing " + few([f"{tree_path(k)} {expected[k]}" for k in missing])
    if extra:
        problems["unexpected"] = "unexpected " + few([f"{tree_path(k)} {found[k]}" for k in extra])
    return problems


def check_shapes(
    tree: Mapping[str, Any],
    expected: Mapping[Keys, tuple[int, ...]],
    source: str,
    label: str,
    order: tuple[str, ...] = ("missing", "unexpected", "wrong shape"),
) -> None:
    """ConversionError "not a <label> theta for this config: ..." unless the leaves match ``expected``."""
    found = {keys: tuple(np.shape(lookup(tree, keys))) for keys in leaves(tree)}
    problems = shape_problems(expected, found)
    if problems:
        parts = [problems[k] for k in order if k in problems]
        raise ConversionError(source, f"not a {label} theta for this config: " + "; ".join(parts))


def validated(validate: Callable[[Any], Config], bindings: Mapping[str, Any], source: str) -> Config:
    """``validate(bindings)`` of a family spec (``pylo_runtime.specs``), its SpecError as ConversionError."""
    try:
        return validate(bindings)
    except SpecError as e:
        raise ConversionError(source, str(e)) from None


def table_shapes(table: Mapping[str, TensorSpec]) -> dict[Keys, tuple[int, ...]]:
    """Source tree path -> shape, for ``check_shapes``."""
    return {ts.keys: ts.shape for ts in table.values()}


def float32_tensors(
    tree: Mapping[str, Any], table: Mapping[str, TensorSpec], source: str
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """``ArchSpec`` tensors and source_paths for a spec's ``table``; every leaf must be float32."""
    tensors: dict[str, np.ndarray] = {}
    source_paths: dict[str, dict[str, Any]] = {}
    for out_name, ts in table.items():
        arr = np.asarray(lookup(tree, ts.keys))
        if arr.dtype != np.float32:
            raise ConversionError(source, f"{ts.path}: dtype {arr.dtype}, expected float32")
        tensors[out_name] = arr
        source_paths[out_name] = {"path": ts.path, "keys": list(ts.keys), "transform": None}
    return tensors, source_paths
