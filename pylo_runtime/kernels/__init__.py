"""Fast implementations of the learned-optimizer steps; ``pylo_runtime.dispatch`` decides which one runs.

``adafac_cpu`` / ``velo_cpu``: the multi-tensor torch-ops paths (``foreach``, any device) and, with the C
passes of ``native`` / ``lopt_cpu.c``, the fused CPU paths; ``*_triton``: the fused CUDA paths.
"""

from __future__ import annotations

from ..dispatch import FusedUnavailableError, interpreting, triton_available

__all__ = ["FusedUnavailableError", "triton_available", "interpreting"]
