"""``nonfinite=`` (issue #12 part 2): one bad number must not poison a training run, for every family.

Measured before the guard: one NaN/Inf loss made every VeLO / Celo / Celo-Adam parameter NaN for good; an
empty parameter made VeLO write NaN into every other tensor; one NaN gradient element made its tensor NaN
(and, in VeLO, every tensor within 3 steps); an Inf gradient did the same for small_fc_lopt and muLO
(nan_to_num turns it into float32 max). With the default ``nonfinite="skip"`` such a step changes nothing
(parameters, state, iteration counter) and the run equals one that never saw that batch, bit for bit.
Random theta (tests.distributed_support): these check the guard, not the learned update.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lopt_bridge.pylo_runtime.step_inputs import NonFiniteError
from tests.distributed_support import FAMILIES, Net, batches, make_optimizer, max_rel_diff

#: The families whose update reads the training loss.
LOSS_FAMILIES = ("velo", "celo", "celo_adam", "rnn_mlp_lopt")
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
#: The skip warning is asserted where it matters; elsewhere it would only fill the report.
pytestmark = pytest.mark.filterwarnings("ignore:.*skipped a step:RuntimeWarning")


def _loss(model, x, y):
    return torch.mean((model(x) - y) ** 2)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_same_tree(a, b, path="state") -> None:
    """Bit-identical nested state (tensors by value and dtype, everything else by ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert (
            torch.equal(a, b)
            or (a.isnan() == b.isnan()).all()
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
        return
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{path}[{i}]")
        return
    assert a == b, (path, a, b)


def _state_without_counter(opt) -> dict:
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():  # the optimizer-wide state: under the first trainable parameter's entry
        st.get("global", {}).pop("skipped_steps", None)
    return sd


def _run(family, n_steps, *, poison=None, drop=(), nonfinite="skip", extra=None, data=None, **options):
    """Train ``Net`` for ``n_steps`` batches; ``poison(i, model) -> loss override or None`` spoils step i.

    Returns (params, optimizer, per-step iteration counters). ``drop``: batches left out entirely (the
    reference run for a skipped step). ``extra``: additional parameters handed to the optimizer.
    """
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters()) + list(extra or [])
    opt = make_optimizer(family, params, nonfinite=nonfinite, **options)
    iters = []
    for i, (x, y) in enumerate(data or batches(n_steps, 16)):
        if i in drop:
            continue
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        for e in extra or []:
            e.grad = torch.zeros_like(e)
        step_loss = loss.detach()
        if poison is not None:
            override = poison(i, model)
            if override is not None:
                step_loss = torch.tensor(override)
        opt.step(loss=step_loss)
        iters.append(int(opt.state["global"]["iteration"]) if "global" in opt.state else 0)
    return _params(model), opt, iters


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LOSS_FAMILIES)
def test_one_nan_loss_then_50_good_steps(family):
    data = batches(52, 16)
    with pytest.warns(RuntimeWarning, match="skipped a step .*the loss is nan"):
        got, opt, iters = _run(family, 52, data=data, poison=lambda i, m: BAD["nan"] if i == 1 else None)
    want, _, _ = _run(family, 52, data=data, drop=(1,))
    assert max_rel_diff(got, want) == 0.0  # as if that batch had never been seen, bit for bit
    assert iters[:3] == [1, 1, 2] and iters[-1] == 51
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("family", LOSS_FAMILIES)
@pytest.mark.parametrize("bad", ["inf", "-inf"])
def test_one_infinite_loss_is_skipped(family, bad):
    with pytest.warns(RuntimeWarning, match=f"skipped a step .*the loss is {bad}"):
        got, opt, iters = _run(family, 5, poison=lambda i, m: BAD[bad] if i == 1 else None)
    want, _, _ = _run(family, 5, drop=(1,))
    assert max_rel_diff(got, want) == 0.0 and iters == [1, 1, 2, 3, 4] and opt.skipped_steps == 1


@pytest.mark.parametrize("family", LOSS_FAMILIES)
def test_propagate_reproduces_the_poisoned_run(family):
    # The reference behaviour, kept for parity studies: one NaN loss, and every parameter is NaN 50 steps on.
    data = batches(52, 16)
    got, opt, _ = _run(
        family, 52, data=data, nonfinite="propagate", poison=lambda i, m: BAD["nan"] if i == 1 else None
    )
    assert all(torch.isnan(v).all() for v in got.values()), {
        k: v.isnan().float().mean() for k, v in got.items()
    }
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(LOSS_FAMILIES)))
def test_families_that_ignore_the_loss_step_on_a_nan_loss(family):
    want, _, _ = _run(family, 4)
    got, opt, iters = _run(family, 4, poison=lambda i, m: BAD["nan"] if i == 1 else None)
    assert max_rel_diff(got, want) == 0.0 and iters == [1, 2, 3, 4] and opt.skipped_steps == 0


# --------------------------------------------------------------------------------------------------------
def _poison_grad(name: str, value: float, at: int):
    def poison(i, model):
        if i == at:
            dict(model.named_parameters())[name].grad.view(-1)[0] = value
        return None

    return poison


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ["lin.weight", "scale"])  # a matrix, and the 0-d parameter
def test_one_bad_gradient_element_skips_the_step(family, bad, name):
    got, opt, iters = _run(family, 6, poison=_poison_grad(name, BAD[bad], at=2))
    want, _, _ = _run(family, 6, drop=(2,))
    assert max_rel_diff(got, want) == 0.0  # every tensor intact, and the same run as without that batch
    assert iters == [1, 2, 2, 3, 4, 5] and opt.skipped_steps == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_step_leaves_state_and_params_bit_identical(family):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, model.parameters())
    data = batches(3, 16)
    for x, y in data[:2]:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        loss.backward()
        opt.step(loss=loss.detach())
    before_params, before_state = _params(model), _state_without_counter(opt)
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, *data[2])
    loss.backward()
    model.kernel.grad[1, 0, 1, 2] = float("nan")
    model.lin.bias.grad[3] = float("inf")
    with pytest.warns(RuntimeWarning) as record:
        opt.step(loss=loss.detach())
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 NaN of 60 elements" in message and "1 Inf of 7 elements" in message, message
    assert "param_groups[0]['params'][0]" in message and "param_groups[0]['params'][4]" in message, message
    assert max_rel_diff(_params(model), before_params) == 0.0
    _assert_same_tree(_state_without_counter(opt)["state"], before_state["state"])
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bad_first_step_is_skipped_before_any_state_exists(family):
    got, opt, iters = _run(family, 4, poison=_poison_grad("lin.bias", BAD["nan"], at=0))
    want, _, _ = _run(family, 4, drop=(0,))
    assert max_rel_diff(got, want) == 0.0 and iters == [0, 1, 2, 3] and opt.skipped_steps == 1


def test_warns_once_and_counts_every_skip():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, opt, iters = _run("velo", 6, poison=lambda i, m: BAD["nan"] if i in (1, 3, 4) else None)
    assert [str(w.message).count("skipped a step") for w in record] == [1]
    assert "1 step(s) skipped so far" in str(record[0].message)
    assert opt.skipped_steps == 3 and iters == [1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_steps_survives_state_dict_round_trip(family):
    _, opt, _ = _run(family, 4, poison=_poison_grad("row", BAD["inf"], at=1))
    assert opt.skipped_steps == 1
    sd = opt.state_dict()
    torch.manual_seed(0)
    fresh = make_optimizer(family, Net().parameters())
    assert fresh.skipped_steps == 0
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.skipped_steps == 1
    _assert_same_tree(fresh.state_dict()["state"], sd["state"])


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_raise_names_the_parameter_and_changes_nothing(family):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(family, list(model.named_parameters()), nonfinite="raise")
    x, y = batches(1, 16)[0]
    _loss(model, x, y).backward()
    opt.step(loss=1.0)
    before_params, before_state = _params(model), copy.deepcopy(opt.state_dict())
    model.lin.weight.grad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"gradient of 'lin.weight' \(shape \(7, 5\)\) has 1 NaN of 35"):
        opt.step(loss=1.0)
    assert max_rel_diff(_params(model), before_params) == 0.0
    _assert_same_tree(opt.state_dict()["state"], before_state["state"])
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("family", LOSS_FAMILIES)
def test_raise_on_a_bad_loss(family):
    model = Net()
    opt = make_optimizer(family, model.parameters(), nonfinite="raise")
    _loss(model, *batches(1, 16)[0]).backward()
    with pytest.raises(NonFiniteError, match="the loss is inf"):
        opt.step(loss=float("inf"))
    assert "global" not in opt.state  # not even the lazily created state


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of skip, raise, propagate, got 'ignore'"):
        make_optimizer("velo", Net().parameters(), nonfinite="ignore")
    with pytest.raises(ValueError, match="loss_reduction must be one of mean, none"):
        make_optimizer("velo", Net().parameters(), loss_reduction="sum")


# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_empty_parameter_is_ignored(family, nonfinite, shape):
    # Before: VeLO's mix layer took a max over a NaN row (the mean of an empty tensor) and every parameter
    # became NaN on the first step. Now an empty tensor is skipped like one without a gradient.
    empty = torch.nn.Parameter(torch.zeros(shape))
    got, opt, _ = _run(family, 4, nonfinite=nonfinite, extra=[empty])
    want, _, _ = _run(family, 4, nonfinite=nonfinite)
    assert max_rel_diff(got, want) == 0.0
    assert len(opt.state[empty]) == 0 and opt.skipped_steps == 0


def test_a_nan_parameter_with_weight_decay_is_reported_as_its_gradient():
    # g + wd * p is what the update reads: a NaN parameter makes it NaN, and the step is refused.
    model = Net()
    opt = make_optimizer("small_fc_lopt", model.parameters(), weight_decay=0.1, nonfinite="raise")
    _loss(model, *batches(1, 16)[0]).backward()
    with torch.no_grad():
        model.row[0, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"params'\]\[1\] \(shape \(1, 7\)\) has 1 NaN"):
        opt.step()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_huge_finite_gradient_is_not_skipped(family):
    # The guard's fast 2-norm overflows to inf here; the exact per-tensor confirmation lets the step run,
    # exactly as nonfinite="propagate" (no check at all) does.
    # (small_fc_lopt, which does not clip, then writes inf/NaN into that tensor, as the reference does.)
    huge = _poison_grad("lin.weight", 3e38, at=1)
    got, opt, iters = _run(family, 2, poison=huge)
    want, _, _ = _run(family, 2, poison=huge, nonfinite="propagate")
    assert opt.skipped_steps == 0 and iters == [1, 2]
    for k in want:
        same_nan = torch.equal(got[k].isnan(), want[k].isnan())
        assert same_nan and torch.equal(got[k].nan_to_num(), want[k].nan_to_num()), k
