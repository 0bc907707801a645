"""Hostile and malformed inputs shared by test_converter_hostile (one-line refusals) and
test_converter_corpus (time and memory limits): ``{name: (bytes or a function making them, needle)}``."""

from __future__ import annotations

import os
import pickle

import msgpack
import numpy as np


def ext(shape, dtype: str, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


MSGPACK_CASES = {
    "list as map key": (b"\x81\x91\x01\x01", "a map key is a list or map"),
    "map as map key": (b"\x81\x81\x01\x01\x01", "a map key is a list or map"),
    "float as map key": (b"\x81\xcb" + b"\0" * 8 + b"\x01", "a map key is a float"),
    "65 dims": (msgpack.packb({"a": ext([1] * 65, "float32", b"\0" * 4)}), "65 dimensions"),
    "shape [0, 2**62]": (msgpack.packb({"a": ext([0, 2**62], "float32", b"")}), "impossibly large"),
    "chunked [0, 2**62]": (
        msgpack.packb(
            {
                "a": {
                    "__msgpack_chunked_array__": True,
                    "shape": {"0": 0, "1": 2**62},
                    "chunks": {"0": ext([0], "float32", b"")},
                }
            }
        ),
        "impossibly large",
    ),
    "chunked 100 dims": (
        msgpack.packb(
            {
                "a": {
                    "__msgpack_chunked_array__": True,
                    "shape": {str(i): 1 for i in range(100)},
                    "chunks": {"0": ext([1], "float32", b"\0" * 4)},
                }
            }
        ),
        "100 dimensions",
    ),
    "maps 1000 deep": (b"\x81\xa1a" * 1000 + b"\xc0", "nests deeper than 64"),
    "arrays 1000 deep": (b"\x81\xa1a" + b"\x91" * 1000 + b"\xc0", "nests deeper than 64"),
    "arrays 100000 deep": (b"\x81\xa1a" + b"\x91" * 100000 + b"\xc0", "nesting too deep"),
    "300k nils": (b"\x81\xa1a\xdd" + (300_000).to_bytes(4, "big") + b"\xc0" * 300_000, "300000 items"),
}


def _shared_bomb(levels: int) -> bytes:
    node: list = []
    for _ in range(levels):
        node = [node, node]
    return pickle.dumps({"t": node}, protocol=4)


def _self_referencing() -> bytes:
    a: list = []
    a.append(a)
    return pickle.dumps({"theta": a}, protocol=4)


def _memo_bomb() -> bytes:
    return b"\x80\x04N" + b"r\xff\xff\xff\x7f" + b"."  # LONG_BINPUT 2**31-1: CPython sizes its memo by it


def _length_bomb() -> bytes:
    return b"\x80\x04B\xff\xff\xff\x7fabc."  # BINBYTES declaring 2 GiB


def _copy_amplifier() -> bytes:
    """One 20k-element list, copied 20k times by list(): 400M elements from ~200 kB."""
    base = pickle.dumps(list(range(200)) * 100, protocol=4)[2:-1]  # the list's opcodes, no PROTO/STOP
    if base[0] == 0x95:  # and no FRAME
        base = base[9:]
    body = b"\x80\x04" + b"\x8c\x08builtins\x8c\x04list\x93" + b"\x94" + base + b"\x94"  # memo 0: list, 1: L
    body += b"]\x94(" + b"h\x00h\x01\x85R" * 20000 + b"e."
    return body


def _arrays_sharing_bytes(arr: np.ndarray, copies: int) -> bytes:
    class Shared:
        def __reduce__(self):
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:
                from numpy.core.multiarray import _reconstruct
            return (_reconstruct, (np.ndarray, (0,), b"b"), (1, arr.shape, arr.dtype, False, data))

    data = arr.tobytes()
    return pickle.dumps([Shared() for _ in range(copies)], protocol=4)


def _dtype_flagged_as_objects() -> bytes:
    """A float64 dtype whose pickled state sets NPY_ITEM_REFCOUNT, then an array of 'A' bytes in it: numpy
    reads 0x4141414141414141 as object pointers (memory corruption / segfault with the C unpickler).
    Found by the long fuzz run of the convert target; rebuilt by hand (the process died with the input)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct

    class Dtype:
        def __reduce__(self):
            return (np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 1))

    class Array:
        def __reduce__(self):
            return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), Dtype(), False, b"A" * 16))

    return pickle.dumps({"a": Array()}, protocol=4)


PICKLE_CASES = {
    "dtype flagged as holding objects": (_dtype_flagged_as_objects, "not numpy's own form"),
    "shared bomb (363 bytes)": (lambda: _shared_bomb(57), "shared references"),
    "self-referencing list": (_self_referencing, "cyclic"),
    "memo index 2**31": (_memo_bomb, "memo index"),
    "BINBYTES of 2 GiB": (_length_bomb, "not a valid pickle"),
    "list() copies": (_copy_amplifier, "container elements"),
    "shared array bytes": (lambda: _arrays_sharing_bytes(np.zeros(16384, np.float32), 5000), "more bytes"),
    "os.system": (lambda: pickle.dumps(os.system), "posix.system"),
    "numpy.ndarray((2**24,)) called": (
        lambda: b"\x80\x04\x8c\x05numpy\x8c\x07ndarray\x93J\x00\x00\x00\x01\x85\x85R.",
        "cannot unpickle",
    ),
    "object array": (lambda: pickle.dumps(np.array([1, "a"], dtype=object), protocol=4), "not numeric"),
    "nested 100 deep": (
        lambda: pickle.dumps({"a": eval("[" * 100 + "]" * 100)}, protocol=4),
        "deeper than 64",
    ),
}
