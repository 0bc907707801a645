"""Torch-free family specs shared by the converter and the runtime (``docs/architecture-specs.md``).

Each module (one per family) exposes ``ARCH``, ``REFERENCE`` (the reference class), ``DEFAULTS``,
``validate(config, who) -> Config``, ``tensor_table(cfg) -> {runtime name: TensorSpec(keys, shape)}`` and
``check_theta(cfg, shapes, dtypes, who)``. Nothing here imports torch: ``lopt-convert`` never loads it.
"""

from __future__ import annotations

from types import ModuleType

from . import adafac, celo, celo2, celo_adam, mlp_lopt, mulo, nn_adam, rnn_mlp_lopt, velo
from .common import Config, SpecError, TensorSpec

__all__ = ["FAMILIES", "Config", "SpecError", "TensorSpec", "family"]

#: architecture id -> its spec module.
FAMILIES: dict[str, ModuleType] = {
    m.ARCH: m for m in (velo, celo, celo_adam, celo2, adafac, mlp_lopt, mulo, rnn_mlp_lopt, nn_adam)
}


def family(arch: str) -> ModuleType | None:
    """The spec module of architecture id ``arch`` (``velo``, ``celo``, ...), or None if unknown."""
    return FAMILIES.get(arch)
