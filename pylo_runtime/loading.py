"""``load_optimizer``: build the right optimizer class from a converted file's metadata."""

from __future__ import annotations

import importlib
from typing import Any

from .base import LearnedOptimizer, ParamsT
from .checkpoint import read_checkpoint

#: architecture id -> "module:Class" (imported lazily so one family's import cost is not everyone's).
ARCHITECTURES: dict[str, str] = {
    "velo": "pylo_runtime.velo:VeLO",
    "celo": "pylo_runtime.celo:Celo",
    "celo_adam": "pylo_runtime.celo_adam:CeloAdam",
    "small_fc_lopt": "pylo_runtime.adafac:SmallFCLOpt",
    "mlp_lopt": "pylo_runtime.mlp_lopt:MLPLOpt",
    "mulo": "pylo_runtime.mulo:MuLO",
}


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
    """Read ``path`` (a lopt-convert ``.safetensors``) and build its optimizer over ``params``."""
    ckpt = read_checkpoint(path)
    cls = optimizer_class(ckpt.architecture)
    return cls(params, ckpt.tensors, ckpt.config, num_steps=num_steps, **options)
