"""Fast implementations of the learned-optimizer steps and the dispatch that picks one (like _fused_adam).

``fused=True``  Triton kernels: the element-wise part of a step for all tensors of a call in a few launches.
                Needs triton and CUDA tensors, or ``TRITON_INTERPRET=1`` (how CI runs them on the CPU).
``fused=False`` the family's reference path (the specification).
``fused=None``  Triton on CUDA when triton is importable; on the CPU the fast CPU path (2-D tensors through
                the hand-fused C passes of ``native`` / ``lopt_cpu.c`` when a C compiler is there, the rest
                through vectorised torch ops); otherwise, or for options a fast path does not cover, the
                reference path.

FSDP2 shards stepped rank-locally (``distributed.any_shard()``): the CPU paths reduce their statistics over
the shard group; the Triton kernels do not, so on CUDA such a step takes the reference path (``fused=True``
included).

small_fc_lopt / muLO call :func:`fast_step` first thing in ``_update`` (False: run the reference path);
VeLO takes :func:`velo_impl`, a drop-in for its single-tensor implementation, after the LSTM inputs are ready.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from .. import distributed as _dist

__all__ = [
    "fast_step",
    "velo_impl",
    "check_fused",
    "choose_impl",
    "triton_available",
    "interpreting",
    "FusedUnavailableError",
]


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
    if _dist.any_shard():  # FSDP2 shards stepped rank-locally: the CPU paths reduce over shards, Triton not
        cpu = family is not None and device.type == "cpu" and _unsupported(opt, family) is None
        return "cpu" if cpu else "reference"
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
    """small_fc_lopt / muLO: run the whole ``_update`` on a fast path; False means: run the reference.

    ``foreach=False`` with ``fused=None`` also asks for the reference (single-tensor) path.
    """
    if fused is None and foreach is False:
        return False
    impl = choose_impl(opt, params[0].device, fused)
    if impl == "reference":
        return False
    if impl == "cpu":
        from .adafac_cpu import adafac_step_cpu

        adafac_step_cpu(opt, params, grads, lrs, global_state)
    else:
        from .adafac_triton import adafac_step_triton

        adafac_step_triton(opt, params, grads, lrs, global_state)
    return True


def velo_impl(opt: Any, device: torch.device, *, foreach: bool | None, fused: bool | None):
    """VeLO: a drop-in for ``velo._single_tensor_velo`` (same arguments) on a fast path, or None.

    Meant for ``VeLO._update``: ``impl = kernels.velo_impl(self, device, foreach=..., fused=...) or impl``.
    ``foreach=False`` with ``fused=None`` keeps the reference path.
    """
    if fused is None and foreach is False:
        return None
    impl = choose_impl(opt, device, fused)
    if impl == "cpu":
        from .velo_cpu import velo_impl_cpu

        return velo_impl_cpu
    if impl == "triton":
        from .velo_triton import velo_impl_triton

        return velo_impl_triton
    return None


def check_fused(opt: Any, device: torch.device, fused: bool | None) -> None:
    """At construction: raise FusedUnavailableError now if ``fused=True`` cannot run on ``device``."""
    if fused:
        choose_impl(opt, device, True)
