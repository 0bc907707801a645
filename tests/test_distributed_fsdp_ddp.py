"""FSDP2 (DTensor shards) and DDP on 2 gloo ranks give the single-process result, for every family.

Each rank trains on its half of every batch and passes the global mean loss (``distributed.global_mean``); the
single-process reference trains on the whole batch. Params: dim 0 of size 7 and 3 (split 4/3 and 2/1),
a (1, 7) row (one rank holds an empty shard), a 4-D kernel and a 0-d scale.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff, run_ranks

STEPS = 10
ROWS = 8  # per rank


def _train(model, opt, data, rank: int, world: int, distributed: bool, replicated=()) -> None:
    """``STEPS`` steps; ``replicated``: params outside FSDP whose gradients this loop averages by hand."""
    from pylo_runtime.distributed import global_mean

    for x, y in data:
        if distributed:  # this rank's half of the global batch
            x, y = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        for p in replicated:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        opt.step(loss=global_mean(loss.detach()) if distributed else loss.detach())


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = Net()
    data = batches(STEPS, ROWS * world)
    out: dict = {}
    for family in FAMILIES:
        ref = copy.deepcopy(base)
        _train(ref, make_optimizer(family, ref.parameters()), data, rank, world, False)
        want = {k: v.detach() for k, v in ref.named_parameters()}

        sharded = copy.deepcopy(base)
        # fully_shard refuses 0-d params: the scale stays a plain replicated tensor in the same optimizer.
        # The 4-D kernel is sharded on dim 1 (FSDP2 allows uneven shards on dim 0 only), the others on dim 0.
        fully_shard(
            sharded,
            mesh=mesh,
            ignored_params={sharded.scale},
            shard_placement_fn=lambda p: Shard(1) if p.dim() == 4 else Shard(0),
        )
        out[f"fsdp_placements/{family}"] = sorted(
            str(p.placements) for p in sharded.parameters() if isinstance(p, DTensor)
        )
        opt = make_optimizer(family, sharded.parameters())
        _train(sharded, opt, data, rank, world, True, replicated=[sharded.scale])
        got = {k: _full(v) for k, v in sharded.named_parameters()}
        out[f"fsdp/{family}"] = max_rel_diff(got, want)
        out[f"moved/{family}"] = max_rel_diff({k: base.state_dict()[k] for k in want}, want)

        ddp = DistributedDataParallel(copy.deepcopy(base))
        _train(ddp, make_optimizer(family, ddp.parameters()), data, rank, world, True)
        got = {k.removeprefix("module."): v.detach() for k, v in ddp.named_parameters()}
        out[f"ddp/{family}"] = max_rel_diff(got, want)

    # GradScaler over DTensor grads: an inf in ONE rank's shard must make EVERY rank skip the step (a rank
    # stepping alone would wait forever in the all-gathers of the next step).
    model = copy.deepcopy(base)
    fully_shard(model, mesh=mesh, ignored_params={model.scale})
    opt = make_optimizer("small_fc_lopt", [p for n, p in model.named_parameters() if n != "scale"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    out["amp_iterations"] = []
    for i, (x, y) in enumerate(data[:3]):
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        scaler.scale(loss).backward()
        if i == 1 and rank == 1:
            model.lin.weight.grad.to_local()[0, 0] = float("inf")
        scaler.step(opt, loss=loss.detach())
        scaler.update()
        out["amp_iterations"].append(int(opt.state["global"]["iteration"]))
    out["amp_scale"] = scaler.get_scale()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, world=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_equals_single_process(results, family):
    # 1e-5: the bound; the update runs on the gathered tensors, so rounding differs only through the
    # gradient reduction (FSDP2 averages the two half-batch gradients, the reference differentiates the mean).
    for r in results:
        assert r[f"fsdp_placements/{family}"] == ["(Shard(dim=0),)"] * 3 + ["(Shard(dim=1),)"]
        assert r[f"moved/{family}"] > 1e-3, (
            "the optimizer barely moved the parameters: the test would be vacuous"
        )
        assert r[f"fsdp/{family}"] <= 1e-5, r


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_equals_single_process(results, family):
    for r in results:
        assert r[f"ddp/{family}"] <= 1e-5, r


def test_grad_scaler_skip_is_agreed_across_ranks(results):
    for r in results:
        assert r["amp_iterations"] == [1, 1, 2] and r["amp_scale"] == 2.0**9, r
