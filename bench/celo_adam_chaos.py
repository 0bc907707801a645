"""How float32 chaos moves the Celo-Adam digits CNN curve: the measurement behind HORIZON in
tests/test_celo_classifier.py. Each +-1 ulp nudge of one initial weight tensor is trained next to the
un-nudged run (PyTorch against PyTorch) and compared with the recorded JAX curve, under CPU kernel settings.

    PYTHONPATH=. python bench/celo_adam_chaos.py --celo-adam celo_adam.safetensors           # all settings
    PYTHONPATH=. python bench/celo_adam_chaos.py --celo-adam celo_adam.safetensors --setting THREADS=1

Prints one JSON line per setting (about 10 CPU-seconds per 100-step run, 8 runs per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: Kernel settings compared: torch's defaults, one thread, AVX2 ATen kernels, MKL's AVX2 path, no oneDNN.
SETTINGS = ["", "THREADS=1", "ATEN_CPU_CAPABILITY=avx2", "MKL_CBWR=AVX2", "NO_MKLDNN=1"]
NUDGES = [("fc", "scale"), *((n, s) for n in ("c1", "c2", "fc") for s in ("+1ulp", "-1ulp"))]


def _first(rel: np.ndarray, threshold: float) -> int | None:
    over = np.nonzero(rel > threshold)[0]
    return int(over[0]) if over.size else None


def measure(checkpoint: str, steps: int) -> dict[str, Any]:
    """Runs in this process, under the kernel settings of its environment."""
    import torch

    import lopt_bridge.parity_tests.digits as digits
    from lopt_bridge.parity_tests.digits import load_digits_split, train_torch
    from lopt_bridge.pylo_runtime import load_optimizer

    if os.environ.get("NO_MKLDNN"):
        torch.backends.mkldnn.enabled = False
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))
    doc = json.loads((REPO / "parity_tests" / "closed_loop" / "celo_digits.json").read_text())
    data = load_digits_split(doc["seed"])
    kw = dict(steps=steps, batch_size=doc["batch_size"], seed=doc["seed"])

    def make(ps: list, n: int) -> Any:
        return load_optimizer(checkpoint, ps, num_steps=doc["num_steps"])

    init = digits.init_cnn
    base = train_torch("cnn", make, data, **kw)["losses"].astype(np.float64)
    ref = np.asarray(doc["curves"]["celo_adam/cnn"][:steps], np.float64)
    jax = np.abs(base - ref) / ref
    keys = ("THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "NO_MKLDNN")
    out: dict[str, Any] = {
        "setting": {k: os.environ[k] for k in keys if k in os.environ},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "jax": {
            "max_0_29": float(jax[:30].max()),
            "first_over_1e-4": _first(jax, 1e-4),
            "peak": float(jax.max()),
        },
    }
    for name, how in NUDGES:

        def nudged(seed: int, name: str = name, how: str = how) -> dict[str, np.ndarray]:
            p = init(seed)
            if how == "scale":  # the nudge the test used before the ensemble
                p[name] = (p[name] * np.float32(1 + 2**-22)).astype(np.float32)
            else:
                p[name] = np.nextafter(p[name], np.float32(np.inf if how[0] == "+" else -np.inf))
            return p

        digits.MODELS["cnn"] = (digits.cnn_forward, nudged)
        try:
            rel = np.abs(train_torch("cnn", make, data, **kw)["losses"].astype(np.float64) - base) / base
        finally:
            digits.MODELS["cnn"] = (digits.cnn_forward, init)
        out[f"{name} {how}"] = {
            "max_0_29": float(rel[:30].max()),
            "first_over_1e-4": _first(rel, 1e-4),
            "first_over_1e-3": _first(rel, 1e-3),
            "peak": float(rel.max()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--celo-adam", required=True, help="converted Celo-Adam .safetensors (lopt-convert)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--setting", action="append", help="KEY=VALUE[,KEY=VALUE] (default: all of SETTINGS)")
    ap.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.here:
        print(json.dumps(measure(args.celo_adam, args.steps)), flush=True)
        return
    for setting in args.setting or SETTINGS:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.update(kv.split("=", 1) for kv in setting.split(",") if kv)
        cmd = [sys.executable, __file__, "--here", "--celo-adam", args.celo_adam, "--steps", str(args.steps)]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
