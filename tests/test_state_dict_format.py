"""The optimizer's state dict on one process: torch's format keyed by parameters only (what
torch.distributed.checkpoint needs), backward compatible with main c91f35a's files, and DCP's own calls.

2-rank FSDP2 checkpoints and resharding: tests/test_checkpoint_dcp.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lopt_bridge.pylo_runtime.distributed import ShardSpec
from lopt_bridge.pylo_runtime.distributed.dcp import state_axes
from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff

pytestmark = [
    # DCP without a process group says it assumes one process: that is the case here.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*skipped a step:RuntimeWarning"),  # the NaN step below, on purpose
]

C91F35A = Path(__file__).parent / "data" / "state_c91f35a"
DATA = batches(6, 16)


def _train(model, opt, data, poison: int | None = None) -> None:
    for i, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        if i == poison:
            model.lin.weight.grad[0, 0] = float("nan")
        opt.step(loss=loss.detach())


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _paths(tree: dict, prefix: str = "") -> set[str]:
    """The dotted key paths of a nested dict (as DCP flattens it)."""
    out = set()
    for k, v in tree.items():
        out |= _paths(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_keyed_by_parameters(family):
    model = _net()
    opt = make_optimizer(family, model.parameters())
    _train(model, opt, DATA[:2])
    sd = opt.state_dict()
    params = list(model.parameters())
    assert set(sd["state"]) == set(range(len(params)))  # no "global" key: DCP maps every key to a parameter
    assert "global" in sd["state"][0] and int(sd["state"][0]["global"]["iteration"]) == 2
    assert not any("global" in st for pid, st in sd["state"].items() if pid != 0)
    assert "global" not in opt.state[params[0]]  # plain state_dict() leaves the optimizer's own state alone
    # and it round-trips through torch.save, bit for bit
    other = make_optimizer(family, params)
    other.load_state_dict(copy.deepcopy(sd))
    assert int(other.state["global"]["iteration"]) == 2 and other.skipped_steps == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("rnn_mlp_lopt", "nn_adam")])  # c91f35a's
def test_c91f35a_state_dicts_load_and_continue_exactly(family):
    """A state dict saved by main c91f35a (top-level "global", reference path): loaded today, the optimizer
    holds exactly its tensors and continues as c91f35a did, bit for bit."""
    rec = torch.load(C91F35A / "one_process.pt", weights_only=True)[family]
    model = _net(1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(rec["params_at_save"][k])
    opt = make_optimizer(family, model.parameters(), foreach=False)
    opt.load_state_dict(rec["state_dict"])
    old = rec["state_dict"]["state"]
    assert "global" in old and set(opt.state_dict()["state"]) == set(old) - {"global"}
    params = list(model.parameters())
    for pid, st in old.items():
        if pid == "global":
            continue
        for k, v in st.items():  # (small_fc_lopt / muLO / MLPLOpt of c91f35a already used today's names)
            assert torch.equal(opt.state[params[pid]][k], v), (pid, k)
    assert torch.equal(opt.state["global"]["iteration"], old["global"]["iteration"])
    _train(model, opt, DATA[3:6])
    assert max_rel_diff(_params(model), rec["params_after"]) == 0.0


# --------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint on one process (no process group).
def _dcp_save(model, opt, path, **options) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def _dcp_load(model, opt, path, **options) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(**options)
    msd, osd = get_state_dict(model, opt, options=opts)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_get_optimizer_state_dict_of_a_fresh_optimizer_steps_nothing(family, flatten):
    """DCP makes a fresh optimizer's state with a zero-gradient, lr=0 step: here it only creates the state
    (a learned optimizer would advance its iteration and loss statistics; VeLO / Celo, without a loss, would
    refuse). Every trainable parameter gets its state and the optimizer-wide state sits in the first one's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = _net()
    before = _params(model)
    opt = make_optimizer(family, model.parameters())
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    assert max_rel_diff(_params(model), before) == 0.0
    assert all(p.grad is None for p in model.parameters())
    assert int(opt.state["global"]["iteration"]) == 0 and opt.skipped_steps == 0
    # The keys real steps make, per parameter and optimizer-wide (nested too): dcp.load fills only the keys
    # this state has, so one made later by a step would be dropped from every DCP resume.
    fresh = make_optimizer(family, list(model.parameters()))
    _train(model, fresh, DATA[:2])
    want = {k for p in model.parameters() for k in fresh.state[p]}
    assert {k for p in model.parameters() for k in opt.state[p]} - {"global"} == want
    assert _paths(opt.state["global"]) == _paths(fresh.state["global"])
    names = {f"state.{n}" for n, _ in model.named_parameters()}
    if flatten:
        assert "state.kernel.global.iteration" in osd and {k.rsplit(".", 1)[0] for k in osd} >= names
    else:
        assert set(osd["state"]) == {n for n, _ in model.named_parameters()}
        assert int(osd["state"]["kernel"]["global"]["iteration"]) == 0


@pytest.mark.parametrize("family", ["velo", "small_fc_lopt"])
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("split", [4, 5], ids=["mid-update", "between-updates"])
def test_dcp_resume_carries_accumulation_and_skipped_steps(tmp_path, family, flatten, split):
    """Saved with gradient accumulation (max_training_steps: 2 gradients per update) after a skipped NaN step,
    with a gradient pending or not: the fresh optimizer resumes bit for bit. dcp.load fills the fresh
    optimizer's keys, dropping others and failing on missing ones, so the accumulation buffers and the skip
    counter exist from the first step on, whatever the phase."""
    options = dict(num_steps=40, max_training_steps=20)
    data = batches(7, 16)
    model = _net()
    opt = make_optimizer(family, model.parameters(), **options)
    _train(model, opt, data, poison=1)
    want = _params(model)

    model = _net()
    opt = make_optimizer(family, model.parameters(), **options)
    _train(model, opt, data[:split], poison=1)
    assert opt.skipped_steps == 1 and int(opt.state["global"]["accum_count"]) == split - 1
    _dcp_save(model, opt, tmp_path / "ckpt", flatten_optimizer_state_dict=flatten)
    model = _net(1)
    opt = make_optimizer(family, model.parameters(), **options)
    _dcp_load(model, opt, tmp_path / "ckpt", flatten_optimizer_state_dict=flatten)
    assert opt.skipped_steps == 1 and int(opt.state["global"]["accum_count"]) == split - 1
    _train(model, opt, data[split:])
    assert max_rel_diff(_params(model), want) == 0.0


def test_flattened_set_without_get_is_refused(tmp_path):
    """DCP's flattened set rebuilds each parameter's entry from the keys the optimizer holds: without a get on
    this optimizer first, the optimizer-wide state would be dropped. Refused with the fix, not dropped."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model = _net()
    opt = make_optimizer("velo", model.parameters())
    _train(model, opt, DATA[:2])
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=flat))
    _train(model, opt, DATA[2:3])  # a step: the optimizer-wide state is no longer in kernel's entry
    with pytest.raises(ValueError, match="call get_optimizer_state_dict on this optimizer first"):
        set_optimizer_state_dict(model, opt, osd, options=flat)
    get_optimizer_state_dict(model, opt, options=flat)
    set_optimizer_state_dict(model, opt, osd, options=flat)
    assert int(opt.state["global"]["iteration"]) == 2


# --------------------------------------------------------------------------------------------------------
# How each state tensor of an FSDP2 shard is sharded (found from the family's own _init_param).
@pytest.mark.parametrize("family", FAMILIES)
def test_state_axes_follow_the_sharded_dim(family):
    opt = make_optimizer(family, [torch.zeros(7, 5, requires_grad=True)])
    p = torch.zeros(4, 5)
    axes = state_axes(opt._new_param_state, p, ShardSpec(0, (7, 5), None), {})
    # per element: sharded like the parameter (stacked over decays, or one slot as NNAdam's)
    assert axes["mom"][0] == 0 and axes["mom"][1][:2] == (7, 5) and len(axes["mom"][1]) in (2, 3)
    if "fac_row" in axes:
        # factored dims (1, 0): fac_row averages over dim 0 (whole on every rank), fac_col keeps it
        assert axes["fac_row"][0] is None and axes["fac_col"][0] == 0
    if family == "velo":
        assert axes["lstm_hidden"] == (None, (8,))  # per-tensor LSTM state: the same on every rank
    on_dim1 = state_axes(opt._new_param_state, torch.zeros(7, 3), ShardSpec(1, (7, 5), None), {})
    assert on_dim1["mom"][0] == 1
    if "fac_row" in on_dim1:
        assert on_dim1["fac_row"][0] == 0 and on_dim1["fac_col"][0] is None


def test_state_axes_refuse_state_they_cannot_place():
    spec = ShardSpec(0, (6, 4), None)

    def reads_values(p, state, red):
        state["scale"] = torch.full((1,), float(p.abs().max()))

    with pytest.raises(ValueError, match="_init_param failed on the meta device"):
        state_axes(reads_values, torch.zeros(3, 4), spec, {})

    def flattened(p, state, red):
        state["flat"] = torch.zeros(p.numel(), device=p.device)

    with pytest.raises(ValueError, match="'flat' .* neither sharded like it nor the same on every rank"):
        state_axes(flattened, torch.zeros(3, 4), spec, {})
