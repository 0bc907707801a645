"""FSDP2 (DTensor shards) and DDP on 2 gloo ranks give the single-process result, for every family.

Each rank trains on its half of every batch and passes the global mean loss (``distributed.global_mean``); the
single-process reference trains on the whole batch. Params: dim 0 of size 7 and 3 (split 4/3 and 2/1),
a (1, 7) row (one rank holds an empty shard), a 4-D kernel and a 0-d scale.

FSDP2 runs twice per family: on a 1-D mesh (the rank-local step: each rank steps its shard, the statistics
are all-reduced; ``gather_param`` is made to raise) and on a (1, 2) HSDP mesh, whose placements
``(Replicate(), Shard(0))`` take the all-gather fallback.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff, run_ranks

pytestmark = pytest.mark.slow  # every test reads the 2-rank runs of the module-scoped `results` fixture

STEPS = 10
ROWS = 8  # per rank
#: Extra rank-local FSDP2 runs: (family, optimizer options).
OTHER_PATHS = (
    ("velo", {"weight_decay": 0.01, "foreach": False}),
    ("mulo", {"weight_decay": 0.01, "foreach": False}),
    ("small_fc_lopt", {"fused": False}),
)


def _train(model, opt, data, rank: int, world: int, distributed: bool, replicated=()) -> None:
    """``STEPS`` steps; ``replicated``: params outside FSDP whose gradients this loop averages by hand."""
    from lopt_bridge.pylo_runtime.distributed import global_mean

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


class _Gathers:
    """Counts ``distributed.gather_param`` calls, or makes them raise (the rank-local path never gathers)."""

    def __init__(self, allow: bool) -> None:
        import lopt_bridge.pylo_runtime.distributed.fsdp as dist_mod

        self.mod, self.real, self.allow, self.calls = dist_mod, dist_mod.gather_param, allow, 0

    def __call__(self, *args):
        self.calls += 1
        if not self.allow:
            raise AssertionError("gather_param called in the rank-local path")
        return self.real(*args)

    def __enter__(self):
        self.mod.gather_param = self
        return self

    def __exit__(self, *exc):
        self.mod.gather_param = self.real


def _state_shapes(model, opt) -> dict:
    """Local shape, global shape and optimizer-state shapes of each DTensor param (on this rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            st = {k: list(v.shape) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            out[name] = {"local": list(p.to_local().shape), "global": list(p.shape), "state": st}
    return out


def _fsdp_run(family, base, data, mesh, rank, world, want, allow_gather: bool, **options) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    model = copy.deepcopy(base)
    # fully_shard refuses 0-d params: the scale stays a plain replicated tensor in the same optimizer.
    # The 4-D kernel is sharded on dim 1 (FSDP2 allows uneven shards on dim 0 only), the others on dim 0.
    fully_shard(
        model,
        mesh=mesh,
        ignored_params={model.scale},
        shard_placement_fn=lambda p: Shard(1) if p.dim() == 4 else Shard(0),
    )
    opt = make_optimizer(family, model.parameters(), **options)
    with _Gathers(allow_gather) as gathers:
        _train(model, opt, data, rank, world, True, replicated=[model.scale])
    got = {k: _full(v) for k, v in model.named_parameters()}
    return {
        "placements": sorted(str(p.placements) for p in model.parameters() if isinstance(p, DTensor)),
        "diff": max_rel_diff(got, want),
        "gathers": gathers.calls,
        "shapes": _state_shapes(model, opt),
    }


def _resume_run(family, base, data, mesh, rank, world) -> float:
    """FSDP2 rank-local: 5 steps, each rank's ``state_dict()`` into a fresh optimizer, 5 more steps; max
    relative difference from 10 uninterrupted steps (each rank saves and loads its own shard's state)."""
    from torch.distributed.fsdp import fully_shard

    runs = []
    for split in (None, len(data) // 2):
        model = copy.deepcopy(base)
        fully_shard(model, mesh=mesh, ignored_params={model.scale})
        opt = make_optimizer(family, model.parameters())
        if split is None:
            _train(model, opt, data, rank, world, True, replicated=[model.scale])
        else:
            _train(model, opt, data[:split], rank, world, True, replicated=[model.scale])
            saved = copy.deepcopy(opt.state_dict())
            opt = make_optimizer(family, model.parameters())
            opt.load_state_dict(saved)
            _train(model, opt, data[split:], rank, world, True, replicated=[model.scale])
        runs.append({k: _full(v) for k, v in model.named_parameters()})
    return max_rel_diff(runs[1], runs[0])


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lopt_bridge.pylo_runtime import adafac

    # small_fc_lopt / muLO take the CPU fast path here: with this threshold the (7, 5) weight and the kernel
    # go through its factored branch, the others through its batched one (both reduce over the shards).
    adafac.SMALL = 20
    mesh = init_device_mesh("cpu", (world,))
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    base = Net()
    data = batches(STEPS, ROWS * world)
    out: dict = {}
    for family in FAMILIES:
        ref = copy.deepcopy(base)
        _train(ref, make_optimizer(family, ref.parameters()), data, rank, world, False)
        want = {k: v.detach() for k, v in ref.named_parameters()}
        out[f"moved/{family}"] = max_rel_diff({k: base.state_dict()[k] for k in want}, want)
        out[f"fsdp/{family}"] = _fsdp_run(family, base, data, mesh, rank, world, want, allow_gather=False)
        out[f"hsdp/{family}"] = _fsdp_run(family, base, data, hsdp, rank, world, want, allow_gather=True)

        ddp = DistributedDataParallel(copy.deepcopy(base))
        _train(ddp, make_optimizer(family, ddp.parameters()), data, rank, world, True)
        got = {k.removeprefix("module."): v.detach() for k, v in ddp.named_parameters()}
        out[f"ddp/{family}"] = max_rel_diff(got, want)

    # Other paths on shards: weight decay (its loss term is all-reduced) with the single-tensor paths, and
    # small_fc_lopt's foreach path asked for explicitly (fused=False; the default takes it too on shards).
    out["other_paths"] = []
    for family, options in OTHER_PATHS:
        ref = copy.deepcopy(base)
        _train(ref, make_optimizer(family, ref.parameters(), **options), data, rank, world, False)
        want = {k: v.detach() for k, v in ref.named_parameters()}
        run = _fsdp_run(family, base, data, mesh, rank, world, want, allow_gather=False, **options)
        out["other_paths"].append(run["diff"])

    out["resume"] = {f: _resume_run(f, base, data, mesh, rank, world) for f in ("velo", "small_fc_lopt")}

    # GradScaler over DTensor grads: an inf in ONE rank's shard must make EVERY rank skip the step (a rank
    # stepping alone would wait forever in the all-reduces of its step).
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
def test_fsdp2_rank_local_equals_single_process(results, family):
    # 1e-5: the bound. Rounding differs from one process through the gradient reduction (FSDP2
    # averages the two half-batch gradients, the reference differentiates the mean) and the summation order
    # of the all-reduced statistics (local sums, then their sum).
    for r in results:
        run = r[f"fsdp/{family}"]
        assert run["placements"] == ["(Shard(dim=0),)"] * 3 + ["(Shard(dim=1),)"]
        assert run["gathers"] == 0  # _Gathers raises as well: no parameter was all-gathered
        assert r[f"moved/{family}"] > 1e-3, (
            "the optimizer barely moved the parameters: the test would be vacuous"
        )
        assert run["diff"] <= 1e-5, (family, run["diff"])


#: Per-element state of each family (one slot per decay on the last axis).
ELEMENT_STATE = {
    "small_fc_lopt": ("mom", "rms"),
    "mulo": ("mom", "rms"),
    "mlp_lopt": ("mom",),
    "velo": ("mom", "rms"),
    "celo": ("mom", "rms"),
    "celo_adam": ("mom", "rms"),
    "rnn_mlp_lopt": ("mom", "rms"),
    "nn_adam": ("mom", "rms"),
}
#: Families whose per-element state has no trailing decay axis (one moment each).
NO_DECAY_AXIS = ("nn_adam",)
#: Factored second moments (row, col) of the families that keep them.
FACTORED = {
    "small_fc_lopt": ("fac_row", "fac_col"),
    "mulo": ("fac_row", "fac_col"),
    "velo": ("fac_row", "fac_col"),
    "celo": ("fac_row", "fac_col"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_rank_local_state_is_shard_sized(results, family):
    local_sizes = []
    for r in results:
        shapes = r[f"fsdp/{family}"]["shapes"]
        assert sorted(shapes) == ["kernel", "lin.bias", "lin.weight", "row"]
        for name, info in shapes.items():
            for key in ELEMENT_STATE[family]:
                shape = info["state"][key] if family in NO_DECAY_AXIS else info["state"][key][:-1]
                assert shape == info["local"], (name, key, info)
        local_sizes.append(shapes["lin.weight"]["local"])
        if family in FACTORED:
            # (7, 5) sharded on dim 0, factored dims (1, 0): the row statistic averages over the sharded dim
            # (all-reduced, the whole (5,) vector on each rank), the column one keeps it (local rows).
            row, col = FACTORED[family]
            info = shapes["lin.weight"]
            assert info["state"][row][:-1] == [5] and info["state"][col][:-1] == info["local"][:1], info
    assert local_sizes == [[4, 5], [3, 5]]  # the two ranks hold different halves: state / world_size


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_fallback_gather_equals_single_process(results, family):
    # A 2-D (HSDP) mesh is not rank-local: the parameters are all-gathered and stepped whole (the fallback).
    for r in results:
        run = r[f"hsdp/{family}"]
        assert run["placements"] == ["(Replicate(), Shard(dim=0))"] * 3 + ["(Replicate(), Shard(dim=1))"]
        assert run["gathers"] == 4 * STEPS  # every DTensor param, every step
        state = run["shapes"]["lin.weight"]["state"][ELEMENT_STATE[family][0]]
        assert (state if family in NO_DECAY_AXIS else state[:-1]) == [7, 5]
        assert run["diff"] <= 1e-5, (family, run["diff"])


def test_fsdp2_rank_local_other_paths(results):
    for r in results:
        assert len(r["other_paths"]) == len(OTHER_PATHS)
        for (family, options), diff in zip(OTHER_PATHS, r["other_paths"], strict=True):
            assert diff <= 1e-5, (family, options, diff)


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_equals_single_process(results, family):
    for r in results:
        assert r[f"ddp/{family}"] <= 1e-5, r


def test_grad_scaler_skip_is_agreed_across_ranks(results):
    for r in results:
        assert r["amp_iterations"] == [1, 1, 2] and r["amp_scale"] == 2.0**9, r


def test_fsdp2_rank_local_state_dict_resume_is_exact(results):
    # Each rank's state_dict() holds its own shard's state: saving and loading it per rank must resume bit for
    # bit. (torch.distributed.checkpoint, resharding included: tests/test_checkpoint_dcp.py.)
    for r in results:
        assert r["resume"] == {"velo": 0.0, "small_fc_lopt": 0.0}, r["resume"]
