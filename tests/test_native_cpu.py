"""The hand-fused C passes of the fused CPU path (pylo_runtime.kernels.cpu, lopt_cpu.c).

Same bar as tests/test_fused_cpu.py: float32, max relative update error vs the reference path <= 1e-5 per
step (they differ in summation order, FMA contraction and a polynomial exp, ~1e-7), one ulp of ``p + u``
forgiven. CI builds the library with the system compiler, so these tests run there (none skips on Linux).
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fused_support import adafac_theta, flags, grad_stream, run_pair, velo_theta

from lopt_bridge.parity_tests.commands import DEFAULT_FIXTURES
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import discover, load_fixture, repo_root
from lopt_bridge.parity_tests.replay import convert_fixture, replay
from lopt_bridge.pylo_runtime import adafac, dispatch, velo
from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt
from lopt_bridge.pylo_runtime.kernels.cpu import build as native
from lopt_bridge.pylo_runtime.kernels.cpu import passes
from lopt_bridge.pylo_runtime.mulo import MuLO
from lopt_bridge.pylo_runtime.velo import VeLO

TOL = 1e-5
#: Tall, wide, fewer columns than a tile (48), an odd element count: every row / tile split the passes do.
SHAPES = [(130, 600), (600, 130), (2003, 40), (7, 11)]
#: Rank 3 and 4 (ResNet conv kernels (out, in, kh, kw) with 7x7 / 3x3 / 1x1 windows, a small 3-D tensor, a
#: wide and a tall one): the factored dims (the two largest) anywhere in the shape, runs of 1..49 elements
#: along which a row / column entry stays or advances, size-1 axes.
ND_SHAPES = [(64, 3, 7, 7), (128, 64, 3, 3), (64, 64, 1, 1), (7, 5, 3), (3, 600, 5), (600, 5, 3)]


@pytest.fixture
def low_thresholds(monkeypatch):
    """Send every 2-D tensor to the C passes (the size thresholds are about speed, not math)."""
    monkeypatch.setattr(adafac, "SMALL", 1)
    monkeypatch.setattr(velo, "NATIVE_MIN", 1)


@pytest.fixture
def calls(monkeypatch):
    """Count the MLP passes run (so a test fails if the C path silently stepped aside). The fused paths'
    once-per-process self-check (tests/test_fused_fallback.py) is taken as done, so that only steps count."""

    class AllVerified(set):
        def __contains__(self, key: object) -> bool:
            return True

    monkeypatch.setattr(dispatch, "_VERIFIED", AllVerified())
    seen = []
    for name in ("sfc_pass2", "velo_pass2"):
        orig = getattr(passes, name)

        def spy(*a, _name=name, _orig=orig, **k):
            seen.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(passes, name, spy)
    return seen


def _adafac(cls=SmallFCLOpt, hidden=32):
    theta, cfg = adafac_theta(hidden)
    return lambda params, fused: cls(params, theta, cfg, num_steps=100, **flags(fused))


def _velo(**config):
    theta, cfg = velo_theta(**config)
    return lambda params, fused: VeLO(params, theta, cfg, num_steps=100, **flags(fused))


def test_library_builds_and_shares_torchs_openmp():
    lib = native.library()
    assert lib is not None, "CI has a C compiler: the native passes must build"
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if torch_gomp.exists():  # Linux wheels: our parallel regions must run on torch's OpenMP runtime
        ours = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
        theirs = ctypes.cast(ctypes.CDLL(str(torch_gomp)).GOMP_parallel, ctypes.c_void_p).value
        assert ours == theirs, "the native library loaded its own libgomp, not torch's"


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("hidden", [32, 4])
def test_small_fc_lopt_native_matches_reference(low_thresholds, calls, threads, hidden):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        errs, oa, ob = run_pair(_adafac(hidden=hidden), SHAPES, grad_stream(SHAPES, 3))
    finally:
        torch.set_num_threads(n)
    assert max(errs) <= TOL, errs
    assert calls.count("sfc_pass2") == 3 * len(SHAPES)
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        for k, v in oa.state[pa].items():  # the accumulators are rounded op for op as the reference's
            torch.testing.assert_close(ob.state[pb][k], v, rtol=1e-6, atol=0)


def test_mulo_native_uses_scales_and_lr(low_thresholds, calls):
    theta, cfg = adafac_theta(32)

    def make(params, fused):
        groups = [{"params": params[:2], "mup_scale": 0.25}, {"params": params[2:], "lr": 0.5}]
        return MuLO(groups, theta, cfg, num_steps=100, **flags(fused))

    errs, _, _ = run_pair(make, SHAPES, grad_stream(SHAPES, 3))
    assert max(errs) <= TOL, errs
    assert calls.count("sfc_pass2") == 3 * len(SHAPES)


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "config",
    [
        {},  # the default HyperV2 options
        {"param_scale_mult": False, "step_mult": 0.3},
        {"precondition_output": True, "clip_param_scale_amount": 0.5},
    ],
)
def test_velo_native_matches_reference(low_thresholds, calls, threads, config):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    losses = [3.0 - 0.2 * t for t in range(3)]
    try:
        errs, oa, ob = run_pair(_velo(**config), SHAPES, grad_stream(SHAPES, 3), losses=losses)
    finally:
        torch.set_num_threads(n)
    assert max(errs) <= TOL, errs
    assert calls.count("velo_pass2") == 3 * len(SHAPES)
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        sa, sb = oa.state[pa], ob.state[pb]
        for k in ("mom", "rms"):
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=0)
        for k in ("fac_row", "fac_col", "lstm_hidden", "lstm_cell"):  # means / LSTM: summation order only
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "family, config",
    [
        ("small_fc_lopt", {}),
        ("velo", {}),
        ("velo", {"param_scale_mult": False, "step_mult": 0.3}),
        ("velo", {"precondition_output": True, "clip_param_scale_amount": 0.5}),
    ],
)
def test_nd_tensors_on_the_c_passes(low_thresholds, calls, threads, family, config):
    """Conv kernels and other rank-3/4 tensors on the C passes: the 2-D bound and state checks."""
    make = _adafac() if family == "small_fc_lopt" else _velo(**config)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        errs, oa, ob = run_pair(make, ND_SHAPES, grad_stream(ND_SHAPES, 3), losses=[3.0, 2.8, 2.6])
    finally:
        torch.set_num_threads(n)
    assert max(errs) <= TOL, errs
    assert calls.count("sfc_pass2" if family == "small_fc_lopt" else "velo_pass2") == 3 * len(ND_SHAPES)
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True):
        sa, sb = oa.state[pa], ob.state[pb]
        for k in ("mom", "rms"):  # the accumulators are rounded op for op as the reference's
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=0)
        for k in ("fac_row", "fac_col"):  # means: summation order only
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", ND_SHAPES + SHAPES)
def test_gsq_means_reduce_over_the_factored_dims(shape):
    """``gsq_sums`` on any rank: the means of g**2 + 1e-30 over d0 and over d1, shaped as torch.mean's."""
    from lopt_bridge.pylo_runtime.features import factored_dims

    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    d1, d0 = fdims = factored_dims(shape)
    mean_d0, mean_d1 = passes.gsq_means(g, fdims)
    want = g * g + 1e-30  # float32, as lopt_cpu.c squares (its sums are float64)
    torch.testing.assert_close(mean_d0, want.double().mean(d0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_d1, want.double().mean(d1).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["small_fc_lopt", "velo"])
def test_bf16_params_round_once_native(low_thresholds, calls, family):
    """bf16 params: float32 state and math, the result rounded once into the bf16 param."""
    make = _adafac() if family == "small_fc_lopt" else _velo(param_scale_mult=False, step_mult=0.3)
    shapes = [(40, 50)]
    errs, oa, ob = run_pair(make, shapes, grad_stream(shapes, 2), dtype=torch.bfloat16, scale=1.0,
                            losses=[2.0, 1.9])  # fmt: skip
    assert calls, "the C passes did not run"
    pa, pb = oa.param_groups[0]["params"][0], ob.param_groups[0]["params"][0]
    assert pa.dtype == pb.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * pa.detach().float().abs()
    assert bool(((pa.detach().float() - pb.detach().float()).abs() <= ulp).all())


def test_disabled_by_environment_uses_torch_path(monkeypatch, low_thresholds, calls):
    monkeypatch.setenv("LOPT_BRIDGE_NATIVE", "0")
    native.reset()
    try:
        assert native.library() is None
        errs, _, _ = run_pair(_adafac(), SHAPES[:1], grad_stream(SHAPES[:1], 2))
    finally:
        native.reset()
    assert max(errs) <= TOL and not calls


def test_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path, low_thresholds, calls):
    monkeypatch.setenv("CC", "no-such-cc-lopt")
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-cc-lopt'"):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every step
            errs, _, _ = run_pair(_velo(), SHAPES[:1], grad_stream(SHAPES[:1], 2), losses=[2.0, 1.9])
    finally:
        native.reset()
    assert max(errs) <= TOL and not calls


def test_compile_error_names_the_source_and_leaves_no_file(monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="bad.c"):
        native.build()
    left = [f.name for f in (tmp_path / "cache" / "native").iterdir() if not f.name.endswith(".lock")]
    assert not left  # no half-written library (only the build lock stays)


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path))
    first = native.build()
    mtime = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == mtime


FIXTURES = [
    p
    for p in discover(repo_root() / DEFAULT_FIXTURES)
    if load_fixture(p).meta["architecture"] in ("velo", "small_fc_lopt", "mulo")  # celo's VeLO-S copies too
]


#: Fixtures whose options the fast paths do not cover (pylo_runtime.dispatch): concat_weights=False; VeLO
#: with feature flags off and other decay counts.
OUTSIDE_FAST_PATH = {"small_fc_lopt_separate", "velo_ablate"}


@pytest.mark.slow
@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_native_replays_jax_fixtures(path, low_thresholds, calls, tmp_path):
    """Every committed VeLO / small_fc_lopt / muLO JAX recording, its 2-D tensors through the C passes:
    the same bound as ``lopt-parity run`` (1e-5 per step and tensor, float32, one ulp forgiven)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a shared CI box
    try:
        fx = load_fixture(path)
        errors, _ = replay(fx, convert_fixture(fx, tmp_path))
    finally:
        torch.set_num_threads(n)
    if path.name in OUTSIDE_FAST_PATH:  # options the fast paths decline: the reference path runs instead
        assert not calls
    else:
        assert calls, "no tensor went through the C passes"
    worst = np.unravel_index(np.argmax(errors), errors.shape)
    assert errors.max() <= FLOAT32_TOLERANCE, (float(errors.max()), int(worst[0]), fx.names[worst[1]])
