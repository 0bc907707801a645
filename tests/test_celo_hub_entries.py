"""The registry subcommands added for issue #13: velo-s, velo-4000 (ff_mult), rnn-mlp-lopt, adafac-mlp-lopt,
mlp-lopt; ``auto`` on a known hub file takes its entry's bindings; files written before ``ff_mult`` existed.

The hub files cannot be downloaded here: each subcommand converts the parity fixture recorded with the same
reference configuration (--source), and the converted file replays that fixture within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from http_support import fake_hub, serve

from lopt_bridge.converter import sources, writer
from lopt_bridge.converter.commands import main
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture
from lopt_bridge.parity_tests.replay import replay
from lopt_bridge.pylo_runtime import load_optimizer

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "parity_tests" / "fixtures"


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def convert_and_replay(command: str, case: str, tmp_path: Path, *sets: str) -> dict:
    """``lopt-convert COMMAND --source <the case's checkpoint> --set ...``; replays the case; returns the
    file's config."""
    fx = load_fixture(FIX / case)
    out = tmp_path / f"{case}.safetensors"
    args = [command, "--source", fx.source_path(), "-o", out]
    for s in sets:
        args += ["--set", s]
    r = run(*args)
    assert r.exit_code == 0, r.output
    errors, _ = replay(fx, out)
    assert errors.max() <= FLOAT32_TOLERANCE, float(errors.max())
    return writer.read(out).config


def test_velo_s(tmp_path):
    # The fixture's only departure from get_optimizer('velo_s') is a larger step_mult (random weights).
    cfg = convert_and_replay("velo-s", "velo_s_random", tmp_path, "step_mult=0.03")
    assert cfg["ff_mult"] == 1.0 and (cfg["lstm_hidden_size"], cfg["param_inits"]) == (64, 32)
    assert cfg["use_bugged_loss_features"] is False and cfg["use_bugged_next_lstm_state"] is False


def test_velo_4000(tmp_path):
    sets = ("lstm_hidden_size=32", "param_inits=8", "step_mult=0.003")  # the fixture's shrunken sizes
    cfg = convert_and_replay("velo-4000", "velo_4000_small", tmp_path, *sets)
    assert cfg["ff_mult"] == 100.0 and cfg["use_bugged_loss_features"] is False


def test_rnn_mlp_lopt(tmp_path):
    cfg = convert_and_replay("rnn-mlp-lopt", "rnn_mlp_lopt_celo", tmp_path, "step_multiplier=0.01")
    assert cfg["corrected_mean_eps"] == 1e-7 and cfg["decays"] == [0.5, 0.9, 0.99, 0.999, 0.9999]


def test_mlp_lopt_from_a_file(tmp_path):
    cfg = convert_and_replay("mlp-lopt", "mlp_lopt_default", tmp_path)
    assert cfg["hidden_size"] == 32
    r = run("mlp-lopt", "--source", FIX / "velo_default" / "checkpoint" / "params", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "conflicting architectures" in r.stderr  # its config.gin says HyperV2


def test_adafac_mlp_lopt_is_small_fc_lopt(tmp_path):
    src = ROOT / "tests" / "data" / "adafac" / "celo_adafac_theta.state"
    files = {}
    for name in ("adafac-mlp-lopt", "small-fc-lopt"):
        out = tmp_path / f"{name}.safetensors"
        assert run(name, "--source", src, "-o", out).exit_code == 0
        files[name] = writer.read(out)
    a, b = files.values()
    assert a.architecture == b.architecture == "small_fc_lopt" and a.config == b.config
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in b.tensors)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hugging Face hub serving the VeLO-S and RNNMLPLOpt fixtures' theta.state as the hub files."""
    import huggingface_hub.constants as hf_constants

    files = {
        ("amoudgl/velo-s", "theta.state"): FIX / "velo_s_random" / "checkpoint" / "random_theta.state",
        ("amoudgl/rnn-mlp-lopt", "theta.state"): FIX
        / "rnn_mlp_lopt_celo"
        / "checkpoint"
        / "random_theta.state",
    }
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with serve(fake_hub({k: v.read_bytes() for k, v in files.items()})) as url:
        monkeypatch.setattr(sources, "HF_ENDPOINT", url)
        yield url


def test_auto_on_a_known_hub_file_converts_as_its_subcommand(hub, tmp_path):
    for entry, uri in (("velo-s", "hf://amoudgl/velo-s/theta.state"),
                       ("rnn-mlp-lopt", "hf://amoudgl/rnn-mlp-lopt/theta.state")):  # fmt: skip
        a, b = tmp_path / f"{entry}-auto.safetensors", tmp_path / f"{entry}.safetensors"
        assert run("auto", "--source", uri, "-o", a).exit_code == 0
        assert run(entry, "-o", b).exit_code == 0
        fa, fb = writer.read(a), writer.read(b)
        assert fa.config == fb.config and fa.metadata["source_uri"] == uri
    assert writer.read(tmp_path / "velo-s-auto.safetensors").config["ff_mult"] == 1.0
    assert writer.read(tmp_path / "rnn-mlp-lopt-auto.safetensors").config["corrected_mean_eps"] == 1e-7


def test_a_file_written_before_ff_mult_existed_loads_and_verifies(tmp_path):
    """Files converted before ff_mult was an option carry no ff_mult: they mean learned_optimization's 100."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    src = ROOT / "tests" / "data" / "lo" / "velo_small" / "params"
    new = tmp_path / "new.safetensors"
    assert run("auto", "--source", src, "-o", new).exit_code == 0
    with safe_open(str(new), "np") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    del config["ff_mult"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(new)), str(old), metadata={**meta, "config": json.dumps(config)})
    import torch

    opt = load_optimizer(str(old), [torch.zeros(3, requires_grad=True)], num_steps=5)
    assert opt.cfg.ff_mult == 100.0
    r = run("verify", old, "--source", src)
    assert r.exit_code == 0, r.output
