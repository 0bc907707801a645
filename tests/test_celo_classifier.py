"""Published Celo / Celo-Adam weights train a real model in PyTorch exactly as in JAX (closed loop).

The JAX curves (parity_tests/closed_loop/celo_digits.json) were recorded by
``python -m parity_tests.recorders.celo classifier``: the same model, initialisation and batches, each side
computing its own gradients. Tolerance: 1e-4 relative on the training loss at each of the first 100 steps
(float32; issue 6). Per-step differences are ~1e-7 (operation order in matmuls, convolutions and
log-softmax) and grow slowly along the closed-loop trajectory, so 1e-4 leaves room without hiding a bug: a
wrong feature or scheduler input changes the loss curve by far more within a few steps.

Exception, measured: Celo-Adam on the CNN is chaotic in float32. Perturbing one weight tensor of the
initialisation by one ulp (PyTorch against PyTorch, no JAX) changes its loss by 3e-6 relative at step 30,
1.4e-4 at step 40 and 0.26 by step 100 (Adam's normalisation turns ulp-level gradient differences into
full-size steps), and the JAX-vs-PyTorch curves separate the same way (3e-5 at step 30, 0.24 by step 100).
No float32 implementation can follow the reference past that point, so that curve is compared for its first
30 steps (at 1e-4), and ``test_celo_adam_cnn_is_chaotic`` keeps the measurement that justifies it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from converter.convert import convert_source
from parity_tests.digits import load_digits_split, train_torch
from parity_tests.fixture import repo_root
from pylo_runtime import load_optimizer

FIXTURE = repo_root() / "parity_tests" / "closed_loop" / "celo_digits.json"
SHARED = repo_root().parent / "shared" / "checkpoints"
DOC = json.loads(FIXTURE.read_text())
RELATIVE_TOLERANCE = 1e-4
#: Steps compared per curve: 100, except where float32 chaos of the reference itself ends the comparison.
HORIZON = {"celo_adam/cnn": 30}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for arch in ("celo", "celo_adam"):
        src = SHARED / arch / "theta.state"
        if not src.is_file():
            pytest.skip(f"{src} absent (published weights are read from ../shared/checkpoints)")
        out[arch] = str(convert_source(str(src), tmp_path_factory.mktemp(arch) / f"{arch}.safetensors"))
    return out


def test_fixture_has_provenance():
    ref = DOC["provenance"]["reference"]
    assert ref["repo"] == "amoudgl/celo" and ref["commit"].startswith("66d97611")
    assert DOC["provenance"]["packages"]["jax"]
    assert set(DOC["curves"]) == {"celo/mlp", "celo/cnn", "celo_adam/mlp", "celo_adam/cnn"}
    for curve in DOC["curves"].values():
        assert len(curve) == DOC["steps"] >= 100
        assert curve[-1] < 0.25 * curve[0]  # the published weights really train the model


@pytest.mark.parametrize("key", sorted(DOC["curves"]))
def test_torch_losses_match_jax(key, converted):
    arch, model = key.split("/")
    data = load_digits_split(DOC["seed"])
    run = train_torch(
        model,
        lambda ps, n: load_optimizer(converted[arch], ps, num_steps=DOC["num_steps"]),
        data,
        steps=DOC["steps"],
        batch_size=DOC["batch_size"],
        seed=DOC["seed"],
    )
    n = HORIZON.get(key, 100)
    ref = np.asarray(DOC["curves"][key][:n], dtype=np.float64)
    rel = np.abs(run["losses"][:n].astype(np.float64) - ref) / np.abs(ref)
    worst = f"max relative difference {rel.max():.3g} at step {rel.argmax()}"
    assert rel.max() <= RELATIVE_TOLERANCE, f"{key}: {worst}"


def test_celo_adam_cnn_is_chaotic(converted, monkeypatch):
    """Why ``HORIZON`` stops that curve at 30: a one-ulp change of the init diverges in PyTorch alone.

    (Told ``num_steps=100`` like the fixture, run for 50 steps to keep the test fast.)
    """
    import parity_tests.digits as digits

    data = load_digits_split(DOC["seed"])
    kw = dict(steps=50, batch_size=DOC["batch_size"], seed=DOC["seed"])

    def make(ps, n):
        return load_optimizer(converted["celo_adam"], ps, num_steps=DOC["num_steps"])

    base = train_torch("cnn", make, data, **kw)["losses"].astype(np.float64)
    init = digits.init_cnn

    def nudged(seed):
        p = init(seed)
        p["fc"] = (p["fc"] * np.float32(1 + 2**-22)).astype(np.float32)  # one or two ulp per element
        return p

    monkeypatch.setitem(digits.MODELS, "cnn", (digits.cnn_forward, nudged))
    other = train_torch("cnn", make, data, **kw)["losses"].astype(np.float64)
    rel = np.abs(other - base) / base
    assert rel[:30].max() < 1e-5  # below the compared horizon the trajectory is still reproducible
    # Within 50 steps float32 rounding alone moves the loss past the 1e-4 tolerance (0.26 by step 100).
    assert rel.max() > RELATIVE_TOLERANCE


def test_example_writes_into_a_git_ignored_folder_by_default():
    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    assert train_classifier.DEFAULT_OUT.is_relative_to(repo_root() / "examples" / "out")
    assert "/examples/out/" in (repo_root() / ".gitignore").read_text().splitlines()


def test_example_runs_and_writes_its_outputs(tmp_path, converted):
    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    args = ["--out", str(tmp_path), "--steps", "15", "--models", "mlp"]
    train_classifier.main([*args, "--celo", converted["celo"], "--celo-adam", converted["celo_adam"]])
    for name in ("results.csv", "results.md", "lr_sweep.csv", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and {r.split(",")[1].split(" ")[0] for r in rows[1:]} == {
        "celo",
        "celo_adam",
        "adamw",
        "celo_random_weights",
    }
