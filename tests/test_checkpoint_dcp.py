"""torch.distributed.checkpoint (DCP) for every family under FSDP2: ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` with ``dcp.save`` / ``dcp.load``, resharding between 2 gloo ranks and one
process.

Each family trains SAVE_AT steps, is checkpointed with DCP (model and optimizer, the way torchtitan-style
scripts do), and a fresh model and optimizer (other initial weights) load the checkpoint and train to STEPS:

- (a) saved and loaded on 2 ranks: the parameters equal an uninterrupted 2-rank run bit for bit;
- (b) saved on 2 ranks, loaded on one process (no FSDP): equal to the uninterrupted 2-rank run within the
  float32 noise of the continuation, measured here (below);
- (c) saved on one process, loaded on 2 ranks: equal to the uninterrupted one-process run, likewise.

FSDP2 on a 1-D mesh (the rank-local step) with the awkward parameters of tests.distributed_support.Net:
uneven shards (7 rows as 4 + 3), a 4-D kernel sharded on dim 1, a (1, 7) row whose shard on rank 1 is empty,
and a 0-d scale kept outside FSDP2 (replicated, its gradient averaged by hand).

The noise floor (REFERENCE_NOTES.md): one process and 2 ranks sum the same numbers in another order (local
sums then an all-reduce; FSDP2 averages two half-batch gradients where one process differentiates the mean),
so after a world-size change the continuation may differ in the last bits, and a learned optimizer's loop
carries such a difference on. We measure how far the continuation moves when its gradients are perturbed by
PERTURB = 1e-7 relative (about one float32 ulp), and require the resharded run to stay within FLOOR_FACTOR
times that (measured ratios in docs/distributed.md#checkpointing).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff, run_ranks

pytestmark = [
    pytest.mark.slow,  # the module-scoped fixture runs every family on 2 gloo ranks (about 30 s)
    # DCP without a process group (the one-process side) says it assumes one process: that is the case.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

SAVE_AT = 4
STEPS = 8
ROWS = 8  # per rank; one process trains on both ranks' rows
PERTURB = 1e-7
FLOOR_FACTOR = 10.0
#: Flags that run the same implementation on FSDP2 shards and on one process, so that (b) and (c) differ by
#: the order of summation only (the shards take foreach; Celo's foreach cannot reduce over shards, so the
#: shards take its reference path: ask for it on one process too).
OPTIONS = {f: {"foreach": False} if f == "celo" else {"fused": False} for f in FAMILIES}
DATA = batches(STEPS, 2 * ROWS)
#: Other StateDictOptions, each resumed on 2 ranks (exact): (family, options).
EXTRA_OPTIONS = (
    ("velo", {"flatten_optimizer_state_dict": True}),
    ("celo", {"flatten_optimizer_state_dict": True}),  # Celo's LSTM state is optimizer-wide
    ("small_fc_lopt", {"full_state_dict": True}),
)
#: The state dicts main c91f35a saved (tests/data/state_c91f35a/make.py: the same model and batches).
C91F35A = Path(__file__).parent / "data" / "state_c91f35a"
C91F35A_SAVE_AT, C91F35A_STEPS = 3, 6
#: The families main c91f35a had (it saved state dicts for these only; later families have no old files).
C91F35A_FAMILIES = [
    f for f in FAMILIES if f in ("velo", "celo", "celo_adam", "small_fc_lopt", "mlp_lopt", "mulo")
]


# --------------------------------------------------------------------------------------------------------
# Training, checkpointing, comparing.
def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def _fsdp(model: Net, mesh) -> Net:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    fully_shard(
        model,
        mesh=mesh,
        ignored_params={model.scale},
        shard_placement_fn=lambda p: Shard(1) if p.dim() == 4 else Shard(0),
    )
    return model


def _train(model, opt, data, rank: int | None = None, perturb: int | None = None) -> None:
    """One step per batch; ``rank``: this rank's half of each batch (FSDP2), else the whole batch;
    ``perturb``: seed of a PERTURB relative perturbation of every gradient (the noise floor)."""
    gen = None if perturb is None else torch.Generator().manual_seed(perturb)
    for x, y in data:
        if rank is not None:
            x, y = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        if rank is not None:  # the 0-d scale is outside FSDP2: average its gradient by hand
            torch.distributed.all_reduce(model.scale.grad, op=torch.distributed.ReduceOp.AVG)
        if gen is not None:
            for p in model.parameters():
                p.grad.mul_(1.0 + PERTURB * torch.randn(p.grad.shape, generator=gen))
        opt.step(loss=loss.detach())  # under torch.distributed the step averages the loss over the ranks


def _params(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().full_tensor() if hasattr(v, "full_tensor") else v.detach()).clone()
        for k, v in model.named_parameters()
    }


@torch.no_grad()
def _set_params(model, full: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the model (this rank's part of each FSDP2 parameter)."""
    from lopt_bridge.pylo_runtime.distributed import is_dtensor, local_slices

    for name, p in model.named_parameters():
        if is_dtensor(p):
            p.to_local().copy_(full[name][local_slices(p)])
        else:
            p.copy_(full[name])


def _save(model, opt, path: str, **options) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(model, opt, path: str, **options) -> None:
    """The DCP resume: the fresh optimizer's own state dict is the template dcp.load fills."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(**options)
    msd, osd = get_state_dict(model, opt, options=opts)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)


def _one_process(family: str, path: str | None = None, data=DATA, perturb: int | None = None):
    """One process: a fresh model and optimizer, loaded from ``path`` (else trained from the start)."""
    model = _net(1 if path else 0)
    opt = make_optimizer(family, model.parameters(), **OPTIONS[family])
    if path:
        _load(model, opt, path)
    _train(model, opt, data, perturb=perturb)
    return model, opt


# --------------------------------------------------------------------------------------------------------
# 2 ranks.
def _worker(out_dir: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {"resumed": {}, "placements": {}}
    tensors: dict = {"uninterrupted": {}, "from_one": {}}
    for family in FAMILIES:
        opts = OPTIONS[family]
        model = _fsdp(_net(0), mesh)
        opt = make_optimizer(family, model.parameters(), **opts)
        _train(model, opt, DATA, rank)
        want = tensors["uninterrupted"][family] = _params(model)

        # (a) save at SAVE_AT, load into a fresh model and optimizer, continue.
        model = _fsdp(_net(0), mesh)
        opt = make_optimizer(family, model.parameters(), **opts)
        _train(model, opt, DATA[:SAVE_AT], rank)
        _save(model, opt, f"{out_dir}/two/{family}")
        model = _fsdp(_net(1), mesh)
        opt = make_optimizer(family, model.parameters(), **opts)
        _load(model, opt, f"{out_dir}/two/{family}")
        _train(model, opt, DATA[SAVE_AT:], rank)
        out["resumed"][family] = max_rel_diff(_params(model), want)

        # (c) the one-process checkpoint, continued on 2 ranks.
        model = _fsdp(_net(1), mesh)
        opt = make_optimizer(family, model.parameters(), **opts)
        _load(model, opt, f"{out_dir}/one/{family}")
        _train(model, opt, DATA[SAVE_AT:], rank)
        tensors["from_one"][family] = _params(model)

    # The option sets of torchtitan-style scripts: flattened keys (OptimizersContainer), full state dicts.
    out["options"] = {}
    for family, options in EXTRA_OPTIONS:
        model = _fsdp(_net(0), mesh)
        opt = make_optimizer(family, model.parameters(), **OPTIONS[family])
        _train(model, opt, DATA[:SAVE_AT], rank)
        path = f"{out_dir}/options/{family}-{'-'.join(options)}"
        _save(model, opt, path, **options)
        model = _fsdp(_net(1), mesh)
        opt = make_optimizer(family, model.parameters(), **OPTIONS[family])
        _load(model, opt, path, **options)
        _train(model, opt, DATA[SAVE_AT:], rank)
        out["options"][f"{family} {options}"] = max_rel_diff(_params(model), tensors["uninterrupted"][family])

    # HSDP (a (1, 2) mesh): the parameters are all-gathered and stepped whole, so is their state.
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    runs = []
    for split in (None, SAVE_AT):
        model = _fsdp(_net(0), hsdp)
        opt = make_optimizer("velo", model.parameters(), **OPTIONS["velo"])
        if split is not None:
            _train(model, opt, DATA[:split], rank)
            _save(model, opt, f"{out_dir}/hsdp")
            model = _fsdp(_net(1), hsdp)
            opt = make_optimizer("velo", model.parameters(), **OPTIONS["velo"])
            _load(model, opt, f"{out_dir}/hsdp")
        _train(model, opt, DATA[split or 0 :], rank)
        runs.append(_params(model))
    out["hsdp"] = max_rel_diff(runs[1], runs[0])

    # c91f35a's per-rank state dicts (plain local tensors, a top-level "global"): they load and continue as
    # they did at c91f35a, bit for bit, and then checkpoint with DCP.
    old = torch.load(C91F35A / f"fsdp2_rank{rank}.pt", weights_only=True)
    out["c91f35a"] = {}
    for family in C91F35A_FAMILIES:
        rec = old[family]
        model = _fsdp(_net(1), mesh)
        _set_params(model, rec["params_at_save"])
        opt = make_optimizer(family, model.parameters(), foreach=False)
        opt.load_state_dict(rec["state_dict"])
        _save(model, opt, f"{out_dir}/c91f35a/{family}")
        _train(model, opt, DATA[C91F35A_SAVE_AT:C91F35A_STEPS], rank)
        out["c91f35a"][family] = max_rel_diff(_params(model), rec["params_after"])

    # A one-process state dict (plain whole tensors; c91f35a's) loaded with load_state_dict on 2 ranks: each
    # rank cuts its shard out of the whole tensors.
    tensors["c91f35a_one_to_two"] = {}
    for family, rec in torch.load(C91F35A / "one_process.pt", weights_only=True).items():
        model = _fsdp(_net(1), mesh)
        _set_params(model, rec["params_at_save"])
        opt = make_optimizer(family, model.parameters(), foreach=False)
        opt.load_state_dict(rec["state_dict"])
        _train(model, opt, DATA[C91F35A_SAVE_AT:C91F35A_STEPS], rank)
        tensors["c91f35a_one_to_two"][family] = _params(model)
    if rank == 0:
        torch.save(tensors, Path(out_dir) / "ranks.pt")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One-process checkpoints and runs (here), then the 2-rank runs (2 gloo processes)."""
    out_dir = tmp_path_factory.mktemp("dcp")
    one = {}
    for family in FAMILIES:
        model, opt = _one_process(family, data=DATA[:SAVE_AT])
        _save(model, opt, str(out_dir / "one" / family))
        _train(model, opt, DATA[SAVE_AT:])
        one[family] = _params(model)
    ranks = run_ranks(functools.partial(_worker, str(out_dir)), world=2)
    tensors = torch.load(out_dir / "ranks.pt", weights_only=True)
    return {"dir": out_dir, "one": one, "ranks": ranks, **tensors}


def _floor(family: str, path: str | None) -> tuple[dict, float]:
    """The one-process continuation from ``path`` and how far PERTURB moves it (the noise floor)."""
    data = DATA[SAVE_AT:] if path else DATA
    got = _params(_one_process(family, path, data)[0])
    perturbed = _params(_one_process(family, path, data, perturb=0)[0])
    return got, max_rel_diff(perturbed, got)


@pytest.mark.parametrize("family", FAMILIES)
def test_dcp_two_ranks_resume_is_exact(run, family):
    for r in run["ranks"]:
        assert r["resumed"][family] == 0.0, (family, r["resumed"][family])


@pytest.mark.parametrize("family", FAMILIES)
def test_dcp_two_ranks_to_one_process(run, family):
    got, floor = _floor(family, str(run["dir"] / "two" / family))
    diff = max_rel_diff(got, run["uninterrupted"][family])
    print(f"(b) {family}: diff {diff:.3e} floor {floor:.3e} ratio {diff / floor:.2f}")
    assert 0.0 < floor < 1e-4, floor
    assert diff <= FLOOR_FACTOR * floor, (family, diff, floor)


@pytest.mark.parametrize("family", FAMILIES)
def test_dcp_one_process_to_two_ranks(run, family):
    _, floor = _floor(family, str(run["dir"] / "one" / family))
    diff = max_rel_diff(run["from_one"][family], run["one"][family])
    print(f"(c) {family}: diff {diff:.3e} floor {floor:.3e} ratio {diff / floor:.2f}")
    assert 0.0 < floor < 1e-4, floor
    assert diff <= FLOOR_FACTOR * floor, (family, diff, floor)


def test_dcp_other_state_dict_options_resume_exactly(run):
    for r in run["ranks"]:
        assert r["options"] == {f"{f} {o}": 0.0 for f, o in EXTRA_OPTIONS}, r["options"]


def test_dcp_hsdp_gathered_state_resumes_exactly(run):
    assert [r["hsdp"] for r in run["ranks"]] == [0.0, 0.0]


@pytest.mark.parametrize("family", C91F35A_FAMILIES)
def test_c91f35a_per_rank_state_dicts_load_and_continue_exactly(run, family):
    for r in run["ranks"]:
        assert r["c91f35a"][family] == 0.0, (family, r["c91f35a"][family])


def test_dcp_checkpoint_layout(run):
    """What a 2-rank checkpoint holds: per-element state in each rank's chunk of the whole tensor (what makes
    resharding possible), statistics that are whole on every rank once, the optimizer-wide state once."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(run["dir"] / "two" / "velo")).read_metadata().state_dict_metadata

    def chunks(key: str) -> tuple[list[int], list]:
        item = md[f"optim.state.{key}"]
        return list(item.size), sorted((list(c.offsets), list(c.sizes)) for c in item.chunks)

    # lin.weight (7, 5) sharded 4 + 3 on dim 0; factored dims (1, 0): the column statistic keeps the rows
    # (sharded), the row statistic averages over them (all-reduced, whole on each rank: saved once).
    assert chunks("lin.weight.mom") == ([7, 5, 3], [([0, 0, 0], [4, 5, 3]), ([4, 0, 0], [3, 5, 3])])
    assert chunks("lin.weight.fac_col") == ([7, 3], [([0, 0], [4, 3]), ([4, 0], [3, 3])])
    assert chunks("lin.weight.fac_row") == ([5, 3], [([0, 0], [5, 3])])
    # the 4-D kernel sharded on dim 1 (1 + 1): dim 1 of fac_row, dim 0 of fac_col (its dim 0 is dropped)
    kernel_chunks = [([0] * 5, [3, 1, 2, 5, 3]), ([0, 1, 0, 0, 0], [3, 1, 2, 5, 3])]
    assert chunks("kernel.mom") == ([3, 2, 2, 5, 3], kernel_chunks)
    assert chunks("kernel.fac_col") == ([2, 2, 5, 3], [([0] * 4, [1, 2, 5, 3]), ([1, 0, 0, 0], [1, 2, 5, 3])])
    # row (1, 7): rank 1's shard is empty
    assert chunks("row.mom") == ([1, 7, 3], [([0, 0, 0], [1, 7, 3]), ([1, 0, 0], [0, 7, 3])])
    # VeLO's per-tensor LSTM state is the same on every rank; the 0-d scale is outside FSDP2
    assert chunks("lin.weight.lstm_hidden") == ([8], [([0], [8])])
    assert chunks("scale.mom") == ([3], [([0], [3])])
    # the optimizer-wide state, under the first trainable parameter (kernel: Net's own parameters first)
    assert chunks("kernel.global.iteration") == ([], [([], [])])
    assert chunks("kernel.global.loss_buffer.means")[0] == [10]
    assert "optim.state.kernel.global.skipped_steps" in md
    assert not [k for k in md if ".global." in k and not k.startswith("optim.state.kernel.global.")]


@pytest.mark.parametrize("family", C91F35A_FAMILIES)
def test_one_process_state_dict_loads_on_two_ranks(run, family):
    """``load_state_dict`` of a one-process state dict (here c91f35a's) on FSDP2 ranks: each rank takes its
    part of every whole tensor; the continuation equals c91f35a's one-process run within the noise floor."""
    rec = torch.load(C91F35A / "one_process.pt", weights_only=True)[family]
    runs = []
    for perturb in (None, 0):
        model = _net(1)
        _set_params(model, rec["params_at_save"])
        opt = make_optimizer(family, model.parameters(), foreach=False)
        opt.load_state_dict(rec["state_dict"])
        _train(model, opt, DATA[C91F35A_SAVE_AT:C91F35A_STEPS], perturb=perturb)
        runs.append(_params(model))
    assert max_rel_diff(runs[0], rec["params_after"]) == 0.0  # one process: c91f35a's run exactly
    floor = max_rel_diff(runs[1], runs[0])
    diff = max_rel_diff(run["c91f35a_one_to_two"][family], rec["params_after"])
    print(f"one-process state dict on 2 ranks, {family}: diff {diff:.3e} floor {floor:.3e}")
    assert 0.0 < floor < 1e-4, floor
    assert diff <= FLOOR_FACTOR * floor, (family, diff, floor)
