"""The fused CUDA kernels (Triton): ``velo`` and ``adafac`` launchers, ``common`` tensor tables."""
