"""Celo and Celo-Adam's fast paths (foreach, the C passes, the Triton kernels) against their reference paths
and the JAX fixtures.

Celo runs VeLO's per-element machinery (``velo._tensor_mlp_out``, VeLO's C passes and Triton kernels) with
one MLP for every tensor and the scheduler's multiplier; Celo-Adam has its own element-wise C pass and
Triton kernel. Bar: float32, max over steps and tensors of ``|u_fast - u_ref|_inf / |u_ref|_inf <= 1e-5``
per update, one ulp of ``p + u`` forgiven (tests/test_native_cpu.py's); 2000-step open-loop drift <= 1e-4.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_support import random_theta
from fused_support import SHAPES, celo_theta, flags, grad_stream, make_params, run_pair

from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture, repo_root
from lopt_bridge.parity_tests.replay import check_fixture
from lopt_bridge.pylo_runtime import dispatch, velo
from lopt_bridge.pylo_runtime.celo import Celo
from lopt_bridge.pylo_runtime.celo_adam import CeloAdam
from lopt_bridge.pylo_runtime.kernels.cpu import passes

HERE = Path(__file__).resolve().parent
TOL = 1e-5
#: Tall, wide, fewer columns than a tile (48), an odd element count: every row / tile split of the C passes.
C_SHAPES = [(130, 600), (600, 130), (2003, 40), (7, 11)]
#: Rank 3 and 4 on the C passes (tests/test_native_cpu.py ND_SHAPES): ResNet conv kernels, a small 3-D
#: tensor, a wide and a tall one.
ND_SHAPES = [(64, 3, 7, 7), (128, 64, 3, 3), (64, 64, 1, 1), (7, 5, 3), (3, 600, 5), (600, 5, 3)]
LOSSES = [3.0 - 0.2 * t for t in range(4)]


@pytest.fixture(autouse=True)
def c_passes_for_fused(monkeypatch):
    """In this process ``fused=True`` means the C passes (the suite runs under TRITON_INTERPRET=1, where it
    means the Triton kernels: those run in a child process below)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def low_thresholds(monkeypatch):
    """Send every 2-D tensor to the C passes (the size threshold is about speed, not math)."""
    monkeypatch.setattr(velo, "NATIVE_MIN", 1)


@pytest.fixture
def calls(monkeypatch):
    """Count the C passes run (a test fails if the C path silently stepped aside); the once-per-process
    self-check is taken as done, so that only steps count."""

    class AllVerified(set):
        def __contains__(self, key: object) -> bool:
            return True

    monkeypatch.setattr(dispatch, "_VERIFIED", AllVerified())
    seen = []
    for name in ("velo_pass1", "velo_pass2", "celo_adam_step"):
        orig = getattr(passes, name)

        def spy(*a, _name=name, _orig=orig, **k):
            seen.append((_name, k.get("lstm_stats", True)))
            return _orig(*a, **k)

        monkeypatch.setattr(passes, name, spy)
    return seen


@pytest.fixture(autouse=True)
def threads():
    """One thread unless a test asks for more (tiny products with several OpenMP threads spin on a busy
    CPU); torch's count restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.set_num_threads
    torch.set_num_threads(n)


def _celo(num_steps: int = 100, **config):
    theta, cfg = celo_theta(**config)
    return lambda params, which: Celo(params, theta, cfg, num_steps=num_steps, **flags(which))


def _celo_adam(num_steps: int = 100, **config):
    theta, cfg = random_theta("celo_adam")
    cfg = {**cfg, **config}
    return lambda params, which: CeloAdam(params, theta, cfg, num_steps=num_steps, **flags(which))


CELO_CONFIGS = [
    {},  # the published options: param_scale_mult, phase 2 (the LSTM's multiplier applied)
    {"train_phase": 1, "precondition_output": True, "clip_param_scale_amount": 0.5, "param_inits": 3},
    {"param_scale_mult": False, "step_mult": 0.01, "ff_hidden_size": 8},
]
CELO_ADAM_CONFIGS = [
    {},  # the published options
    {"param_scale_mult": True},
    {"initial_momentum_decays": [0.9, 0.99], "initial_rms_decays": [0.999, 0.9], "mom_decay": False},
]


# ------------------------------------------------------------------------------------------------------
# Celo
@pytest.mark.parametrize("n_threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("config", CELO_CONFIGS, ids=["default", "phase1-precond-inits3", "no-scale-h8"])
@pytest.mark.parametrize("shapes", [C_SHAPES, ND_SHAPES], ids=["2-D", "3-D-4-D"])
def test_celo_c_passes_match_reference(low_thresholds, calls, threads, n_threads, config, shapes):
    threads(n_threads)
    errs, oa, ob = run_pair(_celo(**config), shapes, grad_stream(shapes, 3), losses=LOSSES, fast=True)
    assert ob.last_path == "fused-cpu"
    assert max(errs) <= TOL, errs
    assert calls.count(("velo_pass2", True)) == 3 * len(shapes)
    assert calls.count(("velo_pass1", False)) == 3 * len(shapes)  # no per-tensor LSTM statistics
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        sa, sb = oa.state[pa], ob.state[pb]
        for k in ("mom", "rms"):  # rounded op for op as the reference's
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=0)
        for k in ("fac_row", "fac_col"):  # means: summation order only
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", CELO_CONFIGS, ids=["default", "phase1-precond-inits3", "no-scale-h8"])
@pytest.mark.parametrize("fast", ["foreach", None])
def test_celo_fast_paths_every_rank(low_thresholds, config, fast):
    """Every rank 0-D to 4-D (tied sizes, size-1 dims) and a matrix on the C passes: foreach and default."""
    shapes = SHAPES + [(40, 130)]
    errs, oa, ob = run_pair(_celo(**config), shapes, grad_stream(shapes, 3), losses=LOSSES, fast=fast)
    assert ob.last_path == ("foreach" if fast == "foreach" else "fused-cpu")
    assert max(errs) <= TOL, errs
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        assert {k: v.shape for k, v in oa.state[pa].items()} == {k: v.shape for k, v in ob.state[pb].items()}


def test_celo_bf16_params_round_once(low_thresholds, calls):
    """bf16 params: float32 state and math, the result rounded once into the bf16 param."""
    shapes = [(7,), (40, 50)]
    grads = grad_stream(shapes, 2)
    _, oa, ob = run_pair(_celo(step_mult=0.3), shapes, grads, dtype=torch.bfloat16, scale=1.0,
                         losses=LOSSES, fast=True)  # fmt: skip
    assert calls, "the C passes did not run"
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        assert pa.dtype == pb.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * pa.detach().float().abs()
        assert bool(((pa.detach().float() - pb.detach().float()).abs() <= ulp).all())


def test_celo_group_lr_and_none_grads(low_thresholds):
    shapes = [(5,), (6, 7), (30, 20)]
    theta, cfg = celo_theta()
    pa, pb = make_params(shapes), make_params(shapes)
    oa = Celo([{"params": pa, "lr": 0.3}], theta, cfg, num_steps=50, foreach=False)
    ob = Celo([{"params": pb, "lr": 0.3}], theta, cfg, num_steps=50, fused=True)
    for t, gs in enumerate(grad_stream(shapes, 3)):
        before = [p.detach().clone() for p in pa]
        for p, g in zip(pa + pb, gs + gs, strict=True):
            p.grad = g.clone()
        pa[0].grad = pb[0].grad = None
        oa.step(loss=2.0 - 0.1 * t)
        ob.step(loss=2.0 - 0.1 * t)
        assert torch.equal(pb[0], before[0])
        from fused_support import update_error

        assert update_error(before[1:], pa[1:], pb[1:]) <= TOL
    assert len(ob.state[pb[0]]) == 0


# ------------------------------------------------------------------------------------------------------
# Celo-Adam
def _noncontiguous_and_all_ranks():
    return SHAPES + [(130, 600), (3, 5, 7)]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("config", CELO_ADAM_CONFIGS, ids=["default", "param-scale", "decays2-nocorr"])
@pytest.mark.parametrize("fast", ["foreach", True])
def test_celo_adam_fast_paths_match_reference(calls, threads, n_threads, config, fast):
    """Accumulators bit for bit on both fast paths; the update to float32 rounding (the C pass's IEEE sqrt
    against torch's vectorised one, 0.55 ulp)."""
    threads(n_threads)
    shapes = _noncontiguous_and_all_ranks()
    errs, oa, ob = run_pair(_celo_adam(**config), shapes, grad_stream(shapes, 4), losses=LOSSES, fast=fast)
    assert ob.last_path == ("foreach" if fast == "foreach" else "fused-cpu")
    assert max(errs) <= 1e-6, errs  # well inside the bar: one sqrt rounding
    if fast is True:
        assert calls.count(("celo_adam_step", True)) == 4 * len(shapes)
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        for k in ("mom", "rms"):
            assert torch.equal(oa.state[pa][k], ob.state[pb][k]), k
        assert set(ob.state[pb]) == {"mom", "rms"}  # no Adafactor accumulators (module docstring)


def test_celo_adam_big_grads_are_clipped_and_nan_propagates(calls):
    """The C pass clips as torch.clamp does (NaN stays NaN) before the accumulators (nonfinite="propagate";
    the self-check is taken as done: it would count the NaN update as a disagreement)."""
    shapes = [(4, 5)]
    g = torch.linspace(-3000.0, 3000.0, 20).reshape(4, 5)
    g[1, 1] = float("nan")
    outs = []
    for which in ("reference", None):
        p = make_params(shapes)
        opt = _celo_adam()(p, which)
        opt.nonfinite = "propagate"
        p[0].grad = g.clone()
        opt.step(loss=2.0)
        outs.append((p[0].detach().clone(), opt.state[p[0]]["mom"].clone()))
    (pa, ma), (pb, mb) = outs
    assert torch.equal(ma.isnan(), mb.isnan()) and torch.equal(ma.nan_to_num(), mb.nan_to_num())
    assert torch.equal(pa.isnan(), pb.isnan())
    assert calls == [("celo_adam_step", True)]
    assert float(ma.nan_to_num().abs().max()) == pytest.approx(100.0)  # 0.1 * 1000: clipped


def test_celo_adam_noncontiguous_bf16_and_group_lr():
    base = torch.randn(12, 10) * 1e-3
    pa = [base.t().clone().requires_grad_(), torch.randn(9).bfloat16().requires_grad_()]
    pb = [base.clone().t().requires_grad_(), pa[1].detach().clone().requires_grad_()]
    assert not pb[0].is_contiguous()
    theta, cfg = random_theta("celo_adam")
    oa = CeloAdam([{"params": pa, "lr": 0.5}], theta, cfg, num_steps=50, foreach=False)
    ob = CeloAdam([{"params": pb, "lr": 0.5}], theta, cfg, num_steps=50, fused=True)
    for t in range(3):
        gs = [torch.randn(10, 12), torch.randn(9).bfloat16()]
        for p, g in zip(pa + pb, gs + gs, strict=True):
            p.grad = g.clone()
        oa.step(loss=2.0 - 0.1 * t)
        ob.step(loss=2.0 - 0.1 * t)
        assert ob.last_path == "fused-cpu"
        torch.testing.assert_close(pb[0].detach(), pa[0].detach(), rtol=1e-6, atol=1e-9)
        eps = torch.finfo(torch.bfloat16).eps
        assert bool(((pa[1].float() - pb[1].float()).abs() <= eps * pa[1].float().abs()).all())
    assert pb[1].dtype == torch.bfloat16


def test_celo_adam_state_dict_resumes_across_paths():
    """Fused and reference paths keep the same state: save on one, resume on the other, bit for bit state."""
    shapes = [(6, 7), (5,)]
    grads = grad_stream(shapes, 6)
    theta, cfg = random_theta("celo_adam")
    pa = make_params(shapes)
    full = CeloAdam(pa, theta, cfg, num_steps=50, foreach=False)
    pb = make_params(shapes)
    first = CeloAdam(pb, theta, cfg, num_steps=50, fused=True)
    for t in range(6):
        for p, g in zip(pa, grads[t], strict=True):
            p.grad = g.clone()
        full.step(loss=2.0 - 0.1 * t)
        if t < 3:
            for p, g in zip(pb, grads[t], strict=True):
                p.grad = g.clone()
            first.step(loss=2.0 - 0.1 * t)
            if t == 2:
                saved = copy.deepcopy(first.state_dict())
                pc = [p.detach().clone().requires_grad_() for p in pb]
                resumed = CeloAdam(pc, theta, cfg, num_steps=50, foreach=False)
                resumed.load_state_dict(saved)
        else:
            for p, g in zip(pc, grads[t], strict=True):
                p.grad = g.clone()
            resumed.step(loss=2.0 - 0.1 * t)
    for a, c in zip(pa, pc, strict=True):
        torch.testing.assert_close(c.detach(), a.detach(), rtol=1e-6, atol=1e-9)
        assert torch.equal(full.state[a]["mom"], resumed.state[c]["mom"])


# ------------------------------------------------------------------------------------------------------
# The JAX fixtures through the fast paths
FIXTURES = repo_root() / "parity_tests" / "fixtures"
CASES = ["celo_random", "celo_random_inits3", "celo_real", "celo_adam_random", "celo_adam_real"]


def _fixture_factory(case: str, **options):
    from lopt_bridge.converter.architectures.celo import CELO, CELO_ADAM
    from lopt_bridge.converter.flax_msgpack import load

    fx = load_fixture(FIXTURES / case)
    src = fx.source_path()
    if not src.is_file():
        pytest.skip(f"{src} absent (the published weights live in ../shared/checkpoints)")
    arch, cls = {"celo": (CELO, Celo), "celo_adam": (CELO_ADAM, CeloAdam)}[fx.meta["architecture"]]
    spec = arch.build(load(src), dict(fx.meta.get("convert_sets") or {}), source=str(src))
    theta = {k: torch.from_numpy(v) for k, v in spec.tensors.items()}
    return lambda fx, params, _ckpt: cls(params, theta, spec.config, num_steps=int(fx.meta["num_steps"]),
                                          **options)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fast", [{"fused": True}, {"foreach": True}], ids=["fused-cpu", "foreach"])
def test_fixtures_replay_through_the_fast_paths(case, fast, low_thresholds, calls, threads):
    """Every Celo / Celo-Adam JAX recording, its 2-D tensors through the C passes (fused) or the foreach
    path: the bound of ``lopt-parity run`` (1e-5 per step and tensor, float32, one ulp forgiven)."""
    res = check_fixture(
        FIXTURES / case, open_loop=False, convert=None, factory=_fixture_factory(case, **fast)
    )
    if "fused" in fast:
        assert calls, "no tensor went through the C passes"
    else:
        assert not calls
    worst = np.unravel_index(np.argmax(res.errors), res.errors.shape)
    assert res.errors.max() <= FLOAT32_TOLERANCE, (float(res.errors.max()), worst)


# ------------------------------------------------------------------------------------------------------
# 2000 steps open loop
@pytest.mark.slow
@pytest.mark.parametrize("family", ["celo", "celo_adam"])
def test_open_loop_drift_2000_steps(family, low_thresholds):
    """2000 steps on the same gradient stream, no resets, the fused CPU path (2-D tensor on the C passes)
    against the reference: max relative param difference <= 1e-4."""
    shapes = [(4, 5)] if family == "celo" else [(), (4, 5)]
    steps = 2000
    grads = grad_stream(shapes, steps)
    pa, pb = make_params(shapes, scale=0.1), make_params(shapes, scale=0.1)
    make = _celo(steps, step_mult=0.01) if family == "celo" else _celo_adam(steps)
    oa, ob = make(pa, "reference"), make(pb, True)
    for t in range(steps):
        for p, g in zip(pa + pb, grads[t] + grads[t], strict=True):
            p.grad = g
        loss = 2.0 * 0.999**t
        oa.step(loss=loss)
        ob.step(loss=loss)
    assert ob.last_path == "fused-cpu"
    moved = max(
        float((a.detach() - a0.detach()).abs().max())
        for a, a0 in zip(pa, make_params(shapes, 0.1), strict=True)
    )
    assert moved > 1e-3  # the run did something
    drift = max(
        float((a.detach() - b.detach()).abs().max() / a.detach().abs().max())
        for a, b in zip(pa, pb, strict=True)
    )
    assert drift <= 1e-4, drift


# ------------------------------------------------------------------------------------------------------
# The self-check (dispatch.verified) covers the new kernels
@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(dispatch, "_VERIFIED", set())
    monkeypatch.setattr(dispatch, "_BROKEN", {})


@pytest.mark.parametrize("family", ["celo", "celo_adam"])
def test_wrong_c_pass_is_caught_by_the_self_check(family, fresh_checks, low_thresholds, monkeypatch):
    name = "velo_pass2" if family == "celo" else "celo_adam_step"
    orig = getattr(passes, name)

    def wrong(pf, *args, **kwargs):
        before = pf.clone()
        orig(pf, *args, **kwargs)
        pf.copy_(before + (pf - before) * 1.01)

    monkeypatch.setattr(passes, name, wrong)
    make = _celo() if family == "celo" else _celo_adam()
    shapes = [(), (7,), (8, 8), (3, 40)]
    params = make_params(shapes)
    opt = make(params, None)
    with pytest.warns(
        RuntimeWarning, match="fused-cpu kernels: its update of a .* differs from the reference"
    ):
        for t, gs in enumerate(grad_stream(shapes, 2)):
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step(loss=3.0 - 0.1 * t)
    assert opt.last_path == "foreach"
    with pytest.raises(dispatch.FusedUnavailableError, match="differs from the reference"):
        params = make_params(shapes)
        opt = make(params, True)
        for p, g in zip(params, grad_stream(shapes, 1)[0], strict=True):
            p.grad = g
        opt.step(loss=3.0)


CHILD = r"""
import json, sys, warnings
import torch
DEVICE = sys.argv[1]
from lopt_bridge.pylo_runtime import dispatch
from fused_support import SHAPES, celo_theta, flags, grad_stream, make_params, run_pair
from distributed_support import random_theta
from lopt_bridge.pylo_runtime.celo import Celo
from lopt_bridge.pylo_runtime.celo_adam import CeloAdam

out = {}
def celo(**config):
    theta, cfg = celo_theta(**config)
    return lambda ps, fused: Celo(ps, theta, cfg, num_steps=100, **flags(fused))
def celo_adam(**config):
    theta, cfg = random_theta("celo_adam")
    return lambda ps, fused: CeloAdam(ps, theta, {**cfg, **config}, num_steps=100, **flags(fused))
losses = [3.0, 2.5]
g = grad_stream(SHAPES, 2)
kw = dict(fast=True, device=DEVICE, losses=losses)
out["celo_default"] = run_pair(celo(), SHAPES, g, **kw)[0]
out["celo_phase1_precond_inits3"] = run_pair(
    celo(train_phase=1, precondition_output=True, clip_param_scale_amount=0.5, param_inits=3), SHAPES, g[:1],
    **kw)[0]
out["celo_adam_default"] = run_pair(celo_adam(), SHAPES, g, **kw)[0]
out["celo_adam_options"] = run_pair(celo_adam(param_scale_mult=True, initial_momentum_decays=[0.9, 0.99],
                                              mom_decay=False), SHAPES, g, **kw)[0]
shapes = [(7,), (4, 6)]
ulps = []
for make in (celo(), celo_adam()):
    _, oa, ob = run_pair(make, shapes, grad_stream(shapes, 1), dtype=torch.bfloat16, scale=1.0, **kw)
    pa, pb = oa.param_groups[0]["params"], ob.param_groups[0]["params"]
    eps = torch.finfo(torch.bfloat16).eps
    ulps += [float(((a.detach().float() - b.detach().float()).abs()
                    / (eps * a.detach().float().abs().clamp(min=1e-30))).max()) for a, b in zip(pa, pb)]
    assert all(p.dtype == torch.bfloat16 for p in pb)
out["bf16_max_ulps"] = max(ulps)
# the default flags on the device: the self-check passes without a warning, one check per kernel variant
if DEVICE == "cpu":
    dispatch._fused_backend = lambda device, explicit, env: "triton"
dispatch._VERIFIED.clear()
checked = {}
for name, make in (("celo", celo()), ("celo_adam", celo_adam())):
    params = make_params(SHAPES, device=DEVICE)
    opt = make(params, None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for t, gs in enumerate(grad_stream(SHAPES, 2)):
            for p, gg in zip(params, gs):
                p.grad = gg.to(DEVICE)
            opt.step(loss=3.0 - 0.1 * t)
    checked[name] = [opt.last_path, [str(x.message) for x in w if "lopt-bridge" in str(x.message)],
                     sorted(str(k[3]) for k in dispatch._VERIFIED if k[0] == opt.architecture)]
out["self_check"] = checked
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", id="interpreter", marks=pytest.mark.slow),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.slow, pytest.mark.gpu]),
    ],
)
def test_triton_kernels_match_reference(device):
    """Celo on VeLO's Triton kernels, Celo-Adam on its own, under ``TRITON_INTERPRET=1`` (or compiled on a
    GPU); the default path's self-check covers each kernel variant and passes without a warning."""
    pytest.importorskip(
        "triton", reason="triton is an optional dependency (pip install 'lopt-bridge[triton]')"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, device], env=env, capture_output=True, text=True, timeout=900, cwd=HERE
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    for case in ("celo_default", "celo_phase1_precond_inits3", "celo_adam_default", "celo_adam_options"):
        assert max(out[case]) <= TOL, (case, out[case])
    assert out["bf16_max_ulps"] <= 1.0, out["bf16_max_ulps"]
    celo_run, adam_run = out["self_check"]["celo"], out["self_check"]["celo_adam"]
    assert celo_run[:2] == ["fused-triton", []], celo_run
    assert celo_run[2] == ["(torch.float32, False)", "(torch.float32, True)"], celo_run
    assert adam_run[:2] == ["fused-triton", []] and adam_run[2] == ["(torch.float32,)"], adam_run


def test_no_warning_on_the_default_cpu_path(fresh_checks):
    """The default CPU path runs its self-check once (the smallest tensor per variant: Celo's C passes per
    rank) without a warning."""
    shapes = [(), (7,), (64, 80), (100, 90), (64, 8, 3, 3)]
    for make in (_celo(), _celo_adam()):
        params = make_params(shapes)
        opt = make(params, None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for t, gs in enumerate(grad_stream(shapes, 2)):
                for p, g in zip(params, gs, strict=True):
                    p.grad = g
                opt.step(loss=3.0 - 0.1 * t)
        assert opt.last_path == "fused-cpu"
    keys = sorted(str(k[3]) for k in dispatch._VERIFIED)
    assert keys == ["('c-pass',)", "('c-passes', 2)", "('c-passes', 4)"], keys
