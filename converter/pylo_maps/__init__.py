"""PyLO key maps, one module per family, each exposing ``MAPS: list[PyloMap]`` (discovered by
``converter.pylo_format.all_maps``; adding a family's PyLO format is adding a module).

A map says which PyLO hub repos (and model classes) hold one of our architectures and converts both ways:
``matches(files)`` / ``to_ours(files, source) -> ArchSpec`` with files in ``repos`` order, and
``to_pylo(arch, config, tensors) -> list[PyloFile]`` (``name`` = the folder to write). Helpers: ``Key``,
``take``, ``place``, ``check_keys``, ``config_ints`` in ``converter.pylo_format``; ``docs/formats.md``.
"""

from __future__ import annotations

from ..pylo_format import Key, PyloFile, PyloMap, all_maps, check_keys, config_ints, place, take

__all__ = ["Key", "PyloFile", "PyloMap", "all_maps", "check_keys", "config_ints", "place", "take"]
