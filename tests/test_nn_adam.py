"""NNAdam: the hparam transforms and their clamps, the foreach path's batches, conversion of both codes'
checkpoints (learned_optimization params + config.gin, amoudgl/celo theta.state: the same code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_support import spec_theta

from lopt_bridge.converter import architectures, flax_msgpack
from lopt_bridge.converter.convert import convert_source
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.pylo_runtime import nn_adam, read_checkpoint
from lopt_bridge.pylo_runtime.nn_adam import NNAdam, next_hparams, round_trip

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "parity_tests" / "fixtures"
CELO_THETA = FIX / "nn_adam_celo" / "checkpoint" / "random_theta.state"
LO_PARAMS = FIX / "nn_adam_lo" / "checkpoint" / "params"


def _numpy_round_trip(h: np.ndarray) -> np.ndarray:
    """The reference's ``forward(inverse(h))`` per hparam, in numpy float32, op for op."""
    f32 = np.float32
    lr, b1, b2, eps = h.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.array(
            [
                f32(0.1) * np.log(np.clip(np.exp(f32(10.0) * lr), f32(1e-8), f32(1e3))),
                f32(0.1) * np.log(f32(1) - (f32(1) - np.exp(np.clip(f32(10) * b1, f32(-10), f32(0))))),
                f32(0.1) * np.log(f32(1) - (f32(1) - np.exp(np.clip(f32(10) * b2, f32(-10), f32(0))))),
                f32(0.1) * np.log(np.clip(np.exp(f32(10.0) * eps), f32(1e-11), f32(1e4))),
            ],
            dtype=np.float32,
        )


@pytest.mark.parametrize(
    "h",
    [
        [0.1 * np.log(1e-4), 0.1 * np.log(0.1), 0.1 * np.log(1e-3), 0.1 * np.log(1e-8)],  # the defaults
        [2.0, 0.5, 0.3, 3.0],  # above every clamp: lr 1e3, betas 0 (10 h clipped to 0), epsilon 1e4
        [-3.0, -2.0, -1.5, -4.0],  # below: lr 1e-8, betas 1 - e^-10, epsilon 1e-11
    ],
)
def test_round_trip_is_the_reference_clamp(h):
    got = round_trip(torch.tensor([h], dtype=torch.float32))[0].numpy()
    want = _numpy_round_trip(np.asarray(h))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)  # exp / log: an ulp or two apart
    if h[0] >= 2.0:  # clamped: lr = 1e3 -> 0.1 log(1e3); beta -> 1 - e^0 = 0 -> 0.1 log(1) = 0
        assert got[0] == pytest.approx(0.1 * np.log(1e3), rel=1e-6) and got[1] == 0.0 and got[2] == 0.0
    if h[0] <= -3.0:
        assert got[0] == pytest.approx(0.1 * np.log(1e-8), rel=1e-6) and got[3] == pytest.approx(
            0.1 * np.log(1e-11), rel=1e-6
        )


def test_decay_strength_pulls_back_to_theta():
    prev = torch.tensor([[-1.0, -0.2, -0.5, -1.5]])
    deltas = torch.tensor([[0.1, -0.05, 0.02, 0.3]])
    initial = torch.tensor([-0.9, -0.23, -0.69, -1.84])
    new = prev + deltas
    pulled = new - (new - initial) * 0.25
    torch.testing.assert_close(next_hparams(prev, deltas, initial, 0.25), round_trip(pulled))
    torch.testing.assert_close(next_hparams(prev, deltas, initial, 0.0), round_trip(new))


def test_foreach_batches_split_and_join_like_the_reference(monkeypatch):
    """The foreach path flattens tensors into batches of at most FOREACH_MAX_ELEMENTS (a bigger one alone)."""
    monkeypatch.setattr(nn_adam, "FOREACH_MAX_ELEMENTS", 10)
    shapes = [(), (3,), (2, 2), (4, 5), (1,), (2, 1, 3)]
    assert nn_adam._batches([torch.zeros(s) for s in shapes]) == [[0, 1, 2], [3], [4, 5]]
    theta, config = spec_theta("nn_adam")
    gen = torch.Generator().manual_seed(0)
    start = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for foreach in (False, True):
        ps = [p.clone().requires_grad_() for p in start]
        opt = NNAdam(ps, theta, config, num_steps=10, foreach=foreach)
        g2 = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g2)
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b, p0 in zip(pa, pb, start, strict=True):
        ua, ub = a.detach() - p0, b.detach() - p0
        assert float((ua - ub).abs().max()) <= 1e-6 * float(ua.abs().max()) + 3e-8
        torch.testing.assert_close(ob.state[b]["hparams"], oa.state[a]["hparams"], rtol=1e-6, atol=1e-7)


def test_state_and_loss():
    theta, config = spec_theta("nn_adam")
    p = torch.zeros(3, 2, requires_grad=True)
    opt = NNAdam([p], theta, config, num_steps=10)
    p.grad = torch.ones(3, 2)
    opt.step()  # the loss is not read: none needed
    st = opt.state[p]
    assert set(st) == {"mom", "rms", "lstm_hidden", "lstm_cell", "hparams"}
    assert (
        st["mom"].shape == (3, 2)
        and st["hparams"].shape == (4,)
        and int(opt.state["global"]["iteration"]) == 1
    )
    # The first step reads theta's hparams: lr = exp(10 * per_layer_lr) = 1e-2 with beta1 0.9, beta2 0.99.
    m, v = 0.1, 0.01
    want = (1e-2 * (1 + 1e-8)) / (1e-8 + np.sqrt(v + 1e-10)) * m
    np.testing.assert_allclose(p.detach().numpy(), -want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
def test_both_codes_convert(tmp_path):
    celo = read_checkpoint(str(convert_source(str(CELO_THETA), tmp_path / "c.safetensors")))
    assert celo.architecture == "nn_adam" and celo.config["lstm_hidden_size"] == 64
    assert celo.tensors["per_layer_beta2"].shape in ((), (1,))
    lo = read_checkpoint(str(convert_source(str(LO_PARAMS), tmp_path / "l.safetensors")))
    want = {"decay_strength": 0.1, "initial_beta1": 0.8, "initial_beta2": 0.99, "initial_epsilon": 1e-6,
            "initial_learning_rate": 3e-3, "lstm_hidden_size": 16, "output_scale": 0.05}  # fmt: skip
    assert lo.config == want  # every argument from config.gin


def test_contradicting_size_and_wrong_trees_are_refused():
    tree = flax_msgpack.load(CELO_THETA)
    arch = architectures.by_name("nn_adam")
    with pytest.raises(ConversionError, match=r"config says lstm_hidden_size=32 but theta's lstm_init_state"):
        arch.build(tree, {"lstm_hidden_size": 32}, source="src")
    bad = {**tree, "rnn_to_controls_params": {"rnn_to_controls": {"w": np.zeros((64, 3), np.float32),
                                                                  "b": np.zeros(3, np.float32)}}}  # fmt: skip
    with pytest.raises(
        ConversionError, match=r"not a nn_adam theta .*rnn_to_controls/w \(64, 3\) \(expected"
    ):
        arch.build(bad, {}, source="src")
    assert architectures.detect(tree).name == "nn_adam"
    assert not arch.matches({**tree, "extra": np.zeros(1)})
