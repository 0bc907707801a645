"""Published Celo / Celo-Adam weights train a real model in PyTorch exactly as in JAX (closed loop).

The JAX curves (parity_tests/closed_loop/celo_digits.json) were recorded by
``python -m lopt_bridge.parity_tests.recorders.celo classifier``: the same model, initialisation and batches,
each side computing its own gradients. Tolerance: 1e-4 relative on the training loss at each of the first
100 steps (float32; issue 6). Per-step differences are ~1e-7 (operation order in matmuls, convolutions and
log-softmax) and grow slowly along the closed-loop trajectory, so 1e-4 leaves room without hiding a bug: a
wrong feature or scheduler input changes the loss curve by far more within a few steps.

Exception, measured: Celo-Adam on the CNN is chaotic in float32. Moving every element of one initial weight
tensor by one ulp (PyTorch against PyTorch, no JAX; +-1 ulp of c1, c2 or fc) changes its loss by at most
1.9e-5 relative up to step 29; then 23 of 24 such runs (6 nudges x 4 CPU kernel settings, below) leave the
1e-4 tolerance between steps 33 and 39, pass 1e-3 by step 52 and peak at 0.18-0.26 within 100 steps:
Adam's normalisation turns ulp-level gradient differences into full-size steps. The JAX-vs-PyTorch curve
behaves the same way (3.0e-5 up to step 29, past 1e-4 at step 33, peak 0.24). No float32 implementation can
follow the reference past that point, so that curve is compared for its first 30 steps (at 1e-4), and
``test_celo_adam_cnn_is_chaotic`` keeps the measurement that justifies it.

Machine dependence, measured on one AVX-512 Xeon by switching kernels: how far one particular nudge has moved
the loss by step 29 depends on thread count and SIMD width (they change the summation order in the
convolutions, matmuls and reductions). The fc x (1 + 2**-22) nudge an earlier version of this test used gives
1.37e-5 with AVX-512 kernels on 2 threads but 3.4e-7, and no departure from the tolerance within 100 steps,
with 1 thread, ATEN_CPU_CAPABILITY=avx2 or MKL_CBWR=AVX2. So the test checks an ensemble of nudges, and only
what the horizon needs: every nudge stays inside the tolerance up to the horizon, and most leave it soon
after. The horizon assumes torch's oneDNN convolutions (on by default in the x86 wheels): with
``torch.backends.mkldnn.enabled = False`` the trajectory departs earlier (JAX-vs-PyTorch 2.1e-3 by step 29,
past 1e-4 at step 23; c1 nudges past 1e-4 at step 22), and both the celo_adam/cnn comparison and the chaos
test fail there. ``bench/celo_adam_chaos.py`` reproduces these numbers.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lopt_bridge.converter.convert import convert_source
from lopt_bridge.parity_tests.digits import load_digits_split, train_torch
from lopt_bridge.parity_tests.fixture import repo_root
from lopt_bridge.pylo_runtime import load_optimizer

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


@pytest.mark.slow
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


#: One-ulp nudges of the CNN's initial weights for the chaos test: (tensor, direction of np.nextafter).
ULP_NUDGES = [(name, sign) for name in ("c1", "c2", "fc") for sign in (1.0, -1.0)]


@pytest.mark.slow
def test_celo_adam_cnn_is_chaotic(converted, monkeypatch):
    """Why ``HORIZON`` stops celo_adam/cnn at 30: one-ulp changes of the init (PyTorch alone) stay inside the
    tolerance up to step 30 but most leave it within 50 steps (told ``num_steps=100`` like the fixture)."""
    import lopt_bridge.parity_tests.digits as digits

    data = load_digits_split(DOC["seed"])
    kw = dict(steps=50, batch_size=DOC["batch_size"], seed=DOC["seed"])
    horizon = HORIZON["celo_adam/cnn"]

    def make(ps, n):
        return load_optimizer(converted["celo_adam"], ps, num_steps=DOC["num_steps"])

    base = train_torch("cnn", make, data, **kw)["losses"].astype(np.float64)
    init = digits.init_cnn
    inside, left = {}, {}
    for name, sign in ULP_NUDGES:

        def nudged(seed, name=name, sign=sign):
            p = init(seed)
            p[name] = np.nextafter(p[name], np.float32(sign * np.inf)).astype(np.float32)  # one ulp each
            return p

        monkeypatch.setitem(digits.MODELS, "cnn", (digits.cnn_forward, nudged))
        rel = np.abs(train_torch("cnn", make, data, **kw)["losses"].astype(np.float64) - base) / base
        key = f"{name} {'+' if sign > 0 else '-'}1 ulp"
        inside[key] = float(rel[:horizon].max())
        beyond = np.nonzero(rel > RELATIVE_TOLERANCE)[0]
        left[key] = int(beyond[0]) if beyond.size else None
    # Up to the horizon float32 rounding alone stays inside the tolerance (measured: at most 1.9e-5) ...
    assert max(inside.values()) < RELATIVE_TOLERANCE, inside
    # ... and soon after it, most nudged runs leave it (measured: 23 of 24 by step 39): comparing the whole
    # 100-step curve at 1e-4 would test float32 chaos, not the optimizer.
    assert sum(step is not None for step in left.values()) > len(ULP_NUDGES) / 2, left


def test_example_writes_into_a_git_ignored_folder_by_default():
    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    assert train_classifier.DEFAULT_OUT.is_relative_to(repo_root() / "examples" / "out")
    assert "/examples/out/" in (repo_root() / ".gitignore").read_text().splitlines()


@pytest.mark.slow
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
