"""``parity-report/``: the parity table (stdout and report.md), report.json and a plot of error per step."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.files import atomic_path, atomic_write_bytes

from .compare import CaseResult

HEADER = (
    "case", "arch", "mode", "dtype", "steps", "max rel update err", "tol", "result", "worst (step, tensor)",
    "open-loop drift", "resolution (median)", "resolved",
)  # fmt: skip


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def rows(results: Sequence[CaseResult]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        worst = f"{r.worst[0]}, {r.worst[1]}" if r.errors.size else "-"
        err = "-" if r.skipped else _fmt(r.max_error)
        result = "SKIP" if r.skipped else "PASS" if r.passed else "FAIL"
        out.append(
            (r.case, r.architecture, r.mode, r.dtype, str(r.steps), err, f"{r.tolerance:g}", result, worst,
             _fmt(r.max_drift), _fmt(r.resolution_median), _pct(r.resolved_fraction))
        )  # fmt: skip
    return out


def format_table(results: Sequence[CaseResult], *, markdown: bool = False) -> str:
    """The parity table, aligned for a terminal or as a Markdown table."""
    body = rows(results)
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(HEADER)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*HEADER), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)


def summary(results: Sequence[CaseResult]) -> str:
    failed = [r.case for r in results if not r.ok]
    skipped = [f"{r.case} ({r.skipped})" for r in results if r.skipped]
    skip = f"; skipped: {', '.join(skipped)}" if skipped else ""
    if failed:
        return f"{len(failed)} of {len(results)} case(s) FAILED: {', '.join(failed)}{skip}"
    return f"{len(results) - len(skipped)} case(s) passed{skip}"


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Temp file + rename, with the umask's mode (mkstemp alone leaves 0600: teammates could not read it)."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def write_report(
    results: Sequence[CaseResult], out_dir: str | Path, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write report.md, report.json and (matplotlib permitting) errors.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_note = write_plot(results, out / "errors.png")
    md = [
        "# Parity report",
        "",
        "Max over steps and tensors of `|u_ours - u_ref|_inf / |u_ref|_inf` after allowing one ulp of the "
        "result (parameters reset to the recorded `param_before[t]` each step); open-loop drift is "
        "`|p_ours - p_ref|_inf / |p_ref[t] - p_ref[0]|_inf` without the reset. Resolution is the smallest "
        "relative error the one-ulp rule can see, `max ulp(p_after) / |u_ref|_inf` (median over steps and "
        "tensors); 'resolved' is the share of (step, tensor) pairs where it is below the tolerance. Where "
        "the update is far smaller than the parameter, float32 rounding of `p + u` hides errors below the "
        "resolution, and PASS means only that. See parity_tests/compare.py.",
        "",
        format_table(results, markdown=True),
        "",
        summary(results),
        "",
    ]
    notes = [f"- {r.case}: {n}" for r in results for n in r.notes]
    if notes:
        md += ["Notes:", "", *notes, ""]
    md += [f"![error per step]({plot_note})" if plot_note == "errors.png" else f"Plot: {plot_note}", ""]
    _atomic_write(out / "report.md", "\n".join(md))
    payload = {
        "passed": all(r.ok for r in results),
        "cases": [r.to_json() for r in results],
        **(extra or {}),
    }
    _atomic_write(out / "report.json", json.dumps(payload, indent=2) + "\n")
    return out


def write_plot(results: Sequence[CaseResult], path: Path) -> str:
    """Plot max-over-tensors error per step for every case (log scale); returns the file name or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed; pip install matplotlib)"
    results = [r for r in results if not r.skipped and r.errors.size]
    if not results:
        return "skipped (no case was run)"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    floor = 1e-12  # log axis: exact zeros are drawn at the floor
    for r in results:
        y = [max(float(v), floor) if math.isfinite(float(v)) else 1.0 for v in r.per_step()]
        ax.semilogy(range(len(y)), y, label=f"{r.case} ({r.dtype})", linewidth=1.2)
    tols = sorted({r.tolerance for r in results})
    for tol in tols:
        ax.axhline(tol, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max rel. update error (after 1 ulp)")
    ax.set_title("Parity against the JAX reference")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path.name
