"""flax msgpack decoding: bytes written by flax itself (tests/data/flax) and every malformed-input case."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from lopt_bridge.converter import flax_msgpack as fm
from lopt_bridge.converter.errors import ConversionError

DATA = Path(__file__).parent / "data" / "flax"
EXPECTED = dict(np.load(DATA / "expected.npz"))


def _check_against_expected(name: str, tree: dict) -> int:
    flat = {"/".join(k): v for k, v in fm.flatten_tree(tree).items()}
    checked = 0
    for key, want in EXPECTED.items():
        prefix, _, path = key.partition(":")
        if prefix != name:
            continue
        got = flat[path]
        if isinstance(got, np.ndarray):
            assert got.dtype == want.dtype, path
            assert got.shape == want.shape, path
            assert got.tobytes() == want.tobytes(), path
        else:
            assert np.asarray(got).item() == want.item(), path
        checked += 1
    assert checked > 0
    return checked


def test_mixed_tree_round_trips_bit_exactly():
    tree = fm.load(DATA / "mixed.msgpack")
    assert _check_against_expected("mixed", tree) == 22
    # haiku names are single keys; namedtuple / dataclass fields and tuple indices become map keys
    assert "rnn/linear" in tree["rnn_params"] and "ff_mod_stack/~" in tree
    assert set(tree["lstm_init_state"]) == {"hidden", "cell"}
    assert tree["tup"]["1"] == "text" and tree["tup"]["2"] == 7
    assert tree["lst"]["3"] is None and tree["lst"]["2"] is True
    assert tree["dc"]["b"] == 4
    assert isinstance(tree["npscalar"], np.float32) and tree["npscalar"] == np.float32(0.125)
    assert tree["complex_py"] == complex(1.5, -2.0)
    assert tree["scalar0d"].shape == () and tree["empty"].shape == (0, 3)
    assert tree["rnn_params"]["rnn/linear"]["w"].flags.writeable


def test_bfloat16_widened_exactly_and_noted():
    notes: dict = {}
    tree = fm.load(DATA / "bfloat16.msgpack", notes=notes)
    _check_against_expected("bfloat16", tree)
    assert tree["w"].dtype == np.float32
    assert notes == {("w",): fm.BFLOAT16_NOTE}
    # widening only appends zero bits: the low 16 bits of every float32 are 0
    assert not np.any(tree["w"].view(np.uint32) & 0xFFFF)


def test_chunked_array_is_reassembled():
    raw = msgpack.unpackb((DATA / "chunked.msgpack").read_bytes(), raw=False, strict_map_key=False)
    assert raw["layer"]["w"][fm.CHUNKED_MARKER] is True  # the fixture really is in chunked form
    assert len(raw["layer"]["w"]["chunks"]) == 3
    tree = fm.load(DATA / "chunked.msgpack")
    _check_against_expected("chunked", tree)
    assert tree["layer"]["w"].shape == (5, 7)


def test_parameter_checkpoint_and_no_config_layouts():
    pc = fm.load(DATA / "parameter_checkpoint.msgpack")
    assert set(pc) == {"params", "gen_id", "step"} and pc["gen_id"] == "abc123" and pc["step"] == 5620
    _check_against_expected("parameter_checkpoint", pc)
    nc = fm.load(DATA / "no_config.msgpack")
    assert set(nc) == {"0", "1", "2"} and nc["1"] == "" and nc["2"] == 0
    np.testing.assert_array_equal(nc["0"]["lstm/w"], pc["params"]["lstm/w"])


def test_encode_matches_flax_bytes():
    # our test-only encoder writes what flax writes for the same plain tree
    data = (DATA / "parameter_checkpoint.msgpack").read_bytes()
    assert fm.encode(fm.decode(data, source="x")) == data


def test_flatten_tree_paths_and_order():
    tree = {"a": {"b/c": 1, "d": {}}, "e": np.zeros(2)}
    flat = fm.flatten_tree(tree)
    assert list(flat) == [("a", "b/c"), ("e",)]


def _array_ext(shape, dtype: str, payload: bytes, code: int = fm.EXT_NDARRAY) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb((shape, dtype, payload), use_bin_type=True))


def _bad(data: bytes, match: str) -> None:
    with pytest.raises(ConversionError, match=match) as info:
        fm.decode(data, source="/x/theta.state")
    msg = str(info.value)
    assert msg.startswith("/x/theta.state: ") and "\n" not in msg


def test_malformed_inputs_raise_one_line_errors():
    good = (DATA / "mixed.msgpack").read_bytes()
    _bad(b"", "file is empty")
    _bad(good[: len(good) // 2], "truncated")
    _bad(b"hello, this is text", "not a flax msgpack file")
    _bad(b"\xc1", "not a flax msgpack file")
    _bad(good + b"\x00", "trailing data")
    _bad(msgpack.packb([1, 2]), "top level is list")
    _bad(msgpack.packb({"w": _array_ext((10, 10), "float32", b"\0" * 16)}), r"'w'.*larger than its data")
    _bad(msgpack.packb({"w": _array_ext((1,), "float32", b"\0" * 8)}), "smaller than its data")
    _bad(msgpack.packb({"w": _array_ext((2,), "object", b"\0" * 16)}), "unsupported array dtype 'object'")
    _bad(msgpack.packb({"w": _array_ext((-1,), "float32", b"")}), "non-negative")
    _bad(msgpack.packb({"a": {"w": msgpack.ExtType(9, b"zz")}}), r"'a/w'.*unknown msgpack extension type 9")
    _bad(msgpack.packb({"w": msgpack.ExtType(fm.EXT_NDARRAY, b"\xc1")}), "array record is not valid msgpack")
    chunk = {
        fm.CHUNKED_MARKER: True,
        "shape": {"0": 100},
        "chunks": {"0": _array_ext((4,), "float32", b"\0" * 16)},
    }
    _bad(msgpack.packb({"w": chunk}), "chunked array declares shape")


def test_load_missing_file(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        fm.load(tmp_path / "nope")
    with pytest.raises(ConversionError, match="is a directory"):
        fm.load(tmp_path)
