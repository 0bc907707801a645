"""The architecture families the converter knows, discovered from the modules of this package.

Each module (``velo.py``, ``celo.py``, ...) exposes ``ARCHITECTURES: list[Architecture]`` (see ``base.py``);
adding a family is adding a module. ``by_name`` / ``by_gin_name`` look one up, ``detect`` picks the one
whose ``matches`` accepts a theta tree.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from ..errors import ConversionError
from .base import Architecture, ArchSpec

__all__ = ["ArchSpec", "Architecture", "all_architectures", "by_gin_name", "by_name", "detect", "gin_names"]


@functools.cache
def all_architectures() -> tuple[Architecture, ...]:
    """Every architecture of every module in this package, in module-name order."""
    found: dict[str, Architecture] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for arch in getattr(module, "ARCHITECTURES", ()):
            if arch.name in found:
                raise RuntimeError(
                    f"architecture {arch.name!r} defined twice (second time in {module.__name__})"
                )
            found[arch.name] = arch
    return tuple(found.values())


def names() -> list[str]:
    """Architecture ids, e.g. ``["celo", "celo_adam", "velo", ...]``."""
    return [a.name for a in all_architectures()]


def by_name(name: str, *, source: str | None = None) -> Architecture:
    """The architecture with id ``name`` (``-`` accepted for ``_``); ConversionError naming the known ones."""
    wanted = name.replace("-", "_")
    for arch in all_architectures():
        if arch.name == wanted:
            return arch
    raise ConversionError(source, f"unknown architecture {name!r} (known: {', '.join(sorted(names()))})")


def gin_names() -> list[str]:
    """Every gin configurable name that selects an architecture."""
    return sorted({g for a in all_architectures() for g in a.gin_names})


def _same_configurable(a: str, b: str) -> bool:
    """gin matches selectors by dotted suffix: ``HyperV2`` selects ``hyper_v2.HyperV2``."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return pa[-n:] == pb[-n:]


def by_gin_name(gin_name: str, *, source: str | None = None) -> Architecture:
    """The architecture a gin configurable name (``HyperV2``, ``module.Class``) selects.

    Raises ConversionError when none or several architectures claim it.
    """
    hits = [a for a in all_architectures() if any(_same_configurable(gin_name, g) for g in a.gin_names)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConversionError(
            source, f"unknown learned optimizer class {gin_name!r} (known: {', '.join(gin_names())})"
        )
    raise ConversionError(
        source,
        f"gin name {gin_name!r} is ambiguous ({', '.join(a.name for a in hits)}); "
        "give the module-qualified name or the architecture",
    )


def describe_tree(tree: Any, limit: int = 8) -> str:
    """One-line summary of a theta tree for error messages: top-level keys and leaf count."""
    if not isinstance(tree, Mapping):
        return f"a {type(tree).__name__}, not a tree"
    leaves = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        for value in node.values():
            if isinstance(value, Mapping):
                stack.append(value)
            else:
                leaves += 1
    keys = sorted(map(str, tree))
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"top-level keys [{', '.join(keys[:limit])}{more}] with {leaves} leaves"


def _expects(arch: Architecture) -> str:
    text = getattr(arch, "expects", None)
    if isinstance(text, str) and text:
        return text
    doc = (getattr(arch.matches, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "(no description)"


def detect(tree: Any, *, source: str | None = None) -> Architecture:
    """The single architecture whose ``matches`` accepts ``tree``; else a one-line ConversionError.

    The error lists what each family expects (its ``expects`` attribute, else the first line of its
    ``matches`` docstring) and what was found.
    """
    hits: list[Architecture] = []
    crashed: list[str] = []
    for arch in all_architectures():
        try:
            ok = bool(arch.matches(tree))
        except Exception as e:  # a malformed tree must not turn into a traceback here
            crashed.append(f"{arch.name} ({type(e).__name__})")
            ok = False
        if ok:
            hits.append(arch)
    if len(hits) == 1:
        return hits[0]
    found = describe_tree(tree)
    if hits:
        raise ConversionError(
            source,
            f"theta matches several architectures ({', '.join(a.name for a in hits)}); "
            f"choose one with --set architecture=NAME or a subcommand; found {found}",
        )
    expected = "; ".join(f"{a.name}: {_expects(a)}" for a in all_architectures())
    note = f" (matches() failed for {', '.join(crashed)})" if crashed else ""
    raise ConversionError(
        source, f"theta matches no known architecture{note}: expected {expected}; found {found}"
    )
