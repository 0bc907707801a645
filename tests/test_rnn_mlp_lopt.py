"""RNNMLPLOpt: the dynamic gradient clip, validation losses (``corrected_mean_eps``: learned_optimization's
1e-8, amoudgl/celo's 1e-7), the 5-decay rule, and conversion of both codes' checkpoints.

tests/data/rnn_mlp_lopt/{lo,celo}.npz are both reference codes recorded (make.py there) through validation
updates and two gradient spikes the clip cuts, which the parity fixtures (training updates on a task that
never clips) do not reach.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_support import spec_theta

from lopt_bridge.converter import architectures, flax_msgpack
from lopt_bridge.converter.convert import convert_source
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE, update_error
from lopt_bridge.pylo_runtime import load_optimizer, read_checkpoint, specs
from lopt_bridge.pylo_runtime.rnn_mlp_lopt import RNNMLPLOpt, clip_amount, corrected_mean

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "rnn_mlp_lopt"
FIX = ROOT / "parity_tests" / "fixtures"
CELO_THETA = FIX / "rnn_mlp_lopt_celo" / "checkpoint" / "random_theta.state"
LO_PARAMS = FIX / "rnn_mlp_lopt_lo" / "checkpoint" / "params"
NAMES = ("a_scalar", "b_vec", "c_mat", "d_conv")
EPS = {"lo": 1e-8, "celo": 1e-7}


# ----------------------------------------------------------------------------------------------------
# Both reference codes through validation updates and gradient spikes.
def _replay(code: str, eps: float, foreach: bool, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reset-mode update errors per update (0 for validation updates) and our clip amounts."""
    z = np.load(DATA / f"{code}.npz")
    sets = {"step_multiplier": 0.01, "corrected_mean_eps": eps}
    ckpt = convert_source(str(CELO_THETA), tmp_path / f"{code}.safetensors", architecture="rnn_mlp_lopt",
                          sets=sets, force=True)  # fmt: skip
    params = [torch.tensor(z[f"params.{k}"][0]) for k in NAMES]
    opt = load_optimizer(str(ckpt), params, num_steps=100, foreach=foreach)
    errors, amounts = np.zeros(len(z["loss"])), np.zeros(len(z["loss"]), np.float32)
    for t, valid in enumerate(z["is_valid"]):
        with torch.no_grad():
            for p, k in zip(params, NAMES, strict=True):
                p.copy_(torch.tensor(z[f"params.{k}"][t]))
        amounts[t] = float(clip_amount(opt.state["global"]["clip"])) if "global" in opt.state else 10.0
        if valid:
            opt.record_validation_loss(float(z["loss"][t]))
        else:
            for p, k in zip(params, NAMES, strict=True):
                p.grad = torch.tensor(z[f"grad.{k}"][t])
            opt.step(loss=float(z["loss"][t]))
        for p, k in zip(params, NAMES, strict=True):
            before, after = z[f"params.{k}"][t], z[f"params.{k}"][t + 1]
            got = p.detach().numpy()
            if valid:
                assert np.array_equal(got, before), "a validation update changes no parameter"
            else:
                errors[t] = max(errors[t], update_error(before, got, before, after))
    return errors, amounts


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("code", ["lo", "celo"])
def test_both_codes_with_validation_updates_and_clipped_spikes(code, foreach, tmp_path):
    z = np.load(DATA / f"{code}.npz")
    errors, amounts = _replay(code, EPS[code], foreach, tmp_path)
    assert errors.max() <= FLOAT32_TOLERANCE, (float(errors.max()), int(errors.argmax()))
    # The clip follows the reference's, and the spikes exceed it: those updates ran clipped gradients.
    np.testing.assert_allclose(amounts, z["clip_amount"], rtol=2e-6)
    spikes = [t for t in range(len(amounts)) if max(np.abs(z[f"grad.{k}"][t]).max() for k in NAMES) > 20]
    assert len(spikes) == 2 and all(amounts[t] < 5.0 for t in spikes)
    assert int(z["is_valid"].sum()) >= 10
    prov = json.loads((DATA / "provenance.json").read_text())[code]
    schedule = "".join("v" if v else "s" if t in spikes else "t" for t, v in enumerate(z["is_valid"]))
    assert prov["reference"]["commit"] and prov["schedule"] == schedule
    assert prov["script"]["sha256"] == hashlib.sha256((DATA / "make.py").read_bytes()).hexdigest()
    assert prov["npz_sha256"] == hashlib.sha256((DATA / f"{code}.npz").read_bytes()).hexdigest()


def test_corrected_mean_eps_is_the_one_difference_of_the_two_codes():
    """The reference's ``c = 1 / (1 - decay ** updates + eps)`` in float32, for both codes' eps."""
    s = {
        "mean": torch.tensor(0.0611),
        "var": torch.tensor(0.0),
        "updates": torch.tensor(1, dtype=torch.int32),
    }
    f32 = np.float32
    for eps in (1e-8, 1e-7):
        want = f32(0.0611) * (f32(1.0) / (f32(1.0) - f32(0.95) ** f32(1.0) + f32(eps)))
        assert float(corrected_mean(s, 0.95, eps)) == pytest.approx(float(want), rel=1e-7)
    assert float(corrected_mean(s, 0.95, 1e-7)) != float(corrected_mean(s, 0.95, 1e-8))
    # Before any validation loss the mean is 0 and eps cannot matter: training-only runs are identical.
    zero = {**s, "mean": torch.tensor(0.0), "updates": torch.tensor(0, dtype=torch.int32)}
    assert float(corrected_mean(zero, 0.95, 1e-7)) == float(corrected_mean(zero, 0.95, 1e-8)) == 0.0


def test_record_validation_loss_is_the_reference_is_valid_update():
    theta, config = spec_theta("rnn_mlp_lopt")
    ps = [torch.zeros(3, 2, requires_grad=True)]
    opt = RNNMLPLOpt(ps, theta, config, num_steps=10)
    opt.record_validation_loss(2.0)
    opt.record_validation_loss(torch.tensor(1.0))
    gs = opt.state["global"]
    mean1 = np.float32(0.05) * np.float32(2.0)
    mean2 = np.float32(0.95) * mean1 + np.float32(0.05) * np.float32(1.0)
    assert float(gs["valid_loss"]["mean"]) == pytest.approx(float(mean2), rel=1e-7)
    assert int(gs["valid_loss"]["updates"]) == 2 and int(gs["iteration"]) == 2
    assert int(gs["train_loss"]["updates"]) == 0 and torch.equal(ps[0].detach(), torch.zeros(3, 2))
    assert "valid_loss" in opt.state_dict()["state"][0]["global"]  # optimizer-wide state: first param's entry


def test_dynamic_clip_cuts_a_spike_as_the_reference_formula():
    """``clip(g, +-(value / (1 - 0.99 ** t)) * 10)`` over every tensor, then ``value' = 0.99 value + 0.01
    sqrt(1e-8 + mean over tensors of mean(g_clipped**2))``, written out in numpy float32."""
    theta, config = spec_theta("rnn_mlp_lopt")
    decays = np.asarray(config["decays"], np.float32)
    params = [torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = RNNMLPLOpt(params, theta, config, num_steps=10)
    gen = torch.Generator().manual_seed(0)
    f32 = np.float32
    value, t = f32(1.0) * (f32(1.0) - f32(0.99)), f32(1.0)
    mom = [np.zeros(tuple(p.shape) + (5,), np.float32) for p in params]
    for step in range(4):
        grads = [0.1 * torch.randn(p.shape, generator=gen) for p in params]
        if step == 2:
            grads[0][1, 2] = 100.0  # far beyond the clip
        amount = (value / (f32(1.0) - f32(0.99) ** t)) * f32(10.0)
        clipped = [np.clip(g.numpy(), -amount, amount) for g in grads]
        avg = (np.mean(np.square(clipped[0])) + np.mean(np.square(clipped[1]))) / f32(2)
        value, t = value * f32(0.99) + np.sqrt(f32(1e-8) + avg) * f32(0.01), t + f32(1)
        mom = [decays * m + (f32(1) - decays) * c[..., None] for m, c in zip(mom, clipped, strict=True)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step(loss=1.0)
        clip = opt.state["global"]["clip"]
        assert float(clip["value"]) == pytest.approx(float(value), rel=1e-6) and float(clip["iteration"]) == t
        for p, m in zip(params, mom, strict=True):
            np.testing.assert_allclose(opt.state[p]["mom"].numpy(), m, rtol=1e-6, atol=1e-9)
        if step == 2:
            assert 0 < amount < 100.0 and opt.state[params[0]]["mom"][1, 2, 0] < 100.0 * (1 - decays[0])


# ----------------------------------------------------------------------------------------------------
# Options and refusals.
def test_decays_must_be_five():
    for bad in ([0.9, 0.99, 0.999, 0.9999], [0.5] * 6):
        with pytest.raises(specs.SpecError, match=r"option decays must have exactly 5 values, got \d+"):
            specs.rnn_mlp_lopt.validate({"decays": bad})
    theta, config = spec_theta("rnn_mlp_lopt")
    with pytest.raises(ValueError, match=r"^RNNMLPLOpt: option decays must have exactly 5 values, got 4"):
        RNNMLPLOpt([torch.zeros(2, requires_grad=True)], theta, {**config, "decays": [0.9] * 4}, num_steps=5)
    tree = flax_msgpack.load(LO_PARAMS)["params"]
    with pytest.raises(ConversionError, match="option decays must have exactly 5 values"):
        architectures.by_name("rnn_mlp_lopt").build(tree, {"decays": [0.9, 0.99]}, source="src")
    v = specs.rnn_mlp_lopt.validate({"decays": (0.6, 0.9, 0.95, 0.99, 0.9995)})
    assert v["decays"] == [0.6, 0.9, 0.95, 0.99, 0.9995] and v["hidden_layer"] == 2


def test_hidden_layer_zero_is_one_linear_layer():
    table = specs.rnn_mlp_lopt.tensor_table(specs.rnn_mlp_lopt.validate({"hidden_layer": 0}))
    assert table["mlp.linear_0.w"].shape == (37 + 17, 2 + 16) and "mlp.linear_1.w" not in table


# ----------------------------------------------------------------------------------------------------
# Conversion: both codes' files, what the converter infers and records.
def test_celo_theta_state_records_celo_eps_and_lo_params_the_lo_eps(tmp_path):
    celo = read_checkpoint(str(convert_source(str(CELO_THETA), tmp_path / "c.safetensors")))
    assert celo.architecture == "rnn_mlp_lopt" and celo.config["corrected_mean_eps"] == 1e-7
    assert celo.config["lstm_hidden_size"] == 64 and celo.config["hidden_layer"] == 2  # class defaults
    lo = read_checkpoint(str(convert_source(str(LO_PARAMS), tmp_path / "l.safetensors")))
    assert lo.config["corrected_mean_eps"] == 1e-8
    want = {"decays": [0.6, 0.9, 0.95, 0.99, 0.9995], "from_lstm_size": 6, "from_mlp_size": 5,
            "hidden_layer": 3, "hidden_size": 12, "lstm_hidden_size": 24, "lstm_to_ff": 7,
            "magnitude_rate": 0.5}  # fmt: skip
    assert {k: lo.config[k] for k in want} == want  # from config.gin
    forced = convert_source(str(CELO_THETA), tmp_path / "f.safetensors", sets=["corrected_mean_eps=1e-8"])
    assert read_checkpoint(str(forced)).config["corrected_mean_eps"] == 1e-8  # a binding wins


def test_bound_sizes_that_contradict_the_theta_are_refused():
    tree = flax_msgpack.load(CELO_THETA)
    arch = architectures.by_name("rnn_mlp_lopt")
    for key, value, found in [("lstm_hidden_size", 32, 64), ("from_mlp_size", 8, 16), ("hidden_layer", 1, 2),
                              ("lstm_to_ff", 3, 17), ("hidden_size", 16, 32)]:  # fmt: skip
        with pytest.raises(
            ConversionError, match=rf"config says {key}={value} but the theta has {key}={found}"
        ):
            arch.build(tree, {key: value}, source="src")
    broken = {**tree, "initial_from_mlp": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError, match="not a rnn_mlp_lopt theta"):
        arch.build(broken, {"from_mlp_size": 3}, source="src")
    assert architectures.detect(tree).name == "rnn_mlp_lopt"
