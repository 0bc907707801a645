"""Read pickled theta trees (muLO's ``global_step*.pickle``) into numpy without importing jax.

muLO's ``helpers.save_checkpoint`` does ``pickle.dump(theta)``: a dict of jax arrays. A jax array pickles as
``jax._src.array._reconstruct_array(numpy reconstruct, args, ndarray state, aval state)``; this unpickler
resolves that one function to "rebuild the numpy array" and allows only numpy's array/dtype/scalar
reconstructors and plain containers. Any other global is refused, naming it, so a pickle cannot run code
through this reader. Callers still gate it behind ``--allow-pickle``.

Limits (a small hostile pickle must not cost memory or time; each breach is a ``PickleLimit``, one line):
  - before unpickling, ``pickletools`` walks the opcodes: at most ``MAX_OPS`` of them, memo indices below
    ``MAX_MEMO`` (CPython's C unpickler sizes its memo table by the largest index: a 10-byte pickle could
    ask for 32 GB), every length field within the data;
  - unpickling uses the pure-Python unpickler so that BUILD can be checked: only numpy's own state for a
    plain numeric dtype, and (version 1, shape, plain dtype, bool, bytes of exactly the right length) for an
    array (a crafted dtype state makes numpy read float bytes as object pointers: a segfault);
  - container constructors called from the pickle (``list(x)``, ``dict(x)``, ...) may create at most
    ``MAX_ELEMENTS`` elements in total, and array/scalar data may total at most the pickle's own size plus
    1 MiB (numpy copies the bytes it is given, so shared byte strings could otherwise multiply);
  - the result is copied into a fresh tree: a cycle is refused, nesting deeper than ``MAX_DEPTH`` is
    refused, at most ``MAX_NODES`` nodes are produced and at most ``MAX_SHARED`` containers are reached a
    second time (shared references count once per use, so a "billion laughs" of shared nested lists stops
    within milliseconds).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MAX_OPS = 200_000
MAX_MEMO = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_SHARED = 10_000
MAX_ELEMENTS = 2_000_000
_NUMERIC_KINDS = "biufc"
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


class UnsupportedPickle(ValueError):
    """The pickle references a global this reader does not allow."""


class PickleLimit(ValueError):
    """The pickle breaks one of the reader's limits (size, depth, count, cycle) or is malformed."""


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


_RECONSTRUCT = _numpy_reconstruct()
_SCALAR = _numpy_scalar()


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: only the array reconstructor accepts it (no direct calls,
    so ``numpy.ndarray((2**40,))`` cannot allocate)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


class _Budget:
    """Per-load counters behind the limits on elements and array bytes."""

    def __init__(self, data_bytes: int) -> None:
        self.elements = 0
        self.array_bytes = 0
        self.max_array_bytes = data_bytes + (1 << 20)

    def add_elements(self, n: int) -> None:
        self.elements += n
        if self.elements > MAX_ELEMENTS:
            raise PickleLimit(f"the pickle builds more than {MAX_ELEMENTS} container elements")

    def add_bytes(self, n: int) -> None:
        self.array_bytes += n
        if self.array_bytes > self.max_array_bytes:
            raise PickleLimit(
                f"the pickle's arrays hold more bytes ({self.array_bytes}) than the pickle could carry "
                "(shared data repeated)"
            )


def _make_allowed(budget: _Budget) -> dict[tuple[str, str], Any]:
    """(module, name) -> object, each bound to this load's budget. jax 0.4's and numpy 1.x / 2.x spellings."""

    class _GuardedArray(np.ndarray):
        """An ndarray whose ``__setstate__`` (pickle BUILD) checks the state numpy would write and charges
        its data to the budget first."""

        def __setstate__(self, state: Any) -> None:
            if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
                raise PickleLimit("an array's pickled state is not (1, shape, dtype, fortran, data)")
            _, shape, dtype, fortran, raw = state
            _check_shape(shape)
            _check_plain_dtype(dtype)
            if not isinstance(fortran, bool) or not isinstance(raw, bytes):
                raise PickleLimit("an array's pickled state has a malformed order flag or data field")
            if len(raw) != math.prod(shape) * dtype.itemsize:
                raise PickleLimit(f"array data is {len(raw)} bytes, shape {shape} {dtype} needs more or less")
            budget.add_bytes(len(raw))
            super().__setstate__(state)

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY:
            raise PickleLimit(f"array reconstruction of {type(subtype).__name__}, expected numpy.ndarray")
        if shape != (0,):
            raise PickleLimit(f"array reconstruction with shape {shape!r}; numpy pickles use (0,)")
        return _RECONSTRUCT(_GuardedArray, (0,), dtype)

    def rebuild_jax_array(fun: Any, args: tuple, arr_state: tuple, aval_state: Any = None) -> np.ndarray:
        """What ``jax._src.array._reconstruct_array`` does, minus ``device_put``: the numpy value."""
        if fun is not reconstruct or not isinstance(args, tuple):
            raise PickleLimit("a jax array is rebuilt by something other than numpy's reconstructor")
        value = fun(*args)
        value.__setstate__(arr_state)
        return value

    def scalar(dtype: Any, data: Any = None) -> Any:
        _check_plain_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise PickleLimit(f"numpy scalar data is not {dtype.itemsize} bytes")
        budget.add_bytes(len(data))
        return _SCALAR(dtype, data)

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        """``numpy.dtype`` as numpy pickles it, ``dtype('f4', False, True)``: a short type code, two bools."""
        if not (
            isinstance(spec, str) and len(spec) <= 8 and isinstance(align, bool) and isinstance(copy, bool)
        ):
            raise PickleLimit(f"numpy.dtype called with {type(spec).__name__} arguments, not a type code")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's deprecation warnings would be a second stderr line
            try:
                made = np.dtype(spec, align, copy)
            except (TypeError, ValueError, Warning) as e:
                raise PickleLimit(f"numpy.dtype({spec!r}) is not a dtype ({type(e).__name__})") from None
        _check_plain_dtype(made)
        return made

    def counted(make: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any) -> Any:
            value = make(*args)
            budget.add_elements(len(value))
            return value

        return build

    return {
        ("jax._src.array", "_reconstruct_array"): rebuild_jax_array,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): dtype,
        ("collections", "OrderedDict"): counted(collections.OrderedDict),
        ("builtins", "dict"): counted(dict),
        ("builtins", "list"): counted(list),
        ("builtins", "tuple"): counted(tuple),
    }


#: The only dtype state numpy writes for a plain numeric dtype (``dtype.__reduce__()[2]``), by byte order.
_DTYPE_STATES = {(3, order, None, None, None, -1, -1, 0) for order in "<>|="}


def _check_plain_dtype(dtype: Any) -> None:
    """A plain numeric dtype, exactly as numpy builds it from its type code (no fields, subarrays, or
    flags: a float dtype flagged as holding objects makes numpy read its bytes as pointers)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
        raise PickleLimit(f"dtype {dtype!r} is not numeric")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.flags != np.dtype(dtype.str).flags:
        raise PickleLimit(f"dtype {dtype!r} is not a plain numeric dtype")


def _check_shape(shape: Any) -> None:
    if not isinstance(shape, tuple) or len(shape) > 32:
        raise PickleLimit(f"array shape {shape!r} is not a tuple of at most 32 sizes")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < 2**40:
            raise PickleLimit(f"array shape {shape!r} holds an invalid size")


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, so that BUILD (``__setstate__``) can be checked: the C one would let a
    pickle set any state on a numpy dtype, and a dtype state can make numpy treat float bytes as object
    pointers (found by fuzzing: a segfault). Only our guarded arrays and plain dtypes may be BUILT."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            _check_plain_dtype(inst)
            if not isinstance(state, tuple) or state not in _DTYPE_STATES:
                raise PickleLimit(f"the pickle sets dtype state {str(state)[:80]}, not numpy's own form")
            inst.__setstate__(state)
        elif isinstance(inst, np.ndarray) and type(inst).__name__ == "_GuardedArray":
            inst.__setstate__(state)
        else:
            raise PickleLimit(
                f"the pickle sets the state of a {type(inst).__name__}, which this reader refuses"
            )

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsupportedPickle(
                f"the pickle needs {module}.{name}, which this reader does not allow "
                "(it reads dicts/lists of jax or numpy arrays only)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsupportedPickle("the pickle uses persistent ids, which this reader does not allow")


def prescan(data: bytes) -> None:
    """Walk the opcodes without building anything; PickleLimit on too many ops, huge memo indices or
    length fields that run past the data."""
    ops = 0
    try:
        for opcode, arg, _ in pickletools.genops(data):
            ops += 1
            if ops > MAX_OPS:
                raise PickleLimit(f"the pickle has more than {MAX_OPS} opcodes")
            if opcode.name in _MEMO_OPS and (not isinstance(arg, int) or not 0 <= arg < MAX_MEMO):
                raise PickleLimit(f"memo index {arg!r} is out of range (the reader allows < {MAX_MEMO})")
    except PickleLimit:
        raise
    except Exception as e:  # pickletools raises ValueError / KeyError / UnicodeDecodeError on bad bytes
        raise PickleLimit(f"not a valid pickle ({type(e).__name__}: {str(e)[:200]})") from None


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bytes):
        return k.decode("utf-8", errors="replace")
    if isinstance(k, int) and abs(k) < 10**18:
        return str(k)
    raise PickleLimit(f"a dict key of type {type(k).__name__} (a tree of arrays has string keys)")


def plain_tree(obj: Any) -> Any:
    """A fresh copy of ``obj`` with plain ndarray leaves; PickleLimit on a cycle, depth or node count."""
    nodes = 0
    shared = 0
    on_path: set[int] = set()
    seen: set[int] = set()

    def visit(x: Any, depth: int) -> Any:
        nonlocal nodes, shared
        nodes += 1
        if nodes > MAX_NODES:
            why = f" ({shared} shared references repeat the same objects)" if shared else ""
            raise PickleLimit(f"the pickle expands to more than {MAX_NODES} objects{why}")
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in _NUMERIC_KINDS or x.dtype.fields:
                raise PickleLimit(f"array of dtype {x.dtype} is not numeric")
            return x.view(np.ndarray)
        if not isinstance(x, (dict, list, tuple)):
            return x
        if id(x) in on_path:
            raise PickleLimit("the pickle is cyclic (a container holds itself)")
        if depth >= MAX_DEPTH:
            raise PickleLimit(f"the pickle nests deeper than {MAX_DEPTH} levels")
        if id(x) in seen:
            shared += 1
            if shared > MAX_SHARED:
                raise PickleLimit(
                    f"the pickle reuses containers more than {MAX_SHARED} times (shared references; "
                    "a tree of arrays has none)"
                )
        seen.add(id(x))
        on_path.add(id(x))
        try:
            if isinstance(x, dict):
                out: dict[str, Any] = {}
                for k, v in x.items():
                    key = _key(k)
                    if key in out:
                        raise PickleLimit(f"duplicate dict key {key[:40]!r}")
                    out[key] = visit(v, depth + 1)
                return collections.OrderedDict(out) if isinstance(x, collections.OrderedDict) else out
            items = [visit(v, depth + 1) for v in x]
            if isinstance(x, tuple):
                return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
            return items
        finally:
            on_path.discard(id(x))

    return visit(obj, 0)


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with only numpy / jax-array reconstruction allowed; jax arrays become numpy.

    Raises UnsupportedPickle (a refused global) or PickleLimit (a limit or malformed data).
    """
    prescan(data)
    allowed = _make_allowed(_Budget(len(data)))
    try:
        obj = _Unpickler(io.BytesIO(data), allowed).load()
    except (UnsupportedPickle, PickleLimit):
        raise
    except RecursionError:
        raise PickleLimit("the pickle nests too deeply") from None
    except MemoryError:
        raise PickleLimit("the pickle asks for more memory than allowed") from None
    return plain_tree(obj)


def to_tree(obj: Any) -> Any:
    """A plain tree as flax would store it: maps with string keys, numpy arrays as leaves (lists become
    index-keyed maps). ``obj`` must come from ``loads`` (acyclic, bounded depth)."""
    if isinstance(obj, Mapping):
        return {str(k): to_tree(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {k: to_tree(getattr(obj, k)) for k in obj._fields}
    if isinstance(obj, (list, tuple)):
        return {str(i): to_tree(v) for i, v in enumerate(obj)}
    return obj
