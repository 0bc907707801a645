"""MuLO: parity with muLO's own code (pickled theta, per-tensor muP scales), muP scale options, clip_grad.

The fixtures parity_tests/fixtures/mulo_*/ were recorded with bentherien/mu_learned_optimization
@e160d548 (see each meta.json): theta saved with pickle.dump as muLO's helpers.save_checkpoint does.
They are read here with converter.jax_pickle (no jax) and replayed with the recorded muP scales as
``mup_scale`` param-group options.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_adafac_runtime import SHAPES, make_theta

from lopt_bridge.converter import jax_pickle
from lopt_bridge.converter.architectures.mulo import MULO
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture
from lopt_bridge.parity_tests.replay import replay
from lopt_bridge.pylo_runtime.mulo import MuLO, clip_by_global_norm, mup_param_groups, mup_scale

FIXTURES = sorted((Path(__file__).parents[1] / "parity_tests" / "fixtures").glob("mulo_*/meta.json"))


def _theta_from_fixture(fx) -> tuple[dict[str, torch.Tensor], dict]:
    tree = jax_pickle.loads(fx.source_path().read_bytes())
    spec = MULO.build(tree, dict(fx.meta["convert_sets"]), source=str(fx.source_path()))
    return {k: torch.from_numpy(v.copy()) for k, v in spec.tensors.items()}, spec.config


@pytest.mark.parametrize("meta", FIXTURES, ids=[m.parent.name for m in FIXTURES])
def test_mulo_fixture_parity(meta):
    # Acceptance (issue 4): max relative update error <= 1e-5 per step and tensor, params reset to the
    # recorded ones each step, one ulp of the result allowed (parity_tests/compare.py).
    fx = load_fixture(meta.parent)
    theta, config = _theta_from_fixture(fx)
    scales = fx.meta["options"]["param_group_options"]
    assert len({o["mup_scale"] for o in scales.values()}) > 2, "the case must use nontrivial muP scales"

    def factory(fx, params, ckpt):
        groups = [{"params": [p], **scales[n]} for n, p in zip(fx.names, params, strict=True)]
        return MuLO(groups, theta, config, num_steps=int(fx.meta["num_steps"]))

    errors, _ = replay(fx, None, mode="reset", factory=factory)
    assert errors.shape == (fx.steps, len(fx.names))
    assert errors.max() <= FLOAT32_TOLERANCE, errors.max()


def test_mulo_fixtures_present_with_provenance():
    assert {m.parent.name for m in FIXTURES} >= {"mulo_pylo", "mulo_clip"}
    for meta in FIXTURES:
        fx = load_fixture(meta.parent)
        ref = fx.meta["provenance"]["reference"]
        assert ref["repo"] == "bentherien/mu_learned_optimization" and ref["commit"].startswith("e160d548")
        assert fx.meta["source_format"] == "pickle" and fx.source_path().suffix == ".pickle"
        if fx.meta["options"]["config"].get("clip_grad"):
            # The clip must act: the recorded gradients' global norm exceeds 1 on some steps.
            norms = [
                sum(float((fx.grads[n][t].astype("float64") ** 2).sum()) for n in fx.grads) ** 0.5
                for t in range(fx.steps)
            ]
            assert max(norms) > 1.0, max(norms)


def _zero_params():
    return [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]


def _grads(scale: float = 0.1):
    gen = torch.Generator().manual_seed(3)
    return [scale * torch.randn(s, generator=gen) for s in SHAPES]


CONFIG = {"hidden_size": 32, "step_mult": 0.01}


def _step(groups_fn, config=CONFIG, grads=None, **options):
    theta = make_theta(config)
    params = _zero_params()
    opt = MuLO(groups_fn(params), theta, config, num_steps=100, **options)
    for p, g in zip(params, grads or _grads(), strict=True):
        p.grad = g.clone()
    opt.step()
    return [p.detach().clone() for p in params]


def test_mup_scale_option_scales_each_tensor():
    # From zero params the new value is exactly -scale * step, so a power-of-two scale is exact.
    base = _step(lambda ps: ps)
    scaled = _step(lambda ps: [{"params": ps[:3], "mup_scale": 0.25}, {"params": ps[3:]}])
    for i, (a, b) in enumerate(zip(base, scaled, strict=True)):
        assert a.abs().max() > 0
        assert torch.equal(b, 0.25 * a if i < 3 else a)


def test_clip_grad_is_optax_clip_by_global_norm():
    big = _grads(3.0)
    norm = torch.sqrt(sum(torch.sum(g * g) for g in big))
    assert norm > 1.0
    clipped = _step(lambda ps: ps, {**CONFIG, "clip_grad": True}, big)
    manual = _step(lambda ps: ps, CONFIG, [(g / norm) * 1.0 for g in big])
    unclipped = _step(lambda ps: ps, CONFIG, big)
    assert all(torch.equal(a, b) for a, b in zip(clipped, manual, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(clipped, unclipped, strict=True))
    small = [g / (2 * norm) for g in big]  # global norm 0.5 < 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(clip_by_global_norm(small, 1.0), small, strict=True))


def test_nan_and_inf_gradients_are_replaced_like_jnp_nan_to_num():
    grads = _grads()
    bad = [g.clone() for g in grads]
    bad[2][0, 0], bad[2][1, 1], bad[3].view(-1)[5] = math.nan, math.inf, -math.inf
    # The reference's behaviour is nonfinite="propagate" (the default "skip" leaves such a step out:
    # tests/test_nonfinite.py).
    got = _step(lambda ps: ps, CONFIG, bad, nonfinite="propagate")
    want = _step(lambda ps: ps, CONFIG, [torch.nan_to_num(g) for g in bad], nonfinite="propagate")
    # Same as nan_to_num first, bit for bit. NaN -> 0 keeps the step finite; +-inf -> +-float32 max
    # overflows g**2, so those tensors' steps are NaN (as the reference's float32 math gives).
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert bool(torch.isfinite(a).all()) == (i not in (2, 3))
    only_nan = [torch.where(torch.isinf(g), 0.0, g) for g in bad]
    got = _step(lambda ps: ps, CONFIG, only_nan, nonfinite="propagate")
    assert all(torch.isfinite(a).all() for a in got)


class _InfShape:
    """What ``mup.set_base_shapes`` attaches as ``p.infshape`` (only ninf / width_mult are read)."""

    def __init__(self, ninf: int, width_mult: float) -> None:
        self._ninf, self._wm = ninf, width_mult

    def ninf(self) -> int:
        return self._ninf

    def width_mult(self) -> float:
        return self._wm


def test_mup_param_groups_from_infshape():
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(64, 32), (64, 64), (64,), (128, 64)]]
    for p, (ninf, wm) in zip(ps, [(2, 4.0), (2, 4.0), (1, 4.0), (2, 8.0)], strict=True):
        p.infshape = _InfShape(ninf, wm)
    groups = mup_param_groups(ps, weight_decay=0.0)
    by_scale = {g["mup_scale"]: g["params"] for g in groups}
    assert set(by_scale) == {0.25, 1.0, 0.125}
    assert by_scale[0.25] == ps[:2] and by_scale[1.0] == [ps[2]] and by_scale[0.125] == [ps[3]]
    assert all(g["weight_decay"] == 0.0 for g in groups)
    opt = MuLO(groups, make_theta(CONFIG), CONFIG, num_steps=10)
    assert sorted(g["mup_scale"] for g in opt.param_groups) == [0.125, 0.25, 1.0]
    three = SimpleNamespace(shape=(2, 2, 2), infshape=_InfShape(3, 2.0))
    with pytest.raises(ValueError, match="infinite dims"):
        mup_scale(three)


def test_mup_param_groups_without_base_shapes_says_what_to_do():
    ps = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises((ImportError, ValueError), match="set_base_shapes"):
        mup_param_groups(ps)


def test_mup_param_groups_with_the_mup_package():
    mup = pytest.importorskip("mup", reason="the optional 'mup' package is not installed")

    def net(width):
        return torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, width), mup.MuReadout(width, 4)
        )

    model = net(64)
    mup.set_base_shapes(model, net(16))
    scales = {id(p): g["mup_scale"] for g in mup_param_groups(model) for p in g["params"]}
    assert scales[id(model[2].weight)] == 0.25  # hidden (64, 64): two infinite dims, width_mult 64 / 16
    assert scales[id(model[0].weight)] == 1.0 and scales[id(model[3].weight)] == 1.0  # one infinite dim
