"""Decode flax ``serialization.to_bytes`` output into plain Python/numpy, without importing jax or flax.

flax writes a state dict with msgpack. Leaves that are not msgpack natives use extension types:
type 1 = ndarray (a nested msgpack ``(shape, dtype name, C-order bytes)``), type 2 = Python complex
(nested ``(real, imag)``), type 3 = numpy scalar (an ndarray of shape ``()``). Arrays over 2**30 bytes are
split into a map ``{"__msgpack_chunked_array__": True, "shape": {"0": ..}, "chunks": {"0": arr, ..}}``.
Lists, tuples, namedtuples and dataclasses reach the bytes as maps keyed by index strings or field names
(flax's state-dict form), so that is what ``decode`` returns too; a raw msgpack array is turned into the
same index-keyed map.

bfloat16: numpy has no bfloat16 and ``ml_dtypes`` is not a runtime dependency, so bfloat16 arrays are
widened to float32. Every bfloat16 value is exactly representable in float32 (the widening appends 16 zero
mantissa bits), so no value changes; pass ``notes={}`` to ``decode`` to learn which leaves were widened.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .errors import ConversionError

EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_MARKER = "__msgpack_chunked_array__"

#: Limits on what a file may declare (a checkpoint tree is a few levels deep with hundreds of leaves).
MAX_DEPTH = 64
MAX_NODES = 200_000
MAX_NDIM = 32

#: Note recorded (via ``decode(..., notes=...)``) for each leaf widened from bfloat16.
BFLOAT16_NOTE = "bfloat16->float32 (exact)"

#: dtype names flax may write (``ndarray.dtype.name``) that we decode; everything else is refused.
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}


class _Ext:
    """An extension value kept undecoded until the tree walk, so errors can name its tree path."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data


def _fail(source: str, path: tuple[str, ...], problem: str) -> ConversionError:
    where = f"at tree path '{'/'.join(path)}': " if path else ""
    return ConversionError(source, f"{where}{problem}")


def _check_shape(shape: Any, itemsize: int, source: str, path: tuple[str, ...], what: str) -> None:
    """Refuse shapes numpy cannot hold: not a list of non-negative ints, more than ``MAX_NDIM`` dims, or
    a size that overflows even when another dimension is 0 (``[0, 2**62]``)."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(source, path, f"{what} shape {_short(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise _fail(source, path, f"{what} has {len(shape)} dimensions (at most {MAX_NDIM})")
    if math.prod(max(d, 1) for d in shape) * max(itemsize, 1) >= 2**62:
        raise _fail(source, path, f"{what} shape {_short(shape)} is impossibly large")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(tuple(value)) if isinstance(value, list) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_ndarray(data: bytes, source: str, path: tuple[str, ...], notes: dict | None) -> np.ndarray:
    try:
        header = msgpack.unpackb(data, raw=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise _fail(source, path, f"array record is not valid msgpack ({e})") from None
    if not (isinstance(header, (list, tuple)) and len(header) == 3):
        raise _fail(source, path, "array record is not a (shape, dtype, bytes) triple")
    shape, dtype_name, buffer = header
    if not isinstance(dtype_name, bytes) or not isinstance(buffer, bytes):
        raise _fail(source, path, "array record has a malformed dtype name or data field")
    name = dtype_name.decode("ascii", errors="replace")
    widen = name == "bfloat16"
    if widen:
        dtype = np.dtype("<u2")
    elif name in _DTYPES:
        dtype = _DTYPES[name]
    else:
        raise _fail(source, path, f"unsupported array dtype {name[:40]!r}")
    _check_shape(shape, dtype.itemsize, source, path, "array")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        relation = "larger than" if expected > len(buffer) else "smaller than"
        raise _fail(
            source,
            path,
            f"array declares shape {tuple(shape)} {name} ({expected} bytes), {relation} "
            f"its data ({len(buffer)} bytes)",
        )
    arr = np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
    if widen:
        arr = (arr.astype("<u4") << 16).view("<f4")
        if notes is not None:
            notes[path] = BFLOAT16_NOTE
    # Native byte order, writable, owning its memory (torch.from_numpy warns on read-only buffers).
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def _decode_ext(ext: _Ext, source: str, path: tuple[str, ...], notes: dict | None) -> Any:
    if ext.code == EXT_NDARRAY:
        return _decode_ndarray(ext.data, source, path, notes)
    if ext.code == EXT_NPSCALAR:
        arr = _decode_ndarray(ext.data, source, path, notes)
        if arr.shape != ():
            raise _fail(source, path, f"numpy scalar record has shape {arr.shape}, expected ()")
        return arr[()]
    if ext.code == EXT_NATIVE_COMPLEX:
        try:
            pair = msgpack.unpackb(ext.data)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise _fail(source, path, f"complex record is not valid msgpack ({e})") from None
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        ):
            raise _fail(source, path, "complex record is not a (real, imag) pair")
        try:
            return complex(pair[0], pair[1])
        except OverflowError:
            raise _fail(source, path, "complex record holds a number too large for a float") from None
    raise _fail(source, path, f"unknown msgpack extension type {ext.code} (flax uses 1, 2 and 3)")


def _unchunk(
    node: Mapping, source: str, path: tuple[str, ...], notes: dict | None, counter: list[int]
) -> np.ndarray:
    shape_map, chunk_map = node.get("shape"), node.get("chunks")
    if set(node) != {CHUNKED_MARKER, "shape", "chunks"} or not isinstance(shape_map, Mapping):
        raise _fail(source, path, "chunked array record lacks 'shape' or 'chunks'")
    if not isinstance(chunk_map, Mapping) or not chunk_map:
        raise _fail(source, path, "chunked array record has no chunks")
    if len(shape_map) > MAX_NDIM:
        raise _fail(source, path, f"chunked array has {len(shape_map)} dimensions (at most {MAX_NDIM})")
    try:
        shape = tuple(shape_map[str(i)] for i in range(len(shape_map)))
        _check_shape(shape, 1, source, path, "chunked array")
        chunk_keys = [str(i) for i in range(len(chunk_map))]
        chunks = [_walk(chunk_map[k], source, (*path, "chunks", k), notes, counter) for k in chunk_keys]
    except KeyError as e:
        raise _fail(source, path, f"chunked array record is missing index {e}") from None
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
        raise _fail(source, path, "chunked array chunks are not 1-D arrays")
    if len({c.dtype for c in chunks}) != 1:
        raise _fail(source, path, "chunked array chunks have different dtypes")
    _check_shape(shape, chunks[0].dtype.itemsize, source, path, "chunked array")
    flat = np.concatenate(chunks)
    if flat.size != math.prod(shape):
        relation = "larger than" if math.prod(shape) > flat.size else "smaller than"
        raise _fail(
            source,
            path,
            f"chunked array declares shape {shape} ({math.prod(shape)} elements), {relation} "
            f"its data ({flat.size} elements)",
        )
    return flat.reshape(shape)


def _map_key(key: Any, source: str, path: tuple[str, ...]) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", errors="replace")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    kind = "an extension value" if isinstance(key, _Ext) else f"a {type(key).__name__}"
    raise _fail(source, path, f"a map key is {kind}; flax state dicts have string keys")


def _walk(node: Any, source: str, path: tuple[str, ...], notes: dict | None, counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise ConversionError(source, f"the tree has more than {MAX_NODES} nodes (a checkpoint has hundreds)")
    if isinstance(node, _Ext):
        return _decode_ext(node, source, path, notes)
    if isinstance(node, (list, tuple, Mapping)) and len(path) >= MAX_DEPTH:
        raise _fail(source, path[:3] + ("...",), f"the tree nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, (list, tuple)):
        if len(node) > MAX_NODES:
            raise _fail(source, path, f"a list of {len(node)} items (more than the {MAX_NODES}-node limit)")
        node = {str(i): v for i, v in enumerate(node)}
    if isinstance(node, Mapping):
        if CHUNKED_MARKER in node:
            return _unchunk(node, source, path, notes, counter)
        out: dict[str, Any] = {}
        for key, value in node.items():
            skey = _map_key(key, source, path)
            if skey in out:
                raise _fail(source, path, f"duplicate map key {skey[:80]!r}")
            out[skey] = _walk(value, source, (*path, skey), notes, counter)
        return out
    return node


def decode(data: bytes, *, source: str, notes: dict | None = None) -> dict[str, Any]:
    """Decode flax msgpack bytes into nested dicts of numpy arrays / Python scalars / strings.

    ``source`` names the file in errors. If ``notes`` is a dict, it receives ``{tree path tuple: note}``
    for leaves whose dtype was changed (only bfloat16, widened exactly to float32).
    Raises ConversionError(source, one-line problem) on any malformed input.
    """
    if len(data) == 0:
        raise ConversionError(source, "file is empty")
    try:
        raw = msgpack.unpackb(data, ext_hook=_Ext, raw=False, strict_map_key=False)
    except msgpack.ExtraData as e:
        raise ConversionError(
            source,
            f"not a flax msgpack file ({len(e.extra)} bytes of trailing data after the first msgpack value)",
        ) from None
    except msgpack.StackError:
        raise ConversionError(source, "not a flax msgpack file (nesting too deep)") from None
    except msgpack.FormatError:
        raise ConversionError(source, "not a flax msgpack file (invalid msgpack type byte)") from None
    except UnicodeDecodeError:
        raise ConversionError(source, "not a flax msgpack file (a string is not valid UTF-8)") from None
    except TypeError:  # msgpack cannot hash a list or map used as a map key
        raise ConversionError(
            source, "not a flax state dict (a map key is a list or map; flax keys are strings)"
        ) from None
    except ValueError as e:
        if "incomplete input" in str(e):
            raise ConversionError(
                source, f"truncated: the msgpack data ends early ({len(data)} bytes read)"
            ) from None
        raise ConversionError(source, f"not a flax msgpack file ({e})") from None
    if not isinstance(raw, Mapping):
        kind = "an array" if isinstance(raw, _Ext) else type(raw).__name__
        raise ConversionError(source, f"not a flax state dict: the msgpack top level is {kind}, not a map")
    return _walk(raw, source, (), notes, [0])


def load(path: str | Path, *, notes: dict | None = None) -> dict[str, Any]:
    """Read and decode a flax msgpack file (``params``, ``.checkpoint``, ``theta.state``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(path, "no such file") from None
    except IsADirectoryError:
        raise ConversionError(path, "is a directory, expected a flax msgpack file") from None
    except OSError as e:
        raise ConversionError(path, f"cannot read ({e.strerror})") from None
    return decode(data, source=str(path), notes=notes)


def flatten_tree(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` for every non-map leaf, in the tree's order; empty maps contribute nothing."""
    flat: dict[tuple[str, ...], Any] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, (*path, key))
        else:
            flat[path] = node

    visit(tree, ())
    return flat


def _pack_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        body = msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(EXT_NDARRAY, body)
    if isinstance(x, np.generic):
        arr = np.asarray(x)
        body = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(EXT_NPSCALAR, body)
    if isinstance(x, complex):
        return msgpack.ExtType(EXT_NATIVE_COMPLEX, msgpack.packb((x.real, x.imag)))
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot encode {type(x).__name__}")


def encode(tree: Mapping[str, Any]) -> bytes:
    """Encode a state dict the way flax does (for tests; no chunking, no bfloat16)."""
    return msgpack.packb(tree, default=_pack_default, strict_types=True, use_bin_type=True)
