"""Shared by the training-stack tests (Accelerate, HF Trainer, Lightning): optional imports, optimizer files.

The stacks are the optional ``integrations`` extra. Locally a missing package skips its tests with the reason;
CI sets ``LOPT_REQUIRE_INTEGRATIONS=1`` (``.ci/run`` installs the extra), and there a missing package FAILS.
Optimizer files: VeLO from the committed ``velo_default`` fixture checkpoint (random theta, no download); Celo
from the published weights in ``../shared/checkpoints`` when present (a real optimizer: losses fall), else
from the committed ``celo_random`` fixture.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lopt_bridge.parity_tests.fixture import load_fixture, repo_root

#: Set by .ci/run: the integrations extra is installed, so a missing package is an error, not a skip.
REQUIRE_ENV = "LOPT_REQUIRE_INTEGRATIONS"


def require(module: str) -> ModuleType:
    """Import ``module`` of the integrations extra; skip (locally) or fail (CI) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"{module} is not installed ({e}); pip install -e '.[integrations]'"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{reason} ({REQUIRE_ENV} is set: CI installs the extra, so this is an error)")
        pytest.skip(f"{reason} ({REQUIRE_ENV} unset: skipped locally, an error in CI)")


def published_celo() -> Path:
    """Where the published Celo weights live for the tests (../shared beside the repository)."""
    return repo_root().parent / "shared" / "checkpoints" / "celo" / "theta.state"


def optimizer_files(out_dir: Path) -> dict[str, Path]:
    """``{"velo": ..., "celo": ...}`` converted ``.safetensors`` files in ``out_dir``."""
    from lopt_bridge.converter.convert import convert_source

    out: dict[str, Path] = {}
    fx = load_fixture(repo_root() / "parity_tests" / "fixtures" / "velo_default")
    out["velo"] = convert_source(
        str(fx.source_path()),
        out_dir / "velo.safetensors",
        architecture="velo",
        sets=dict(fx.meta.get("convert_sets") or {}),
        force=True,
    )
    src = published_celo()
    if not src.is_file():
        fx = load_fixture(repo_root() / "parity_tests" / "fixtures" / "celo_random")
        src = fx.source_path()
    out["celo"] = convert_source(str(src), out_dir / "celo.safetensors", architecture="celo", force=True)
    return out


def record_step_losses(optimizer: Any) -> list[float]:
    """Spy: the loss each ``step`` of ``optimizer`` (a pylo_runtime optimizer) resolved to, in order."""
    seen: list[float] = []
    take = optimizer._take_loss

    def spy(*args: Any) -> Any:
        loss = take(*args)
        seen.append(float(loss) if loss is not None else float("nan"))
        return loss

    optimizer._take_loss = spy
    return seen


def classification_batches(n: int, rows: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of ``rows`` 16-D points with 4 classes from a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 16, generator=g)
        out.append((x, (x @ w).argmax(dim=1)))
    return out


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def hand_loop(
    family_file: Path, batches: list, k: int, *, autocast: torch.dtype | None = None, seed: int = 0
) -> tuple[torch.Tensor, Any]:
    """The reference loop the stacks must reproduce bit for bit: ``(loss / k).backward()`` per micro-batch,
    then ``step(loss=mean of the k losses)``; ``autocast``: the forward under torch.autocast, to float32."""
    from lopt_bridge import pylo_runtime

    model = mlp(seed)
    opt = pylo_runtime.load_optimizer(str(family_file), model.parameters(), num_steps=100)
    window: list[torch.Tensor] = []
    for i, (x, y) in enumerate(batches):
        if autocast is None:
            out = model(x)
        else:
            with torch.autocast("cpu", dtype=autocast):
                out = model(x)
            out = out.float()
        loss = torch.nn.functional.cross_entropy(out, y)
        (loss / k).backward()
        window.append(loss.detach())
        if (i + 1) % k == 0 or i == len(batches) - 1:
            total = window[0]
            for extra in window[1:]:
                total = total + extra
            opt.step(loss=total if len(window) == 1 else total / len(window))
            opt.zero_grad()
            window = []
    return flat(model), opt
