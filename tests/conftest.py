"""Shared test setup. Markers (registered in pyproject.toml, strict): ``slow`` (the quick subset is
``pytest -m "not slow"``, CONTRIBUTING.md) and ``gpu`` (skipped, naming why, where torch sees no CUDA device).
The repository root is put on sys.path by pyproject's ``pythonpath``, so any one test file runs alone."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, naming why, when there is no CUDA device (torch is imported only if one asks)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
