"""Issue #12.3/#12.4: every malformed or hostile input is one stderr line and exit 2, never a traceback.

Covers the decoders (msgpack map keys, dims, huge shapes, chunked arrays, nesting), gin (nesting, macro
bombs, odd literals), the pickle reader (cycles, shared-reference bombs, memo and length tricks, copy
amplification), the output target (empty, file as parent, /proc, read-only, devices, FIFOs) and converted
files whose metadata is not what the converter writes.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file

from converter import flax_msgpack, gin_config, jax_pickle
from converter.commands import main
from converter.errors import ConversionError

DATA = Path(__file__).parent / "data"
VELO_DIR = DATA / "lo" / "velo_small"
SMALL_SETS = ["--set", "architecture=velo", "--set", "use_bugged_loss_features=False"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *needles: str) -> str:
    """Exit 2 with exactly one stderr line holding every needle; return the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def ext(shape, dtype: str, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


# --------------------------------------------------------------------------------------- msgpack


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


@pytest.mark.parametrize("name", sorted(MSGPACK_CASES))
def test_msgpack_refusals(tmp_path, name):
    data, needle = MSGPACK_CASES[name]
    src = tmp_path / "theta.state"
    src.write_bytes(data)
    out = tmp_path / "x.safetensors"
    refused(run("auto", "--source", src, "-o", out), str(src), needle)
    assert not out.exists()


def test_decoder_direct_refusals():
    tree = {f"k{i}": {f"j{j}": {} for j in range(300)} for i in range(700)}  # 210700 maps
    with pytest.raises(ConversionError, match="more than 200000 nodes"):
        flax_msgpack.decode(msgpack.packb(tree), source="s")


# --------------------------------------------------------------------------------------- gin


def _gin_run(tmp_path: Path, extra: str):
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "params").write_bytes((VELO_DIR / "params").read_bytes())
    (folder / "config.gin").write_text((VELO_DIR / "config.gin").read_text() + "\n" + extra + "\n")
    return run("velo", "--source", folder, "-o", tmp_path / "x.safetensors", "--force")


@pytest.mark.parametrize(
    "extra, where, needle",
    [
        ("HyperV2.param_inits = " + "[" * 600 + "]" * 600, "config.gin", "nest too deeply"),
        ("HyperV2.param_inits = " + "[" * 100 + "]" * 100, "config.gin", "deeper than 64"),
        ("HyperV2.param_inits = " + "9" * 5000, "config.gin", "4300 digits"),
        ("HyperV2.lstm_hidden_size = 'eight'", "params", "lstm_hidden_size"),
        ("HyperV2.lstm_hidden_size = [8]", "params", "lstm_hidden_size"),
        ("HyperV2.lstm_hidden_size = {'a': 1}", "params", "lstm_hidden_size"),
        ("HyperV2.lstm_hidden_size = 1e9", "params", "lstm_hidden_size"),
        ("HyperV2.lstm_hidden_size = 100000000", "params", "lstm_hidden_size"),
    ],
)
def test_gin_refusals(tmp_path, extra, where, needle):
    refused(_gin_run(tmp_path, extra), where, needle)


def test_gin_macro_bomb_is_refused_fast():
    lines = ["run_train.lopt = @HyperV2()", "M0 = [1, 1]"]
    lines += [f"M{i} = [%M{i - 1}, %M{i - 1}]" for i in range(1, 25)]  # 2**25 values if expanded
    lines.append("HyperV2.param_inits = %M24")
    start = time.process_time()
    with pytest.raises(ConversionError, match="expand to more than 100000 items"):
        gin_config.parse_optimizer("\n".join(lines), source="bomb.gin")
    assert time.process_time() - start < 2


def test_set_values_of_the_wrong_type(tmp_path):
    for value in ("'abc'", "[1, 2]", "-3", "1e9", "None"):
        out = tmp_path / "x.safetensors"
        refused(
            run("velo", "--source", VELO_DIR, "-o", out, "--set", f"lstm_hidden_size={value}"),
            "lstm_hidden_size",
        )


# --------------------------------------------------------------------------------------- pickle


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


PICKLE_CASES = {
    "shared bomb (363 bytes)": (lambda: _shared_bomb(57), "shared references"),
    "self-referencing list": (_self_referencing, "cyclic"),
    "memo index 2**31": (_memo_bomb, "memo index"),
    "BINBYTES of 2 GiB": (_length_bomb, "not a valid pickle"),
    "list() copies": (_copy_amplifier, "container elements"),
    "shared array bytes": (lambda: _arrays_sharing_bytes(np.zeros(16384, np.float32), 20000), "more bytes"),
    "os.system": (lambda: pickle.dumps(os.system), "posix.system"),
    "numpy.ndarray((2**40,))": (
        lambda: b"\x80\x04\x8c\x05numpy\x8c\x07ndarray\x93J\x00\x00\x00\x01\x85\x85R.",
        "cannot unpickle",
    ),
    "object array": (lambda: pickle.dumps(np.array([1, "a"], dtype=object), protocol=4), "not numeric"),
    "nested 100 deep": (
        lambda: pickle.dumps({"a": eval("[" * 100 + "]" * 100)}, protocol=4),
        "deeper than 64",
    ),
}


@pytest.mark.parametrize("name", list(PICKLE_CASES))
def test_pickle_limits(tmp_path, name):
    make, needle = PICKLE_CASES[name]
    data = make()
    src = tmp_path / "theta.pkl"
    src.write_bytes(data)
    start = time.process_time()
    r = run("auto", "--source", src, "-o", tmp_path / "x.safetensors", "--allow-pickle", *SMALL_SETS)
    took = time.process_time() - start
    line = refused(r, str(src))
    assert needle in line, line
    assert took < 1.0, f"{name}: {took:.2f} s of CPU"
    if name == "shared bomb (363 bytes)":
        assert len(data) == 363


def test_pickle_reader_keeps_real_pickles():
    src = Path(__file__).parents[1] / "parity_tests" / "fixtures" / "mulo_pylo" / "checkpoint"
    src = src / "global_step1.pickle"
    tree = jax_pickle.loads(src.read_bytes())
    leaves = flax_msgpack.flatten_tree(jax_pickle.to_tree(tree))
    assert len(leaves) == 9 and all(type(v) is np.ndarray for v in leaves.values())
    plain = {"a": np.arange(3, dtype=np.float32), "b": [np.float32(2.5), (1, 2)], "c": {"d": np.eye(2)}}
    back = jax_pickle.loads(pickle.dumps(plain, protocol=4))
    assert (
        np.array_equal(back["a"], plain["a"]) and back["b"][0] == np.float32(2.5) and back["b"][1] == (1, 2)
    )
    assert type(back["c"]["d"]) is np.ndarray and np.array_equal(back["c"]["d"], np.eye(2))


# --------------------------------------------------------------------------------------- output target


def test_output_targets_are_checked_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(run("velo", "--source", VELO_DIR, "-o", ""), "empty output path")
    refused(run("auto", "--source", VELO_DIR, "-o", ""), "empty output path")
    assert not (tmp_path / "checkpoints").exists() and not Path("checkpoints/velo.safetensors").exists()
    refused(run("velo", "--source", VELO_DIR, "-o", afile / "x.safetensors"), "afile is not a folder")
    refused(run("velo", "--source", VELO_DIR, "-o", "/proc/x.safetensors"), "cannot write into /proc")
    refused(run("velo", "--source", VELO_DIR, "-o", tmp_path), "is a directory")
    # checked before reading: a missing source is not even looked at
    refused(run("auto", "--source", tmp_path / "missing", "-o", afile / "x.safetensors"), "not a folder")


def test_force_never_replaces_a_device_or_fifo(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(run("velo", "--source", VELO_DIR, "-o", fifo, "--force"), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    dev = tmp_path / "null.safetensors"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError as e:
        pytest.skip(f"cannot make a character device here ({e.strerror}); the FIFO case above ran")
    refused(run("velo", "--source", VELO_DIR, "-o", dev, "--force"), "not a regular file")
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; CI runs as a user")
def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(run("velo", "--source", VELO_DIR, "-o", folder / "x.safetensors"), "cannot write into")
    finally:
        folder.chmod(0o755)


def test_written_files_follow_the_umask(tmp_path):
    out = tmp_path / "x.safetensors"
    old = os.umask(0o027)
    try:
        assert run("velo", "--source", VELO_DIR, "-o", out).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_parity_report_files_follow_the_umask(tmp_path):
    from parity_tests.report import _atomic_write

    old = os.umask(0o022)
    try:
        _atomic_write(tmp_path / "r.md", "report")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------- converted files


def _with_meta(tmp_path: Path, **changes: str) -> Path:
    good = tmp_path / "good.safetensors"
    if not good.exists():
        assert run("velo", "--source", VELO_DIR, "-o", good).exit_code == 0
    with safe_open(str(good), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, **changes})
    return bad


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"config": "[1, 2]"}, "'config' is a JSON list, not an object"),
        ({"config": "null"}, "'config' is a JSON NoneType"),
        ({"source_paths": '"text"'}, "'source_paths' is a JSON str"),
        ({"source_paths": json.dumps({"a": 3})}, "entry 'a' is not"),
        ({"source_paths": json.dumps({"a": {"path": 1}})}, "entry 'a' is not"),
        ({"source_paths": json.dumps({"a": {"path": "x", "keys": [1]}})}, "entry 'a' is not"),
        ({"config": "[" * 100000 + "]" * 100000}, "not JSON"),
        ({"config": "{"}, "not JSON"),
    ],
)
def test_inspect_and_verify_on_malformed_metadata(tmp_path, changes, needle):
    bad = _with_meta(tmp_path, **changes)
    refused(run("inspect", bad), str(bad), needle)
    refused(run("verify", bad, "--source", VELO_DIR), str(bad), needle)


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata())


def test_verify_with_crafted_transforms_and_config(tmp_path):
    meta = _meta(_with_meta(tmp_path))
    paths, cfg = json.loads(meta["source_paths"]), json.loads(meta["config"])
    name = sorted(paths)[0]
    for transform in ("transpose:0,0,0", "reshape:" + "9" * 5000, "reshape:-1,-1", "explode"):
        entry = {**paths[name], "transform": transform}
        bad = _with_meta(tmp_path, source_paths=json.dumps({**paths, name: entry}))
        r = run("verify", bad, "--source", VELO_DIR)
        assert r.exit_code == 1 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    bad = _with_meta(tmp_path, config=json.dumps({**cfg, "ff_hidden_layers": 10**9}))
    r = run("verify", bad, "--source", VELO_DIR)
    assert r.exit_code == 1 and "ff_hidden_layers" in r.stderr and len(r.stderr.strip().splitlines()) == 1
