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
from hostile_inputs import MSGPACK_CASES, PICKLE_CASES
from safetensors import safe_open
from safetensors.numpy import save_file

from lopt_bridge.converter import flax_msgpack, gin_config, jax_pickle
from lopt_bridge.converter.commands import main
from lopt_bridge.converter.errors import ConversionError

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


# --------------------------------------------------------------------------------------- msgpack


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


def test_default_output_folder_is_checked_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").write_text("a file where ./checkpoints/ would go")
    refused(run("auto", "--source", tmp_path / "missing"), "checkpoints is not a folder")
    refused(run("velo", "--source", tmp_path / "missing"), "checkpoints is not a folder")


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


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root, which writes into read-only folders")
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
    from lopt_bridge.parity_tests.report import _atomic_write

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


def test_usage_errors_are_one_line_and_help_stays_help():
    refused(run("auto"), "Missing option '--source'")
    refused(run("no-such-command"), "No such command")
    refused(run("velo", "--max-source-size", "lots"), "--max-source-size", "not a size")
    bare = run()
    assert "Commands:" in bare.output and "auto" in bare.output  # a bare command still shows the help
    assert run("--help").exit_code == 0 and run("--version").exit_code == 0
