"""The loss under data parallelism, on 2 gloo ranks (issue #14): every rank must feed the same loss.

Each rank trains on its own half of every batch, so its local loss differs from the other's. The optimizer
averages the loss over the ranks inside ``step`` (one all-reduce of one scalar, only for the families that
read the loss), so DDP replicas stay bit-identical whether the loop passes ``step(loss=local_loss)`` or
``set_loss(opt, local_loss)``; ``loss_reduction="none"`` shows what happens otherwise. The ``nonfinite=``
decision is shared too: a NaN in ONE rank's FSDP2 gradient shard, or in a tensor only one rank steps under
``ShardedOptimizer``, makes every rank skip the step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, run_ranks

STEPS = 5
ROWS = 8  # per rank
LOSS_FAMILIES = ("velo", "celo", "celo_adam", "rnn_mlp_lopt")
#: How the loop hands over the loss: ``step(loss=local)``, ``set_loss(opt, local)`` + ``step()``, the explicit
#: ``global_mean`` with the in-step reduction off (the old recipe), and the local loss with it off.
MODES = ("loss", "set_loss", "explicit_mean", "none")


def _half(rank: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]


def _flat(model: torch.nn.Module) -> list[float]:
    """Every parameter value (full tensors for DTensors), exactly (JSON keeps float64 repr of float32)."""
    out = []
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out += p.detach().reshape(-1).tolist()
    return out


class _CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls and the elements they carry."""

    def __enter__(self):
        self.real, self.calls = torch.distributed.all_reduce, []

        def counting(t, *args, **kwargs):
            self.calls.append(t.numel())
            return self.real(t, *args, **kwargs)

        torch.distributed.all_reduce = counting
        return self

    def __exit__(self, *exc):
        torch.distributed.all_reduce = self.real


def _ddp_runs(family: str, base: Net, data, rank: int) -> dict:
    from lopt_bridge import pylo_runtime
    from lopt_bridge.pylo_runtime.distributed import global_mean

    runs: dict = {}
    for mode in MODES:
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        reduction = "none" if mode in ("explicit_mean", "none") else "mean"
        opt = make_optimizer(family, ddp.parameters(), loss_reduction=reduction)
        losses = []
        for x, y in data:
            x, y = _half(rank, x, y)
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((ddp(x) - y) ** 2)
            loss.backward()
            losses.append(loss.item())
            if mode == "set_loss":
                pylo_runtime.set_loss(opt, loss)
                opt.step()
            elif mode == "explicit_mean":
                opt.step(loss=global_mean(loss.detach()))
            else:
                opt.step(loss=loss.detach())
        runs[mode] = _flat(ddp)
        runs["losses"] = losses
    return runs


def _all_reduces_per_step(family: str, base: Net, data, rank: int) -> list[int]:
    """Elements of each all-reduce inside ``step`` over 2 steps of a plain (not DDP) model."""
    model = copy.deepcopy(base)
    opt = make_optimizer(family, model.parameters())
    with _CountAllReduce() as counter:
        for x, y in data[:2]:
            opt.zero_grad(set_to_none=True)
            x, y = _half(rank, x, y)
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            for p in model.parameters():  # what DDP would do, outside the counted step
                counter.real(p.grad, op=torch.distributed.ReduceOp.AVG)
            opt.step(loss=loss.detach())
    return counter.calls


def _nan_shard_runs(family: str, base: Net, data, mesh, rank: int) -> dict:
    """FSDP2 rank-local: a NaN in rank 1's shard of lin.weight at step 1; and the run without that batch."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for label, drop in (("poisoned", None), ("dropped", 1)):
        model = copy.deepcopy(base)
        fully_shard(model, mesh=mesh, ignored_params={model.scale})
        opt = make_optimizer(family, [p for n, p in model.named_parameters() if n != "scale"])
        iters = []
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            opt.zero_grad(set_to_none=True)
            x, y = _half(rank, x, y)
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            if label == "poisoned" and i == 1 and rank == 1:
                model.lin.weight.grad.to_local()[0, 0] = float("nan")
            opt.step(loss=loss.detach())
            iters.append(int(opt.state["global"]["iteration"]))
        out[label] = {"params": _flat(model), "iters": iters, "skipped": opt.skipped_steps}
    return out


def _sharded_nan_runs(family: str, base: Net, data, rank: int) -> dict:
    """ShardedOptimizer over DDP: a NaN in lin.weight's gradient (stepped by ONE rank) at step 1."""
    from lopt_bridge import pylo_runtime
    from lopt_bridge.pylo_runtime.distributed.sharded import ShardedOptimizer

    out = {}
    for label, drop in (("poisoned", None), ("dropped", 1)):
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        inner = make_optimizer(family, ddp.parameters())
        opt = ShardedOptimizer(inner)
        for i, (x, y) in enumerate(data):
            if i == drop:
                continue
            opt.zero_grad(set_to_none=True)
            x, y = _half(rank, x, y)
            loss = torch.mean((ddp(x) - y) ** 2)
            loss.backward()
            if label == "poisoned" and i == 1:
                ddp.module.lin.weight.grad[2, 2] = float("nan")
            pylo_runtime.set_loss(opt, loss)  # different on each rank: averaged inside the step
            opt.step()
        names = {id(p): k.removeprefix("module.") for k, p in ddp.named_parameters()}
        out[label] = {
            "params": _flat(ddp),
            "skipped": inner.skipped_steps,
            "iteration": int(inner.state["global"]["iteration"]),
            "stepped": sorted(names[id(p)] for p in inner.state if not isinstance(p, str)),
        }
    return out


def _worker(rank: int, world: int) -> dict:
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore", RuntimeWarning)  # the skip warning; the counters are asserted instead
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = Net()
    data = batches(STEPS, ROWS * world)
    out: dict = {}
    for family in FAMILIES:
        out[f"ddp/{family}"] = _ddp_runs(family, base, data, rank)
        out[f"all_reduce/{family}"] = _all_reduces_per_step(family, base, data, rank)
    for family in ("velo", "small_fc_lopt"):
        out[f"nan_shard/{family}"] = _nan_shard_runs(family, base, data, mesh, rank)
    out["sharded_nan/velo"] = _sharded_nan_runs("velo", base, data, rank)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, world=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_ranks_with_different_losses_stay_bit_identical(results, family):
    r0, r1 = (r[f"ddp/{family}"] for r in results)
    assert r0["losses"] != r1["losses"]  # each rank really sees its own loss
    for mode in ("loss", "set_loss", "explicit_mean"):
        assert r0[mode] == r1[mode], mode
    # The in-step mean is exactly the explicit global_mean recipe; set_loss is exactly loss=.
    assert r0["loss"] == r0["set_loss"] == r0["explicit_mean"]
    if family in LOSS_FAMILIES:
        # Without the reduction the replicas drift apart: the property above is not vacuous.
        assert r0["none"] != r1["none"]
    else:
        assert r0["none"] == r1["none"] == r0["loss"]  # these families never read the loss


@pytest.mark.parametrize("family", FAMILIES)
def test_one_all_reduce_of_one_scalar_per_step_only_where_the_loss_is_read(results, family):
    for r in results:
        assert r[f"all_reduce/{family}"] == ([1, 1] if family in LOSS_FAMILIES else [])


@pytest.mark.parametrize("family", ["velo", "small_fc_lopt"])
def test_nan_in_one_ranks_shard_makes_every_rank_skip(results, family):
    runs = [r[f"nan_shard/{family}"] for r in results]
    for run in runs:
        assert run["poisoned"]["iters"] == [1, 1, 2, 3, 4] and run["poisoned"]["skipped"] == 1
        # Skipping changed nothing: the same parameters as a run that never saw that batch.
        assert run["poisoned"]["params"] == run["dropped"]["params"]
    assert runs[0]["poisoned"]["params"] == runs[1]["poisoned"]["params"]


def test_sharded_optimizer_skips_on_every_rank(results):
    runs = [r["sharded_nan/velo"] for r in results]
    assert runs[0]["poisoned"]["stepped"] != runs[1]["poisoned"]["stepped"]  # lin.weight has one owner
    for run in runs:
        assert run["poisoned"]["skipped"] == 1 and run["poisoned"]["iteration"] == STEPS - 1
        assert run["poisoned"]["params"] == run["dropped"]["params"]
    assert runs[0]["poisoned"]["params"] == runs[1]["poisoned"]["params"]
