"""The Triton kernels (pylo_runtime.kernels.*_triton) against the reference paths, on the CPU under
``TRITON_INTERPRET=1`` and (marker ``gpu``) compiled on a CUDA device, each in a child process: triton reads
the variable when the kernels are defined.

Tolerance: float32 update error <= 1e-5 per step (the project's parity bar), one ulp of ``p + u`` forgiven.
The interpreter is slow, so: small tensors of every rank, 1 or 2 steps per case (the 2000-step drift test
runs the CPU fast path, tests/test_fused_cpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopt_bridge.pylo_runtime import dispatch
from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt

pytest.importorskip("triton", reason="triton is an optional dependency (pip install 'lopt-bridge[triton]')")

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys
import torch
DEVICE = sys.argv[1]
from fused_support import SHAPES, adafac_theta, flags, grad_stream, run_pair, velo_theta
from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt
from lopt_bridge.pylo_runtime.mulo import MuLO
from lopt_bridge.pylo_runtime.velo import VeLO

out = {}
def adafac(hidden, cls=SmallFCLOpt, **extra):
    theta, cfg = adafac_theta(hidden)
    cfg = {**cfg, **extra}
    return lambda ps, fused: cls(ps, theta, cfg, num_steps=100, **flags(fused))
def velo(**config):
    theta, cfg = velo_theta(**config)
    return lambda ps, fused: VeLO(ps, theta, cfg, num_steps=100, **flags(fused))
losses = [3.0, 2.5]
g = grad_stream(SHAPES, 2)
kw = dict(fast=True, device=DEVICE)
out["small_fc_lopt_h32"] = run_pair(adafac(32), SHAPES, g, **kw)[0]
out["small_fc_lopt_h4"] = run_pair(adafac(4), SHAPES, g[:1], **kw)[0]
out["mulo"] = run_pair(adafac(32, MuLO, clip_grad=True), SHAPES, g[:1], **kw)[0]
out["velo_no_param_scale"] = run_pair(velo(param_scale_mult=False, step_mult=0.3), SHAPES, g, losses=losses,
                                      **kw)[0]
make = velo(precondition_output=True, clip_param_scale_amount=0.5)
out["velo_precondition"] = run_pair(make, SHAPES, g[:1], losses=losses, **kw)[0]
# bf16 params (fp32 state and math): the results may differ by one bf16 rounding
shapes = [(7,), (4, 6)]
_, oa, ob = run_pair(adafac(32), shapes, grad_stream(shapes, 1), dtype=torch.bfloat16, scale=1.0, **kw)
out["on_device"] = all(p.device.type == torch.device(DEVICE).type for p in ob.param_groups[0]["params"])
pa, pb = oa.param_groups[0]["params"], ob.param_groups[0]["params"]
out["bf16_dtype_kept"] = all(p.dtype == torch.bfloat16 for p in pb)
eps = torch.finfo(torch.bfloat16).eps
ulps = [(a.float() - b.float()).abs() / (eps * a.float().abs().clamp(min=1e-30)) for a, b in zip(pa, pb)]
out["bf16_max_ulps"] = max(float(u.max()) for u in ulps)
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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, not the interpreter
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, device], env=env, capture_output=True, text=True, timeout=900, cwd=HERE
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    for case in ("small_fc_lopt_h32", "small_fc_lopt_h4", "mulo", "velo_no_param_scale", "velo_precondition"):
        assert max(out[case]) <= 1e-5, (case, out[case])
    assert out["bf16_dtype_kept"] and out["on_device"]
    assert out["bf16_max_ulps"] <= 1.0, out["bf16_max_ulps"]


def test_fused_true_on_cpu_is_the_c_passes_and_triton_under_the_interpreter(monkeypatch):
    from fused_support import adafac_theta, make_params

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    theta, cfg = adafac_theta(4)
    params = make_params([(3, 4)])
    opt = SmallFCLOpt(params, theta, cfg, num_steps=10, fused=True)
    params[0].grad = torch.ones(3, 4)
    opt.step()
    assert opt.last_path == "fused-cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(dispatch.FusedUnavailableError, match="triton is not installed"):
        SmallFCLOpt(make_params([(3,)]), theta, cfg, num_steps=10, fused=True)


def test_scalar_path_is_not_fused():
    from fused_support import adafac_theta, make_params

    theta, cfg = adafac_theta(4)
    cfg = {**cfg, "concat_weights": False}
    with pytest.raises(dispatch.FusedUnavailableError, match="concat_weights"):
        SmallFCLOpt(make_params([(3,)]), theta, cfg, num_steps=10, fused=True)
    params = make_params([(3,)])
    opt = SmallFCLOpt(params, theta, cfg, num_steps=10)
    params[0].grad = torch.ones(3)
    opt.step()
    assert opt.last_path == "reference"
