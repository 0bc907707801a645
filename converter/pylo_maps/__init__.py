"""Key maps between PyLO's Hugging Face format (``model.safetensors`` + ``config.json`` of PyLO's
model classes, written by huggingface_hub's ``PyTorchModelHubMixin.save_pretrained``) and lopt-bridge's
architectures.

Each module here (``celo2.py``, ...) exposes ``MAPS: list[PyloMap]``. A map takes PyLO files in the order
of its ``repos`` and gives a validated ``ArchSpec`` (``to_ours``, recording per tensor the PyLO key and
transform in ``source_paths``), and writes the other way (``to_pylo``). Torch-free, like the converter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..architectures.base import ArchSpec


@dataclass(frozen=True)
class PyloFile:  # one PyLO hub repo / folder: model.safetensors + config.json
    name: str  # repo id or path, for messages and provenance
    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    sha256: str  # of model.safetensors


@dataclass(frozen=True)
class PyloMap:
    architecture: str  # our architecture id, e.g. "celo2"
    repos: tuple[str, ...]  # PyLO hub repos in the order to_ours takes them
    model_classes: tuple[str, ...]  # PyLO model class per repo, e.g. ("CELO2MLP",)
    matches: Callable[[list[PyloFile]], bool]
    to_ours: Callable[[list[PyloFile], str], ArchSpec]  # (files in repos order, source label) -> ArchSpec
    to_pylo: Callable[[str, dict[str, Any], dict[str, np.ndarray]], list[PyloFile]]  # (arch, config, tensors)
