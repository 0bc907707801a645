"""Celo2 / Celo2Base conversion: celo's theta.state -> the ``celo2`` architecture (lopt-convert celo2, auto).

theta.state carries no config: the MLP sizes come from the shapes, the rest from the class defaults or the
registry entry's ``sets`` (``celo2``: celo.factory's absl defaults; ``celo2-base``: no Adam branch, no
Newton-Schulz). The fixtures' checkpoints were written by celo's own code (parity_tests/recorders/celo2.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from lopt_bridge.converter import architectures
from lopt_bridge.converter.architectures.celo2 import CELO2
from lopt_bridge.converter.commands import main
from lopt_bridge.converter.convert import convert_source, verify
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.converter.flax_msgpack import load
from lopt_bridge.parity_tests.fixture import repo_root
from lopt_bridge.pylo_runtime import Celo2, read_checkpoint, specs

FIXTURES = repo_root() / "parity_tests" / "fixtures"
SRC = FIXTURES / "celo2_random" / "checkpoint" / "random_theta.state"  # factory Celo2 (3/1/3 decays)
OPTIONS_SRC = FIXTURES / "celo2_options" / "checkpoint" / "random_theta.state"  # 6 wide, 3 layers, 2/2/2
ABLATE_SRC = FIXTURES / "celo2_ablate" / "checkpoint" / "random_theta.state"  # 9 input groups


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_auto_detects_celo2_and_nothing_else_claims_it(tmp_path):
    tree = load(SRC)
    assert architectures.detect(tree, source="t").name == "celo2"
    for other in ("celo_random", "celo_adam_random", "velo_default", "small_fc_lopt_default"):
        src = next((FIXTURES / other / "checkpoint").iterdir())
        if src.suffix in (".state", "") and src.name != "config.gin":
            assert not CELO2.matches(load(src)), other
    r = run("auto", "--source", SRC, "-o", tmp_path / "a.safetensors")
    assert r.exit_code == 0 and "(celo2, 19 tensors, 347 values)" in r.output, r.output
    # auto knows no factory: the class defaults (its regex matches PyTorch names as they are).
    assert read_checkpoint(tmp_path / "a.safetensors").config == CELO2.defaults()


def test_registry_subcommands_bind_the_factory_configurations(tmp_path, monkeypatch):
    r = run("celo2", "--source", SRC, "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    cfg = read_checkpoint(tmp_path / "c.safetensors").config
    assert cfg == {**specs.celo2.DEFAULTS, **specs.celo2.FACTORY_CELO2}
    assert cfg["regex_1d"] == "/b$" and cfg["adam_b2"] == 0.95 and cfg["orthogonalize"] is True
    r = run("celo2-base", "--source", SRC, "-o", tmp_path / "b.safetensors", "--set", "step_mult=0.005")
    assert r.exit_code == 0, r.output
    cfg = read_checkpoint(tmp_path / "b.safetensors").config
    assert cfg["regex_1d"] == "" and cfg["orthogonalize"] is False and cfg["step_mult"] == 0.005
    assert verify(tmp_path / "b.safetensors", str(SRC))["tensors"] == 19
    # Nothing published by celo: the subcommand asks for --source, on one line.
    r = run("celo2", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "no published file; give --source PATH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # celo2-pylo downloads hf://DiamondXL/celo2 (tests/test_pylo_format.py serves it on loopback);
    # offline it says so on one line and exits 1 (not the input's fault).
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "ours"))
    r = run("celo2-pylo", "-o", tmp_path / "y.safetensors")
    assert r.exit_code == 1 and "hf://DiamondXL/celo2" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "y.safetensors").exists()


def test_sizes_come_from_the_shapes_and_disagreements_name_both(tmp_path):
    tree = load(OPTIONS_SRC)
    decays = {
        "initial_momentum_decays": [0.5, 0.95],
        "initial_rms_decays": [0.9, 0.999],
        "initial_adafactor_decays": [0.8, 0.99],
    }
    spec = CELO2.build(tree, decays, source="t")
    assert (spec.config["ff_hidden_size"], spec.config["ff_hidden_layers"]) == (6, 3)
    assert spec.source_paths["ff.w3"]["path"] == "ff_mod_stack/~/w3" and spec.tensors["ff.w3"].shape == (6, 3)
    with pytest.raises(
        ConversionError, match=r"^t: celo2: config says ff_hidden_size=8 but theta's MLP has 6$"
    ):
        CELO2.build(tree, {**decays, "ff_hidden_size": 8}, source="t")
    # The decay counts set the first layer's widths: without them the table names the group that differs.
    with pytest.raises(
        ConversionError, match=r"not a celo2 theta for this config: wrong shape .*w0__3 \(2, 6\)"
    ):
        CELO2.build(tree, {}, source="t")
    # Ablation flags renumber w0__i: 9 groups, checked against the flags the fixture was recorded with.
    abl = load(ABLATE_SRC)
    flags = {
        "with_grad_clip_feat": False,
        "with_rms": False,
        "with_fac_rms": False,
        "with_fac_mom_mult": False,
    }
    assert len([k for k in CELO2.build(abl, flags, source="t").tensors if k.startswith("ff.w0.")]) == 9
    with pytest.raises(ConversionError, match="unexpected ff_mod_stack/~/w0__9|missing ff_mod_stack/~/w0__1"):
        CELO2.build(abl, {}, source="t")


def test_spec_table_names_groups_and_bounds():
    cfg = specs.celo2.validate({})
    table = specs.celo2.tensor_table(cfg)
    assert list(table)[:3] == ["ff.w0.0", "ff.w0.1", "ff.w0.2"] and len(table) == 19
    assert specs.celo2.ff_input_widths(cfg) == [
        1,
        1,
        1,
        3,
        1,
        3,
        1,
        3,
        1,
        3,
        3,
        3,
        3,
        3,
    ]  # PyLO's feature_dims
    assert "fac_mom_mult" in table["ff.w0.13"].note
    zero = specs.celo2.tensor_table(specs.celo2.validate({"ff_hidden_layers": 0}))
    assert zero["ff.w0.0"].shape == (1, 3) and zero["ff.b0"].shape == (3,) and "ff.w1" not in zero
    assert (
        specs.celo2.validate({"regex_1d": None})["regex_1d"] == ""
    )  # falsy: no Adam branch, as the reference
    assert specs.celo2.torch_name_regex("/b$") == r"(^|\.)bias$"
    assert specs.celo2.torch_name_regex(".*bias.*|.*embed.*") == ".*bias.*|.*embed.*"
    assert re.search(specs.celo2.torch_name_regex("/b$"), "layers.0.bias")
    assert not re.search(specs.celo2.torch_name_regex("/b$"), "layers.0.bias_scale")


def test_converted_file_loads_and_steps(tmp_path):
    out = convert_source(str(SRC), tmp_path / "c.safetensors", architecture="celo2")
    import torch

    model = torch.nn.Linear(3, 2)
    opt = Celo2.from_checkpoint(str(out), model.named_parameters(), num_steps=10)
    model(torch.randn(4, 3)).square().sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight) and np.isfinite(model.weight.detach().numpy()).all()
