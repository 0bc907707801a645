"""VeLO runtime behaviour needing no reference: paths agree, resume, loss, dtypes, wrappers, refusals.

Parity against the JAX reference itself is checked by the committed fixtures (tests/test_parity_fixtures.py);
here theta is random (seeded) and small, so every test runs in a fraction of a second.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lopt_bridge.pylo_runtime.velo import VeLO, VeLOConfig, expected_theta_shapes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny steps are dominated by thread start-up on a shared 2-core CI box: run them on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(), (7,), (16, 9), (3, 40), (3, 3, 4, 8), (8, 8), (8, 8), (4, 4, 3, 3), (5, 1)]
SMALL = {"lstm_hidden_size": 16, "param_inits": 4, "use_bugged_loss_features": False}


def make_theta(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random theta with the shapes ``config`` needs (biases nonzero; the per-element MLP scaled so that the
    100x control interpolation gives steps of a few percent of the parameter scale, not runaway growth)."""
    gen = torch.Generator().manual_seed(seed)
    theta = {}
    for name, shape in expected_theta_shapes(VeLOConfig.from_mapping(config)).items():
        fan_in = shape[-2] if len(shape) >= 2 else 4
        scale = 0.1 if name.startswith("ff.") else 1.0
        theta[name] = scale * torch.randn(shape, generator=gen) / fan_in**0.5
    return theta


def make_params(seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def grads_and_loss(params: list[torch.Tensor], t: int) -> tuple[list[torch.Tensor], float]:
    """A deterministic gradient stream (depends on the params, like a real loss) and a falling loss."""
    shift = [0.01 * torch.cos(torch.tensor(float(t + i))) for i in range(len(params))]
    grads = [0.1 * p.detach().float() + s for p, s in zip(params, shift, strict=True)]
    return grads, 10.0 / (1.0 + 0.1 * t)


def run(opt: VeLO, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        grads, loss = grads_and_loss(params, t)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype)
        opt.step(loss=loss)


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


# ----------------------------------------------------------------------------------------------------------
def test_single_and_multi_tensor_paths_agree():
    """Reference (foreach=False) and batched (foreach=True) paths agree to float32 rounding over 15 steps.

    Tolerance 1e-5 relative to each tensor's total movement: the batched path sums in a different order
    (vmap / bmm), so results differ by a few float32 ulps per step, nothing more.
    """
    cfg = {**SMALL, "use_bugged_next_lstm_state": False}
    theta = make_theta(cfg)
    pa, pb = make_params(), make_params()
    p0 = snapshot(pa)
    oa = VeLO(pa, theta, cfg, num_steps=50, foreach=False)
    ob = VeLO(pb, theta, cfg, num_steps=50, foreach=True)
    run(oa, pa, 15)
    run(ob, pb, 15)
    for a, b, z in zip(pa, pb, p0, strict=True):
        moved = (a.detach() - z).abs().max()
        assert moved > 0
        assert ((a.detach() - b.detach()).abs().max() / moved) < 1e-5
    for a, b in zip(pa, pb, strict=True):
        sa, sb = oa.state[a], ob.state[b]
        for k in ("mom", "rms", "fac_row", "fac_col", "fac_full", "lstm_hidden", "lstm_cell"):
            assert sa[k].shape == sb[k].shape and sa[k].dtype == torch.float32
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(foreach, dtype):
    """20 steps, save, load into a fresh optimizer, 20 more == 40 uninterrupted, bit for bit."""
    theta = make_theta(SMALL)
    pa = make_params(dtype=dtype)
    oa = VeLO(pa, theta, SMALL, num_steps=100, foreach=foreach)
    run(oa, pa, 40)

    pb = make_params(dtype=dtype)
    ob = VeLO(pb, theta, SMALL, num_steps=100, foreach=foreach)
    run(ob, pb, 20)
    saved = copy.deepcopy(ob.state_dict())
    pc = [p.detach().clone().requires_grad_() for p in pb]
    oc = VeLO(pc, theta, SMALL, num_steps=100, foreach=foreach)
    oc.load_state_dict(saved)
    for p in pc:
        assert all(v.dtype != torch.bfloat16 for v in oc.state[p].values() if isinstance(v, torch.Tensor))
    run(oc, pc, 20, start=20)
    for a, c in zip(pa, pc, strict=True):
        assert torch.equal(a.detach(), c.detach())


def test_step_needs_a_loss():
    theta = make_theta(SMALL)
    params = make_params()
    opt = VeLO(params, theta, SMALL, num_steps=10)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="needs the training loss"):
        opt.step()


def test_closure_float_and_tensor_loss_are_the_same():
    """step(closure) uses the closure's loss; loss=float and loss=0-d tensor give identical updates."""
    theta = make_theta(SMALL)
    results = []
    for mode in ("float", "tensor", "closure"):
        params = make_params()
        opt = VeLO(params, theta, SMALL, num_steps=20)
        for t in range(5):
            grads, loss = grads_and_loss(params, t)
            if mode == "closure":

                def closure(params=params, grads=grads, loss=loss):
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g
                    return torch.tensor(loss)

                returned = opt.step(closure)
                assert float(returned) == float(torch.tensor(loss))
            else:
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                opt.step(loss=loss if mode == "float" else torch.tensor(loss))
        results.append(snapshot(params))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_params_without_grad_are_untouched():
    """A param whose .grad is None is neither updated nor given state (as torch optimizers do)."""
    theta = make_theta(SMALL)
    params = make_params()
    frozen = params[2]
    before = frozen.detach().clone()
    opt = VeLO(params, theta, SMALL, num_steps=20)
    for t in range(3):
        grads, loss = grads_and_loss(params, t)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if p is frozen else g
        opt.step(loss=loss)
    assert torch.equal(frozen.detach(), before)
    assert len(opt.state[frozen]) == 0
    assert not torch.equal(params[1].detach(), make_params()[1].detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_float32_state_and_math(dtype):
    """bf16/fp16 params: state and math stay float32, so from the same (representable) inputs the new param
    is exactly the float32 result rounded once to the param dtype (tolerance: zero, bit-identical)."""
    theta = make_theta(SMALL)
    low = make_params(dtype=dtype)
    ref = [p.detach().float().requires_grad_() for p in low]
    ol = VeLO(low, theta, SMALL, num_steps=20)
    of = VeLO(ref, theta, SMALL, num_steps=20)
    for t in range(5):
        for a, b in zip(ref, low, strict=True):
            a.detach().copy_(b.detach().float())  # same inputs every step
        grads, loss = grads_and_loss(ref, t)
        for a, b, g in zip(ref, low, grads, strict=True):
            g = g.to(dtype).float()
            a.grad, b.grad = g, g.to(dtype)
        ol.step(loss=loss)
        of.step(loss=loss)
        for a, b in zip(ref, low, strict=True):
            assert b.dtype == dtype
            assert torch.equal(a.detach().to(dtype), b.detach())
            assert ol.state[b]["mom"].dtype == torch.float32


def test_weight_decay_is_the_wrapper_formula():
    """weight_decay=wd == WeightDecayWrapper: g + wd * p, loss + wd * sum(p**2) fed to the plain optimizer."""
    wd = 0.01
    theta = make_theta(SMALL)
    pa, pb = make_params(), make_params()
    oa = VeLO(pa, theta, SMALL, num_steps=20, weight_decay=wd)
    ob = VeLO(pb, theta, SMALL, num_steps=20)
    for t in range(6):
        grads, loss = grads_and_loss(pa, t)
        for p, g in zip(pa, grads, strict=True):
            p.grad = g
        oa.step(loss=loss)
        l2 = torch.tensor(loss, dtype=torch.float32)
        for p, g in zip(pb, grads, strict=True):
            pf = p.detach()
            p.grad = g + wd * pf
            l2 = l2 + wd * torch.sum(pf * pf)
        ob.step(loss=l2)
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a.detach(), b.detach())


def test_gradient_accumulation_beyond_the_training_horizon():
    """num_steps > max_training_steps: k = ceil(ratio) grads averaged per update, horizon num_steps // k."""
    theta = make_theta(SMALL)
    pa, pb = make_params(), make_params()
    oa = VeLO(pa, theta, SMALL, num_steps=300, max_training_steps=100)
    assert oa.num_accumulate == 3 and oa.inner_num_steps == 100
    ob = VeLO(pb, theta, SMALL, num_steps=100)
    for t in range(4):
        acc = [torch.zeros_like(p) for p in pa]
        total = None
        for j in range(3):
            before = snapshot(pa)
            grads, loss = grads_and_loss(pa, 3 * t + j)
            for p, g, a in zip(pa, grads, acc, strict=True):
                p.grad = g
                a.add_(g)
            oa.step(loss=loss)
            lt = torch.tensor(loss, dtype=torch.float32)
            total = lt if total is None else total + lt
            if j < 2:  # no update until the third gradient
                assert all(torch.equal(a, b.detach()) for a, b in zip(before, pa, strict=True))
        for p, a in zip(pb, acc, strict=True):
            p.grad = a / 3
        ob.step(loss=total / 3)
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a.detach(), b.detach())


def test_lr_multiplies_the_step():
    """lr scales the learned step (lr=1 is the reference); half the lr, half the update (to rounding)."""
    theta = make_theta(SMALL)
    updates = {}
    for lr in (1.0, 0.5):
        params = make_params()
        before = snapshot(params)
        opt = VeLO(params, theta, SMALL, num_steps=20, lr=lr)
        run(opt, params, 1)
        updates[lr] = [p.detach() - b for p, b in zip(params, before, strict=True)]
    for u1, uh in zip(updates[1.0], updates[0.5], strict=True):
        assert u1.abs().max() > 0
        # one float32 ulp of the parameter (|p| < 8 here) on each side
        assert (uh - 0.5 * u1).abs().max() <= 2e-6


def test_tensors_of_every_rank_get_finite_updates():
    theta = make_theta(SMALL)
    params = make_params()
    before = snapshot(params)
    opt = VeLO(params, theta, SMALL, num_steps=20)
    run(opt, params, 3)
    for p, b in zip(params, before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, name",
    [
        ({"with_rms_norm_g": False, "with_rsqrt_rms": False}, "with_rms_only_norm_g"),
        ({"with_rms_norm_g": False, "with_rms_only_norm_g": False}, "with_rsqrt_rms"),
        (
            {"initial_momentum_decays": (0.9, 0.99), "initial_rms_decays": (0.9, 0.99, 0.999)},
            "initial_rms_decays",
        ),
        ({"initial_adafactor_decays": (0.9, 0.99)}, "initial_adafactor_decays"),
        ({"lstm_hidden_size": 0}, "lstm_hidden_size"),
        ({"with_g": "yes"}, "with_g"),
        ({"not_an_option": 1}, "not_an_option"),
    ],
)
def test_refused_options_name_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        VeLOConfig.from_mapping({**SMALL, **options})


def test_all_three_rms_inputs_off_is_allowed():
    """with_rms_norm_g, with_rsqrt_rms and with_rms_only_norm_g all False runs in the reference: accepted."""
    cfg = {**SMALL, "with_rms_norm_g": False, "with_rsqrt_rms": False, "with_rms_only_norm_g": False}
    params = make_params()
    opt = VeLO(params, make_theta(cfg), cfg, num_steps=20)
    run(opt, params, 2)


def test_theta_that_does_not_fit_the_config_is_refused():
    theta = make_theta(SMALL)
    theta["rnn.lstm.w"] = theta["rnn.lstm.w"][:, :8]
    with pytest.raises(ValueError, match="rnn.lstm.w"):
        VeLO(make_params(), theta, SMALL, num_steps=10)
    theta = make_theta(SMALL)
    del theta["ff.w0.13"]
    with pytest.raises(ValueError, match="ff.w0.13"):
        VeLO(make_params(), theta, SMALL, num_steps=10)
