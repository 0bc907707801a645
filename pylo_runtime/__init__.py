"""PyTorch optimizers that reproduce learned optimizers meta-trained in JAX, loaded from converted files."""

from __future__ import annotations

import importlib
from typing import Any

from .base import LearnedOptimizer
from .checkpoint import Checkpoint, read_checkpoint
from .loading import ARCHITECTURES, load_optimizer, optimizer_class
from .step_inputs import NonFiniteError, set_loss

_CLASSES = {target.split(":")[1]: target.split(":")[0] for target in ARCHITECTURES.values()}

__all__ = [
    "LearnedOptimizer",
    "Checkpoint",
    "read_checkpoint",
    "load_optimizer",
    "optimizer_class",
    "set_loss",
    "NonFiniteError",
    *_CLASSES,
]


def __getattr__(name: str) -> Any:
    """Import optimizer classes (VeLO, Celo, ...) on first use."""
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'pylo_runtime' has no attribute {name!r}")
