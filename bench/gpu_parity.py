"""Fused (Triton) and foreach (torch ops) versus reference parity on CUDA, the default path's self-check,
and 2000-step open-loop drift.

Part of ``bench/gpu_check.sh``; writes ``bench/results/<host>-<date>-gpu-parity.json``. Same metric as the
CPU tests (tests/test_fused_*.py): float32 ``|u_fast - u_ref|_inf / |u_ref|_inf`` per step (<= 1e-5), one ulp
of ``p + u`` forgiven; open loop, max relative parameter difference after 2000 steps (<= 1e-4). The default
flags must pick the Triton path and pass its self-check without a warning (pylo_runtime.dispatch.verified);
every family's foreach path (the CUDA fallback) must match its reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from distributed_support import random_theta  # noqa: E402
from fused_support import (  # noqa: E402
    SHAPES,
    adafac_theta,
    celo_theta,
    flags,
    grad_stream,
    make_params,
    run_pair,
    velo_theta,
)

from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt  # noqa: E402
from lopt_bridge.pylo_runtime.celo import Celo  # noqa: E402
from lopt_bridge.pylo_runtime.celo_adam import CeloAdam  # noqa: E402
from lopt_bridge.pylo_runtime.mulo import MuLO  # noqa: E402
from lopt_bridge.pylo_runtime.velo import VeLO  # noqa: E402

BIG = [(768, 3, 16, 16), (2304, 768), (3072,), (1, 197, 768)]


def _on(device, grads):
    return [[g.to(device) for g in gs] for gs in grads]


def _pair(make, shapes, steps, device, losses=None, dtype=torch.float32, fast=True):
    grads = _on(device, grad_stream(shapes, steps))
    errs, _, _ = run_pair(make, shapes, grads, losses=losses, dtype=dtype, fast=fast, device=device)
    return errs


def default_path(make, shapes, device) -> dict:
    """Two steps with the default flags: the path they ran and any lopt-bridge warning (the self-check)."""
    import warnings

    params = make_params(shapes, device=device)
    opt = make(params, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, gs in enumerate(_on(device, grad_stream(shapes, 2))):
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            opt.step(loss=3.0 - 0.2 * t)
    msgs = [str(w.message) for w in caught if "lopt-bridge" in str(w.message)]
    return {"path": opt.last_path, "warnings": msgs}


def every_family_foreach(device, shapes, steps: int) -> dict:
    """Each family's foreach path (what CUDA falls back to) against its reference, on ``device``."""
    from distributed_support import FAMILIES, random_theta

    from lopt_bridge.pylo_runtime.loading import optimizer_class

    out = {}
    for family in FAMILIES:
        theta, cfg = random_theta(family)
        make = lambda ps, flag, f=family, t=theta, c=cfg: optimizer_class(f)(  # noqa: E731
            ps,
            t,
            c,
            num_steps=100,
            **flags(flag),
        )
        losses = [3.0 - 0.2 * t for t in range(steps)]
        out[family] = max(_pair(make, shapes, steps, device, losses=losses, fast="foreach"))
    return out


def drift(family: str, device, steps: int) -> float:
    shapes = [(), (6,), (4, 5), (3, 2, 4)]
    grads = _on(device, grad_stream(shapes, steps))
    pa, pb = make_params(shapes, 0.1, device=device), make_params(shapes, 0.1, device=device)
    if family == "velo":
        theta, cfg = velo_theta(lstm_hidden_size=8, param_inits=4)
        oa, ob = (
            VeLO(p, theta, cfg, num_steps=steps, **flags(f)) for p, f in ((pa, "reference"), (pb, True))
        )
    elif family in ("celo", "celo_adam"):
        cls, (theta, cfg) = (
            (Celo, celo_theta(step_mult=0.01)) if family == "celo" else (CeloAdam, random_theta("celo_adam"))
        )
        oa, ob = (cls(p, theta, cfg, num_steps=steps, **flags(f)) for p, f in ((pa, "reference"), (pb, True)))
    else:
        theta, cfg = adafac_theta(32)
        oa, ob = (
            SmallFCLOpt(p, theta, cfg, num_steps=steps, **flags(f))
            for p, f in ((pa, "reference"), (pb, True))
        )
    for t in range(steps):
        for p, g in zip(pa + pb, grads[t] + grads[t], strict=True):
            p.grad = g
        oa.step(loss=2.0 * 0.999**t)
        ob.step(loss=2.0 * 0.999**t)
    pa, pb = [p.detach() for p in pa], [p.detach() for p in pb]
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(pa, pb, strict=True) if a.numel())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--drift-steps", type=int, default=2000)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--device", default="cuda", help="cpu runs it under TRITON_INTERPRET=1 (smoke test)")
    ap.add_argument("--no-big", action="store_true", help="leave out the ViT-sized tensors")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device", file=sys.stderr)
        return 2
    shapes = SHAPES + ([] if a.no_big else BIG)
    losses = [3.0 - 0.2 * t for t in range(a.steps)]
    results = {}

    def adafac(hidden, cls=SmallFCLOpt, **extra):
        theta, cfg = adafac_theta(hidden)
        return lambda ps, fused: cls(ps, theta, {**cfg, **extra}, num_steps=100, **flags(fused))

    def velo(**config):
        theta, cfg = velo_theta(**config)
        return lambda ps, fused: VeLO(ps, theta, cfg, num_steps=100, **flags(fused))

    def celo(**config):
        theta, cfg = celo_theta(**config)
        return lambda ps, fused: Celo(ps, theta, cfg, num_steps=100, **flags(fused))

    def celo_adam(**config):
        theta, cfg = random_theta("celo_adam")
        return lambda ps, fused: CeloAdam(ps, theta, {**cfg, **config}, num_steps=100, **flags(fused))

    cases = {
        "small_fc_lopt_h32": (adafac(32), None),
        "small_fc_lopt_h4": (adafac(4), None),
        "mulo_clip_grad": (adafac(32, MuLO, clip_grad=True), None),
        "velo_default": (velo(), losses),
        "velo_no_param_scale": (velo(param_scale_mult=False, step_mult=0.3), losses),
        "velo_precondition": (velo(precondition_output=True), losses),
        "celo_default": (celo(), losses),
        "celo_phase1_precondition": (celo(train_phase=1, precondition_output=True, param_inits=3), losses),
        "celo_adam_default": (celo_adam(), losses),
        "celo_adam_options": (celo_adam(param_scale_mult=True, initial_momentum_decays=[0.9, 0.99]), losses),
    }
    ok = True
    for name, (make, ls) in cases.items():
        t0 = time.perf_counter()
        errs = _pair(make, shapes, a.steps, dev, losses=ls)
        fe = _pair(make, shapes, a.steps, dev, losses=ls, fast="foreach")
        dp = default_path(make, shapes, dev)
        results[name] = {"max_update_error": max(errs), "per_step": errs, "foreach_max_update_error": max(fe),
                         "default": dp, "wall_s": time.perf_counter() - t0}  # fmt: skip
        want = "fused-triton" if dev.type == "cuda" else "fused-cpu"
        ok &= max(errs) <= 1e-5 and max(fe) <= 1e-5 and dp["path"] == want and not dp["warnings"]
        print(
            f"{name:<22} max update error fused {max(errs):.2e}, foreach {max(fe):.2e}; default: "
            f"{dp['path']} {dp['warnings'] or 'no warning'}  ({results[name]['wall_s']:.1f} s)",
            flush=True,
        )
    fam = every_family_foreach(dev, SHAPES, a.steps)
    results["every_family_foreach"] = fam
    ok &= max(fam.values()) <= 1e-5
    print("foreach vs reference, every family: " + ", ".join(f"{k} {v:.2e}" for k, v in fam.items()))
    for dt in (torch.bfloat16, torch.float16):
        # low-precision params: the fp32 results agree, so the stored params differ by at most one rounding
        small = [(7,), (64, 48)]
        grads = _on(dev, grad_stream(small, 2))
        _, oa, ob = run_pair(adafac(32), small, grads, dtype=dt, scale=1.0, fast=True, device=dev)
        eps = torch.finfo(dt).eps
        ulps = max(
            float(((a.detach().float() - b.detach().float()).abs() / (eps * a.detach().float().abs())).max())
            for a, b in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"], strict=True)
        )
        results[f"small_fc_lopt_{dt}"] = {"max_ulps": ulps}
        ok &= ulps <= 1.0
        print(f"small_fc_lopt {dt} params: max difference {ulps:.2f} ulp", flush=True)
    for fam in ("small_fc_lopt", "velo", "celo", "celo_adam"):
        t0 = time.perf_counter()
        d = drift(fam, dev, a.drift_steps)
        results[f"drift_{fam}"] = {
            "steps": a.drift_steps,
            "max_rel_param_diff": d,
            "wall_s": time.perf_counter() - t0,
        }
        ok &= d <= 1e-4
        print(f"open-loop drift {fam} after {a.drift_steps} steps: {d:.2e}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = out / f"{socket.gethostname()}-{stamp:%Y%m%d-%H%M%S}-gpu-parity.json"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (triton interpreter)"
    record = {"device": name, "torch": torch.__version__, "ok": ok, "results": results}
    path.write_text(json.dumps(record, indent=1))
    print(f"{'PASS' if ok else 'FAIL'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
