"""Optimizer step time on 2 CPU ranks (gloo): replicated (DDP) or FSDP2 (DTensor) params, plain or sharded.

Modes: ``replicated`` (every rank steps every tensor), ``sharded`` (ShardedOptimizer), ``fsdp2`` (DTensor
params, ``Shard(0)``: each rank steps its shard, the statistics are all-reduced), ``fsdp2_gather`` (the same
params on the fallback: all-gathered and stepped whole on every rank), ``fsdp2_sharded`` (ShardedOptimizer
over DTensor params).

Every rank uses one thread. Per family and mode it reports the median wall time of ``step`` (a barrier after
each step, so the slowest rank counts), the bytes each rank moves, the optimizer-state bytes it holds and
the all-reduces of one step (counted). Writes ``bench/results/distributed_step-<host>-<date>.json``
(``--modes`` runs a subset). A tool, not a test:

    python bench/distributed_step.py --steps 10
    python bench/distributed_step.py --steps 5 --modes fsdp2,fsdp2_gather
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

#: 8 blocks of a (256, 256) weight and a (256,) bias, plus a (256, 10) head: 0.53M parameters in 17 tensors.
SHAPES = [s for _ in range(8) for s in ((256, 256), (256,))] + [(256, 10)]
FAMILIES = ("small_fc_lopt", "velo")
MODES = ("replicated", "sharded", "fsdp2", "fsdp2_gather", "fsdp2_sharded")


def _make(family: str, params):
    from theta import random_theta

    from lopt_bridge.pylo_runtime.loading import optimizer_class

    theta, config = random_theta(family)
    return optimizer_class(family)(params, theta, config, num_steps=1000)


def _state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else ():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


class _CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls and the elements they reduce (while entered)."""

    def __enter__(self):
        self.real, self.calls, self.elements = dist.all_reduce, 0, 0

        def counted(t, *args, **kwargs):
            self.calls += 1
            self.elements += t.numel()
            return self.real(t, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.real


def _time(opt, loss: torch.Tensor, steps: int) -> list[float]:
    out = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        opt.step(loss=loss)
        dist.barrier()
        if i:  # the first step initialises the state
            out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, world: int, port: int, steps: int, modes: list[str], out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lopt_bridge.pylo_runtime.distributed.sharded import ShardedOptimizer, assign_owners

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in SHAPES]
    rows = []
    for family in FAMILIES:
        for mode in modes:
            if mode.startswith("fsdp2"):
                params = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
                for p, g in zip(params, grads, strict=True):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            else:
                params = [torch.nn.Parameter(v.clone()) for v in values]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
            inner = _make(family, params)
            if mode == "fsdp2_gather":
                inner.shard_local = False  # the fallback path, for comparison
            opt = ShardedOptimizer(inner) if mode.endswith("sharded") else inner
            loss = torch.tensor(1.0)
            times = _time(opt, loss, steps)
            with _CountAllReduce() as counted:
                opt.step(loss=loss)
            n = sum(v.numel() for v in values)
            owners = assign_owners([v.numel() for v in values], world)
            not_owned = sum(v.numel() for v, o in zip(values, owners, strict=True) if o != rank)
            # float32: fsdp2_gather all-gathers param and grad; sharded receives the tensors others own;
            # fsdp2 all-reduces statistics (a ring all-reduce of k floats moves about 2 * 4k * (W-1)/W bytes).
            gathered = 2 * 4 * n * (world - 1) // world
            moved = {
                "replicated": 0,
                "sharded": 4 * not_owned,
                "fsdp2": 2 * 4 * counted.elements * (world - 1) // world,
                "fsdp2_gather": gathered,
                "fsdp2_sharded": gathered + 4 * not_owned,
            }[mode]
            rows.append(
                {
                    "family": family,
                    "mode": mode,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "state_bytes_this_rank": _state_bytes(inner),
                    "bytes_received_per_rank_approx": moved,
                    "all_reduces_per_step": counted.calls,
                    "all_reduce_floats_per_step": counted.elements,
                }
            )
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "host": socket.gethostname(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__,
                    "world": world,
                    "threads_per_rank": 1,
                    "shapes": SHAPES,
                    "num_params": sum(v.numel() for v in values),
                    "steps": steps,
                    "load_average": os.getloadavg(),
                    "rows": rows,
                },
                f,
                indent=1,
            )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    day = datetime.date.today().isoformat()
    out = HERE / "results" / f"distributed_step-{socket.gethostname()}-{day}.json"
    out.parent.mkdir(exist_ok=True)
    if set(modes) != set(MODES):
        out = out.with_name(f"{out.stem}-{'-'.join(modes)}.json")
    mp.spawn(_worker, args=(2, port, args.steps, modes, str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    print(f"{res['num_params']} params in {len(SHAPES)} tensors, 2 ranks x 1 thread, median of {args.steps}")
    ref_mode = "replicated" if "replicated" in modes else modes[0]
    print(
        f"| family | mode | step (ms) | vs {ref_mode} | state bytes / rank | bytes received / rank "
        "| all-reduces / step |"
    )
    print("|---|---|---|---|---|---|---|")
    base = {r["family"]: r["median_s"] for r in res["rows"] if r["mode"] == ref_mode}
    for r in res["rows"]:
        print(
            f"| {r['family']} | {r['mode']} | {1000 * r['median_s']:.1f} | "
            f"{base[r['family']] / r['median_s']:.2f}x | {r['state_bytes_this_rank']:,} | "
            f"{r['bytes_received_per_rank_approx']:,} | {r['all_reduces_per_step']} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
