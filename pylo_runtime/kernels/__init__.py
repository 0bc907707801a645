"""The fused kernels, entry points that take tensors and numbers (never an optimizer; nothing here imports a
family module): ``cpu`` (hand-fused C passes, built on first use or ahead of time) and ``triton`` (CUDA).

The family modules (``velo.py``, ``adafac.py``) prepare the kernels' inputs and call them on the paths
``pylo_runtime.dispatch`` chooses.
"""
