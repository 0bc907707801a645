"""Converting small_fc_lopt / MLPLOpt / muLO checkpoints made by the reference code (fixtures' files)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_bridge.converter import architectures, jax_pickle
from lopt_bridge.converter.architectures.adafac import SMALL_FC_LOPT
from lopt_bridge.converter.architectures.mlp_lopt import ARCHITECTURES as MLP_ARCHS
from lopt_bridge.converter.architectures.mulo import MULO
from lopt_bridge.converter.convert import convert_source, verify
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.pylo_runtime import load_optimizer, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "parity_tests" / "fixtures"
MULO_FIX = ROOT / "parity_tests" / "fixtures"


def test_params_and_config_gin_convert_and_load(tmp_path):
    src = FIX / "small_fc_lopt_pylo" / "checkpoint" / "params"
    out = convert_source(str(src), tmp_path / "a.safetensors")
    ckpt = read_checkpoint(out)
    assert ckpt.architecture == "small_fc_lopt"
    assert ckpt.config["hidden_size"] == 32 and ckpt.config["hidden_layers"] == 2
    assert ckpt.config["step_mult"] == 0.01 and ckpt.config["initial_rms_decays"] == [0.999]
    assert set(ckpt.config) == set(SMALL_FC_LOPT.defaults())
    assert sorted(ckpt.tensors) == sorted(
        ["momentum_decays", "rms_decays", "adafactor_decays"] + [f"nn.{k}{i}" for k in "wb" for i in range(3)]
    )
    assert ckpt.tensors["nn.w0"].shape == (39, 32) and ckpt.tensors["nn.w2"].shape == (32, 2)
    # The meta-learned decay offsets are carried as tensors (perturbed away from their zero init).
    assert ckpt.tensors["momentum_decays"].abs().max() > 0
    verify(str(out), str(src))
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = load_optimizer(str(out), [p], num_steps=10)
    assert type(opt).__name__ == "SmallFCLOpt"
    p.grad = torch.full((4, 3), 0.1)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4, 3))


def test_detect_picks_small_fc_lopt_never_mulo():
    tree = _theta_tree()
    assert architectures.detect(tree).name == "small_fc_lopt"
    assert not MULO.matches(tree)


def _theta_tree(hidden=4, layers=2, n_in=39):
    rng = np.random.default_rng(0)
    nn = {}
    sizes = [hidden] * layers + [2]
    for i, out in enumerate(sizes):
        nn[f"w{i}"] = rng.standard_normal((n_in, out)).astype(np.float32)
        nn[f"b{i}"] = np.zeros(out, np.float32)
        n_in = out
    return {
        "momentum_decays": np.full(3, 0.1, np.float32),
        "rms_decays": np.full(1, 0.1, np.float32),
        "adafactor_decays": np.full(3, 0.1, np.float32),
        "nn": {"~": nn},
    }


def test_sizes_inferred_and_checked_against_bindings():
    spec = SMALL_FC_LOPT.build(_theta_tree(hidden=8, layers=3), {}, source="t")
    assert spec.config["hidden_size"] == 8 and spec.config["hidden_layers"] == 3
    assert spec.source_paths["nn.w1"]["path"] == "nn/~/w1"
    with pytest.raises(ConversionError, match="hidden_size=4 but theta's MLP has 8"):
        SMALL_FC_LOPT.build(_theta_tree(hidden=8), {"hidden_size": 4}, source="t")
    with pytest.raises(ConversionError, match="adafactor_decays has 3 decays"):
        SMALL_FC_LOPT.build(_theta_tree(), {"initial_adafactor_decays": (0.9,)}, source="t")
    with pytest.raises(ConversionError, match="wrong shape nn/~/w0"):
        SMALL_FC_LOPT.build(_theta_tree(n_in=30), {}, source="t")
    with pytest.raises(ConversionError, match="unknown constructor argument"):
        SMALL_FC_LOPT.build(_theta_tree(), {"lstm_hidden_size": 4}, source="t")
    bad = _theta_tree()
    bad["nn"]["~"]["b0"] = bad["nn"]["~"]["b0"].astype(np.float64)
    with pytest.raises(ConversionError, match="dtype float64"):
        SMALL_FC_LOPT.build(bad, {}, source="t")


def test_no_config_separate_scalar_weights(tmp_path):
    fx = FIX / "small_fc_lopt_separate"
    src = next((fx / "checkpoint").glob("*.checkpoint"))
    sets = [
        "architecture=small_fc_lopt",
        "concat_weights=False",
        "make_separate_weights=True",
        "step_mult=0.1",
    ]
    out = convert_source(str(src), tmp_path / "s.safetensors", sets=sets)
    ckpt = read_checkpoint(out)
    assert ckpt.config["hidden_size"] == 3 and ckpt.config["make_separate_weights"] is True
    # 0-d leaves: the values are carried (the writer currently stores them with shape (1,); the runtime
    # accepts either).
    assert ckpt.tensors["nn.w0_38_2"].numel() == 1 and "nn.b2_1" in ckpt.tensors
    assert len(ckpt.tensors) == 3 + 39 * 3 + 3 * 3 + 3 * 2 + 3 + 3 + 2


def test_mlp_lopt_converts():
    arch = MLP_ARCHS[0]
    rng = np.random.default_rng(0)
    tree = {
        "mlp/~/linear_0": {
            "w": rng.standard_normal((19, 16)).astype(np.float32),
            "b": np.zeros(16, np.float32),
        },
        "mlp/~/linear_1": {
            "w": rng.standard_normal((16, 2)).astype(np.float32),
            "b": np.zeros(2, np.float32),
        },
    }
    assert architectures.detect(tree).name == "mlp_lopt"
    spec = arch.build(tree, {}, source="t")
    assert spec.config["hidden_size"] == 16 and spec.config["hidden_layers"] == 1
    assert sorted(spec.tensors) == ["linear_0.b", "linear_0.w", "linear_1.b", "linear_1.w"]
    assert spec.source_paths["linear_1.w"]["path"] == "mlp/~/linear_1/w"
    with pytest.raises(ConversionError, match="hidden_layers=2 but theta's MLP has 1"):
        arch.build(tree, {"hidden_layers": 2}, source="t")


def test_mlp_lopt_fixture_checkpoint(tmp_path):
    src = FIX / "mlp_lopt_default" / "checkpoint" / "params"
    ckpt = read_checkpoint(convert_source(str(src), tmp_path / "m.safetensors"))
    assert ckpt.architecture == "mlp_lopt" and ckpt.tensors["linear_0.w"].shape == (19, 32)


@pytest.mark.parametrize("case", ["mulo_pylo", "mulo_clip"])
def test_mulo_pickle_reads_without_jax(case):
    src = next((MULO_FIX / case / "checkpoint").glob("*.pickle"))
    tree = jax_pickle.loads(src.read_bytes())
    assert isinstance(tree["nn"]["~"]["w0"], np.ndarray)
    spec = MULO.build(tree, {"step_mult": 0.01, "clip_grad": case == "mulo_clip"}, source=str(src))
    assert spec.name == "mulo" and spec.config["hidden_size"] == 32
    assert spec.config["clip_grad"] is (case == "mulo_clip") and spec.config["mup_lrs"] is None


def test_jax_pickle_refuses_other_globals():
    with pytest.raises(jax_pickle.UnsupportedPickle, match="system"):
        jax_pickle.loads(pickle.dumps(os.system))
    data = pickle.dumps({"a": np.arange(3, dtype=np.float32)})
    assert np.array_equal(jax_pickle.loads(data)["a"], np.arange(3, dtype=np.float32))


def test_celo_repo_theta_state_is_small_fc_lopt(tmp_path):
    # amoudgl/celo's AdafacMLPLOpt (the adafac-mlp-lopt Hugging Face format): same class, same tree; made by
    # celo's code (tests/data/adafac/celo_adafac_theta.provenance.json), detected without any --set.
    src = ROOT / "tests" / "data" / "adafac" / "celo_adafac_theta.state"
    out = convert_source(str(src), tmp_path / "c.safetensors")
    ckpt = read_checkpoint(out)
    assert ckpt.architecture == "small_fc_lopt" and ckpt.metadata["source_format"] == "theta_state"
    assert ckpt.config == SMALL_FC_LOPT.defaults()
    assert ckpt.tensors["nn.w0"].shape == (39, 4) and ckpt.tensors["rms_decays"].abs().max() > 0
    verify(str(out), str(src))
