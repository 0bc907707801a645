"""Data-parallel training (DDP, gloo on the CPU) with a learned optimizer: every rank feeds the same loss.

    lopt-convert celo                         # -> checkpoints/celo.safetensors
    python examples/ddp_train.py --world 2    # spawns 2 CPU processes
    torchrun --nproc-per-node 2 examples/ddp_train.py

Each rank computes the loss on its own shard of the batch. VeLO and Celo read the loss, so the ranks must
use the same number or their replicas drift apart: the optimizer averages the loss over the ranks inside
``step`` (one all-reduce of one scalar; ``loss_reduction="none"`` turns that off). The loop is the plain one,
``pylo_runtime.set_loss(opt, loss); opt.step()`` or ``opt.step(loss=loss)``. See docs/integrations.md.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lopt_bridge import pylo_runtime

REPO = Path(__file__).resolve().parent.parent


def train(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One rank's loop; returns its losses and a checksum of its final parameters."""
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts it)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    )
    opt = pylo_runtime.load_optimizer(args.optimizer, model.parameters(), num_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(16, 4, generator=g)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.batch_size * world, 16, generator=g)  # the global batch, same on every rank
        x = x[rank * args.batch_size : (rank + 1) * args.batch_size]  # this rank's shard
        loss = torch.nn.functional.cross_entropy(model(x), (x @ w).argmax(dim=1))
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        pylo_runtime.set_loss(opt, loss)  # this rank's loss; step() averages it over the ranks
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "checksum": float(flat.double().sum()), "params": flat}


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _report(rank, world, train(rank, world, args))
    finally:
        dist.destroy_process_group()


def _report(rank: int, world: int, result: dict[str, Any]) -> None:
    gathered = [None] * world
    dist.all_gather_object(gathered, result["params"])
    identical = all(torch.equal(gathered[0], p) for p in gathered)
    print(
        f"rank {rank}: local loss first / last {result['losses'][0]:.4f} / {result['losses'][-1]:.4f}; "
        f"parameters identical on all {world} ranks: {identical}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", default=str(REPO / "checkpoints" / "celo.safetensors"))
    ap.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path(args.optimizer).is_file():
        raise SystemExit(f"{args.optimizer}: not found; run `lopt-convert celo`, or pass --optimizer FILE")
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            _report(rank, world, train(rank, world, args))
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
