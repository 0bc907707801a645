"""PyTorch optimizers that reproduce learned optimizers meta-trained in JAX, loaded from converted files.

Importing the package is torch-free (the converter imports ``pylo_runtime.specs``); the optimizer classes
and loaders below import torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .specs import FAMILIES

#: Public name -> the submodule that defines it (imported on first use).
_LAZY: dict[str, str] = {
    "LearnedOptimizer": "base",
    "Checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "ARCHITECTURES": "loading",
    "load_optimizer": "loading",
    "optimizer_class": "loading",
    "set_loss": "step_inputs",
    "NonFiniteError": "step_inputs",
    "FusedUnavailableError": "dispatch",
    **{
        m.RUNTIME_CLASS.split(":")[1]: m.RUNTIME_CLASS.split(":")[0].rsplit(".", 1)[1]
        for m in FAMILIES.values()
    },
}

__all__ = [
    "LearnedOptimizer",
    "Checkpoint",
    "read_checkpoint",
    "load_optimizer",
    "optimizer_class",
    "set_loss",
    "NonFiniteError",
    "FusedUnavailableError",
] + [m.RUNTIME_CLASS.split(":")[1] for m in FAMILIES.values()]


def __getattr__(name: str) -> Any:
    """Import optimizer classes (VeLO, Celo, ...), loaders and submodules on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'pylo_runtime' has no attribute {name!r}")
