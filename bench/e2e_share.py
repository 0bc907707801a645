"""The optimizer's share of a whole training step (forward + backward + step), and a step's peak memory.

What a user feels: a ResNet-18-shaped CNN and a small GPT-2-shaped transformer (both built locally, random
data) trained for ``--steps`` steps with torch AdamW (foreach and fused) and each learned optimizer on its
default path (random theta: the step's cost does not depend on the weights). Each run is its own process, so
the peak memory of the optimizer step is measured from a clean slate (Linux: VmHWM reset through
``/proc/self/clear_refs`` before the step; the peak resident size during the step minus the size before it,
in a second run with glibc told to unmap every freed block >= 64 KiB so that the resident size follows the
live tensors; the times come from the first run).
A tool, not a test:

    python bench/e2e_share.py --threads 2               # both models, every optimizer; writes bench/results/
    python bench/e2e_share.py --models gpt2 --optimizers adamw_fused,velo --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from step_time import state_bytes, write_result  # noqa: E402

OPTIMIZERS = ["adamw_foreach", "adamw_fused", "velo", "small_fc_lopt", "celo", "celo_adam"]
MODELS = ["resnet18", "gpt2"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None
        if stride != 1 or c_in != c:
            self.down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 layout (62 tensors, 11.69M parameters), without torchvision."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    c_in = 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(c_in, c, stride), _Block(c, c, 1)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def build(model: str, batch: int, seed: int) -> tuple[nn.Module, Any]:
    """The model and a loss function of it on one fixed random batch."""
    torch.manual_seed(seed)
    if model == "resnet18":
        net = resnet18()
        x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 1000, (batch,))
        return net, lambda: nn.functional.cross_entropy(net(x), y)
    from transformers import GPT2Config, GPT2LMHeadModel  # the integrations extra

    cfg = GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    net = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, 128))
    return net, lambda: net(input_ids=ids, labels=ids).loss


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name.startswith("adamw"):
        fused = name == "adamw_fused"
        return torch.optim.AdamW(params, lr=1e-3, foreach=not fused, fused=fused or None)
    from theta import random_theta

    from lopt_bridge.pylo_runtime.loading import optimizer_class

    theta, config = random_theta(name)
    return optimizer_class(name)(params, theta, config, num_steps=10_000)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(model: str, opt_name: str, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """One model x optimizer in this process: median seconds of fwd+bwd and of the step, peak step memory."""
    net, loss_fn = build(model, batch, seed=0)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(opt_name, params)
    uses_loss = getattr(opt, "uses_loss", False)
    fwd_bwd, step, peak = [], [], []
    can_reset = os.access("/proc/self/clear_refs", os.W_OK)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        t1 = time.perf_counter()
        before = _rss_kib("VmRSS")
        if can_reset:
            Path("/proc/self/clear_refs").write_text("5")
        t2 = time.perf_counter()
        opt.step(loss=loss.detach()) if uses_loss else opt.step()
        t3 = time.perf_counter()
        if i >= warmup:
            fwd_bwd.append(t1 - t0)
            step.append(t3 - t2)
            if can_reset:
                peak.append((_rss_kib("VmHWM") - before) / 1024)
    n = sum(p.numel() for p in params)
    fb, st = statistics.median(fwd_bwd), statistics.median(step)
    return {
        "model": model, "optimizer": opt_name, "params": n, "tensors": len(params), "batch": batch,
        "fwd_bwd_s": fb, "step_s": st, "share": st / (fb + st),
        "peak_step_mib": max(peak) if peak else None, "loss_last": float(loss),
        "state_bytes_per_param": state_bytes(opt) / n,
    }  # fmt: skip


def _child(cmd: list[str], env: dict[str, str]) -> dict[str, Any] | None:
    """One ``--one`` run in a fresh process; its JSON row, or None (the error printed)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, **env})
    if out.returncode != 0:
        print(out.stderr.strip().splitlines()[-1:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(run_one(*a.one, a.steps, a.warmup, a.batch)))
        return
    rows = []
    for model in a.models.split(","):
        for name in a.optimizers.split(","):
            cmd = [sys.executable, __file__, "--one", model, name, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch", str(a.batch)]  # fmt: skip
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            r = _child(cmd, {})
            # Memory in a second run: glibc told to unmap every freed block >= 64 KiB, so the resident size
            # follows the live tensors (else freed pages stay resident and hide the peak). That slows every
            # allocation down, so its times are not used.
            mem = _child(cmd, {"MALLOC_MMAP_THRESHOLD_": "65536"}) if r else None
            if not r or not mem:
                print(f"{model} {name}: failed", file=sys.stderr)
                continue
            r["peak_step_mib"] = mem["peak_step_mib"]
            rows.append(r)
            peak = "-" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.0f}"
            print(f"{model:9} {name:14} fwd+bwd {r['fwd_bwd_s'] * 1e3:8.1f} ms"
                  f"  step {r['step_s'] * 1e3:8.1f} ms  share {100 * r['share']:5.1f}%"
                  f"  peak step {peak:>5} MiB  state {r['state_bytes_per_param']:.0f} B/param",
                  flush=True)  # fmt: skip
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "steps": a.steps, "batch": a.batch, "args": vars(a)}  # fmt: skip
    write_result(a.out, "e2e-share", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
