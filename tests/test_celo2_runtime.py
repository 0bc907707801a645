"""The Celo2 runtime (pylo_runtime/celo2.py): routing, options, paths, state, odd inputs.

The committed parity fixtures (celo2_random, celo2base_random, celo2_options, celo2_ablate) check the math
against celo's JAX reference; here: which tensors take the Adam branch and how a user says so, that every
reference option is implemented (changes the update where the reference's does) or refused by name, that
both paths replay every Celo2 fixture and agree bit for bit, state_dict resume, bf16 parameters, non-finite
steps and empty tensors.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings

import numpy as np
import pytest
import torch

from lopt_bridge.parity_tests.commands import DEFAULT_FIXTURES
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import discover, load_fixture, repo_root
from lopt_bridge.parity_tests.replay import check_fixture
from lopt_bridge.pylo_runtime import Celo2, FusedUnavailableError, NonFiniteError, specs
from tests.distributed_support import random_theta
from tests.fused_support import SHAPES, grad_stream, make_params, update_error

THETA, CONFIG = random_theta("celo2")  # celo2_random's theta and config (factory Celo2, step_mult 0.005)
CELO2_FIXTURES = [
    p for p in discover(repo_root() / DEFAULT_FIXTURES) if load_fixture(p).meta["family"] == "celo2"
]
UNNAMED = "ignore:Celo2. .* without names:UserWarning"


class Model(torch.nn.Module):
    """Every kind of parameter the routing rules tell apart (PyTorch's own names)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(11, 6)
        self.fc = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, idx: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc(self.embed_tokens(idx))).sum() * self.scale
        return h + self.conv(img).square().mean()


def _model_step(opt, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randint(0, 11, (4,), generator=gen), torch.randn(1, 2, 5, 5, generator=gen)).backward()
    opt.step()


def _build(params, config=None, **kw):
    return Celo2(params, THETA, {**CONFIG, **(config or {})}, num_steps=100, **kw)


# ----------------------------------------------------------------------------------------------------------
# Routing.
def test_default_routing_is_the_reference_regex_on_named_parameters():
    """The class default ``.*bias.*|.*embed.*``, searched in each ``named_parameters()`` name."""
    model = Model()
    opt = Celo2(
        model.named_parameters(), THETA, {**CONFIG, "regex_1d": specs.celo2.CLASS_REGEX_1D}, num_steps=9
    )
    want = {
        n: "adam" if re.search(specs.celo2.CLASS_REGEX_1D, n) else "learned"
        for n, _ in model.named_parameters()
    }
    assert opt.routing() == want
    assert want["embed_tokens.weight"] == "adam" and want["fc.bias"] == want["norm.bias"] == "adam"
    assert want["norm.weight"] == want["scale"] == "learned"  # name-based: a 1-D / 0-d tensor may be learned
    _model_step(opt, model)
    assert {n: "fac_row" in opt.state[p] for n, p in model.named_parameters()} == {
        n: b == "learned" for n, b in want.items()
    }
    assert opt.routing() == want  # from the state once stepped


def test_factory_haiku_regex_means_biases_for_pytorch_names():
    """celo.factory's ``/b$`` matches haiku paths (``linear/b``); on PyTorch names it is applied as
    ``(^|\\.)bias$``, i.e. the same tensors: the biases."""
    model = Model()
    opt = Celo2(model.named_parameters(), THETA, CONFIG, num_steps=9)
    assert CONFIG["regex_1d"] == "/b$" and opt.name_regex == r"(^|\.)bias$"
    assert {n for n, b in opt.routing().items() if b == "adam"} == {"fc.bias", "norm.bias", "conv.bias"}


def test_regex_override_groups_and_predicates():
    model = Model()
    named = list(model.named_parameters())
    assert set(_build(named, regex_1d="norm").routing().values()) >= {"adam"}
    assert {n for n, b in _build(named, regex_1d="norm").routing().items() if b == "adam"} == {
        "norm.weight",
        "norm.bias",
    }
    assert set(_build(named, regex_1d="").routing().values()) == {"learned"}  # Celo2Base's rule
    assert set(_build(named, {"regex_1d": ""}).routing().values()) == {"learned"}
    # A param group's celo2_branch wins over every rule.
    groups = [
        {"params": [(n, p) for n, p in named if n.startswith("conv")], "celo2_branch": "adam"},
        {"params": [(n, p) for n, p in named if not n.startswith("conv")]},
    ]
    got = _build(groups).routing()
    assert got["conv.weight"] == "adam" and got["fc.weight"] == "learned" and got["fc.bias"] == "adam"
    # route="rank": PyLO's rule; a callable sees the name (None without names) and the tensor.
    rank = _build(named, route="rank").routing()
    assert rank == {n: "adam" if p.dim() <= 1 else "learned" for n, p in named}
    seen = []

    def route(name, p):
        seen.append(name)
        return "adam" if name == "scale" else "learned"

    assert {n for n, b in _build(named, route=route).routing().items() if b == "adam"} == {"scale"}
    assert "fc.weight" in seen
    with pytest.raises(ValueError, match=r"route\('fc.weight', ...\) returned 'sgd'"):
        opt = _build(named, route=lambda n, p: "sgd" if n == "fc.weight" else "adam")
        _model_step(opt, model)
    with pytest.raises(ValueError, match="route must be 'regex' or 'rank' or a callable"):
        _build(named, route="names")
    with pytest.raises(ValueError, match="celo2_branch must be 'adam' or 'learned', got 'Adam'"):
        _build([{"params": [p for _, p in named], "celo2_branch": "Adam"}])
    for bad, why in [("(a+)+", "quantified group"), ("[", "not a valid regex"), ("x" * 600, "at most 512")]:
        with pytest.raises(ValueError, match=why):
            _build(named, regex_1d=bad)


def test_unnamed_params_take_the_rank_rule_with_one_warning():
    model = Model()
    with pytest.warns(UserWarning, match=r"8 parameter\(s\) were given without names.*rank rule") as rec:
        opt = _build(model.parameters())
    assert len(rec) == 1
    assert list(opt.routing().values()) == ["adam" if p.dim() <= 1 else "learned" for p in model.parameters()]
    with warnings.catch_warnings():  # explicit choices do not warn
        warnings.simplefilter("error")
        _build(model.parameters(), route="rank")
        _build(model.parameters(), regex_1d="")
        _build([{"params": list(model.parameters()), "celo2_branch": "learned"}])
        opt = _build(model.named_parameters())
        extra = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
            opt.add_param_group({"params": [extra]})  # torch: names everywhere or nowhere
        opt.add_param_group({"params": [("extra", extra)]})
    assert opt.routing()["extra"] == "learned"


def test_adam_branch_is_the_reference_formula():
    """``p - sm * mult_1d * m * rsqrt(v + eps)`` (eps inside the root), with and without bias correction."""
    for corr in (False, True):
        p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        opt = _build(
            [{"params": [p], "celo2_branch": "adam"}], {"adam_bias_correction": corr, "weight_decay": 0.1}
        )
        b1, b2, eps = 0.9, 0.95, 1e-8
        m = v = np.zeros(3)
        want = p.detach().double().numpy()
        sm = float(np.float32(0.005) * np.float32(20.0))
        for t in range(1, 4):
            g = np.array([0.3, -0.2, 0.1]) * t
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if corr else (m, v)
            want = want - sm * mh / np.sqrt(vh + eps) - 0.1 * want * sm
            np.testing.assert_allclose(p.detach().numpy(), want, rtol=2e-6)


# ----------------------------------------------------------------------------------------------------------
# Options: every constructor argument of the reference is implemented (it changes the update) or refused.
#: Option -> (changed value, other options the change needs to show). Options the defaults make inert are
#: tried where they act: param_scale_mult / aggregate_mag scale the step by a tensor-wide number, which the
#: output normalisation (and Newton-Schulz) removes; aggregate_mag needs exp_mult.
CHANGES: dict[str, tuple] = {
    "regex_1d": ("fc", {}),
    "step_mult": (0.002, {}),
    "weight_decay": (0.5, {}),
    "adam_b1": (0.5, {}),
    "adam_b2": (0.5, {}),
    "adam_epsilon": (1e-1, {}),
    "adam_bias_correction": (True, {}),
    "mult_1d": (3.0, {}),
    "exp_mult": (0.7, {"normalize_output": False}),
    "rmsmult": (2.0, {}),
    "param_scale_mult": (True, {"normalize_output": False, "orthogonalize": False}),
    "precondition_output": (True, {}),
    "normalize_input": (False, {}),
    "normalize_output": (False, {}),
    "aggregate_mag": (True, {"normalize_output": False, "orthogonalize": False, "exp_mult": 1.0}),
    "bias_correction": (True, {}),
    "mlp_activation": ("tanh", {}),
    "orthogonalize": (False, {}),
    "ns_coeffs": ([3.0, -3.2, 1.2], {}),
    "ns_iters": (2, {}),
    "ns_eps": (1.0, {}),
    "initial_momentum_decays": ([0.5, 0.6, 0.7], {}),
    "initial_rms_decays": ([0.5], {}),
    "initial_adafactor_decays": ([0.5, 0.6, 0.7], {}),
}
#: Options that change the theta's shapes: tried with a fresh theta.
SHAPE_OPTIONS = ("ff_hidden_size", "ff_hidden_layers", *specs.celo2.FEATURE_SWITCHES)


def _theta_for(config: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    table = specs.celo2.tensor_table(specs.celo2.validate(config))
    return {k: torch.randn(ts.shape, generator=gen) / math.sqrt(ts.shape[0]) for k, ts in table.items()}


def _updates(config: dict, theta=None, steps: int = 2) -> list[torch.Tensor]:
    model = Model()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data = 0.1 * torch.randn_like(p)
    opt = Celo2(model.named_parameters(), THETA if theta is None else theta, config, num_steps=9)
    before = [p.detach().clone() for p in model.parameters()]
    for t in range(steps):
        _model_step(opt, model, seed=t)
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


def test_every_reference_option_is_implemented_or_refused():
    assert set(CHANGES) | set(SHAPE_OPTIONS) == set(specs.celo2.DEFAULTS)
    for key, (value, ctx) in CHANGES.items():
        base = {**CONFIG, **ctx}
        a, b = _updates(base), _updates({**base, key: value})
        assert any(not torch.equal(x, y) for x, y in zip(a, b, strict=True)), key
    for key in SHAPE_OPTIONS:
        default = specs.celo2.DEFAULTS[key]
        changed = {**CONFIG, key: (not default) if isinstance(default, bool) else default + 1}
        ups = _updates(changed, _theta_for(changed))
        assert all(torch.isfinite(u).all() for u in ups) and any(u.abs().max() > 0 for u in ups), key


def test_options_the_reference_cannot_run_are_refused_naming_them():
    cases = [
        ({"mlp_activation": "gelu"}, "option mlp_activation must be one of relu, tanh, got 'gelu'"),
        ({"ns_coeffs": [1.0, 2.0]}, r"option ns_coeffs must be 3 finite numbers"),
        ({"ns_iters": -1}, r"option ns_iters must be an int in \[0, 1000\]"),
        ({"ff_hidden_layers": -1}, r"option ff_hidden_layers must be an int in \[0, 1024\]"),
        ({"regex_1d": 3}, "option regex_1d must be a regex string"),
        (
            {"initial_rms_decays": [0.9, 0.99]},
            r"option initial_rms_decays: m \* rsqrt\(rms\) \(3 vs 2 decays\)",
        ),
        (
            {"initial_adafactor_decays": [0.9, 0.99]},
            "option initial_adafactor_decays: the fac_mom_mult input",
        ),
        ({k: False for k in specs.celo2.FEATURE_SWITCHES}, "every MLP input group is switched off"),
        (
            {"bogus": 1},
            r"unknown constructor argument\(s\) bogus \(not an option of celo.optimizers.celo2.Celo2\)",
        ),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=rf"^Celo2: {pattern}"):
            Celo2([torch.zeros(2, requires_grad=True)], THETA, {**CONFIG, **bad}, num_steps=3, route="rank")
    # Only factored inputs: a learned tensor of rank < 2 has none (the reference fails there).
    only_fac = {
        **CONFIG,
        **{k: k in ("with_fac_rms", "with_fac_rsqrt") for k in specs.celo2.FEATURE_SWITCHES},
    }
    p = torch.zeros(3, requires_grad=True)
    opt = Celo2([{"params": [p], "celo2_branch": "learned"}], _theta_for(only_fac), only_fac, num_steps=3)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"rank 1\) takes the learned update, but the config enables only"):
        opt.step()


def test_lr_scales_step_mult_and_none_grads_are_untouched():
    pa, pb = make_params(SHAPES), make_params(SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        oa = _build([{"params": pa, "lr": 1.0}])
        ob = _build([{"params": pb, "lr": 0.25}], {"step_mult": CONFIG["step_mult"] * 4})
    for gs in grad_stream(SHAPES, 3):
        before = [p.detach().clone() for p in pa]
        with torch.no_grad():
            for a, b in zip(pa, pb, strict=True):
                b.copy_(a)
        for p, g in zip(pa + pb, gs + gs, strict=True):
            p.grad = g.clone()
        pa[2].grad = pb[2].grad = None
        oa.step()
        ob.step()
        assert torch.equal(pa[2], before[2]) and len(oa.state[pa[2]]) == 0
        assert update_error(before, pa, pb) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# Paths.
def _pinned(fx, params, ckpt, *, foreach):
    from lopt_bridge.pylo_runtime import load_optimizer

    routing = fx.meta["options"]["routing"]
    groups = [{"params": [p], "celo2_branch": routing[n]} for n, p in zip(fx.names, params, strict=True)]
    return load_optimizer(str(ckpt), groups, num_steps=int(fx.meta["num_steps"]), foreach=foreach)


@pytest.mark.slow
@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("path", CELO2_FIXTURES, ids=[p.name for p in CELO2_FIXTURES])
def test_both_paths_replay_every_celo2_fixture(path, foreach):
    """Each path pinned: within 1e-5 of celo's recorded updates, misses only where the float64 rule
    (parity_tests/compare.py) accepts them (h_tied of celo2_random and celo2_ablate)."""
    r = check_fixture(path, open_loop=False, factory=functools.partial(_pinned, foreach=foreach))
    assert r.passed, (r.max_error, r.worst, r.notes)
    over = {r.names[i] for i in range(len(r.names)) if r.errors[:, i].max() > FLOAT32_TOLERANCE}
    assert over <= {"h_tied"}, over
    assert all(s["accepted"] for s in r.x64_summary().values())


def test_paths_agree_bit_for_bit():
    """The foreach path stacks equally shaped tensors and runs the reference's function once per stack."""
    for extra in ({}, {"bias_correction": True, "adam_bias_correction": True, "precondition_output": True}):
        pa, pb = make_params(SHAPES + [(8, 8), (8, 8)]), make_params(SHAPES + [(8, 8), (8, 8)])
        oa = _build(pa, extra, foreach=False, route="rank")
        ob = _build(pb, extra, route="rank")
        for gs in grad_stream([tuple(p.shape) for p in pa], 4):
            for p, g in zip(pa + pb, gs + gs, strict=True):
                p.grad = g.clone()
            oa.step()
            ob.step()
        assert oa.last_path == "reference" and ob.last_path == "foreach"
        assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))


def test_fused_is_refused_at_construction():
    with pytest.raises(
        FusedUnavailableError, match="Celo2: fused=True is not available: Celo2 has no fused kernels"
    ):
        _build(make_params([(3, 4)]), route="rank", fused=True)


@pytest.mark.slow
def test_open_loop_drift_2000_steps():
    """2000 steps on the same gradient stream, no resets, foreach against the reference path: max relative
    parameter difference <= 1e-4 (here 0: the paths agree bit for bit), and the run moved."""
    shapes = [(), (7,), (4, 5), (2, 3, 3)]
    steps = 2000
    grads = grad_stream(shapes, steps)
    pa, pb = make_params(shapes, scale=0.1), make_params(shapes, scale=0.1)
    oa = _build(pa, foreach=False, route="rank")
    ob = _build(pb, route="rank")
    for t in range(steps):
        for p, g in zip(pa + pb, grads[t] + grads[t], strict=True):
            p.grad = g
        oa.step()
        ob.step()
    moved = max(
        float((a - a0).detach().abs().max()) for a, a0 in zip(pa, make_params(shapes, 0.1), strict=True)
    )
    assert moved > 1e-3
    drift = max(float(((a - b).abs().max() / a.abs().max()).detach()) for a, b in zip(pa, pb, strict=True))
    assert drift <= 1e-4, drift


# ----------------------------------------------------------------------------------------------------------
# State, dtypes, odd inputs.
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_resume_is_bit_exact(foreach):
    def run(opt, model, start, n):
        for t in range(start, start + n):
            _model_step(opt, model, seed=t)
        return [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    a = Model()
    b = copy.deepcopy(a)
    full = run(_build(a.named_parameters(), foreach=foreach), a, 0, 6)
    ob = _build(b.named_parameters(), foreach=foreach)
    run(ob, b, 0, 3)
    saved = copy.deepcopy(ob.state_dict())
    c = copy.deepcopy(b)
    oc = _build(c.named_parameters(), foreach=foreach)
    oc.load_state_dict(saved)
    assert int(oc.state["global"]["iteration"]) == 3
    resumed = run(oc, c, 3, 3)
    assert all(torch.equal(x, y) for x, y in zip(full, resumed, strict=True))
    # The branch of each tensor travels with its state (even if the routing rules would now say otherwise).
    d = copy.deepcopy(b)
    od = _build(d.named_parameters(), regex_1d="", foreach=foreach)
    od.load_state_dict(saved)
    assert od.routing() == ob.routing() and "adam" in od.routing().values()


@pytest.mark.filterwarnings(UNNAMED)
def test_bfloat16_params_keep_float32_state_and_round_once():
    pb = make_params(SHAPES, scale=0.1, dtype=torch.bfloat16)
    pf = [p.detach().float().requires_grad_() for p in pb]
    ob, of = _build(pb), _build(pf)
    for opt, ps in ((ob, pb), (of, pf)):
        for p in ps:
            g = 0.25 * torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape).sin()
            p.grad = g.to(torch.bfloat16).to(p.dtype)
        opt.step()
    for x, y in zip(pb, pf, strict=True):
        assert x.dtype == torch.bfloat16 and torch.equal(x, y.to(torch.bfloat16))
        assert all(v.dtype == torch.float32 for v in ob.state[x].values())


@pytest.mark.filterwarnings(UNNAMED, "ignore:.*skipped a step:RuntimeWarning")
def test_nonfinite_gradient_skips_the_step_and_raise_names_the_parameter():
    model = Model()
    opt = _build(model.named_parameters())
    _model_step(opt, model)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    model.zero_grad()
    model(torch.randint(0, 11, (4,)), torch.randn(1, 2, 5, 5)).backward()
    model.fc.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state_dict()
    # Only the skip counter moves (it lives in the optimizer-wide entry, saved with the first parameter).
    assert after["state"][0]["global"]["skipped_steps"] == 1
    after["state"][0]["global"]["skipped_steps"] = 0
    for pid, st in state["state"].items():
        for k, v in st.items():
            assert (
                torch.equal(v, after["state"][pid][k])
                if isinstance(v, torch.Tensor)
                else v == after["state"][pid][k]
            ), (pid, k)
    strict = _build(model.named_parameters(), nonfinite="raise")
    with pytest.raises(NonFiniteError, match="'fc.weight'"):
        strict.step()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_empty_tensors_are_ignored(shape):
    empty = torch.nn.Parameter(torch.zeros(shape))
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = _build([("p", p), ("empty.bias", empty)])
    q = p.detach().clone().requires_grad_()
    ref = _build([("p", q)])
    for _ in range(3):
        p.grad, q.grad, empty.grad = torch.ones(3, 4), torch.ones(3, 4), torch.zeros(shape)
        opt.step()
        ref.step()
    assert torch.equal(p, q) and len(opt.state[empty]) == 0
