"""``load_optimizer``: build the right optimizer class from a converted file's metadata."""

from __future__ import annotations

import importlib
from typing import Any

from .base import LearnedOptimizer, ParamsT
from .checkpoint import read_checkpoint
from .specs import FAMILIES, SpecError

#: architecture id -> "module:Class" (from the family specs; imported lazily so one family's import cost
#: is not everyone's).
ARCHITECTURES: dict[str, str] = {arch: spec.RUNTIME_CLASS for arch, spec in FAMILIES.items()}


def optimizer_class(architecture: str) -> type[LearnedOptimizer]:
    """The runtime class for an architecture id."""
    try:
        target = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def load_optimizer(path: str, params: ParamsT, *, num_steps: int, **options: Any) -> LearnedOptimizer:
    """Read ``path`` (a lopt-convert ``.safetensors``) and build its optimizer over ``params``.

    The config and theta are validated against the architecture's spec before the tensors are loaded; every
    refusal is a ValueError naming the file.
    """
    ckpt = read_checkpoint(path)
    try:
        cls = optimizer_class(ckpt.architecture)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        return cls(params, ckpt.tensors, ckpt.config, num_steps=num_steps, **options)
    except SpecError as e:
        raise ValueError(f"{path}: {e}") from None
