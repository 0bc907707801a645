"""Parity metrics and the replay/report machinery, on synthetic arrays and a hand-made SGD fixture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_bridge.parity_tests.compare import CaseResult, drift, ulp, update_error
from lopt_bridge.parity_tests.fixture import load_fixture, write_fixture
from lopt_bridge.parity_tests.replay import check_fixture
from lopt_bridge.parity_tests.report import format_table, write_report
from lopt_bridge.parity_tests.tasks import Task


def test_ulp_matches_numpy_spacing_for_float32():
    x = np.array([1.0, 1.5, 2.0, -3.0, 1e-3, 0.0, 1e-40, 6.5e4], dtype=np.float32)
    np.testing.assert_array_equal(ulp(x, "float32"), np.spacing(np.abs(x)).astype(np.float64))
    assert ulp(np.float32(1.0), "bfloat16") == 2.0**-7
    assert ulp(np.float32(1.0), "float16") == 2.0**-10


def test_exact_and_one_ulp_pass_two_ulp_fail():
    before = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    u = np.array([1e-6, -3e-6, 2e-6], dtype=np.float32)
    after_ref = before + u
    assert update_error(before, after_ref, before, after_ref) == 0.0
    one_ulp = np.nextafter(after_ref, np.float32(np.inf))
    assert update_error(before, one_ulp, before, after_ref) == 0.0
    two_ulp = np.nextafter(one_ulp, np.float32(np.inf))
    err = update_error(before, two_ulp, before, after_ref)
    # Excess is one ulp of the largest entry (|-2| -> 2**-22) over |u_ref|_inf ~ 3e-6.
    assert err > 0.0
    assert err == pytest.approx(2.0**-22 / np.abs((after_ref - before).astype(np.float64)).max(), rel=1e-6)


def test_known_relative_error_is_measured():
    before = np.zeros(4, dtype=np.float32)
    after_ref = np.array([1.0, 2.0, -4.0, 0.5], dtype=np.float32)
    after_ours = after_ref.copy()
    after_ours[2] = -4.0 * (1 + 1e-3)
    err = update_error(before, after_ours, before, after_ref)
    # |diff| = 4e-3 minus one ulp at 4.004 (2**-21), over |u_ref|_inf = 4.
    assert err == pytest.approx(
        (np.float32(-4.004) - np.float64(-4.0)).__abs__() / 4 - 2.0**-21 / 4, rel=1e-5
    )
    assert err > 1e-5


def test_zero_reference_update_and_nonfinite():
    z = np.zeros(3, dtype=np.float32)
    assert update_error(z, z, z, z) == 0.0
    assert update_error(z, np.array([0, 1, 0], np.float32), z, z) == math.inf
    assert update_error(z, np.array([np.nan, 0, 0], np.float32), z, np.ones(3, np.float32)) == math.inf


def test_drift_relative_to_distance_travelled():
    p0 = np.zeros(2)
    assert drift(np.array([1.0, 1.001]), np.array([1.0, 1.0]), p0) == pytest.approx(1e-3)
    assert drift(p0, p0, p0) == 0.0


def test_case_result_pass_fail_and_worst():
    errs = np.array([[0.0, 1e-7], [2e-6, 0.0]])
    r = CaseResult("c", "fam", "arch", ["x", "y"], errs)
    assert r.passed and r.worst == (1, "x") and r.max_error == 2e-6
    bad = CaseResult("c", "fam", "arch", ["x", "y"], errs + np.array([[0, 0], [0, 2e-5]]))
    assert not bad.passed and bad.worst == (1, "y")
    nan = CaseResult("c", "fam", "arch", ["x"], np.array([[np.nan]]))
    assert not nan.passed


# ---------------------------------------------------------------------------------------------------------
# A hand-made fixture whose "reference" is float32 SGD, replayed through the real replay code.
LR = np.float32(0.05)


class _SGD:
    """Stand-in optimizer with the runtime's step(loss=...) signature."""

    def __init__(self, params, lr):
        self.params, self.lr = params, lr

    @torch.no_grad()
    def step(self, loss=None):
        for p in self.params:
            p.add_(p.grad.to(torch.float32) * -self.lr)


def _sgd_fixture(tmp_path: Path, shapes: str = "default", steps: int = 6) -> Path:
    task = Task(shapes, seed=0)
    p = task.init_params()
    arrays: dict[str, list] = {}
    losses = []
    hist = {n: [p[n]] for n in task.names}
    grads = {n: [] for n in task.names}
    for t in range(steps):
        loss, g = task.loss_and_grads(p, t)
        losses.append(loss)
        p = {n: (p[n] + g[n] * -LR).astype(np.float32) for n in task.names}
        for n in task.names:
            hist[n].append(p[n])
            grads[n].append(g[n])
    arrays = {"loss": np.asarray(losses, np.float32)}
    for n in task.names:
        arrays[f"params.{n}"] = np.stack(hist[n])
        arrays[f"grads.{n}"] = np.stack(grads[n])
    meta = {
        "case": "sgd", "family": "test", "architecture": "sgd", "seed": 0, "steps": steps, "num_steps": 10,
        "shapes": shapes, "shape_dict": {n: list(task.shapes[n]) for n in task.names}, "source": "none",
    }  # fmt: skip
    return write_fixture(tmp_path / "sgd", meta, arrays)


def _check(path, lr, **kw):
    return check_fixture(path, factory=lambda fx, params, ckpt: _SGD(params, lr), convert=None, **kw)


def test_replay_exact_optimizer_passes(tmp_path):
    fx = _sgd_fixture(tmp_path)
    assert load_fixture(fx).steps == 6
    r = _check(fx, float(LR))
    assert r.passed, r.max_error
    assert r.max_error == 0.0  # same float32 operation: bit equal
    assert r.max_drift == 0.0


def test_replay_detects_a_wrong_optimizer(tmp_path):
    r = _check(_sgd_fixture(tmp_path), float(LR) * (1 + 1e-4))
    assert not r.passed
    assert 5e-5 < r.max_error < 2e-4
    assert r.max_drift > 0.0


def test_replay_bfloat16_reports_with_its_tolerance(tmp_path):
    r = _check(_sgd_fixture(tmp_path), float(LR), dtype="bfloat16", open_loop=False)
    assert r.tolerance == 1e-2 and r.dtype == "bfloat16"
    assert r.max_error < 1e-2


def test_report_files_and_table(tmp_path):
    good = CaseResult("good", "f", "a", ["x"], np.array([[1e-7], [0.0]]), drifts=np.array([[0.0], [1e-6]]))
    bad = CaseResult("bad", "f", "a", ["x"], np.array([[1e-3], [0.0]]))
    table = format_table([good, bad])
    assert "PASS" in table and "FAIL" in table and "1.00e-03" in table
    out = write_report([good, bad], tmp_path / "rep")
    data = json.loads((out / "report.json").read_text())
    assert data["passed"] is False
    assert [c["passed"] for c in data["cases"]] == [True, False]
    md = (out / "report.md").read_text()
    assert "| good |" in md and "FAIL" in md
    assert (out / "errors.png").stat().st_size > 1000
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.md", "report.json", "errors.png"):  # readable like any file the user writes
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


class _NumpySGDReference:
    """A reference stand-in honouring the recorder contract (parity_tests/recorders/__init__.py)."""

    architecture = "sgd"
    source = "weights.bin"
    source_format = "theta_state"
    convert_sets: dict = {}
    provenance = {"repo": "test", "commit": "none"}

    def init(self, params, num_steps):
        return dict(params)

    def update(self, state, grads, loss):
        return {n: (state[n] + grads[n] * -LR).astype(np.float32) for n in state}

    def params(self, state):
        return state


def test_record_case_with_sampled_large_tensor(tmp_path, monkeypatch):
    import types

    from lopt_bridge.parity_tests.record import record_case

    mod = types.ModuleType("lopt_bridge.parity_tests.recorders.sgdtest")
    mod.CASES = {"sgd_large": {"lr": float(LR)}}

    def make_reference(options, ckpt_dir, seed):
        (ckpt_dir / "weights.bin").write_bytes(b"\0" * 16)
        return _NumpySGDReference()

    mod.make_reference = make_reference
    monkeypatch.setitem(__import__("sys").modules, "lopt_bridge.parity_tests.recorders.sgdtest", mod)
    out = record_case("sgdtest", "sgd_large", tmp_path / "fx", steps=5, num_steps=10, shapes="large")
    fx = load_fixture(out)
    assert fx.steps == 5 and "z_large" in fx.sample_index and "z_large" not in fx.params
    assert fx.meta["source"] == "checkpoint/weights.bin" and (out / "checkpoint" / "weights.bin").is_file()
    assert fx.meta["provenance"]["reference"] == {"repo": "test", "commit": "none"}
    assert fx.loss[-1] < fx.loss[0]
    assert (out / "trajectory.npz").stat().st_size < 2_000_000
    r = _check(out, float(LR))
    assert r.passed and r.max_error == 0.0 and r.max_drift == 0.0
    assert not _check(out, float(LR) * 1.001, open_loop=False).passed
    with pytest.raises(FileExistsError):
        record_case("sgdtest", "sgd_large", out, steps=5)


def test_report_without_matplotlib_skips_the_plot_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    good = CaseResult("good", "f", "a", ["x"], np.array([[1e-7]]))
    out = write_report([good], tmp_path / "rep")
    assert not (out / "errors.png").exists()
    assert "matplotlib is not installed" in (out / "report.md").read_text()


def test_plot_has_one_panel_per_architecture_and_draws_zero_errors_at_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lopt_bridge.parity_tests.report import plot_figure

    exact = CaseResult("exact", "velo", "velo", ["x"], np.array([[0.0], [2e-7], [0.0]]))
    broken = CaseResult("broken", "velo", "velo", ["x"], np.array([[1e-7], [np.inf], [3e-5]]))
    other = CaseResult("other", "adafac", "small_fc_lopt", ["x"], np.array([[1e-6], [1e-6]]))
    skipped = CaseResult("real", "celo", "celo", ["-"], np.zeros((0, 0)), skipped="weights absent")
    fig = plot_figure([exact, broken, other, skipped])
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title().split()[0] for ax in panels] == ["small_fc_lopt", "velo"]
        velo = panels[1]
        assert velo.get_yscale() == "symlog" and velo.get_ylim()[0] < 0.0 <= velo.get_ylim()[1]
        lines = {ln.get_label(): ln for ln in velo.get_lines()}
        assert list(lines["exact"].get_ydata()) == [0.0, 2e-7, 0.0]  # zeros are zeros, not a floor
        assert lines["broken: not finite"].get_xdata().tolist() == [1]  # marked, not drawn as a value
        assert {"exact", "broken", "tolerance 1e-05"} <= {t.get_text() for t in velo.get_legend().get_texts()}
        assert velo.get_ylim()[1] > 3e-5  # the tolerance line and the worst error are inside the frame
    finally:
        plt.close(fig)
