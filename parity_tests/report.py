"""``parity-report/``: the parity table (stdout and report.md), report.json and a plot of error per step."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lopt_bridge.converter.files import atomic_path, atomic_write_bytes

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
        result = "SKIP" if r.skipped else "FAIL" if not r.passed else "PASS"
        if r.passed and r.x64_accepted().any():
            result = "PASS (float64 rule)"
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
        "resolution, and PASS means only that. 'PASS (float64 rule)': some steps of a tensor on which the "
        "recorded float32 reference is itself more than the tolerance from float64 miss the reference, and "
        "ours is no further from float64 than the reference (within a factor 2; both numbers per tensor in "
        "the notes). See parity_tests/compare.py.",
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


#: The symlog axis is linear below this (exact zeros sit on their own "0" tick), logarithmic above it.
ZERO_BAND = 1e-9


def write_plot(results: Sequence[CaseResult], path: Path) -> str:
    """Write ``plot_figure``'s figure to ``path``; returns the file name or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed; pip install matplotlib)"
    fig = plot_figure(results)
    if fig is None:
        return "skipped (no case was run)"
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path.name


def plot_figure(results: Sequence[CaseResult]) -> Any:
    """Max-over-tensors error per step, one panel per architecture (a matplotlib Figure; None if none ran).

    The y axis is symmetric-log: exact zeros (an update equal up to one ulp) are drawn at 0, not clamped to a
    floor; a non-finite error is drawn as a red x on the top edge.
    """
    import matplotlib.pyplot as plt

    ran = [r for r in results if not r.skipped and r.errors.size]
    if not ran:
        return None
    archs = sorted({r.architecture for r in ran})
    ncols = min(3, len(archs))
    nrows = math.ceil(len(archs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.4 * nrows), squeeze=False)
    finite = [float(v) for r in ran for v in r.per_step() if math.isfinite(float(v))]
    # One decade of headroom above the largest error or tolerance, so the tolerance line is never the frame.
    top = 10 ** (math.floor(math.log10(max([*finite, *(r.tolerance for r in ran), ZERO_BAND]))) + 1)
    for ax, arch in zip(axes.flat, archs, strict=False):
        mine = [r for r in ran if r.architecture == arch]
        for r in mine:
            y = [float(v) for v in r.per_step()]
            ax.plot(
                range(len(y)), [v if math.isfinite(v) else math.nan for v in y], marker="o", markersize=2.5,
                linewidth=0.9, label=f"{r.case}" + ("" if r.dtype == "float32" else f" ({r.dtype})"),
            )  # fmt: skip
            bad = [t for t, v in enumerate(y) if not math.isfinite(v)]
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color="red", markersize=7, clip_on=False,
                        label=f"{r.case}: not finite")  # fmt: skip
        for tol in sorted({r.tolerance for r in mine}):
            ax.axhline(tol, color="k", linestyle="--", linewidth=0.8, label=f"tolerance {tol:g}")
        skipped = [r.case for r in results if r.skipped and r.architecture == arch]
        title = f"{arch} (family {mine[0].family})" + (f"; skipped {', '.join(skipped)}" if skipped else "")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("symlog", linthresh=ZERO_BAND, linscale=0.4)
        ax.set_ylim(-0.2 * ZERO_BAND, top)
        decades = range(round(math.log10(ZERO_BAND)), round(math.log10(top)) + 1)
        ax.set_yticks([0.0, *(10.0**k for k in decades)])
        ax.set_yticklabels(["0", *(f"1e{k}" for k in decades)], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, which="major", axis="y", linewidth=0.3, alpha=0.5)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("max rel. update error", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(archs) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Parity against the JAX reference: per step, max over tensors of |u_ours - u_ref| / |u_ref| "
        "(one ulp allowed; 0 = equal)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
