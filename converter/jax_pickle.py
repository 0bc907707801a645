"""Read pickled theta trees (muLO's ``global_step*.pickle``) into numpy without importing jax.

muLO's ``helpers.save_checkpoint`` does ``pickle.dump(theta)``: a dict of jax arrays. A jax array pickles as
``jax._src.array._reconstruct_array(numpy reconstruct, args, ndarray state, aval state)``; this unpickler
resolves that one function to "rebuild the numpy array" and allows only numpy's array/dtype/scalar
reconstructors and plain containers. Any other global is refused, naming it, so a pickle cannot run code
through this reader. Callers still gate it behind ``--allow-pickle``.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np


def _rebuild_jax_array(fun: Any, args: tuple, arr_state: tuple, aval_state: Any = None) -> np.ndarray:
    """What ``jax._src.array._reconstruct_array`` does, minus ``device_put``: the numpy value."""
    value = fun(*args)
    value.__setstate__(arr_state)
    return value


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _numpy_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


#: (module, name) -> object. jax 0.4's and numpy 1.x / 2.x spellings.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("jax._src.array", "_reconstruct_array"): _rebuild_jax_array,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
}


class UnsupportedPickle(ValueError):
    """The pickle references a global this reader does not allow."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsupportedPickle(
                f"the pickle needs {module}.{name}, which this reader does not allow "
                "(it reads dicts/lists of jax or numpy arrays only)"
            ) from None


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with only numpy / jax-array reconstruction allowed; jax arrays become numpy."""
    return _Unpickler(io.BytesIO(data)).load()
