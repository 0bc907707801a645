"""ShardedOptimizer on 2 gloo ranks: each rank steps part of the tensors; the result is the unsharded one."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff, run_ranks

STEPS = 10
ROWS = 8  # per rank
#: Weight decay adds ``wd * |p|^2`` of every tensor to VeLO's loss: the sharded step must add the others'.
OPTIONS = {"velo": {"weight_decay": 0.01}}


def _train(model, opt, data, rank: int, distributed: bool, replicated=()) -> None:
    from lopt_bridge.pylo_runtime.distributed import global_mean

    for x, y in data:
        if distributed:
            x, y = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        for p in replicated:  # outside FSDP: averaged by hand
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        opt.step(loss=global_mean(loss.detach()) if distributed else loss.detach())


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lopt_bridge.pylo_runtime.distributed.sharded import ShardedOptimizer

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = Net()
    data = batches(STEPS, ROWS * world)
    out: dict = {}
    for family in FAMILIES:
        opts = OPTIONS.get(family, {})
        ref = copy.deepcopy(base)
        _train(ref, make_optimizer(family, ref.parameters(), **opts), data, rank, False)
        want = {k: v.detach() for k, v in ref.named_parameters()}

        ddp = DistributedDataParallel(copy.deepcopy(base))
        inner = make_optimizer(family, ddp.parameters(), **opts)
        _train(ddp, ShardedOptimizer(inner), data, rank, True)
        got = {k.removeprefix("module."): v.detach() for k, v in ddp.named_parameters()}
        out[f"diff/{family}"] = max_rel_diff(got, want)
        names = {id(p): k.removeprefix("module.") for k, p in ddp.named_parameters()}
        out[f"stepped/{family}"] = sorted(names[id(p)] for p in inner.state if not isinstance(p, str))

        # FSDP2 (the 0-d scale stays outside, replicated): each tensor stepped whole by one owner.
        sharded = copy.deepcopy(base)
        fully_shard(sharded, mesh=mesh, ignored_params={sharded.scale})
        inner = make_optimizer(family, sharded.parameters(), **opts)
        _train(sharded, ShardedOptimizer(inner), data, rank, True, replicated=[sharded.scale])
        got = {k: _full(v) for k, v in sharded.named_parameters()}
        out[f"fsdp_diff/{family}"] = max_rel_diff(got, want)
        names = {id(p): k for k, p in sharded.named_parameters()}
        out[f"fsdp_stepped/{family}"] = sorted(names[id(p)] for p in inner.state if not isinstance(p, str))

    # Fewer tensors than ranks: every rank steps them all (nothing to split), still equal.
    ref, ddp = copy.deepcopy(base), DistributedDataParallel(copy.deepcopy(base))
    _train(ref, make_optimizer("velo", [ref.lin.weight]), data, rank, False)
    _train(ddp, ShardedOptimizer(make_optimizer("velo", [ddp.module.lin.weight])), data, rank, True)
    out["one_tensor"] = max_rel_diff({"w": ddp.module.lin.weight.detach()}, {"w": ref.lin.weight.detach()})
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, world=2)


@pytest.mark.slow  # the 2-rank runs of `results`
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_step_equals_unsharded(results, family):
    # 1e-5: the bound; only the order of the loss / norm sums differs from the unsharded step.
    for r in results:
        assert r[f"diff/{family}"] <= 1e-5, r


@pytest.mark.slow  # the 2-rank runs of `results`
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_step_over_fsdp2_equals_unsharded(results, family):
    for r in results:
        assert r[f"fsdp_diff/{family}"] <= 1e-5, r


@pytest.mark.slow  # the 2-rank runs of `results`
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["stepped", "fsdp_stepped"])
def test_each_rank_steps_a_disjoint_part(results, family, mode):
    a, b = (set(r[f"{mode}/{family}"]) for r in results)
    assert a and b and not (a & b), (a, b)
    assert a | b == {"lin.weight", "lin.bias", "kernel", "row", "scale"}


@pytest.mark.slow  # the 2-rank runs of `results`
def test_fewer_tensors_than_ranks_falls_back_to_stepping_all(results):
    for r in results:
        assert r["one_tensor"] <= 1e-5, r


def test_owner_assignment_balances_sizes():
    from lopt_bridge.pylo_runtime.distributed.sharded import assign_owners

    assert assign_owners([100, 1, 60, 50, 1], 2) == [0, 0, 1, 1, 0]
    assert assign_owners([5], 3) == [0]
