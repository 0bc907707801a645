"""Recordings waiting for their runtime (parity_tests/fixtures_pending/, tests/data/pylo/): well-formed, their
files are the recorded ones, and each is registered with its recorder. No JAX or PyLO needed.

The replays themselves belong to the runtime work (see parity_tests/fixtures_pending/README.md for how a
case is switched on); these tests keep the recordings honest until then.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from lopt_bridge.parity_tests.commands import RECORDERS_DIR, _recorder_families
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import load_fixture, repo_root, sha256_file

PENDING = sorted((repo_root() / "parity_tests" / "fixtures_pending").glob("*/meta.json"))
PYLO = repo_root() / "tests" / "data" / "pylo"
PYLO_CASES = ("velo", "mulo", "celo2")


def test_pending_fixtures_exist():
    names = {m.parent.name for m in PENDING}
    # Every case recorded for a runtime that did not exist yet has been switched on (none pending today);
    # a recorder still marked RUNTIME_PENDING must have its cases here.
    mods = [
        importlib.import_module(f"lopt_bridge.parity_tests.recorders.{p.stem}")
        for p in RECORDERS_DIR.glob("*.py")
    ]
    pending = {c for m in mods if getattr(m, "RUNTIME_PENDING", False) for c in getattr(m, "CASES", ())}
    assert names == pending


def _check_pending(meta: Path) -> None:
    fx = load_fixture(meta.parent)
    assert fx.meta["source_base"] == "fixture"
    assert sha256_file(fx.source_path()) == fx.meta["source_sha256"]
    rec = importlib.import_module(f"lopt_bridge.parity_tests.recorders.{fx.meta['family']}")
    assert fx.meta["case"] in rec.CASES and rec.RUNTIME_PENDING is True
    first, last = fx.meta["loss_first_last"]
    assert last < 0.5 * first, "the recorded loss must fall meaningfully (REFERENCE_NOTES: conditioning)"
    assert fx.meta["provenance"]["reference"]["commit"]
    for name, arr in fx.params.items():
        assert np.all(np.isfinite(arr)), name
        assert np.any(arr[1:] != arr[:-1]), f"{name} never moves"


def test_pending_fixtures_are_recorded_and_registered() -> None:
    # A loop, not a parametrisation: with nothing pending (today) the test still runs and asserts.
    for meta in PENDING:
        _check_pending(meta)
    assert all(m.parent.parent.name == "fixtures_pending" for m in PENDING)


X64 = sorted(repo_root().glob("parity_tests/fixtures*/*/x64.npz"))  # pending or switched on (Celo2)


@pytest.mark.parametrize("path", X64, ids=[p.parent.name for p in X64])
def test_float64_reference_beside_ill_conditioned_fixtures(path: Path) -> None:
    # parity_tests.conditioning --write: the float64 reference's parameters after each step (as a difference
    # from the recorded float32 ones) and the recorded update's error against it (the float32 floor).
    from lopt_bridge.parity_tests.compare import update_error

    fx = load_fixture(path.parent)
    with np.load(path) as z:
        for n in fx.names:
            after64 = fx.params[n][1:].astype(np.float64) + z[f"after64_minus_recorded.{n}"]
            floor = [update_error(fx.params[n][t], fx.params[n][t + 1], fx.params[n][t], after64[t])
                     for t in range(fx.steps)]  # fmt: skip
            np.testing.assert_allclose(floor, z[f"floor.{n}"], rtol=1e-3, atol=1e-9, err_msg=n)
        assert max(float(z[f"floor.{n}"].max()) for n in fx.names) > FLOAT32_TOLERANCE


def test_celo2_routing_is_recorded_and_covers_both_branches():
    from lopt_bridge.parity_tests.recorders.celo2 import CASES, expected_routing

    for case, opts in CASES.items():
        meta = json.loads((repo_root() / "parity_tests" / "fixtures" / case / "meta.json").read_text())
        regex = "" if opts.get("factory") == "celo2base" else opts["config"]["regex_1d"]
        assert meta["options"]["routing"] == expected_routing(regex, opts["tree_paths"])
    default = CASES["celo2_random"]["routing"]
    assert default["b_vec"] == "adam" and default["a_scalar"] == "adam" and default["c_mat"] == "learned"
    options = CASES["celo2_options"]["routing"]
    assert options["d_wide"] == "adam" and options["b_vec"] == "learned"  # 2-D to Adam, 1-D learned


def test_pending_recorders_stay_out_of_the_default_live_run():
    fams = _recorder_families()
    assert "velo" in fams and "celo" in fams
    assert {"celo2", "celo_copies", "rnn_mlp_lopt", "nn_adam"} <= set(fams)  # switched on (runtimes exist)
    assert "perturb" not in fams


@pytest.mark.parametrize("name", PYLO_CASES)
def test_pylo_files_and_recordings(name: str) -> None:
    fx = load_fixture(PYLO / name)
    assert fx.meta["source_format"] == "pylo" and fx.meta["shapes"] == "pylo"
    assert "a_scalar" not in fx.names and "h_tied" not in fx.names
    for key, folder in fx.meta["sources"].items():
        files = fx.meta["sources_sha256"][key]
        assert {"model.safetensors", "config.json"} <= set(files)
        for fname, digest in files.items():
            assert sha256_file(PYLO / name / folder / fname) == digest, (name, folder, fname)
        prov = json.loads((PYLO / name / folder / "provenance.json").read_text())
        assert prov["pylo"]["commit"].startswith("d05c6c1") and prov["script"] == "tests/data/pylo/make.py"
    first, last = fx.meta["loss_first_last"]
    assert last < 0.6 * first


@pytest.mark.parametrize("name", PYLO_CASES)
def test_pylo_agreement_with_the_jax_reference(name: str) -> None:
    # crosscheck.py mapped the PyLO files onto the reference's theta and replayed PyLO's steps through it:
    # every tensor is within 1e-5 but the ones PyLO routes to its own AdamW (Celo2's 1-D tensors).
    doc = json.loads((PYLO / name / "agreement.json").read_text())
    for tensor, r in doc["tensors"].items():
        if "why_not_faithful" in r:
            assert r["max_rel_update_error"] > FLOAT32_TOLERANCE, tensor
        else:
            assert r["max_rel_update_error"] <= FLOAT32_TOLERANCE, (tensor, r)
    assert sum("why_not_faithful" not in r for r in doc["tensors"].values()) >= 5
