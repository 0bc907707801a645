"""Our optimizers in ordinary PyTorch training code: GradScaler, LR schedulers, zero_grad, add_param_group,
torch.compile. Random theta (tests.distributed_support): these check the plumbing, not the learned update.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff

F32_EPS = torch.finfo(torch.float32).eps


def _loss(model, x, y):
    return torch.mean((model(x) - y) ** 2)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _iteration(opt) -> int:
    return int(opt.state["global"]["iteration"])


# --------------------------------------------------------------------------------------------------------
# AMP: torch.amp.GradScaler unscales the grads, skips steps with inf/nan and otherwise forwards loss=.
def _run_amp(family: str, scaler: torch.amp.GradScaler | None, poison_step: int | None = None, skip=()):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, model.parameters())
    iters = []
    for i, (x, y) in enumerate(batches(5, 16)):
        if i in skip:
            continue
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step(loss=loss.detach())
        else:
            scaler.scale(loss).backward()
            if i == poison_step:
                model.lin.weight.grad[0, 0] = float("inf")
            scaler.step(opt, loss=loss.detach())  # the unscaled loss: VeLO reads its value
            scaler.update()
        iters.append(_iteration(opt))
    return _params(model), iters


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_scaler_matches_unscaled_run(family):
    want, _ = _run_amp(family, None)
    got, _ = _run_amp(family, torch.amp.GradScaler("cpu", init_scale=2.0**10))
    # Scaling by a power of two is exact in every backward op and in unscale_, so the runs agree bit for bit.
    assert max_rel_diff(got, want) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_scaler_skips_inf_steps(family):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got, iters = _run_amp(family, scaler, poison_step=2)
    assert iters == [1, 2, 2, 3, 4]  # the poisoned step left the optimizer state alone
    assert scaler.get_scale() == 2.0**9  # and the scaler backed off once
    want, _ = _run_amp(family, None, skip=(2,))  # as if that batch had never been seen
    assert max_rel_diff(got, want) == 0.0


# --------------------------------------------------------------------------------------------------------
# LR schedulers drive ``lr``, a multiplier on the learned step.
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["cosine", "lambda"])
def test_schedulers_scale_each_step(family, kind):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, model.parameters())
    if kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    lrs = []
    for x, y in batches(4, 16):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        # The same step with lr = 1 from a copy of the state: ours must be lr times it.
        twin_model = copy.deepcopy(model)
        for tp, p in zip(twin_model.parameters(), model.parameters(), strict=True):
            tp.grad = p.grad.clone()
        twin = make_optimizer(family, twin_model.parameters())
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for g in twin.param_groups:
            g["lr"] = 1.0
        before = _params(model)
        twin.step(loss=loss.detach())
        opt.step(loss=loss.detach())
        sched.step()
        for k, p in model.named_parameters():
            unit = dict(twin_model.named_parameters())[k].detach() - before[k]
            delta = p.detach() - before[k]
            # p - lr*s and p - s round differently: allow 2 ulp of the parameter plus 2 ulp of the step.
            tol = 2 * F32_EPS * (before[k].abs() + (lr * unit).abs())
            assert torch.all((delta - lr * unit).abs() <= tol), (k, lr)
    if kind == "cosine":
        assert lrs == pytest.approx([1.0, 0.1 + 0.9 * (1 + 2**-0.5) / 2, 0.55, 0.1 + 0.9 * (1 - 2**-0.5) / 2])
    else:
        assert lrs == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4])


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_grad_set_to_none_then_step_is_a_no_op(family):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, model.parameters())
    x, y = batches(1, 16)[0]
    _loss(model, x, y).backward()
    opt.step(loss=1.0)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before, state = _params(model), copy.deepcopy(opt.state_dict())
    opt.step(loss=1.0)
    assert max_rel_diff(_params(model), before) == 0.0
    saved = next(st["global"] for st in state["state"].values() if "global" in st)  # first trainable param's
    assert _iteration(opt) == int(saved["iteration"]) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_add_param_group_initialises_state_lazily(family):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, model.lin.parameters())
    data = batches(3, 16)
    for x, y in data[:2]:
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step(loss=1.0)
    opt.add_param_group({"params": [model.kernel, model.scale], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0
    assert len(opt.state[model.kernel]) == 0
    before = _params(model)
    opt.zero_grad(set_to_none=True)
    _loss(model, *data[2]).backward()
    opt.step(loss=1.0)
    assert len(opt.state[model.kernel]) > 0 and len(opt.state[model.scale]) > 0
    assert not torch.equal(model.kernel.detach(), before["kernel"])
    assert torch.equal(model.row.detach(), before["row"])  # never added: untouched
    assert _iteration(opt) == 3


# --------------------------------------------------------------------------------------------------------
#: torch.compile cases: the adafac family's default path, and VeLO's reference path (foreach=False).
COMPILE_CASES = [("small_fc_lopt", {}), ("velo", {"foreach": False})]


@pytest.mark.slow
@pytest.mark.parametrize("family, options", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiled_training_step(family, options):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = batches(3, 16)

    def train(compiled: bool):
        torch.manual_seed(0)
        model = Net()
        opt = make_optimizer(family, model.parameters(), **options)

        def opt_step(loss):
            opt.step(loss=loss)

        step = torch.compile(opt_step, backend="eager") if compiled else opt_step
        graphs = []
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y)
            loss.backward()
            step(loss.detach())
            graphs.append(counters["stats"]["unique_graphs"])
        return _params(model), graphs

    want, _ = train(False)
    got, graphs = train(True)
    assert max_rel_diff(got, want) == 0.0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph for the first step (it creates the state), one for every later step: no recompilation.
    assert graphs == [1, 2, 2], graphs
