"""The fused paths' safety net (pylo_runtime.dispatch.verified), simulated on the CPU.

With the default flags a fused path (Triton on CUDA, the C passes on the CPU) first steps one tensor of each
kernel variant on copies, by the kernels and by the reference, once per process: a kernel that does not
compile or launch, or whose update differs from the reference by more than 1e-5 (relative, one ulp
forgiven), gives one warning naming the reason and the foreach path from then on (nothing written by the
failed kernel). ``fused=True`` raises instead. No GPU here: "Triton on CUDA" is simulated by making the
default pick Triton on the CPU, with a failing kernel, a kernel made wrong on purpose, and the real kernels
under ``TRITON_INTERPRET=1`` (in a child process: triton reads it when the kernels are defined).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fused_support import adafac_theta, grad_stream, make_params, velo_theta

from lopt_bridge.pylo_runtime import adafac, dispatch, velo
from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt
from lopt_bridge.pylo_runtime.kernels.cpu import passes
from lopt_bridge.pylo_runtime.velo import VeLO

HERE = Path(__file__).resolve().parent
SHAPES = [(), (7,), (3, 40), (8, 8), (2, 3, 5)]


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test starts in a 'new process' as far as the self-check goes."""
    monkeypatch.setattr(dispatch, "_VERIFIED", set())
    monkeypatch.setattr(dispatch, "_BROKEN", {})


@pytest.fixture
def triton_by_default(monkeypatch):
    """Make the default flags pick the Triton path on CPU tensors, as they do on CUDA."""
    real = dispatch._fused_backend
    monkeypatch.setattr(dispatch, "_fused_backend", lambda device, explicit, env: "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    yield
    monkeypatch.setattr(dispatch, "_fused_backend", real)


def _make(family: str, params, **flags):
    if family == "velo":
        theta, cfg = velo_theta(param_scale_mult=False, step_mult=0.3)
        return VeLO(params, theta, cfg, num_steps=50, **flags)
    theta, cfg = adafac_theta(8)
    return SmallFCLOpt(params, theta, cfg, num_steps=50, **flags)


def _triton_module(family: str):
    """Where the family's Triton path lives (its glue: the kernels are under pylo_runtime.kernels.triton)."""
    return (velo, "_triton_velo") if family == "velo" else (adafac, "_triton_adafac")


def _train(opt, params, steps: int) -> None:
    for t, gs in enumerate(grad_stream(SHAPES, steps)):
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step(loss=3.0 - 0.1 * t)


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", ["velo", "small_fc_lopt"])
def test_kernel_that_fails_to_launch_falls_back_with_one_warning(family, triton_by_default, monkeypatch):
    module, name = _triton_module(family)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: PTX assembly failed\nmore detail")

    monkeypatch.setattr(module, name, broken)
    pa, pb = make_params(SHAPES), make_params(SHAPES)
    opt, want = _make(family, pa), _make(family, pb, fused=False)
    with pytest.warns(RuntimeWarning) as record:
        _train(opt, pa, 3)
    msgs = [str(w.message) for w in record if "lopt-bridge" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert (
        "fused-triton kernels: failed to compile or run (RuntimeError: simulated: PTX assembly failed)"
        in msgs[0]
    )
    assert "using the foreach path" in msgs[0]
    assert opt.last_path == "foreach"
    _train(want, pb, 3)
    assert _equal(pa, pb)  # the failed kernel wrote nothing: the run is the foreach run, bit for bit


@pytest.mark.parametrize("family", ["velo", "small_fc_lopt"])
def test_fused_true_still_raises(family, triton_by_default, monkeypatch):
    module, name = _triton_module(family)
    monkeypatch.setattr(module, name, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    params = make_params(SHAPES)
    opt = _make(family, params, fused=True)
    with pytest.raises(
        dispatch.FusedUnavailableError, match="failed to compile or run.*fused=True cannot run"
    ):
        _train(opt, params, 1)


@pytest.mark.parametrize("family", ["velo", "small_fc_lopt"])
def test_wrong_kernel_is_caught_by_the_self_check(family, triton_by_default, monkeypatch):
    """A kernel 'made wrong on purpose': the torch-ops path with every update scaled by 1 + 1e-3."""
    module, name = _triton_module(family)
    impl = velo._multi_tensor_velo if family == "velo" else adafac._multi_tensor_adafac

    def wrong(params, *args, **kwargs):
        before = [p.detach().clone() for p in params]
        impl(params, *args, **kwargs)
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b + (p - b) * (1.0 + 1e-3))

    monkeypatch.setattr(module, name, wrong)
    pa, pb = make_params(SHAPES), make_params(SHAPES)
    opt, want = _make(family, pa), _make(family, pb, fused=False)
    with pytest.warns(
        RuntimeWarning, match=r"differs from the reference by [\d.]+e-0[34] \(bound 1e-05\)"
    ) as rec:
        _train(opt, pa, 2)
    err = float(str(rec[0].message).split("reference by ")[1].split()[0])
    assert 5e-4 < err < 2e-3, err
    assert opt.last_path == "foreach"
    _train(want, pb, 2)
    assert _equal(pa, pb)
    # The verdict holds for the process: a new optimizer with the same config does not try again.
    pc = make_params(SHAPES)
    other = _make(family, pc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(other, pc, 1)
    assert other.last_path == "foreach"


def test_c_passes_are_checked_once_per_process(monkeypatch):
    """The default CPU path (C passes) is checked once per kernel variant, then trusted; a wrong C pass is
    caught the same way (here: its output scaled after the pass)."""
    monkeypatch.setattr(velo, "NATIVE_MIN", 1)
    calls = []
    real = dispatch._check_one
    monkeypatch.setattr(dispatch, "_check_one", lambda *a: calls.append(a[2]) or real(*a))
    for _ in range(2):
        params = make_params(SHAPES)
        opt = _make("velo", params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train(opt, params, 2)
        assert opt.last_path == "fused-cpu"
    assert calls == [3, 4]  # once per rank: on the smallest 2-D tensor, (8, 8), and the 3-D (2, 3, 5)

    monkeypatch.setattr(dispatch, "_VERIFIED", set())
    orig = passes.velo_pass2

    def wrong(pf, *args):
        before = pf.clone()
        orig(pf, *args)
        pf.copy_(before + (pf - before) * 1.01)

    monkeypatch.setattr(passes, "velo_pass2", wrong)
    params = make_params(SHAPES)
    opt = _make("velo", params)
    with pytest.warns(RuntimeWarning, match="fused-cpu kernels: its update of a 8x8 float32 tensor differs"):
        _train(opt, params, 1)
    assert opt.last_path == "foreach"


def test_nonfinite_results_agree_only_when_both_sides_have_them():
    """The self-check's metric: NaN where both sides have NaN is agreement; a one-sided NaN or inf is not."""
    one, nan = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    inf = torch.tensor([1.0, float("inf"), 1.0])
    assert dispatch.update_error(torch.zeros(3), nan, nan.clone()) == 0.0
    assert dispatch.update_error(torch.zeros(3), inf, inf.clone()) == 0.0
    assert dispatch.update_error(torch.zeros(3), nan, one) == float("inf")
    assert dispatch.update_error(torch.zeros(3), one, nan) == float("inf")
    assert dispatch.update_error(torch.zeros(3), inf, -inf) == float("inf")


def test_propagated_nan_reaches_the_reference_result(monkeypatch):
    """``nonfinite="propagate"`` promises the reference's behaviour. The C passes do not spread a NaN gradient
    element over the tensor as the reference does (its factored statistics do), so when the checked step
    holds one the self-check sees the difference and the foreach path, which does, takes over."""
    monkeypatch.setattr(velo, "NATIVE_MIN", 1)
    params = make_params(SHAPES)
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt, opt_ref = _make("velo", params, nonfinite="propagate"), _make("velo", ref, nonfinite="propagate",
                                                                       foreach=False)  # fmt: skip
    for ps in (params, ref):
        for p, g in zip(ps, grad_stream(SHAPES, 1)[0], strict=True):
            p.grad = g.clone()
        ps[3].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="8x8 float32 tensor differs from the reference by inf"):
        opt.step(loss=torch.tensor(1.0))
    opt_ref.step(loss=torch.tensor(1.0))
    assert opt.last_path == "foreach" and torch.isnan(params[3]).all()
    for p, q in zip(params, ref, strict=True):
        assert torch.equal(torch.isnan(p), torch.isnan(q))


CHILD = r"""
import json, warnings
import torch
from lopt_bridge.pylo_runtime import dispatch
dispatch._fused_backend = lambda device, explicit, env: "triton"
from test_fused_fallback import SHAPES, _make, _train
from fused_support import make_params
out = {}
for family in ("velo", "small_fc_lopt"):
    params = make_params(SHAPES)
    opt = _make(family, params)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _train(opt, params, 2)
    out[family] = [opt.last_path, [str(x.message) for x in w if "lopt-bridge" in str(x.message)],
                   sorted(str(k[3]) for k in dispatch._VERIFIED if k[0] == opt.architecture)]
print("RESULT " + json.dumps(out))
"""


def test_real_triton_kernels_pass_their_self_check_under_the_interpreter():
    pytest.importorskip("triton", reason="triton is optional (pip install 'lopt-bridge[triton]')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600, cwd=HERE
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    for family, (path, warned, variants) in out.items():
        assert path == "fused-triton" and not warned, (family, path, warned)
        # one check per kernel variant: (float32, rank <= 1) and (float32, factored)
        assert variants == ["(torch.float32, False)", "(torch.float32, True)"], variants
