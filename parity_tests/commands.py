"""``lopt-parity``: record fixtures with the JAX reference, check one, or run every fixture into a report."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click
import numpy as np

from .compare import TOLERANCES, CaseResult
from .fixture import default_fixtures, discover

DEFAULT_FIXTURES = "parity_tests/fixtures"


def _fixtures_root(option: str) -> Path:
    """The checkout's fixture folder; installed from a wheel (no fixtures in it): one line, exit 2."""
    root = default_fixtures()
    if root is None:
        click.echo(
            f"error: no {DEFAULT_FIXTURES} here (installed without a checkout: the wheel does not ship the "
            f"fixtures); pass {option}, e.g. a lopt-bridge clone's {DEFAULT_FIXTURES}",
            err=True,
        )
        sys.exit(2)
    return root


RECORDERS_DIR = Path(__file__).resolve().parent / "recorders"


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 110, "max_content_width": 110},
    epilog="""\b
Examples:
  lopt-parity run                                  # replay every committed fixture, write parity-report/
  lopt-parity check parity_tests/fixtures/velo_default
  PYTHONPATH=/path/to/learned_optimization lopt-parity record velo --case velo_default \\
      --out parity_tests/fixtures/velo_default
  PYTHONPATH=/path/to/learned_optimization lopt-parity run --live --family velo
""",
)
def main() -> None:
    """Parity of lopt-bridge's PyTorch optimizers against the JAX reference, step by step.

    A fixture is a recording of the reference optimizer on a synthetic multi-tensor task (loss, gradients,
    parameters before and after each step, provenance). `check` and `run` convert the recorded checkpoint with
    our converter, replay the recorded steps through our runtime and compare each step's update per tensor:
    max |u_ours - u_ref|_inf / |u_ref|_inf (one ulp of the result allowed) must be <= 1e-5 in float32.
    """


@main.command()
@click.argument("family")
@click.option("--case", "case", required=True, help="Case name from the family recorder's CASES.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help=f"Fixture directory to write (default: {DEFAULT_FIXTURES}/CASE).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seed of the task and of the random theta.")
@click.option("--steps", default=50, show_default=True, help="Reference steps to record.")
@click.option("--num-steps", default=100, show_default=True, help="Training length the optimizer is told.")
@click.option("--shapes", type=click.Choice(["default", "large"]), default="default", show_default=True,
              help="Task tensor set; 'large' adds a 512x384 tensor (stored sampled).")  # fmt: skip
@click.option("--init", type=click.Choice(["unit", "small"]), default="unit", show_default=True,
              help="Initial params: targets + N(0,1), or 1e-3 N(0,1) (finer resolution).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing fixture directory.")
def record(
    family: str,
    case: str,
    out: Path | None,
    seed: int,
    steps: int,
    num_steps: int,
    shapes: str,
    init: str,
    force: bool,
) -> None:
    """Record CASE of FAMILY (velo, celo, small_fc_lopt, ...) with the JAX reference into a fixture.

    \b
    Needs jax and the reference on PYTHONPATH (google/learned_optimization, or amoudgl/celo for celo).
    Example:
      PYTHONPATH=$LO_SRC lopt-parity record velo --case velo_default --out parity_tests/fixtures/velo_default
    """
    from .record import ReferenceUnavailable, record_case

    out = out if out is not None else _fixtures_root("--out PATH/CASE") / case
    command = shlex.join(["lopt-parity", *sys.argv[1:]])
    try:
        path = record_case(
            family, case, out, seed=seed, steps=steps, num_steps=num_steps, shapes=shapes, init=init,
            force=force, command=command,
        )  # fmt: skip
    except ReferenceUnavailable as e:
        _fail(str(e))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        _fail(str(e))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    click.echo(f"recorded {family}/{case}: {steps} steps -> {path} ({size / 1e6:.2f} MB)")


def _check_one(path: Path, dtype: str, open_loop: bool) -> CaseResult:
    """check_fixture, turning any failure (missing converter/runtime, bad file) into a failing result."""
    from .fixture import load_fixture
    from .replay import check_fixture

    try:
        fx = load_fixture(path)
        if fx.meta.get("source_base") == "repo" and not fx.source_path().exists():
            # Published weights live in ../shared beside the repository, never in it.
            return CaseResult(
                fx.label, fx.meta["family"], fx.meta["architecture"], fx.names, np.zeros((0, 0)),
                dtype=dtype, tolerance=TOLERANCES[dtype], skipped=f"{fx.meta['source']} absent",
            )  # fmt: skip
        return check_fixture(path, dtype=dtype, open_loop=open_loop)
    except Exception as e:  # a broken case is reported as FAIL with the reason, others still run
        meta: dict[str, Any] = {}
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            pass
        r = CaseResult(
            case=path.name,
            family=str(meta.get("family", "?")),
            architecture=str(meta.get("architecture", "?")),
            names=["-"],
            errors=np.full((1, 1), np.inf),
            dtype=dtype,
            tolerance=TOLERANCES[dtype],
            notes=[f"error: {type(e).__name__}: {e}"],
        )
        r.mode = "error"
        if "-v" in sys.argv or "--verbose" in sys.argv:
            traceback.print_exc()
        return r


@main.command()
@click.argument("fixture", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(list(TOLERANCES)), default="float32", show_default=True,
              help="Parameter dtype of our side (bf16/fp16 have their own stated tolerance).")  # fmt: skip
@click.option("--no-open-loop", is_flag=True, help="Skip the open-loop replay (drift).")
def check(fixture: Path, dtype: str, no_open_loop: bool) -> None:
    """Replay one FIXTURE directory through our converter and runtime; exit 1 if it fails.

    \b
    Example:
      lopt-parity check parity_tests/fixtures/velo_default
    """
    from .report import format_table

    r = _check_one(fixture, dtype, not no_open_loop)
    click.echo(format_table([r]))
    for note in r.notes:
        click.echo(f"  {note}")
    if r.skipped:
        click.echo(f"SKIP: {r.case}: {r.skipped}")
    elif not r.passed:
        click.echo(f"FAIL: {r.case}", err=True)
        sys.exit(1)


@main.command()
@click.option("--fixtures", type=click.Path(path_type=Path), default=None,
              help=f"Folder of fixture directories (default: {DEFAULT_FIXTURES}).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=Path("parity-report"), show_default=True,
              help="Report folder (report.md, report.json, errors.png).")  # fmt: skip
@click.option("--dtype", "dtypes", type=click.Choice(list(TOLERANCES)), multiple=True,
              help="Parameter dtype(s) to replay in (repeatable; default float32).")  # fmt: skip
@click.option(
    "--no-open-loop", is_flag=True, help="Skip the open-loop replay (drift column); halves the time."
)
@click.option("--live", is_flag=True,
              help="Reference and ours side by side (no fixtures), also closed loop.")  # fmt: skip
@click.option(
    "--family", "families", multiple=True, help="With --live: families to run (default: all recorders)."
)
@click.option("--case", "cases", multiple=True, help="With --live: only these cases.")
@click.option("--steps", default=50, show_default=True, help="With --live: steps per case.")
def run(
    fixtures: Path | None,
    out: Path,
    dtypes: tuple[str, ...],
    no_open_loop: bool,
    live: bool,
    families: tuple[str, ...],
    cases: tuple[str, ...],
    steps: int,
) -> None:
    """Replay every committed fixture, print the parity table, write the report; exit 1 if any case fails.

    \b
    Examples:
      lopt-parity run
      lopt-parity run --dtype float32 --dtype bfloat16 --out parity-report
      PYTHONPATH=$LO_SRC lopt-parity run --live --family velo --steps 20
    """
    from .report import format_table, summary, write_report

    results: list[CaseResult] = []
    extra: dict[str, Any] = {}
    if live:
        results = _run_live(families, cases, steps)
    else:
        root = fixtures if fixtures is not None else _fixtures_root("--fixtures PATH")
        found = discover(root)
        if not found:
            click.echo(f"no parity fixtures under {root} yet: nothing to check (record some with "
                       "`lopt-parity record`)")  # fmt: skip
            return
        jobs = [(path, dtype) for dtype in dtypes or ("float32",) for path in found]
        results, seconds = _run_fixtures(jobs, root, out, open_loop=not no_open_loop)
        extra = {"fixtures": {p.name: _fixture_digest(p) for p in found}, "seconds": seconds}
    click.echo("")
    click.echo(format_table(results))
    for r in results:
        for note in r.notes:
            click.echo(f"  {r.case}: {note}")
    report = write_report(results, out, extra=extra)
    click.echo(summary(results))
    click.echo(f"report: {report / 'report.md'}")
    if not results or not all(r.ok for r in results):
        sys.exit(1)


#: Rough seconds per fixture (float32, reset + open-loop replay) when no earlier report says: 26 cases in
#: 15 s on a quiet 2-core machine with the fast paths (2026-12-02), up to about 3x that on a busy one.
ROUGH_SECONDS_PER_CASE = 1.5


def _fixture_digest(path: Path) -> str:
    """sha256 of a fixture's meta.json (it records every array's sha256): which recording a report checked."""
    return hashlib.sha256((path / "meta.json").read_bytes()).hexdigest()


def _estimate(jobs: list[tuple[Path, str]], out: Path, open_loop: bool) -> str:
    """Roughly how long: the per-case times of the last report in ``out`` if it has them, else a rule."""
    try:
        previous = json.loads((out / "report.json").read_text()).get("seconds", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    known = [float(previous[f"{p.name}/{d}"]) for p, d in jobs if f"{p.name}/{d}" in previous]
    if len(known) == len(jobs):
        return f"about {_duration(sum(known))} (the last run in {out})"
    per_case = ROUGH_SECONDS_PER_CASE * (1.0 if open_loop else 0.5)
    return f"roughly {_duration(per_case * len(jobs))} on 2 cores"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _run_fixtures(
    jobs: list[tuple[Path, str]], root: Path, out: Path, *, open_loop: bool
) -> tuple[list[CaseResult], dict[str, float]]:
    """Check each (fixture, dtype), printing one line per case as it finishes under a progress bar."""
    from tqdm import tqdm

    click.echo(
        f"lopt-parity run: {len(jobs)} case(s) from {root}, open-loop drift {'on' if open_loop else 'off'}; "
        f"{_estimate(jobs, out, open_loop)}"
    )
    results: list[CaseResult] = []
    seconds: dict[str, float] = {}
    width = max(len(p.name) for p, _ in jobs)
    with tqdm(total=len(jobs), unit="case", file=sys.stderr, disable=None, leave=False) as bar:
        for i, (path, dtype) in enumerate(jobs, 1):
            bar.set_postfix_str(path.name)
            start = time.perf_counter()
            r = _check_one(path, dtype, open_loop)
            seconds[f"{path.name}/{dtype}"] = round(time.perf_counter() - start, 2)
            results.append(r)
            line = _case_line(r, seconds[f"{path.name}/{dtype}"], width)
            bar.write(f"[{i:>{len(str(len(jobs)))}}/{len(jobs)}] {line}", file=sys.stdout)
            bar.update()
    return results, seconds


def _case_line(r: CaseResult, seconds: float | None, width: int) -> str:
    """One finished case: verdict, error against its tolerance, drift, time."""
    if r.skipped:
        return f"{r.case:<{width}}  SKIP  {r.skipped}"
    verdict = "PASS" if r.passed else "FAIL"
    if r.passed and r.x64_accepted().any():
        verdict = "PASS (float64 rule)"
    drift = "" if r.max_drift is None else f", open-loop drift {r.max_drift:.2e}"
    detail = f"max rel update err {r.max_error:.2e} (tol {r.tolerance:g}, {r.dtype}){drift}"
    if r.mode == "error":
        detail = "; ".join(r.notes)
    return f"{r.case:<{width}}  {verdict}  {detail}" + ("" if seconds is None else f"  {seconds:.1f} s")


def _recorder_families() -> list[str]:
    """Recorders `run --live` runs by default: those with CASES whose runtime exists (no RUNTIME_PENDING).

    A recorder marked ``RUNTIME_PENDING = True`` records cases of a family our runtime cannot replay yet; it
    runs live only when named with --family. Importing a recorder needs no jax."""
    import importlib

    out = []
    for p in sorted(RECORDERS_DIR.glob("*.py")):
        if p.stem == "__init__":
            continue
        mod = importlib.import_module(f"lopt_bridge.parity_tests.recorders.{p.stem}")
        if getattr(mod, "CASES", None) and not getattr(mod, "RUNTIME_PENDING", False):
            out.append(p.stem)
    return out


def _run_live(families: tuple[str, ...], cases: tuple[str, ...], steps: int) -> list[CaseResult]:
    """One subprocess per family (celo and learned_optimization cannot share a process)."""
    results: list[CaseResult] = []
    todo = families or tuple(_recorder_families())
    click.echo(f"lopt-parity run --live: {len(todo)} family subprocess(es) ({', '.join(todo)}), JAX and "
               "PyTorch side by side; minutes per family")  # fmt: skip
    for family in todo:
        with tempfile.TemporaryDirectory(prefix="lopt-parity-live-") as tmp:
            out = Path(tmp) / "results.json"
            cmd = [sys.executable, "-m", "lopt_bridge.parity_tests.commands", "live-family", family,
                   "--json", str(out), "--steps", str(steps),
                   *(a for c in cases for a in ("--case", c))]  # fmt: skip
            click.echo(f"live: {family} ...", err=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not out.is_file():
                results.append(
                    _error_result(family, f"live run failed (exit {proc.returncode}); see messages above")
                )
                continue
            done = [_result_from_dict(d) for d in json.loads(out.read_text())]
            width = max((len(r.case) for r in done), default=1)
            for r in done:
                click.echo(f"[{family}] {_case_line(r, None, width)}")
            results.extend(done)
    return results


def _error_result(family: str, note: str) -> CaseResult:
    r = CaseResult(family, family, "?", ["-"], np.full((1, 1), np.inf), notes=[note])
    r.mode = "error"
    return r


def _result_to_dict(r: CaseResult) -> dict[str, Any]:
    return {
        "case": r.case, "family": r.family, "architecture": r.architecture, "names": r.names,
        "errors": r.errors.tolist(), "drifts": None if r.drifts is None else r.drifts.tolist(),
        "dtype": r.dtype, "mode": r.mode, "tolerance": r.tolerance, "notes": r.notes,
        "resolutions": None if r.resolutions is None else r.resolutions.tolist(),
        "x64_ours": None if r.x64_ours is None else r.x64_ours.tolist(),
        "x64_ref": None if r.x64_ref is None else r.x64_ref.tolist(),
    }  # fmt: skip


def _result_from_dict(d: dict[str, Any]) -> CaseResult:
    drifts = None if d["drifts"] is None else np.asarray(d["drifts"], dtype=np.float64)
    res = None if d.get("resolutions") is None else np.asarray(d["resolutions"], dtype=np.float64)
    x64 = {
        k: None if d.get(k) is None else np.asarray(d[k], dtype=np.float64) for k in ("x64_ours", "x64_ref")
    }
    return CaseResult(
        d["case"], d["family"], d["architecture"], list(d["names"]),
        np.asarray(d["errors"], dtype=np.float64), drifts, d["dtype"], d["mode"], float(d["tolerance"]),
        list(d["notes"]), resolutions=res, **x64,
    )  # fmt: skip


@main.command("live-family", hidden=True)
@click.argument("family")
@click.option("--json", "json_out", type=click.Path(path_type=Path), required=True)
@click.option("--case", "cases", multiple=True)
@click.option("--steps", default=50)
def live_family(family: str, json_out: Path, cases: tuple[str, ...], steps: int) -> None:
    """(internal) Live parity for one family's cases in this process; results as JSON."""
    from .live import family_cases, live_case
    from .record import ReferenceUnavailable

    try:
        names = [c for c in family_cases(family) if not cases or c in cases]
    except ReferenceUnavailable as e:
        _fail(str(e))
    results: list[CaseResult] = []
    for case in names:
        try:
            results.extend(live_case(family, case, steps=steps))
        except ReferenceUnavailable as e:
            _fail(str(e))
        except Exception as e:  # report and continue with the next case
            traceback.print_exc()
            results.append(_error_result(case, f"error: {type(e).__name__}: {e}"))
    json_out.write_text(json.dumps([_result_to_dict(r) for r in results]))


if __name__ == "__main__":
    main()
