"""The synthetic parity task: one definition, the same value and gradients in numpy, torch and jax."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from lopt_bridge.parity_tests.tasks import LARGE, SHAPES, Task, loss_scale, shapes

HAS_JAX = importlib.util.find_spec("jax") is not None


def test_shape_sets_sorted_and_complete():
    assert list(SHAPES) == sorted(SHAPES)
    assert shapes("large") == {**SHAPES, **LARGE}
    assert {len(s) for s in SHAPES.values()} == {0, 1, 2, 4}
    with pytest.raises(ValueError, match="unknown shape set"):
        shapes("nope")


def test_init_is_deterministic_and_independent_of_set():
    a, b = Task("default", seed=3).init_params(), Task("large", seed=3).init_params()
    for name in SHAPES:
        assert a[name].dtype == np.float32 and a[name].shape == SHAPES[name]
        np.testing.assert_array_equal(a[name], b[name])
    c = Task("default", seed=4).init_params()
    assert not np.array_equal(a["f_mat"], c["f_mat"])


def test_numpy_matches_torch_autograd():
    task = Task("large", seed=0)
    params = task.init_params()
    for step in (0, 7):
        loss_np, grads_np = task.loss_and_grads(params, step)
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        loss_t = task.loss_torch(tp, step)
        loss_t.backward()
        # float32 evaluations with different operation order: a few ulp apart.
        assert loss_np == pytest.approx(loss_t.item(), rel=1e-6)
        for k in params:
            scale = np.abs(grads_np[k]).max()
            np.testing.assert_allclose(grads_np[k], tp[k].grad.numpy(), rtol=0, atol=1e-6 * scale, err_msg=k)


def test_loss_falls_without_moving_params_and_is_nonconvex():
    task = Task("default", seed=0)
    params = task.init_params()
    l0, _ = task.loss_and_grads(params, 0)
    l49, _ = task.loss_and_grads(params, 49)
    assert l49 < 0.35 * l0  # s_49 = 1 / 3.45
    assert loss_scale(49) == pytest.approx(1 / 3.45)
    # Negative curvature somewhere along a coordinate: f'' = 2w + 1.8 cos(6x) < 0 for some x.
    w = task.weights["b_vec"]
    assert np.any(2 * w - 2 * 0.1 * 9 < 0)


def test_quadratic_grad_is_bit_reproducible():
    task = Task("large", seed=1)
    params = task.init_params()
    _, grads = task.loss_and_grads(params, 5)
    np.testing.assert_array_equal(grads["z_large"], task.grad_quadratic("z_large", params["z_large"], 5))


@pytest.mark.skipif(not HAS_JAX, reason="jax not installed (CI has no jax; the reference venv does)")
def test_numpy_matches_jax_grad():
    import jax

    task = Task("default", seed=0)
    params = task.init_params()
    loss_j, grads_j = jax.value_and_grad(task.loss_jax)({k: v for k, v in params.items()}, 3)
    loss_np, grads_np = task.loss_and_grads(params, 3)
    assert loss_np == pytest.approx(float(loss_j), rel=1e-6)
    for k in params:
        scale = np.abs(grads_np[k]).max()
        np.testing.assert_allclose(grads_np[k], np.asarray(grads_j[k]), rtol=0, atol=1e-6 * scale, err_msg=k)


def test_small_init_is_tiny_and_keeps_targets():
    unit, small = Task("default", seed=2), Task("default", seed=2, init="small")
    ps = small.init_params()
    assert max(float(np.abs(p).max()) for p in ps.values()) < 1e-2
    for name in SHAPES:
        np.testing.assert_array_equal(unit.targets[name], small.targets[name])
    l0, _ = small.loss_and_grads(ps, 0)
    assert l0 > 0.05  # the targets are still far away: plenty of loss to fall
    with pytest.raises(ValueError, match="unknown init"):
        Task(init="big")
