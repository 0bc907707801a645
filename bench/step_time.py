"""Median optimizer step time on a small CPU tree, a ResNet-18- or a ViT-B/16-shaped tree, as ratios to torch
AdamW.

Times, in one run: torch AdamW (``adamw``: foreach; fused on CUDA; ``adamw_fused``: ``fused=True`` on any
device, the baseline users compare against on CPU too), each of our optimizers on its reference path
(``foreach=False``), its foreach path (``foreach=True``: torch ops, what CUDA falls back to) and its default
path (``fused=None``: Triton on CUDA, C passes on CPU),
the JAX reference (jitted, in a subprocess with ``--jax-python``) and PyLO's naive PyTorch optimizers
(``--pylo-src``). Prints a table, writes ``bench/results/<host>-<date>.json``. A tool, not a test:

    python bench/step_time.py --tree small --quick
    python bench/step_time.py --tree conv --optimizers adamw,adamw_fused,velo_fused,small_fc_lopt_fused
    python bench/step_time.py --tree vit --device cuda --optimizers adamw,velo,velo_fused
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from theta import random_theta  # noqa: E402
from trees import TREES, num_params, tree_shapes  # noqa: E402

#: Our optimizers: bench name -> (architecture id, constructor options, config overrides for random theta).
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "velo": ("velo", {"fused": False, "foreach": False}),
    "velo_foreach": ("velo", {"foreach": True}),
    "velo_fused": ("velo", {"fused": None}),
    "small_fc_lopt": ("small_fc_lopt", {"fused": False, "foreach": False}),
    "small_fc_lopt_foreach": ("small_fc_lopt", {"foreach": True}),
    "small_fc_lopt_fused": ("small_fc_lopt", {"fused": None}),
    "celo": ("celo", {"fused": False, "foreach": False}),
    "celo_foreach": ("celo", {"foreach": True}),
    "celo_fused": ("celo", {"fused": None}),
    "celo_adam": ("celo_adam", {"fused": False, "foreach": False}),
    "celo_adam_foreach": ("celo_adam", {"foreach": True}),
    "celo_adam_fused": ("celo_adam", {"fused": None}),
}
JAX = {
    "jax_velo": "velo",
    "jax_small_fc_lopt": "small_fc_lopt",
    "jax_celo": "celo",
    "jax_celo_adam": "celo_adam",
}
PYLO = {"pylo_velo": "VeLO_naive", "pylo_small_fc_lopt": "AdafacLO_naive"}
ALL = ["adamw", "adamw_fused", *OURS, *JAX, *PYLO]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tree(shapes: dict[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Parameters ~ N(0, 0.05^2) and a fixed gradient stream ~ N(0, 1e-3^2), one tensor per shape."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for s in shapes.values():
        params.append((torch.randn(s, generator=gen) * 0.05).to(device, dtype).requires_grad_())
        grads.append((torch.randn(s, generator=gen) * 1e-3).to(device, dtype))
    return params, grads


def time_steps(step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step(i)``; seconds per call."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter and global state."""
    seen: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = x.data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(dict(opt.state))
    return total


def write_result(out: str | Path, kind: str, record: dict[str, Any]) -> Path:
    """``record``, stamped with the UTC time, as ``<out>/<host>-<UTC date-time>-<kind>.json`` (atomically)."""
    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = Path(out) / f"{socket.gethostname()}-{stamp:%Y%m%d-%H%M%S}-{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "utc": stamp.isoformat()}, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _torch_runner(opt, params, grads, device, warmup, steps, loss_arg: str | None) -> tuple[list[float], int]:
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def step(i: int) -> None:
        if loss_arg is None:
            opt.step()
        else:
            opt.step(**{loss_arg: torch.tensor(2.0 - 0.001 * i, device=device)})

    times = time_steps(step, device, warmup, steps)
    return times, state_bytes(opt)


def bench_adamw(params, grads, device, warmup, steps, fused: bool | None = None):
    """torch AdamW: ``fused=None`` the table's base (fused on CUDA, foreach elsewhere), else as asked."""
    if fused is None:
        fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=not fused, fused=fused or None)
    return (*_torch_runner(opt, params, grads, device, warmup, steps, None), "fused" if fused else "foreach")


def bench_ours(name, params, grads, device, warmup, steps, theta_path: str | None):
    arch, options = OURS[name]
    from lopt_bridge.pylo_runtime.loading import optimizer_class

    cls = optimizer_class(arch)
    if theta_path:
        opt = cls.from_checkpoint(theta_path, params, num_steps=10000, **options)
        src = theta_path
    else:
        theta, config = random_theta(arch)
        opt = cls(params, theta, config, num_steps=10000, **options)
        src = "random theta"
    loss_arg = "loss" if cls.uses_loss else None
    times, nbytes = _torch_runner(opt, params, grads, device, warmup, steps, loss_arg)
    return times, nbytes, f"{cls.__name__}({options}), {src}"


#: Sizes PyLO's models need where their constructor defaults are not the published ones.
_PYLO_SIZES = {"MetaMLP": dict(input_size=39, hidden_size=32, hidden_layers=1)}


def _random_model(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``from_pretrained`` without the hub: the model at its default sizes with random weights."""
    return cls(**_PYLO_SIZES.get(cls.__name__, {}))


def _stub_pylo_imports() -> None:
    """Stand in for PyLO's import-time dependencies when absent (timing only, random weights).

    Its models subclass ``huggingface_hub.PyTorchModelHubMixin`` (``from_pretrained`` then builds the model
    with its default sizes), and ``pylo.optim`` imports ``mup`` for MuLO, which is not timed here.
    """
    try:
        import mup.optim  # noqa: F401
    except ImportError:
        mup = types.ModuleType("mup")
        mup.optim = types.ModuleType("mup.optim")
        mup.optim.process_param_groups = None
        sys.modules.setdefault("mup", mup)
        sys.modules.setdefault("mup.optim", mup.optim)
    try:
        import huggingface_hub  # noqa: F401

        return
    except ImportError:
        pass

    class PyTorchModelHubMixin:
        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__()

        from_pretrained = classmethod(_random_model)

    mod = types.ModuleType("huggingface_hub")
    mod.PyTorchModelHubMixin = PyTorchModelHubMixin
    sys.modules["huggingface_hub"] = mod


def bench_pylo(name, params, grads, device, warmup, steps, pylo_src: str):
    import warnings

    _stub_pylo_imports()
    if pylo_src not in sys.path:
        sys.path.insert(0, pylo_src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylo.optim

    cls = getattr(pylo.optim, PYLO[name])

    def make() -> torch.optim.Optimizer:
        return cls(params, num_steps=10000) if "VeLO" in PYLO[name] else cls(params)

    hub = sys.modules.get("huggingface_hub")
    stubbed = getattr(hub, "__file__", None) is None
    loader = getattr(hub.PyTorchModelHubMixin, "from_pretrained", None)
    patched = getattr(loader, "__func__", None) is _random_model
    weights = "random weights: no huggingface_hub" if stubbed else "hub weights"
    if patched:
        weights = "random weights: the hub was unreachable for an earlier row"
    try:
        opt = make()
    except Exception as exc:  # the hub unreachable (or huggingface_hub stubbed): random weights, timing only
        import huggingface_hub

        huggingface_hub.PyTorchModelHubMixin.from_pretrained = classmethod(_random_model)
        opt = make()
        weights = f"random weights: {type(exc).__name__} from the hub"
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def step(i: int) -> None:
        opt.step(torch.tensor(2.0 - 0.001 * i, device=device))

    times = time_steps(step, device, warmup, steps)
    return times, state_bytes(opt), f"pylo.optim.{PYLO[name]} ({weights})"


def bench_jax(name, tree, warmup, steps, jax_python: str):
    env = dict(os.environ)
    if torch.get_num_threads() == 1:  # same thread budget as the torch runs
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        env["OMP_NUM_THREADS"] = "1"
    cmd = [jax_python, str(HERE / "jax_worker.py"), "--tree", tree, "--opt", JAX[name]]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"jax worker failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    r = json.loads(lines[-1])
    return r["times_s"], r["state_bytes_per_param"], r["note"]


def _time_mm(m: int, k: int, n: int, device: torch.device) -> list[float]:
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return time_steps(lambda i: torch.mm(a, b, out=out), device, 1, 5)


def matmul_peak(device: torch.device, rows: int, k: int = 32, n: int = 32) -> dict[str, float]:
    """GFLOP/s of a plain sgemm (rows x k) @ (k x n) and of a square 1024^3 one on ``device``."""
    res = {}
    for label, (m, kk, nn) in {"tall_skinny": (rows, k, n), "square": (1024, 1024, 1024)}.items():
        ts = _time_mm(m, kk, nn, device)
        res[label + "_gflops"] = 2 * m * kk * nn / statistics.median(ts) / 1e9
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default="small", choices=sorted(TREES))
    ap.add_argument("--optimizers", default=",".join(ALL), help=f"comma list from: {', '.join(ALL)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 timed steps after 2 warm-up steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--jax-python", default=None, help="python with jax + learned_optimization on PYTHONPATH")
    ap.add_argument("--pylo-src", default=os.environ.get("PYLO_SRC"), help="checkout of Belilovsky-Lab/pylo")
    ap.add_argument("--theta", action="append", default=[], help="ARCH=PATH.safetensors (else random theta)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = 3, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    names = [n.strip() for n in a.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        ap.error(f"unknown optimizers {unknown}; known: {ALL}")
    if "adamw" not in names:
        names.insert(0, "adamw")
    thetas = dict(t.split("=", 1) for t in a.theta)
    shapes = tree_shapes(a.tree)
    n = num_params(shapes)
    print(
        f"tree {a.tree}: {len(shapes)} tensors, {n / 1e6:.2f}M params, {device}, {a.dtype}, "
        f"{torch.get_num_threads()} threads, {a.warmup} warm-up + {a.steps} timed steps",
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            if name in JAX:
                if device.type != "cpu" or not a.jax_python:
                    raise RuntimeError("skipped: needs --jax-python (CPU only)")
                times, bpp, note = bench_jax(name, a.tree, a.warmup, a.steps, a.jax_python)
                results[name] = {"times_s": times, "state_bytes_per_param": bpp, "note": note}
            else:
                params, grads = make_tree(shapes, device, dtype)
                if name in ("adamw", "adamw_fused"):
                    fused = True if name == "adamw_fused" else None
                    times, nbytes, note = bench_adamw(params, grads, device, a.warmup, a.steps, fused)
                elif name in OURS:
                    path = thetas.get(OURS[name][0])
                    times, nbytes, note = bench_ours(name, params, grads, device, a.warmup, a.steps, path)
                else:
                    if not a.pylo_src:
                        raise RuntimeError("skipped: needs --pylo-src or $PYLO_SRC")
                    src = a.pylo_src
                    times, nbytes, note = bench_pylo(name, params, grads, device, a.warmup, a.steps, src)
                results[name] = {"times_s": times, "state_bytes_per_param": nbytes / n, "note": note}
                del params, grads
        except Exception as e:  # a tool: report and go on with the others
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            results[name] = {"error": f"{type(e).__name__}: {msg}"}
        gc.collect()
        r = results[name]
        if "times_s" in r:
            r["median_s"] = statistics.median(r["times_s"])
        status = f"{r['median_s']:.4f} s" if "median_s" in r else r["error"]
        print(f"  {name:<22} {status}   ({time.perf_counter() - t0:.0f} s wall)", flush=True)

    base = results.get("adamw", {}).get("median_s")
    base_fused = results.get("adamw_fused", {}).get("median_s")
    peak = matmul_peak(device, rows=min(n, 1 << 20))
    print()
    print(f"{'optimizer':<22} {'median step':>12} {'x AdamW':>9} {'x fused':>9} {'state B/param':>14}  note")
    for name, r in results.items():
        if "median_s" in r:
            ratio = r["median_s"] / base if base else float("nan")
            r["ratio_to_adamw"] = ratio
            ratio_f = r["median_s"] / base_fused if base_fused else float("nan")
            if base_fused:
                r["ratio_to_adamw_fused"] = ratio_f
            print(
                f"{name:<22} {r['median_s']:>10.4f} s {ratio:>8.1f}x {ratio_f:>8.1f}x "
                f"{r['state_bytes_per_param']:>14.1f}  {r['note']}"
            )
        else:
            print(f"{name:<22} {'-':>12} {'-':>9} {'-':>9} {'-':>14}  {r['error']}")
    print(
        f"\nsgemm peak on {device}: tall-skinny (rows x 32 x 32) {peak['tall_skinny_gflops']:.1f} GFLOP/s, "
        f"square 1024^3 {peak['square_gflops']:.1f} GFLOP/s"
    )

    record = {
        "tree": a.tree,
        "num_params": n,
        "num_tensors": len(shapes),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "warmup": a.warmup,
        "steps": a.steps,
        "matmul_peak": peak,
        "results": results,
    }
    write_result(a.out, f"{a.tree}-{device.type}", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
