"""Fast implementations of the learned-optimizer steps and the dispatch that picks one (like _fused_adam).

``fused=True``  Triton kernels: the element-wise part of a step for all tensors of a call in a few launches.
                Needs triton and CUDA tensors, or ``TRITON_INTERPRET=1`` (how CI runs them on the CPU).
``fused=False`` the family's reference path (the specification).
``fused=None``  Triton on CUDA when triton is importable; on the CPU the vectorised CPU path; otherwise, or
                for options a fast path does not cover, the reference path.

Families call :func:`fast_step` first thing in ``_update``; it returns False when the reference path must run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

__all__ = ["fast_step", "choose_impl", "triton_available", "interpreting", "FusedUnavailableError"]


class FusedUnavailableError(RuntimeError):
    """``fused=True`` was asked for where the Triton kernels cannot run."""


def triton_available() -> bool:
    """Whether triton can be imported (it is an optional dependency: ``pip install lopt-bridge[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _family(opt: Any) -> str | None:
    arch = getattr(opt, "architecture", "")
    if arch in ("small_fc_lopt", "mulo"):
        return "adafac"
    if arch == "velo":
        return "velo"
    return None


def _unsupported(opt: Any, family: str) -> str | None:
    if family == "adafac":
        from .adafac_cpu import supported

        return supported(opt)
    from .velo_cpu import supported

    return supported(opt)


def choose_impl(opt: Any, device: torch.device, fused: bool | None) -> str:
    """``"triton"``, ``"cpu"`` or ``"reference"`` for ``opt`` on ``device``.

    Raises FusedUnavailableError when ``fused=True`` cannot be honoured.
    """
    name = type(opt).__name__
    family = _family(opt)
    if fused is False:
        return "reference"
    reason = None if family else f"{name} has no fused implementation"
    if reason is None:
        reason = _unsupported(opt, family)
    if fused:
        if reason is None and not triton_available():
            reason = "triton is not installed (pip install 'lopt-bridge[triton]')"
        if reason is None and device.type != "cuda" and not interpreting():
            reason = (
                f"the Triton kernels need CUDA tensors (got {device.type}; "
                "TRITON_INTERPRET=1 runs them on the CPU)"
            )
        if reason is not None:
            raise FusedUnavailableError(f"{name}: fused=True is not available: {reason}")
        return "triton"
    if reason is not None:
        return "reference"
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"


def fast_step(
    opt: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    loss: torch.Tensor | None,
    global_state: dict[str, Any],
    *,
    foreach: bool | None,
    fused: bool | None,
) -> bool:
    """Run ``opt``'s step on a fast path if ``fused``/the device select one; False means: run the reference.

    ``foreach=False`` with ``fused=None`` also asks for the reference (single-tensor) path.
    """
    if fused is None and foreach is False:
        return False
    impl = choose_impl(opt, params[0].device, fused)
    if impl == "reference":
        return False
    family = _family(opt)
    if family == "adafac":
        if impl == "cpu":
            from .adafac_cpu import adafac_step_cpu

            adafac_step_cpu(opt, params, grads, lrs, global_state)
        else:
            from .adafac_triton import adafac_step_triton

            adafac_step_triton(opt, params, grads, lrs, global_state)
        return True
    if impl == "cpu":
        from .velo_cpu import velo_step_cpu

        velo_step_cpu(opt, params, grads, lrs, loss, global_state)
    else:
        from .velo_triton import velo_step_triton

        velo_step_triton(opt, params, grads, lrs, loss, global_state)
    return True
