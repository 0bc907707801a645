"""PyLO's Celo2 format (``DiamondXL/celo2``: CELO2MLP) through converter/pylo_maps/celo2.py, both ways.

tests/data/pylo/celo2 holds a CELO2MLP written by PyLO's own ``save_pretrained`` (random weights, PyLO
d05c6c1) and PyLO's CELO2_naive recorded on the synthetic task (tests/data/pylo/make.py). Converted with our
map, our runtime must reproduce PyLO's recorded updates within 1e-5 on every tensor where PyLO is faithful
to celo's reference: all but ``b_vec``, which PyLO sends to its own AdamW (bias-corrected, eps outside the
root) instead of celo's Adam branch (``m * rsqrt(v + eps)``): 1.1e-3 apart even with our
``adam_bias_correction=True`` (tests/data/pylo/celo2/agreement.json, measured against the JAX reference).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_bridge.converter import writer
from lopt_bridge.converter.convert import load_source
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.converter.pylo_maps import PyloFile
from lopt_bridge.converter.pylo_maps.celo2 import EMBED_KEY, MAPS, safetensors_bytes
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture, repo_root
from lopt_bridge.parity_tests.replay import replay
from lopt_bridge.pylo_runtime import Celo2
from lopt_bridge.pylo_runtime.checkpoint import read_checkpoint

PYLO = repo_root() / "tests" / "data" / "pylo" / "celo2"
MAP = MAPS[0]
#: Tensors where PyLO is not the reference (module docstring), and why.
NOT_FAITHFUL = {"b_vec": "PyLO's own AdamW for 1-D tensors, not celo's Adam branch"}


def read_pylo(folder: Path) -> PyloFile:
    """A PyLO folder as the map takes it (what converter/pylo_format.py reads from a hub repo)."""
    from safetensors.numpy import load_file

    raw = (folder / "model.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    return PyloFile(
        str(folder), load_file(folder / "model.safetensors"), config, hashlib.sha256(raw).hexdigest()
    )


def write_ours(spec, out: Path, source: PyloFile) -> Path:
    return writer.write(spec, out, writer.Provenance(source.name, source.sha256, "pylo"), force=True)


def test_map_reads_pylos_file_with_every_key_and_shape():
    f = read_pylo(PYLO / "model")
    assert (
        MAP.architecture == "celo2"
        and MAP.repos == ("DiamondXL/celo2",)
        and MAP.model_classes == ("CELO2MLP",)
    )
    assert MAP.matches([f]) and not MAP.matches([f, f])
    spec = MAP.to_ours([f], "test")
    assert len(spec.tensors) == len(f.tensors) == 19
    for name, arr in spec.tensors.items():
        key = spec.source_paths[name]["path"]
        assert spec.source_paths[name]["transform"] is None and spec.source_paths[name]["keys"] == [key]
        assert arr.tobytes() == f.tensors[key].tobytes() and arr.shape == f.tensors[key].shape
    assert (
        spec.source_paths["ff.w2"]["path"] == "dense_w.1" and spec.source_paths["ff.w0.13"]["path"] == "w0.13"
    )
    # No config of ours in the file: celo's get_optimizer("celo2") with the file's sizes and activation.
    assert (
        spec.config["regex_1d"] == "/b$" and spec.config["adam_b2"] == 0.95 and spec.config["mult_1d"] == 20.0
    )
    assert (spec.config["ff_hidden_size"], spec.config["ff_hidden_layers"]) == (8, 2)


def _factory(fx, params, ckpt):
    """Our Celo2 told PyLO's run's arguments: lr = step_mult, adam_lr_mult = mult_1d, betas (0.9, 0.95)."""
    ck = read_checkpoint(str(ckpt))
    kw = fx.meta["options"]["pylo_kwargs"]
    config = {**ck.config, "step_mult": kw["lr"], "mult_1d": kw["adam_lr_mult"], "adam_bias_correction": True}
    routing = fx.meta["options"]["routing"]
    groups = [{"params": [p], "celo2_branch": routing[n]} for n, p in zip(fx.names, params, strict=True)]
    return Celo2(groups, ck.tensors, config, num_steps=int(fx.meta["num_steps"]))


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
def test_ours_reproduces_pylos_recorded_updates(tmp_path, foreach):
    f = read_pylo(PYLO / "model")
    ckpt = write_ours(MAP.to_ours([f], "test"), tmp_path / "celo2.safetensors", f)
    fx = load_fixture(PYLO)

    def factory(fx, params, ckpt):
        opt = _factory(fx, params, ckpt)
        for g in opt.param_groups:
            g["foreach"] = foreach
        return opt

    errors, _ = replay(fx, ckpt, factory=factory)
    per_tensor = dict(zip(fx.names, errors.max(axis=0), strict=True))
    for name, err in per_tensor.items():
        if name in NOT_FAITHFUL:
            assert err > FLOAT32_TOLERANCE, (name, err)  # the known difference is real, not a no-op replay
        else:
            assert err <= FLOAT32_TOLERANCE, (name, err)
    assert set(per_tensor) - set(NOT_FAITHFUL) == {"c_mat", "d_wide", "e_conv", "f_mat", "i_col"}


def test_to_pylo_writes_pylos_own_bytes():
    f = read_pylo(PYLO / "model")
    spec = MAP.to_ours([f], "test")
    (back,) = MAP.to_pylo("celo2", spec.config, spec.tensors)
    assert safetensors_bytes(back.tensors) == (PYLO / "model" / "model.safetensors").read_bytes()
    assert back.sha256 == f.sha256 and back.name == "celo2"  # the folder export-pylo writes
    assert {k: v for k, v in back.config.items() if k != EMBED_KEY} == f.config
    assert back.config[EMBED_KEY] == {"architecture": "celo2", "config": spec.config}


@pytest.mark.parametrize("case", ["celo2_random", "celo2base_random", "celo2_ablate"])
def test_round_trip_theta_state_ours_pylo_ours_is_exact(case):
    """celo's theta.state -> ours -> PyLO -> ours: the same tensors bit for bit and the same config (PyLO
    cannot run celo2_ablate's raw inputs / outputs: refused, naming them)."""
    fx = load_fixture(repo_root() / "parity_tests" / "fixtures" / case)
    ours, _ = load_source(str(fx.source_path()), architecture="celo2", sets=fx.meta["convert_sets"])
    if case == "celo2_ablate":
        with pytest.raises(
            ConversionError, match=r"cannot run this config: with_rms=False .*normalize_input"
        ):
            MAP.to_pylo("celo2", ours.config, ours.tensors)
        return
    files = MAP.to_pylo("celo2", ours.config, ours.tensors)
    again = MAP.to_ours(files, "round trip")
    assert again.config == ours.config
    assert set(again.tensors) == set(ours.tensors)
    for k, v in ours.tensors.items():
        assert again.tensors[k].dtype == v.dtype and again.tensors[k].tobytes() == v.tobytes(), k


def _file(tensors=None, config=None) -> PyloFile:
    f = read_pylo(PYLO / "model")
    t = dict(f.tensors) if tensors is None else tensors
    return PyloFile("x", t, dict(f.config) if config is None else config, "0" * 64)


def test_map_refuses_what_is_not_celo2mlp():
    base = read_pylo(PYLO / "model")
    cases = [
        (
            _file({**base.tensors, "extra": np.zeros(2, np.float32)}),
            "not a CELO2MLP state dict: unexpected extra",
        ),
        (_file({k: v for k, v in base.tensors.items() if k != "dense_b.1"}), "missing dense_b.1"),
        (_file({**base.tensors, "w0.3": np.zeros((3, 5), np.float32)}), r"w0.3 has shape \(3, 5\)"),
        (_file({**base.tensors, "dense_w.1": np.zeros((8, 4), np.float32)}), "3 outputs: Celo2's"),
        (_file({**base.tensors, "b0": base.tensors["b0"].astype(np.float64)}), "b0: dtype float64"),
        (_file(config={**base.config, "hidden_size": 16}), "config.json says hidden_size=16"),
        (_file(config={**base.config, "activation": "gelu"}), "activation 'gelu' is not relu or tanh"),
        (_file(config={**base.config, EMBED_KEY: {"architecture": "velo"}}), "is not a celo2 config"),
        (
            _file(
                config={**base.config, EMBED_KEY: {"architecture": "celo2", "config": {"ff_hidden_size": 4}}}
            ),
            "disagrees with the weights",
        ),
        (
            _file(
                config={**base.config, EMBED_KEY: {"architecture": "celo2", "config": {"ns_iters": 10**9}}}
            ),
            "option ns_iters must be an int",
        ),
    ]
    for f, pattern in cases:
        with pytest.raises(ConversionError, match=pattern):
            MAP.to_ours([f], "t")
    # Fewer first-layer weights: another decay count than CELO2_naive's defaults, which the file cannot say.
    few = {k: v for k, v in base.tensors.items() if k not in {f"w0.{i}" for i in range(9, 14)}}
    with pytest.raises(ConversionError, match="do not describe CELO2_naive's inputs"):
        MAP.to_ours([_file(few, {k: v for k, v in base.config.items() if k != "feature_dims"})], "t")
    with pytest.raises(ConversionError, match="cannot write a 'velo'"):
        MAP.to_pylo("velo", {}, {})


def test_a_pylo_converted_file_runs_in_our_runtime(tmp_path):
    f = read_pylo(PYLO / "model")
    path = write_ours(MAP.to_ours([f], "test"), tmp_path / "c.safetensors", f)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = Celo2.from_checkpoint(str(path), model.named_parameters(), num_steps=10)
    assert opt.routing() == {"0.weight": "learned", "0.bias": "adam"}  # "/b$" on PyTorch names: biases
    model(torch.randn(2, 4)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
