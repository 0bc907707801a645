"""Celo / Celo-Adam runtime: parity on the recorded fixtures (both code paths) and the optimizer contract.

Parity tolerance (issue 3): max over steps and tensors of |u_ours - u_ref|_inf / |u_ref|_inf <= 1e-5 with the
parameters reset to the recorded ``param_before[t]`` (parity_tests/compare.py). Theta for the contract tests
comes from the random-weight fixtures' own checkpoints, so they need neither JAX nor ../shared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_bridge.converter.architectures.celo import CELO, CELO_ADAM
from lopt_bridge.converter.flax_msgpack import load
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture, repo_root
from lopt_bridge.parity_tests.replay import check_fixture
from lopt_bridge.pylo_runtime.celo import Celo
from lopt_bridge.pylo_runtime.celo_adam import CeloAdam

FIXTURES = repo_root() / "parity_tests" / "fixtures"
CLASSES = {"celo": (CELO, Celo), "celo_adam": (CELO_ADAM, CeloAdam)}
SHAPES = [(), (7,), (16, 9), (3, 40), (3, 3, 4, 8), (8, 8), (4, 4, 3, 3), (5, 1)]


def _build(case: str, params, **options):
    """The optimizer of fixture ``case``, built from its checkpoint via our architecture module."""
    fx = load_fixture(FIXTURES / case)
    src = fx.source_path()
    if not src.is_file():
        pytest.skip(f"{src} absent (the published weights live in ../shared/checkpoints)")
    arch, cls = CLASSES[fx.meta["architecture"]]
    spec = arch.build(load(src), dict(fx.meta.get("convert_sets") or {}), source=str(src))
    theta = {k: torch.from_numpy(v) for k, v in spec.tensors.items()}
    return cls(params, theta, spec.config, num_steps=int(fx.meta["num_steps"]), **options)


#: The batched path (the default) replays every fixture in tests/test_parity_fixtures.py (lopt-parity run);
#: here the reference single-tensor path on the real weights and the interpolated-controls case, plus the
#: batched path on one case so this file checks both paths on its own.
#: The single-tensor replays of the three bigger cases are `slow` (4-15 s each on a busy 2-core machine).
PARITY_RUNS = [
    pytest.param("celo_real", False, id="celo_real-single", marks=pytest.mark.slow),
    pytest.param("celo_adam_real", False, id="celo_adam_real-single", marks=pytest.mark.slow),
    pytest.param("celo_random_inits3", False, id="celo_random_inits3-single", marks=pytest.mark.slow),
    pytest.param("celo_random", True, id="celo_random-multi"),
    pytest.param("celo_adam_random", True, id="celo_adam_random-multi"),
]


@pytest.mark.parametrize(("case", "foreach"), PARITY_RUNS)
def test_fixture_parity(case, foreach):
    res = check_fixture(
        FIXTURES / case,
        open_loop=False,
        convert=None,
        factory=lambda fx, params, _ckpt: _build(fx.meta["case"], params, foreach=foreach),
    )
    assert float(res.errors.max()) <= FLOAT32_TOLERANCE, f"max rel update error {res.errors.max():.3g}"


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _run(opt, params, steps, start=0, wd_in_grad=0.0):
    """Deterministic pseudo-training: the loss falls, gradients depend on the step and the parameters."""
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = sum(((p.float() - 0.1 * t) ** 2).mean() for p in params) / (1 + 0.05 * t)
        loss.backward()
        opt.step(loss=loss.detach())
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("case", ["celo_random", "celo_adam_random"])
def test_single_and_multi_tensor_paths_agree(case):
    a, b = _params(), _params()
    pa = _run(_build(case, a, foreach=False), a, 10)
    pb = _run(_build(case, b, foreach=True), b, 10)
    for x, y, x0 in zip(pa, pb, _params(), strict=True):
        # Same math; the batched path sums the MLP's first layer in one matmul instead of input by input.
        u = (x - x0).abs().max()
        assert (x - y).abs().max() <= 1e-5 * u + 1e-7


@pytest.mark.parametrize(("case", "foreach"), [("celo_random", True), ("celo_adam_random", False)])
def test_state_dict_resume_is_bit_exact(case, foreach):
    a = _params()
    opt_a = _build(case, a, foreach=foreach)
    full = _run(opt_a, a, 40)

    b = _params()
    opt_b = _build(case, b, foreach=foreach)
    _run(opt_b, b, 20)
    saved = copy.deepcopy(opt_b.state_dict())
    c = [p.detach().clone().requires_grad_() for p in b]
    opt_c = _build(case, c, foreach=foreach)
    opt_c.load_state_dict(saved)
    resumed = _run(opt_c, c, 20, start=20)
    for x, y in zip(full, resumed, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", ["celo_random", "celo_adam_random"])
def test_bfloat16_params_keep_float32_state(case):
    """State and math are float32; only the final write rounds: one step from bf16 values equals the
    float32 step from the same values, rounded to bf16 (exactly, so the tolerance is 0)."""
    pb = _params(torch.bfloat16)
    pf = [p.detach().float().requires_grad_() for p in pb]
    ob, of = _build(case, pb), _build(case, pf)
    for opt, ps in ((ob, pb), (of, pf)):
        for p in ps:  # the same bf16-representable gradient for both
            g = 0.25 * torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).sin()
            p.grad = g.to(torch.bfloat16).to(p.dtype)
        opt.step(loss=2.0)
    for x, y in zip(pb, pf, strict=True):
        assert x.dtype == torch.bfloat16
        assert torch.equal(x.detach(), y.detach().to(torch.bfloat16))
    for st in ob.state.values():
        for v in st.values() if isinstance(st, dict) else []:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32
    # Several steps stay close to the float32 run (bf16 rounding of each result: relative 2**-8).
    _run(ob, pb, 5, start=1)
    _run(of, pf, 5, start=1)
    for x, y in zip(pb, pf, strict=True):
        assert (x.float() - y).abs().max() <= 2e-2 * (y.abs().max() + 1e-3)


@pytest.mark.parametrize("case", ["celo_random", "celo_adam_random"])
def test_params_without_grad_are_untouched(case):
    ps = _params()
    opt = _build(case, ps)
    frozen = ps[2]
    before = frozen.detach().clone()
    for t in range(3):
        opt.zero_grad(set_to_none=True)
        loss = sum((p**2).mean() for i, p in enumerate(ps) if i != 2) / (1 + t)
        loss.backward()
        assert frozen.grad is None
        opt.step(loss=loss)
    assert torch.equal(frozen.detach(), before)
    assert len(opt.state[frozen]) == 0
    assert int(opt.state["global"]["iteration"]) == 3


@pytest.mark.parametrize("case", ["celo_random", "celo_adam_random"])
def test_lr_multiplies_the_step(case):
    x0 = _params()
    steps = {}
    for lr in (1.0, 0.5, 0.0):
        ps = _params()
        _run(_build(case, ps, lr=lr), ps, 1)
        steps[lr] = [p - q for p, q in zip(ps, x0, strict=True)]
    for full, half, zero in zip(steps[1.0], steps[0.5], steps[0.0], strict=True):
        assert torch.equal(zero, torch.zeros_like(zero))
        assert torch.allclose(half, 0.5 * full, rtol=1e-5, atol=1e-6)
        assert full.abs().max() > 0


@pytest.mark.parametrize("case", ["celo_random", "celo_adam_random"])
def test_weight_decay_is_the_wrapper(case):
    """``WeightDecayWrapper``: g += wd * p and loss += wd * sum(p**2), fed to the unwrapped optimizer."""
    wd = 0.1
    a, b = _params(), _params()
    oa, ob = _build(case, a, weight_decay=wd), _build(case, b)
    for t in range(5):
        for opt, ps, manual in ((oa, a, False), (ob, b, True)):
            opt.zero_grad()
            loss = sum(((p - 0.1 * t) ** 2).mean() for p in ps)
            loss.backward()
            if manual:
                with torch.no_grad():
                    for p in ps:  # the wrapper's arithmetic, in the same order
                        p.grad += wd * p
                        loss = loss + wd * torch.sum(p * p)
            opt.step(loss=loss.detach())
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[2], _params()[2])


def test_loss_is_required():
    ps = _params()
    opt = _build("celo_random", ps)
    sum((p**2).sum() for p in ps).backward()
    with pytest.raises(ValueError, match="needs the training loss"):
        opt.step()


def test_bad_config_is_refused():
    fx = load_fixture(FIXTURES / "celo_random")
    spec = CELO.build(load(fx.source_path()), dict(fx.meta["convert_sets"]), source="x")
    theta = {k: torch.from_numpy(v) for k, v in spec.tensors.items()}
    with pytest.raises(ValueError, match="unknown constructor argument.*bogus_flag"):
        Celo(_params(), theta, {**spec.config, "bogus_flag": True}, num_steps=10)
    cfg = {**spec.config, "with_rms_norm_g": False, "with_rms_only_norm_g": False}
    with pytest.raises(ValueError, match="UnboundLocalError"):
        Celo(_params(), theta, cfg, num_steps=10)


def test_real_weights_give_every_tensor_the_same_lr_mult(tmp_path: Path):
    """The scheduler reads only global features: its multiplier is a scalar shared by all tensors."""
    ps = _params()
    opt = _build("celo_real", ps)
    _run(opt, ps, 3)
    h = opt.state["global"]["lstm_hidden"]
    assert h.shape == (1, 64) and np.isfinite(h.numpy()).all()
