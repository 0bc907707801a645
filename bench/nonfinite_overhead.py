"""What ``nonfinite="skip"`` (the default) costs per step: the guard alone, and whole steps skip vs propagate.

The guard is one ``torch._foreach_norm(grads, 2)`` per device, the stacked norms' ``isfinite``, and one host
sync. Steps are timed interleaved (skip, propagate, skip, ...) on two copies of the same tree, so slow phases
of a shared machine hit both alike; medians and their ratio are printed (and written with ``--json``).

    python bench/nonfinite_overhead.py --tree small --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from theta import random_theta  # noqa: E402
from trees import tree_shapes  # noqa: E402

from lopt_bridge.pylo_runtime.loading import optimizer_class  # noqa: E402
from lopt_bridge.pylo_runtime.step_inputs import count_nonfinite_tensors  # noqa: E402


def _tree(shapes: dict[str, tuple[int, ...]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.1 for s in shapes.values()]
    grads = [torch.randn(s, generator=g) * 0.01 for s in shapes.values()]
    return params, grads


def time_guard(grads: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds per guard evaluation (the fused reduction and its one host sync)."""
    out = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        bool(count_nonfinite_tensors(grads, grads[0].device) > 0)
        out.append(time.perf_counter() - t0)
    return out[3:]


def time_steps(family: str, shapes: dict, repeats: int, options: dict) -> dict[str, list[float]]:
    """Interleaved step times of ``nonfinite="skip"`` and ``"propagate"`` on identical trees."""
    theta, config = random_theta(family)
    runs = {}
    for mode in ("skip", "propagate"):
        params, grads = _tree(shapes, 0)
        params = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt = optimizer_class(family)(params, theta, config, num_steps=1000, nonfinite=mode, **options)
        runs[mode] = opt
    times: dict[str, list[float]] = {"skip": [], "propagate": []}
    for i in range(repeats + 2):
        for mode, opt in runs.items():
            t0 = time.perf_counter()
            opt.step(loss=1.0)
            if i >= 2:  # the first steps create the state
                times[mode].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="small")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--families", default="velo,small_fc_lopt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = tree_shapes(args.tree)
    _, grads = _tree(shapes, 0)
    guard = time_guard(grads, args.repeats * 5)
    result: dict = {
        "tree": args.tree,
        "elements": sum(g.numel() for g in grads),
        "threads": torch.get_num_threads(),
        "guard_median_s": statistics.median(guard),
        "guard_repeats": len(guard),
    }
    print(f"guard alone: median {result['guard_median_s'] * 1e3:.2f} ms over {len(guard)} runs")
    for family in args.families.split(","):
        times = time_steps(family, shapes, args.repeats, {"fused": None})
        med = {m: statistics.median(t) for m, t in times.items()}
        result[family] = {
            "step_skip_median_s": med["skip"],
            "step_propagate_median_s": med["propagate"],
            "step_ratio_skip_over_propagate": med["skip"] / med["propagate"],
            "guard_over_step": result["guard_median_s"] / med["propagate"],
            "repeats": args.repeats,
        }
        ratio, share = med["skip"] / med["propagate"], result[family]["guard_over_step"]
        print(
            f"{family}: step median skip {med['skip'] * 1e3:.1f} ms, "
            f"propagate {med['propagate'] * 1e3:.1f} ms (ratio {ratio:.3f}); guard / step {share:.4f} "
            f"({args.repeats} interleaved steps each)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
