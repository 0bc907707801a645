"""Read learned-optimizer checkpoints in their original published formats and write safetensors.

Nothing here imports jax, flax, haiku or tensorflow.
Entry point for other packages: ``converter.convert.convert_source(...)`` (see its docstring).
"""

__version__ = "0.1.0"
