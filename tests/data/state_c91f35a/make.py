"""Optimizer state dicts as main c91f35a saved them (before the DCP work): backward-compatibility fixtures.

c91f35a's ``state_dict()`` kept the optimizer-wide state under a top-level ``"global"`` key and, under FSDP2,
each rank's shard state as plain local tensors. tests/test_checkpoint_dcp.py loads these files with today's
code and checks that training continues exactly as it did at c91f35a.

Run at c91f35a only (the files record what that commit wrote; at a later commit this script writes today's
format):

    git -C /work/main worktree add /tmp/c91f35a c91f35a
    cd /tmp/c91f35a && PYTHONPATH=. python <this file> OUT_DIR

Every family, the reference path (``foreach=False``, the specification, the path least likely to change):
3 steps, ``state_dict()`` saved with the parameters, then 3 more steps whose parameters are recorded.
``one_process.pt``: one process, the whole batch. ``fsdp2_rank{0,1}.pt``: 2 gloo ranks, FSDP2 on a 1-D mesh
(rank-local steps: uneven shards, rank 1's shard of ``row`` is empty), each rank's own ``state_dict()``.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, run_ranks

SAVE_AT = 3
STEPS = 6
ROWS = 8  # per rank under FSDP2


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().full_tensor() if hasattr(v, "full_tensor") else v.detach()).clone()
        for k, v in model.named_parameters()
    }


def _record(model, opt, data, shard=None) -> dict:
    """SAVE_AT steps, the state dict and parameters, STEPS - SAVE_AT more steps and their parameters."""
    out: dict = {}
    for i, (x, y) in enumerate(data):
        if i == SAVE_AT:
            out["state_dict"] = copy.deepcopy(opt.state_dict())
            out["params_at_save"] = _params(model)
        if shard is not None:
            x, y = x[shard], y[shard]
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        if shard is not None:  # the 0-d scale stays outside FSDP2: average its gradient by hand
            torch.distributed.all_reduce(model.scale.grad, op=torch.distributed.ReduceOp.AVG)
        opt.step(loss=loss.detach())  # under torch.distributed the step averages the loss over the ranks
    out["params_after"] = _params(model)
    return out


def _one_process() -> dict:
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = Net()
        opt = make_optimizer(family, model.parameters(), foreach=False)
        out[family] = _record(model, opt, batches(STEPS, 2 * ROWS))
    return out


def _rank(out_dir: str, rank: int, world: int) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = Net()
        fully_shard(
            model,
            mesh=mesh,
            ignored_params={model.scale},
            shard_placement_fn=lambda p: Shard(1) if p.dim() == 4 else Shard(0),
        )
        opt = make_optimizer(family, model.parameters(), foreach=False)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        out[family] = _record(model, opt, batches(STEPS, ROWS * world), shard=rows)
    torch.save(out, Path(out_dir) / f"fsdp2_rank{rank}.pt")
    return 0


def main(out_dir: str) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.save(_one_process(), Path(out_dir) / "one_process.pt")
    run_ranks(functools.partial(_rank, out_dir), world=2)


if __name__ == "__main__":
    main(sys.argv[1])
