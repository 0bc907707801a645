"""MLPLOpt runtime behaviour (parity with the reference: parity_tests/fixtures/mlp_lopt_default)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adafac_runtime import SHAPES, assert_paths_agree, make_params, old_names, run

from lopt_bridge.pylo_runtime.mlp_lopt import MLPLOpt


def make_theta(hidden: int = 16, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta, n_in = {}, 19
    for i, out in enumerate([hidden] * layers + [2]):
        theta[f"linear_{i}.w"] = torch.randn(n_in, out, generator=gen) / n_in**0.5
        theta[f"linear_{i}.b"] = 0.1 * torch.randn(out, generator=gen)
        n_in = out
    return theta


CONFIG = {"hidden_size": 16, "step_mult": 0.01}
SMALL = SHAPES[:-1]


def test_single_and_batched_paths_agree():
    theta = make_theta()
    pa, pb = make_params(shapes=SMALL), make_params(shapes=SMALL)
    p0 = [p.detach().clone() for p in pa]
    run(MLPLOpt(pa, theta, CONFIG, num_steps=10, foreach=False), pa, 0, 3)
    run(MLPLOpt(pb, theta, CONFIG, num_steps=10, foreach=True), pb, 0, 3)
    # Same math, the batched matmul may sum in another order: float32 rounding only.
    assert_paths_agree(pa, pb, p0)


def test_state_dict_resume_is_bit_exact():
    theta = make_theta()
    p_full, p_half = make_params(shapes=SMALL), make_params(shapes=SMALL)
    run(MLPLOpt(p_full, theta, CONFIG, num_steps=100), p_full, 0, 40)
    first = MLPLOpt(p_half, theta, CONFIG, num_steps=100)
    run(first, p_half, 0, 20)
    second = MLPLOpt(p_half, theta, CONFIG, num_steps=100)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run(second, p_half, 20, 40)
    assert all(torch.equal(a, b) for a, b in zip(p_full, p_half, strict=True))


def test_state_dict_with_the_old_key_name_loads():
    """MLPLOpt saved its momenta as ``m`` before the one state naming (``mom``)."""
    theta = make_theta()
    p_full, p_half = make_params(shapes=SMALL), make_params(shapes=SMALL)
    run(MLPLOpt(p_full, theta, CONFIG, num_steps=100), p_full, 0, 10)
    first = MLPLOpt(p_half, theta, CONFIG, num_steps=100)
    run(first, p_half, 0, 5)
    second = MLPLOpt(p_half, theta, CONFIG, num_steps=100)
    second.load_state_dict(old_names(first.state_dict(), {"mom": "m"}))
    assert all("mom" in second.state[p] and "m" not in second.state[p] for p in p_half)
    run(second, p_half, 5, 10)
    assert all(torch.equal(a, b) for a, b in zip(p_full, p_half, strict=True))


def test_lr_grad_none_and_state():
    theta = make_theta()
    outs = []
    for lr in (1.0, 0.5):
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in SMALL]
        opt = MLPLOpt(ps, theta, CONFIG, num_steps=10, lr=lr)
        gen = torch.Generator().manual_seed(0)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        ps[1].grad = None
        opt.step()
        assert torch.equal(ps[1], torch.zeros(SMALL[1])) and len(opt.state[ps[1]]) == 0
        assert opt.state[ps[0]]["mom"].shape == (1, 6)  # 0-d param reshaped to (1,), six fixed decays
        outs.append([p.detach().clone() for p in ps])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(b, 0.5 * a)
    assert outs[0][2].abs().max() > 0


def test_wrong_first_layer_is_refused():
    theta = make_theta()
    theta["linear_0.w"] = theta["linear_0.w"][:18]
    with pytest.raises(ValueError, match=r"linear_0.w has shape \(18, 16\), config expects \(19, 16\)"):
        MLPLOpt(make_params(shapes=SMALL), theta, CONFIG, num_steps=10)
