"""The fused CPU kernels: hand-fused C passes (``lopt_cpu.c``), built by ``build``, called through ``passes``.

Build them ahead of time (instead of inside the first ``opt.step()``)::

    python -m lopt_bridge.pylo_runtime.kernels.cpu build
"""
