"""The lopt-parity command line: exit codes and messages (no reference needed)."""

from __future__ import annotations

import json
import sys
import types

from click.testing import CliRunner

from lopt_bridge.parity_tests.commands import main
from tests.test_parity_compare import _sgd_fixture


def test_help_has_examples():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "lopt-parity run" in res.output
    assert CliRunner().invoke(main, ["-h"]).output == res.output  # -h as in lopt-convert
    for sub in ("record", "check", "run"):
        res = CliRunner().invoke(main, [sub, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, sub
        assert CliRunner().invoke(main, [sub, "-h"]).output == res.output, sub


def test_run_reports_each_case_as_it_finishes(tmp_path):
    fixtures = tmp_path / "fixtures"
    _sgd_fixture(fixtures)
    (fixtures / "sgd").rename(fixtures / "sgd_a")
    _sgd_fixture(fixtures)  # two cases, both FAIL (our runtime has no "sgd" architecture)
    args = ["run", "--fixtures", str(fixtures), "--out", str(tmp_path / "r"), "--no-open-loop"]
    res = CliRunner().invoke(main, args)
    lines = res.output.splitlines()
    assert lines[0].startswith("lopt-parity run: 2 case(s) from") and "roughly" in lines[0], lines[0]
    assert lines[1].startswith("[1/2] sgd ") and "FAIL" in lines[1] and lines[1].endswith(" s"), lines[1]
    assert lines[2].startswith("[2/2] sgd_a ") and "FAIL" in lines[2], lines[2]
    assert lines.index("") < next(i for i, ln in enumerate(lines) if ln.startswith("case "))  # then the table
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["seconds"]) == {"sgd/float32", "sgd_a/float32"}
    assert set(report["fixtures"]) == {"sgd", "sgd_a"}
    assert all(len(digest) == 64 for digest in report["fixtures"].values())
    # The next run estimates its time from this report's per-case times.
    res = CliRunner().invoke(main, args)
    assert f"(the last run in {tmp_path / 'r'})" in res.output.splitlines()[0]


def test_run_without_fixtures_is_not_a_failure(tmp_path):
    res = CliRunner().invoke(
        main, ["run", "--fixtures", str(tmp_path / "none"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0
    assert "no parity fixtures" in res.output


def test_run_and_check_fail_on_a_case_that_cannot_be_replayed(tmp_path):
    fx = _sgd_fixture(tmp_path / "fixtures")  # architecture "sgd": our converter/runtime cannot load it
    res = CliRunner().invoke(
        main, ["run", "--fixtures", str(tmp_path / "fixtures"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "sgd" in res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] is False and report["cases"][0]["case"] == "sgd"
    assert (tmp_path / "r" / "report.md").is_file()
    res = CliRunner().invoke(main, ["check", str(fx)])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_record_unknown_family_and_missing_reference(tmp_path, monkeypatch):
    res = CliRunner().invoke(main, ["record", "no_such_family", "--case", "x", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no recorder for family" in res.output

    mod = types.ModuleType("lopt_bridge.parity_tests.recorders.needsjax")
    mod.CASES = {"c": {}}

    def make_reference(options, ckpt_dir, seed):
        raise ModuleNotFoundError("No module named 'learned_optimization'", name="learned_optimization")

    mod.make_reference = make_reference
    monkeypatch.setitem(sys.modules, "lopt_bridge.parity_tests.recorders.needsjax", mod)
    res = CliRunner().invoke(main, ["record", "needsjax", "--case", "c", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "PYTHONPATH" in res.output and "learned_optimization" in res.output
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(main, ["record", "needsjax", "--case", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "has no case 'nope'" in res.output


def test_fixture_with_absent_shared_weights_is_skipped_not_failed(tmp_path):
    fx = _sgd_fixture(tmp_path / "fixtures")
    meta = json.loads((fx / "meta.json").read_text())
    meta.update(source="../no-such-shared/checkpoints/celo/theta.state", source_base="repo")
    (fx / "meta.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(
        main, ["run", "--fixtures", str(tmp_path / "fixtures"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    assert "SKIP" in res.output and "absent" in res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] is True and report["cases"][0]["skipped"]


def test_live_results_survive_the_subprocess_json_round_trip():
    import numpy as np

    from lopt_bridge.parity_tests.commands import _result_from_dict, _result_to_dict
    from lopt_bridge.parity_tests.compare import CaseResult

    r = CaseResult("c", "f", "a", ["x", "y"], np.array([[1e-7, np.inf]]), drifts=np.array([[1.0, 2.0]]),
                   mode="closed-loop", tolerance=1e-4, resolutions=np.array([[1e-6, 1e-6]]))  # fmt: skip
    back = _result_from_dict(json.loads(json.dumps(_result_to_dict(r))))
    assert back.mode == "closed-loop" and back.tolerance == 1e-4 and not back.passed
    assert back.resolution_median == 1e-6 and back.max_drift == 2.0 and back.worst == (0, "y")
