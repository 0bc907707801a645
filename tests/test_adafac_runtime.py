"""SmallFCLOpt (small_fc_lopt) runtime behaviour beyond fixture parity: paths, state, dtypes, options, theta.

Parity with the JAX reference is checked by the committed fixtures (tests/test_parity_fixtures.py replays
small_fc_lopt_default / _pylo / _separate / _large); these tests need no jax.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lopt_bridge.pylo_runtime.adafac import DEFAULTS, SmallFCLOpt, factored_dims, n_inputs

SHAPES = [(), (7,), (16, 9), (3, 3, 4, 8), (4, 4, 3, 3), (5, 1), (64, 32)]


def make_theta(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random theta with nonzero decay offsets, in the converter's naming."""
    cfg = {**DEFAULTS, **config}
    gen = torch.Generator().manual_seed(seed)
    theta = {
        "momentum_decays": 0.1 * torch.randn(len(cfg["initial_momentum_decays"]), generator=gen),
        "rms_decays": 0.1 * torch.randn(len(cfg["initial_rms_decays"]), generator=gen),
        "adafactor_decays": 0.1 * torch.randn(len(cfg["initial_adafactor_decays"]), generator=gen),
    }
    sizes = [cfg["hidden_size"]] * cfg["hidden_layers"] + [2]
    n_in = n_inputs(cfg)
    for i, out in enumerate(sizes):
        theta[f"nn.w{i}"] = torch.randn(n_in, out, generator=gen) / n_in**0.5
        theta[f"nn.b{i}"] = 0.1 * torch.randn(out, generator=gen)
        n_in = out
    return theta


def make_params(dtype=torch.float32, seed: int = 1, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def set_grads(params, t: int) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = (0.1 * torch.randn(p.shape, generator=gen) + 0.05 * p.detach().float()).to(p.dtype)


def run(opt, params, t0: int, t1: int) -> None:
    for t in range(t0, t1):
        set_grads(params, t)
        opt.step()


CONFIG = {"hidden_size": 32, "step_mult": 0.01}


def test_single_and_multi_tensor_paths_agree():
    # Same math; the batched matmul may sum in another order: agreement to float32 rounding (1e-6 relative).
    theta = make_theta(CONFIG)
    pa, pb = make_params(), make_params()
    # fused=False keeps pylo_runtime.kernels out: the reference per-tensor path vs its batched-MLP form.
    a = SmallFCLOpt(pa, theta, CONFIG, num_steps=100, foreach=False, fused=False)
    b = SmallFCLOpt(pb, theta, CONFIG, num_steps=100, foreach=True, fused=False)
    p0 = [p.detach().clone() for p in pa]
    run(a, pa, 0, 3)
    run(b, pb, 0, 3)
    assert_paths_agree(pa, pb, p0)


def assert_paths_agree(pa, pb, p0) -> None:
    """Both paths moved every param from ``p0`` and agree to float32 rounding of another summation order:
    1e-6 of the update, plus 2 eps of the parameter (the rounding of ``p + u``)."""
    for x, y, z in zip(pa, pb, p0, strict=True):
        ua, ub = x.detach() - z, y.detach() - z
        assert ua.abs().max() > 0
        assert (ua - ub).abs().max() <= 1e-6 * ua.abs().max() + 2 * torch.finfo(
            torch.float32
        ).eps * z.abs().max()


def test_state_dict_resume_is_bit_exact():
    # 20 steps, save, load into a fresh optimizer, 20 more == 40 uninterrupted, bit for bit.
    small = SHAPES[:-1]  # keep it quick: every rank, no large tensor
    theta = make_theta({})
    p_full = make_params(shapes=small)
    full = SmallFCLOpt(p_full, theta, {}, num_steps=100)
    run(full, p_full, 0, 40)

    p_half = make_params(shapes=small)
    first = SmallFCLOpt(p_half, theta, {}, num_steps=100)
    run(first, p_half, 0, 20)
    saved = copy.deepcopy(first.state_dict())
    second = SmallFCLOpt(p_half, theta, {}, num_steps=100)
    second.load_state_dict(saved)
    run(second, p_half, 20, 40)
    for x, y in zip(p_full, p_half, strict=True):
        assert torch.equal(x, y)
    assert int(second.state["global"]["iteration"]) == 40


def old_names(state_dict: dict, renames: dict[str, str]) -> dict:
    """A state_dict as releases before the one state naming saved it (``renames``: today's -> old), with
    the optimizer-wide state at the top level as they kept it."""
    sd = copy.deepcopy(state_dict)
    state = {}
    for pid, st in sd["state"].items():
        if "global" in st:
            state["global"] = st.pop("global")
        state[pid] = {renames.get(k, k): v for k, v in st.items()}
    sd["state"] = state
    return sd


def test_state_dict_with_the_old_key_names_loads():
    """small_fc_lopt / muLO saved m / v_row / v_col / v_diag before mom / fac_row / fac_col / fac_full."""
    small = SHAPES[:-1]
    theta = make_theta({})
    p_full, p_half = make_params(shapes=small), make_params(shapes=small)
    run(SmallFCLOpt(p_full, theta, {}, num_steps=100), p_full, 0, 10)
    first = SmallFCLOpt(p_half, theta, {}, num_steps=100)
    run(first, p_half, 0, 5)
    old = old_names(
        first.state_dict(), {"mom": "m", "fac_row": "v_row", "fac_col": "v_col", "fac_full": "v_diag"}
    )
    keys = {k for pid, st in old["state"].items() if pid != "global" for k in st}
    assert keys == {"m", "rms", "v_row", "v_col", "v_diag"}
    second = SmallFCLOpt(p_half, theta, {}, num_steps=100)
    second.load_state_dict(old)
    assert {k for st in second.state.values() for k in st if k != "iteration"} >= {
        "mom",
        "fac_row",
        "fac_full",
    }
    run(second, p_half, 5, 10)
    assert all(torch.equal(x, y) for x, y in zip(p_full, p_half, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_track_float32(dtype):
    # State and math are float32; the params (and the gradients built from them) are rounded to bf16 / fp16
    # (relative 2**-9 / 2**-12) before the optimizer sees them, so one update differs from the float32 run
    # by about that much relative to its size: 3e-2 (bf16) and 5e-3 (fp16) leave room for the features
    # (rms, factored statistics) that amplify input rounding.
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    theta = make_theta(CONFIG)
    p32 = make_params()
    plow = [torch.nn.Parameter(p.detach().to(dtype)) for p in p32]
    with torch.no_grad():
        for a, b in zip(p32, plow, strict=True):
            a.copy_(b.float())
    o32 = SmallFCLOpt(p32, theta, CONFIG, num_steps=100)
    olow = SmallFCLOpt(plow, theta, CONFIG, num_steps=100)
    before = [p.detach().float().clone() for p in plow]
    gen = torch.Generator().manual_seed(5)
    for a, b in zip(p32, plow, strict=True):
        g = (0.1 * torch.randn(a.shape, generator=gen)).to(dtype)
        a.grad, b.grad = g.float(), g
    o32.step()
    olow.step()
    for a, b, z in zip(p32, plow, before, strict=True):
        assert b.dtype == dtype
        assert all(v.dtype == torch.float32 for v in olow.state[b].values())
        u32, ulow = a.detach() - z, b.detach().float() - z
        spacing = torch.finfo(dtype).eps * a.detach().abs().max()
        assert (u32 - ulow).abs().max() <= tol * u32.abs().max() + spacing


def test_param_without_grad_is_untouched():
    theta = make_theta(CONFIG)
    params = make_params()
    opt = SmallFCLOpt(params, theta, CONFIG, num_steps=100)
    set_grads(params, 0)
    params[2].grad = None
    frozen = params[2].detach().clone()
    others = [p.detach().clone() for p in params]
    opt.step()
    assert torch.equal(params[2], frozen) and len(opt.state[params[2]]) == 0
    assert all(not torch.equal(p, o) for i, (p, o) in enumerate(zip(params, others, strict=True)) if i != 2)


def _one_update(theta, config, lr=1.0, weight_decay=0.0, grad_extra=None, params=None):
    """One step from zero parameters (so ``p - lr * step`` is exactly ``-lr * step``)."""
    params = params or [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = SmallFCLOpt(params, theta, config, num_steps=100, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = 0.1 * torch.randn(p.shape, generator=gen)
        if grad_extra is not None:
            p.grad = p.grad + grad_extra(p)
    opt.step()
    return [p.detach().clone() for p in params]


def test_lr_multiplies_the_step():
    theta = make_theta(CONFIG)
    full = _one_update(theta, CONFIG)
    half = _one_update(theta, CONFIG, lr=0.5)
    assert any(u.abs().max() > 0 for u in full)
    for a, b in zip(full, half, strict=True):
        assert torch.equal(b, 0.5 * a)


def test_weight_decay_adds_wd_times_p_to_the_gradient():
    theta = make_theta(CONFIG)
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    with_wd = _one_update(
        theta, CONFIG, weight_decay=0.1, params=[torch.nn.Parameter(x.clone()) for x in init]
    )
    manual = _one_update(
        theta,
        CONFIG,
        grad_extra=lambda p: 0.1 * p.detach(),
        params=[torch.nn.Parameter(x.clone()) for x in init],
    )
    plain = _one_update(theta, CONFIG, params=[torch.nn.Parameter(x.clone()) for x in init])
    for a, b in zip(with_wd, manual, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(with_wd, plain, strict=True))


@pytest.mark.parametrize("key", ["momentum_decays", "rms_decays", "adafactor_decays"])
def test_decays_are_read_from_theta(key):
    theta = make_theta(CONFIG)
    base = _one_update(theta, CONFIG)
    changed = dict(theta)
    changed[key] = theta[key] + 0.2
    other = _one_update(changed, CONFIG)
    assert any(not torch.equal(a, b) for a, b in zip(base, other, strict=True))


def test_scalar_path_and_separate_weights_match_matrix_path():
    # concat_weights=False runs the reference's scalar-math path; with make_separate_weights the MLP is
    # stored as scalars. Same function, other summation order: float32 rounding (1e-5 relative).
    cfg = {"hidden_size": 3, "step_mult": 0.1}
    theta = make_theta(cfg)
    sep = {k: v for k, v in theta.items() if not k.startswith("nn.")}
    for i in range(3):
        w, b = theta[f"nn.w{i}"], theta[f"nn.b{i}"]
        for v in range(w.shape[0]):
            for o in range(w.shape[1]):
                sep[f"nn.w{i}_{v}_{o}"] = w[v, o].clone()
        for o in range(b.shape[0]):
            sep[f"nn.b{i}_{o}"] = b[o].clone()
    ref = _one_update(theta, cfg)
    scalar = _one_update(theta, {**cfg, "concat_weights": False})
    separate = _one_update(sep, {**cfg, "concat_weights": False, "make_separate_weights": True})
    for a, b, c in zip(ref, scalar, separate, strict=True):
        assert a.abs().max() > 0
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        assert torch.equal(b, c)


def test_scalar_param_is_normalised_on_its_own():
    # The reference reshapes 0-d params to (1,): each feature is divided by its own magnitude.
    theta = make_theta(CONFIG)
    p = torch.nn.Parameter(torch.tensor(0.7))
    opt = SmallFCLOpt([p], theta, CONFIG, num_steps=10)
    p.grad = torch.tensor(0.3)
    opt.step()
    assert p.shape == () and torch.isfinite(p) and p.item() != 0.7
    assert opt.state[p]["mom"].shape == (1, 3) and opt.state[p]["fac_full"].shape == (1, 3)


def test_factored_dims_follow_numpy_argsort():
    import numpy as np

    for shape in [(4, 4, 3, 3), (64, 64, 3, 3), (512, 384), (5, 1), (3, 40)]:
        order = np.argsort(shape)
        assert factored_dims(shape) == (int(order[-2]), int(order[-1]))
    assert factored_dims((7,)) is None and factored_dims(()) is None


def test_bad_theta_is_refused():
    theta = make_theta(CONFIG)
    params = make_params()
    with pytest.raises(ValueError, match="momentum_decays"):
        SmallFCLOpt(params, {k: v for k, v in theta.items() if k != "momentum_decays"}, CONFIG, num_steps=10)
    with pytest.raises(ValueError, match="adafactor_decays"):
        SmallFCLOpt(params, theta, {**CONFIG, "initial_adafactor_decays": [0.9]}, num_steps=10)
    with pytest.raises(ValueError, match="inputs"):
        bad = dict(theta)
        bad["nn.w0"] = theta["nn.w0"][:30]
        SmallFCLOpt(params, bad, CONFIG, num_steps=10)
