"""RNNMLPLOpt and NNAdam: runtime behaviour common to both (paths, resume, lr, frozen params, bf16/fp16).

Parity with the references is parity_tests/fixtures/{rnn_mlp_lopt,nn_adam}_{lo,celo} (replayed by
`lopt-parity run` on the default path and here on every path); family details are in test_rnn_mlp_lopt.py
and test_nn_adam.py.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from distributed_support import spec_theta

from lopt_bridge.parity_tests.commands import DEFAULT_FIXTURES
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import discover, load_fixture, repo_root
from lopt_bridge.parity_tests.replay import convert_fixture, replay
from lopt_bridge.pylo_runtime import load_optimizer, optimizer_class

FAMILIES = ("rnn_mlp_lopt", "nn_adam")
#: Every rank (0-d, size-1, tied dims, 4-D), as the parity task.
SHAPES = [(), (1,), (7,), (5, 1), (4, 4), (3, 5), (2, 3, 2, 2)]


def make_params(dtype=torch.float32, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(s, generator=gen)).to(dtype).requires_grad_() for s in SHAPES]


def grads_and_loss(t: int) -> tuple[list[torch.Tensor], float]:
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen) for s in SHAPES], 2.0 * 0.95**t


def build(family: str, params, **options):
    theta, config = spec_theta(family)
    return optimizer_class(family)(params, theta, config, num_steps=100, **options)


def run(opt, params, t0: int, t1: int) -> None:
    for t in range(t0, t1):
        grads, loss = grads_and_loss(t)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype)
        opt.step(loss=loss)


def rel_update_error(p0, pa, pb) -> float:
    """max over tensors of |u_a - u_b|_inf / |u_a|_inf."""
    out = 0.0
    for a0, a, b in zip(p0, pa, pb, strict=True):
        ua, ub = (a.detach() - a0).double(), (b.detach() - a0).double()
        out = max(out, float((ua - ub).abs().max() / ua.abs().max().clamp(min=1e-30)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_and_foreach_paths_agree(family):
    pa, pb = make_params(), make_params()
    p0 = [p.detach().clone() for p in pa]
    oa, ob = build(family, pa, foreach=False), build(family, pb, foreach=True)
    run(oa, pa, 0, 1)
    run(ob, pb, 0, 1)
    assert oa.last_path == "reference" and ob.last_path == "foreach"
    assert rel_update_error(p0, pa, pb) <= 1e-6  # the same math; summation order only
    for p, q in zip(pa, p0, strict=True):
        assert not torch.equal(p.detach(), q), "every tensor moves"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_resume_is_bit_exact(family, foreach):
    p_full, p_half = make_params(), make_params()
    run(build(family, p_full, foreach=foreach), p_full, 0, 8)
    first = build(family, p_half, foreach=foreach)
    run(first, p_half, 0, 4)
    second = build(family, p_half, foreach=foreach)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run(second, p_half, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(p_full, p_half, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_lr_multiplies_the_step(family, foreach):
    p0 = make_params()
    steps = []
    for lr in (1.0, 0.25):
        ps = make_params()
        run(build(family, ps, lr=lr, foreach=foreach), ps, 0, 1)
        steps.append([(p - q).detach() for p, q in zip(ps, p0, strict=True)])
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(b, 0.25 * a, rtol=1e-5, atol=3e-8)  # one ulp of p + u (|p| < 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_param_without_grad_is_untouched(family):
    ps = make_params()
    opt = build(family, ps)
    before = ps[3].detach().clone()
    for t in range(3):
        grads, loss = grads_and_loss(t)
        for p, g in zip(ps, grads, strict=True):
            p.grad = None if p is ps[3] else g
        opt.step(loss=loss)
    assert torch.equal(ps[3].detach(), before) and len(opt.state[ps[3]]) == 0
    assert all(not torch.equal(p.detach(), q) for p, q in zip(ps[:3], make_params()[:3], strict=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_float32_state_and_math(family, dtype):
    """From the same (representable) inputs the new param is exactly the float32 result rounded once."""
    low = make_params(dtype=dtype)
    ref = [p.detach().float().requires_grad_() for p in low]
    ol, of = build(family, low), build(family, ref)
    for t in range(4):
        for a, b in zip(ref, low, strict=True):
            a.detach().copy_(b.detach().float())
        grads, loss = grads_and_loss(t)
        for a, b, g in zip(ref, low, grads, strict=True):
            a.grad, b.grad = g.to(dtype).float(), g.to(dtype)
        ol.step(loss=loss)
        of.step(loss=loss)
        for a, b in zip(ref, low, strict=True):
            assert b.dtype == dtype and torch.equal(a.detach().to(dtype), b.detach())
            assert ol.state[b]["mom"].dtype == torch.float32


FIXTURES = [
    p for p in discover(repo_root() / DEFAULT_FIXTURES) if load_fixture(p).meta["architecture"] in FAMILIES
]


def test_fixtures_of_both_codes_are_committed():
    found = {(load_fixture(p).meta["architecture"], load_fixture(p).meta["source_format"]) for p in FIXTURES}
    for family in FAMILIES:  # learned_optimization's params + config.gin and celo's theta.state
        assert {(family, "lo_params_gin"), (family, "theta_state")} <= found


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_every_path_replays_the_fixtures(path, foreach, tmp_path):
    fx = load_fixture(path)

    def factory(fx, params, ckpt, *, foreach):
        return load_optimizer(str(ckpt), params, num_steps=int(fx.meta["num_steps"]), foreach=foreach)

    errors, _ = replay(fx, convert_fixture(fx, tmp_path), factory=functools.partial(factory, foreach=foreach))
    worst = np.unravel_index(np.argmax(errors), errors.shape)
    assert errors.max() <= FLOAT32_TOLERANCE, (float(errors.max()), int(worst[0]), fx.names[worst[1]])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_open_loop_drift_2000_steps(family):
    """2000 steps on the same gradient stream, no resets: the foreach path stays within 1e-4 (max relative
    parameter difference) of the reference path."""
    shapes = [(), (4, 5)]
    steps = 2000
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen) for s in shapes]
    pa = [(0.1 * torch.randn(s, generator=gen)).requires_grad_() for s in shapes]
    p0 = [p.detach().clone() for p in pa]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    oa, ob = build(family, pa, foreach=False), build(family, pb, foreach=True)
    for t in range(steps):
        gs = [
            0.5 * b * (1 + 0.3 * math.sin(t / 50)) + 0.3 * torch.randn(b.shape, generator=gen) for b in base
        ]
        for a, b, g in zip(pa, pb, gs, strict=True):
            a.grad, b.grad = g, g.clone()
        loss = 2.0 * 0.999**t
        oa.step(loss=loss)
        ob.step(loss=loss)
    moved = max(float((a.detach() - a0).abs().max()) for a, a0 in zip(pa, p0, strict=True))
    assert moved > 1e-3  # the run did something
    drift = max(
        float((a.detach() - b.detach()).abs().max() / a.detach().abs().max())
        for a, b in zip(pa, pb, strict=True)
    )
    assert drift <= 1e-4, drift
