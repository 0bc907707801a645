"""lopt-bridge: learned optimizers meta-trained in JAX, converted and run exactly in PyTorch.

The one installed top-level name. Its subpackages are the repository's top-level folders: ``converter``,
``pylo_runtime``, ``parity_tests``, ``checkpoints`` (the wheel maps them here; in a checkout the repository
root is appended to ``__path__``, so ``lopt_bridge.pylo_runtime`` is ./pylo_runtime without installing).
Always import them as ``lopt_bridge.<package>``: the bare names would load every module a second time.
The runtime's public names are here too, on first use (``lopt_bridge.VeLO``, ``lopt_bridge.load_optimizer``,
``lopt_bridge.set_loss``); importing this package is torch-free.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

__version__ = "0.1.0"

# In a checkout the subpackages sit beside this folder; installed, setuptools put them inside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pylo_runtime", "__init__.py")) and _root not in __path__:
    __path__.append(_root)


def __getattr__(name: str) -> Any:
    """``lopt_bridge.X`` for every public name of ``lopt_bridge.pylo_runtime`` (imported on first use)."""
    if not name.startswith("_"):
        runtime = importlib.import_module(".pylo_runtime", __name__)
        if name in runtime.__all__:
            return getattr(runtime, name)
    raise AttributeError(f"module 'lopt_bridge' has no attribute {name!r}")


def __dir__() -> list[str]:
    runtime = importlib.import_module(".pylo_runtime", __name__)
    return sorted(set(globals()) | set(runtime.__all__))
