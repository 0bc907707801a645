"""lopt-convert end to end: each bad-input case of issue 2, conversion, inspect, verify, help, registry."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

from lopt_bridge.converter import architectures, flax_msgpack, registry
from lopt_bridge.converter.commands import main

DATA = Path(__file__).parent / "data"
VELO_DIR = DATA / "lo" / "velo_small"
VELO_NC = DATA / "lo" / "velo_small_no_config.checkpoint"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/checkpoints is absent")
# The small HyperV2 fixture's config for the config-less layouts (see tests/data/lo/README.md).
SMALL_SETS = ["--set", "architecture=velo", "--set", "use_bugged_loss_features=False"]


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_bad_input(result, names: str | Path, pattern: str, output: Path | None = None) -> str:
    """Exit code 2, exactly one stderr line naming the file and matching ``pattern``, nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert str(names) in line, line
    assert re.search(pattern, line), line
    if output is not None:
        assert not output.exists()
        if output.parent.exists():
            assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temp file left"
    return line


def velo_theta() -> dict:
    return flax_msgpack.load(VELO_DIR / "params")["params"]


def write_theta(path: Path, theta: dict) -> Path:
    path.write_bytes(flax_msgpack.encode(theta))
    return path


# --------------------------------------------------------------------------------------- bad input


def test_empty_file(tmp_path):
    src = tmp_path / "theta.state"
    src.write_bytes(b"")
    out = tmp_path / "o" / "x.safetensors"
    assert_bad_input(run("celo", "--source", src, "-o", out), src, "file is empty", out)


def test_truncated_file(tmp_path):
    src = tmp_path / "params"
    src.write_bytes((VELO_DIR / "params").read_bytes()[:3000])
    shutil.copy(VELO_DIR / "config.gin", tmp_path / "config.gin")
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("auto", "--source", src, "-o", out), src, "truncated", out)


def test_not_msgpack(tmp_path):
    src = tmp_path / "theta.state"
    src.write_text("this is a README, not a checkpoint\n")
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("auto", "--source", src, "-o", out), src, "not a flax msgpack file", out)


def test_wrong_tree_velo_given_as_celo(tmp_path):
    out = tmp_path / "x.safetensors"
    line = assert_bad_input(run("celo", "--source", VELO_NC, "-o", out), VELO_NC, "not a celo theta", out)
    assert "wrong shape" in line or "missing" in line


@needs_shared
def test_wrong_tree_celo_given_as_velo(tmp_path):
    src = SHARED / "celo" / "theta.state"
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("velo", "--source", src, "-o", out), src, "not a VeLO", out)


def test_shape_contradicts_config_gin(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(VELO_DIR, folder)
    gin = folder / "config.gin"
    gin.write_text(gin.read_text().replace("HyperV2.lstm_hidden_size = 8", "HyperV2.lstm_hidden_size = 16"))
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("velo", "--source", folder, "-o", out), folder / "params", "lstm_hidden_size", out)


@pytest.mark.parametrize("bad", [np.arange(8, dtype=np.int32), "a string"])
def test_integer_or_string_leaf(tmp_path, bad):
    theta = velo_theta()
    theta["rnn_params"]["step_size"]["b"] = bad
    src = write_theta(tmp_path / "theta.state", theta)
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("auto", "--source", src, "-o", out, *SMALL_SETS), src, "step_size/b", out)


def test_nonfinite_refused_unless_allowed(tmp_path):
    theta = velo_theta()
    theta["rnn_params"]["step_size"]["w"][0, 0] = np.nan
    theta["rnn_params"]["step_size"]["w"][1, 0] = np.inf
    src = write_theta(tmp_path / "theta.state", theta)
    out = tmp_path / "x.safetensors"
    line = assert_bad_input(run("auto", "--source", src, "-o", out, *SMALL_SETS), src, "NaN/Inf", out)
    assert "2 of" in line and "--allow-nonfinite" in line
    ok = run("auto", "--source", src, "-o", out, *SMALL_SETS, "--allow-nonfinite")
    assert ok.exit_code == 0, ok.output
    assert run("verify", out).exit_code == 0  # NaN bits are compared as bits


def test_missing_config_gin(tmp_path):
    src = tmp_path / "params"
    shutil.copy(VELO_DIR / "params", src)
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("velo", "--source", src, "-o", out), tmp_path / "config.gin", "missing", out)


def test_unknown_optimizer_class(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(VELO_DIR, folder)
    gin = folder / "config.gin"
    gin.write_text(gin.read_text().replace("run_train.lopt = @HyperV2()", "run_train.lopt = @FancyOpt()"))
    out = tmp_path / "x.safetensors"
    assert_bad_input(
        run("auto", "--source", folder, "-o", out), gin, "unknown learned optimizer class 'FancyOpt'", out
    )


def test_declared_array_larger_than_file(tmp_path):
    arr = msgpack.packb(((1000, 1000), "float32", b"\0" * 64), use_bin_type=True)
    src = tmp_path / "theta.state"
    src.write_bytes(msgpack.packb({"rnn_params": {"w": msgpack.ExtType(1, arr)}}))
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("auto", "--source", src, "-o", out), src, r"rnn_params/w.*larger than its data", out)


def test_pickle_needs_flag(tmp_path):
    src = tmp_path / "theta.pkl"
    src.write_bytes(pickle.dumps(velo_theta(), protocol=4))
    out = tmp_path / "x.safetensors"
    assert_bad_input(run("velo", "--source", src, "-o", out), src, "pickle.*--allow-pickle", out)
    ok = run("velo", "--source", src, "-o", out, "--allow-pickle", *SMALL_SETS[2:])
    assert ok.exit_code == 0, ok.output
    assert run("verify", out, "--allow-pickle").exit_code == 0
    assert json.loads(run("inspect", out, "--json").stdout)["provenance"]["source_format"] == "pickle"


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    assert_bad_input(run("velo", "--source", VELO_DIR, "-o", out), out, "already exists.*--force")
    assert out.read_bytes() == b"keep me"
    assert run("velo", "--source", VELO_DIR, "-o", out, "--force").exit_code == 0


def test_no_config_needs_an_architecture(tmp_path):
    out = tmp_path / "x.safetensors"
    assert_bad_input(
        run("auto", "--source", VELO_NC, "-o", out), VELO_NC, "no_config checkpoint carries no config", out
    )


def test_bad_set_and_usage(tmp_path):
    out = tmp_path / "x.safetensors"
    r = run("velo", "--source", VELO_DIR, "-o", out, "--set", "lstm_hidden_size")
    assert_bad_input(r, "--set", "not key=value", out)
    r = run("velo", "--source", VELO_DIR, "-o", out, "--set", "param_inits=2 3")
    assert_bad_input(r, "--set param_inits", "unexpected '3' after the value", out)
    r = run("velo", "--source", VELO_DIR, "-o", out, "--set", "use_bugged_loss_features=maybe")
    assert_bad_input(r, "--set use_bugged_loss_features", "quote strings", out)
    r = run("velo", "--source", VELO_DIR, "-o", out, "--set", "no_such_argument=1")
    assert_bad_input(r, VELO_DIR / "params", "no_such_argument", out)
    assert run("auto", "-o", out).exit_code == 2  # --source is required
    assert run("pylo", "-o", out).exit_code == 2  # --source is required
    assert run("mlp-lopt").exit_code == 2  # nothing published: --source required
    assert_bad_input(run("mlp-nom-lopt"), "mlp-nom-lopt", "not supported: No lopt-bridge runtime")
    # Any entry listed as not supported refuses with its note, as one line.
    from lopt_bridge.converter.commands import _registry_command

    entry = registry.Entry("x-lopt", "X", "velo", "theta_state", ("hf://o/r/theta.state",), "MIT",
                           supported=False, note="no runtime for this architecture yet")  # fmt: skip
    r = CliRunner().invoke(_registry_command(entry), [])
    assert r.exit_code == 2 and "x-lopt: not supported: no runtime" in r.stderr, r.output


def test_conflicting_architectures(tmp_path):
    out = tmp_path / "x.safetensors"
    r = run("celo", "--source", VELO_DIR, "-o", out)
    line = assert_bad_input(r, VELO_DIR / "params", "conflicting architectures", out)
    assert "the command says celo" in line and "config.gin says velo" in line


# --------------------------------------------------------------------------------------- conversions


def test_velo_folder_convert_inspect_verify(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("velo", "--source", VELO_DIR)
    assert r.exit_code == 0, r.output
    out = tmp_path / "checkpoints" / "velo.safetensors"  # the default output
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["architecture"] == "velo"
    assert info["config"]["lstm_hidden_size"] == 8 and info["config"]["param_inits"] == 2
    assert info["config"]["use_bugged_loss_features"] is False
    prov = info["provenance"]
    assert prov["source_format"] == "lo_params_gin"
    assert prov["source_sha256"] == hashlib.sha256((VELO_DIR / "params").read_bytes()).hexdigest()
    assert all(t["source_path"].startswith("params/") for t in info["tensors"])
    assert info["num_parameters"] == 1649  # every theta value, nothing derived
    theta = flax_msgpack.flatten_tree(velo_theta())
    assert {tuple(t["source_path"].split("/")[1:]) for t in info["tensors"]} <= {
        tuple("/".join(k).split("/")) for k in theta
    }
    text = run("inspect", out).stdout
    assert "architecture:" in text and "lstm_hidden_size = 8" in text
    v = run("verify", out, "--source", VELO_DIR)
    assert v.exit_code == 0 and "bit for bit" in v.stdout


def test_verify_detects_a_changed_tensor(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    out = tmp_path / "v.safetensors"
    assert run("velo", "--source", VELO_DIR, "-o", out).exit_code == 0
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = np.nextafter(tensors[name], np.float32(np.inf))  # one ulp
    save_file(tensors, str(out), metadata=meta)
    r = run("verify", out)
    assert r.exit_code == 1 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_config_with_set_and_config_file(tmp_path):
    out = tmp_path / "nc.safetensors"
    r = run("auto", "--source", VELO_NC, "-o", out, *SMALL_SETS)
    assert r.exit_code == 0, r.output
    gin = tmp_path / "small.gin"
    gin.write_text("HyperV2.use_bugged_loss_features = False\n")
    out2 = tmp_path / "nc2.safetensors"
    r = run("velo", "--source", VELO_NC, "-o", out2, "--config", gin)
    assert r.exit_code == 0, r.output
    out3 = tmp_path / "nc3.safetensors"
    r = run("auto", "--source", VELO_NC, "-o", out3, "--set", "architecture=velo", "--set",
            "HyperV2.use_bugged_loss_features=False")  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b, c = (json.loads(run("inspect", o, "--json").stdout) for o in (out, out2, out3))
    assert a["config"] == b["config"] == c["config"] and a["provenance"]["source_format"] == "lo_no_config"
    assert all(t["source_path"].startswith("0/") for t in a["tensors"])
    # the registry's no_config baselines are HyperV2(512, 256): this small theta contradicts them
    r = run("velo-nc-sep14-aug20run-prior0", "--source", VELO_NC, "-o", tmp_path / "no.safetensors")
    assert_bad_input(r, VELO_NC, "lstm_hidden_size = 512", tmp_path / "no.safetensors")


def test_no_config_with_an_operative_config_gin(tmp_path):
    out = tmp_path / "nc.safetensors"
    r = run("auto", "--source", VELO_NC, "-o", out, "--config", VELO_DIR / "config.gin")
    assert r.exit_code == 0, r.output
    cfg = json.loads(run("inspect", out, "--json").stdout)["config"]
    assert cfg["use_bugged_loss_features"] is False and cfg["lstm_hidden_size"] == 8


@needs_shared
@pytest.mark.parametrize("name, folder", [("celo", "celo"), ("celo-adam", "celo_adam")])
def test_real_celo_files_convert_and_verify(tmp_path, name, folder):
    src = SHARED / folder / "theta.state"
    entry = registry.load().get(name)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == entry.sha256
    assert src.stat().st_size == entry.size
    out = tmp_path / f"{name}.safetensors"
    r = run(name, "--source", src, "-o", out)
    assert r.exit_code == 0, r.output
    v = run("verify", out, "--source", src)
    assert v.exit_code == 0, v.output
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["architecture"] == entry.architecture
    assert info["provenance"]["source_sha256"] == entry.sha256
    assert info["num_parameters"] == sum(
        a.size for a in flax_msgpack.flatten_tree(flax_msgpack.load(src)).values()
    )
    auto = run("auto", "--source", src, "-o", tmp_path / "auto.safetensors")
    assert auto.exit_code == 0 and f"({entry.architecture}," in auto.stdout


# --------------------------------------------------------------------------------------- help, registry


def test_every_command_shows_an_example():
    assert "Example" in run("--help").stdout
    for name in main.list_commands(None):
        r = run(name, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout, name


def test_registry_entries():
    reg = registry.load()
    names = [e.name for e in reg.entries]
    for needed in ("velo", "celo", "celo-adam", "small-fc-lopt", "velo-4000", "velo-s", "rnn-mlp-lopt"):
        assert needed in names
    # Every Celo-author hub repository is a supported entry under its own name (issue #13).
    for hub in ("celo", "celo-adam", "velo-4000", "velo-s", "adafac-mlp-lopt", "rnn-mlp-lopt"):
        e = reg.get(hub)
        assert e.supported and e.source == f"hf://amoudgl/{hub}/theta.state" and e.licence.startswith("MIT")
    assert "ff_mult=1.0" in reg.get("velo-s").sets and "ff_mult=100.0" in reg.get("velo-4000").sets
    assert reg.get("adafac-mlp-lopt").architecture == reg.get("small-fc-lopt").architecture == "small_fc_lopt"
    assert reg.get("mlp-lopt").architecture == "mlp_lopt" and reg.get("mlp-lopt").source is None
    velo = reg.get("velo")
    assert velo.format == "lo_params_gin" and velo.uris[0].endswith(
        "aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620/params"
    )
    assert velo.uris[1].endswith("/config.gin")
    assert sum(e.format == "lo_no_config" for e in reg.entries) == 6
    assert "aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620" in reg.lo_names
    known = set(architectures.names())
    for e in reg.entries:
        if e.supported:
            assert e.architecture in known, f"{e.name}: no converter module for {e.architecture!r}"
        assert e.name in main.list_commands(None)


def test_registry_rejects_bad_entries(tmp_path):
    bad = tmp_path / "r.toml"
    base = 'name = "{}"\ntitle = "t"\narchitecture = "velo"\nformat = "{}"\nuris = []\nlicence = "x"\n'
    for name, fmt, extra, match in [
        ("verify", "theta_state", "", "is a lopt-convert command"),
        ("a", "zip", "", "format 'zip'"),
        ("a", "theta_state", 'sha256 = "XYZ"\n', "64 lowercase hex"),
        ("a", "theta_state", "colour = 1\n", "unknown field"),
    ]:
        bad.write_text("[[checkpoint]]\n" + base.format(name, fmt) + extra)
        with pytest.raises(ValueError, match=match):
            registry.load(bad)
