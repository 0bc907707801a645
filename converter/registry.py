"""The registry of published checkpoints (``checkpoints/registry.toml``): names, sources, sizes, sha256."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lopt_bridge.checkpoints import REGISTRY_PATH

FORMATS = ("lo_params_gin", "lo_no_config", "theta_state", "pickle", "pylo")
#: Names taken by lopt-convert's own commands; no checkpoint may use them.
RESERVED = ("auto", "inspect", "verify", "list", "lo-pretrained", "pylo", "export-pylo")


@dataclass(frozen=True)
class Entry:
    """One published checkpoint. ``uris[0]`` is the weights file; ``size``/``sha256`` describe it."""

    name: str
    title: str
    architecture: str
    format: str
    uris: tuple[str, ...]
    licence: str
    homepage: str = ""
    size: int | None = None
    sha256: str | None = None
    sets: tuple[str, ...] = ()
    supported: bool = True
    note: str = ""

    @property
    def source(self) -> str | None:
        """The URI to pass as ``--source`` (None when nothing is published)."""
        return self.uris[0] if self.uris else None


@dataclass(frozen=True)
class Registry:
    """All entries plus learned_optimization's list of pretrained run names."""

    entries: tuple[Entry, ...]
    lo_root: str = ""
    lo_names: tuple[str, ...] = field(default_factory=tuple)
    lo_licence: str = ""

    def get(self, name: str) -> Entry:
        """The entry called ``name`` (``_`` accepted for ``-``); KeyError listing the names otherwise."""
        wanted = name.replace("_", "-")
        for entry in self.entries:
            if entry.name == wanted:
                return entry
        raise KeyError(
            f"no checkpoint {name!r} in the registry (known: {', '.join(e.name for e in self.entries)})"
        )

    def sha256_for(self, uri: str) -> str | None:
        """The known sha256 of a weights URI, if the registry has it (URIs compared in normalised form,
        so ``hf://o/r/f`` and ``hf://o/r@main/f`` are the same)."""
        entry = self.entry_for(uri)
        return entry.sha256 if entry is not None and entry.sha256 else None

    def entry_for(self, uri: str) -> Entry | None:
        """The first entry whose weights file is ``uri`` (remote URIs compared normalised), if any: ``auto``
        then converts a known hub file as its subcommand would (the entry's ``sets``)."""
        from .sources import is_remote, normalise

        if not is_remote(uri):
            return None
        wanted = normalise(uri)  # a malformed URL is refused here, on one line
        for entry in self.entries:
            if entry.uris and _file_uri(entry.uris[0]) == wanted:
                return entry
        return None

    def lo_pretrained(self, name: str) -> Entry:
        """An entry for one of learned_optimization's ``pretrained_optimizers.opt_names``."""
        if name not in self.lo_names:
            raise KeyError(f"{name!r} is not in learned_optimization's pretrained_optimizers.opt_names")
        base = f"{self.lo_root.rstrip('/')}/{name}"
        return Entry(
            name=name,
            title=f"learned_optimization pretrained run {name}",
            architecture="",  # from its config.gin
            format="lo_params_gin",
            uris=(f"{base}/params", f"{base}/config.gin"),
            licence=self.lo_licence,
        )


def _file_uri(uri: str) -> str | None:
    """A registry URI normalised if it names one remote file; None for PyLO's repo-level ``hf://owner/repo``
    entries (they are matched by name, not by file)."""
    from .errors import ConversionError
    from .sources import is_remote, normalise

    if not is_remote(uri):
        return None
    try:
        return normalise(uri)
    except ConversionError:
        return None


def _entry(raw: dict[str, Any], where: str) -> Entry:
    known = set(Entry.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("name", "title", "architecture", "format", "uris", "licence"):
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
    if raw["name"] in RESERVED:
        raise ValueError(f"{where}: name {raw['name']!r} is a lopt-convert command")
    if raw["format"] not in FORMATS:
        raise ValueError(f"{where}: format {raw['format']!r} is not one of {', '.join(FORMATS)}")
    sha = raw.get("sha256")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits")
    return Entry(**{**raw, "uris": tuple(raw["uris"]), "sets": tuple(raw.get("sets", ()))})


def load(path: str | Path = REGISTRY_PATH) -> Registry:
    """Parse and check ``registry.toml``; ValueError naming the file and entry on a bad field."""
    path = Path(path)
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = tuple(
        _entry(raw, f"{path}: checkpoint {raw.get('name', i)!r}")
        for i, raw in enumerate(data.get("checkpoint", []))
    )
    names = [e.name for e in entries]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: duplicate checkpoint names")
    lo = data.get("lo_pretrained", {})
    return Registry(entries, lo.get("root", ""), tuple(lo.get("names", ())), lo.get("licence", ""))
