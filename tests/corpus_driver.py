"""Run a list of ``lopt-convert`` invocations in ONE process under an address-space limit, measuring each.

Usage: ``python tests/corpus_driver.py CASES.json RESULTS.json``. CASES.json is ``[{"name", "args",
"mode"}]`` (mode "cli": ``lopt-convert ARGS``; mode "runtime": ``load_optimizer(ARGS[0], ...)`` and one step).
For each case it records the exit code, stderr lines, an escaped exception's type, CPU and wall seconds, and
the peak resident memory it added (``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

Limits: ``RLIMIT_AS`` = the address space after imports + ``LOPT_CORPUS_MEMORY_MB`` (500) MiB, so no case can
take the machine down; a case is stopped after ``LOPT_CORPUS_CPU_S`` (5) s of CPU or 60 s of wall time
(``CaseTimeout``, a BaseException so no ``except Exception`` in the code under test can swallow it).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from typing import Any

MEMORY_MB = int(os.environ.get("LOPT_CORPUS_MEMORY_MB", "500"))
CPU_S = float(os.environ.get("LOPT_CORPUS_CPU_S", "5"))
WALL_S = 60.0


class CaseTimeout(BaseException):
    """A case ran past its CPU or wall-time budget."""


def _status(key: str) -> int:
    """A ``/proc/self/status`` value in kB (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _on_timer(signum: int, frame: Any) -> None:
    raise CaseTimeout("cpu" if signum == signal.SIGPROF else "wall")


def _run_cli(args: list[str]) -> tuple[int | None, str, str | None]:
    from click.testing import CliRunner

    from lopt_bridge.converter.commands import main

    result = CliRunner().invoke(main, args)
    exc = result.exception
    escaped = None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    return result.exit_code, result.stderr, escaped


def _run_runtime(args: list[str]) -> tuple[int | None, str, str | None]:
    """Load a converted file and take one step; a clean refusal is a ValueError/TypeError (code 2)."""
    import torch

    from lopt_bridge import pylo_runtime

    p = torch.nn.Parameter(torch.zeros(4, 3))
    try:
        opt = pylo_runtime.load_optimizer(args[0], [p], num_steps=10)
        p.grad = torch.ones_like(p)
        opt.step(loss=torch.tensor(1.0))
    except (ValueError, TypeError) as e:
        return 2, f"error: {e}\n", None
    return 0, "", None


def main() -> None:
    cases_path, results_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as f:
        cases = json.load(f)
    import click.testing  # noqa: F401  (imports count toward the baseline, not toward a case)

    import lopt_bridge.converter.commands  # noqa: F401

    if any(c["mode"] == "runtime" for c in cases):
        import torch  # noqa: F401

        from lopt_bridge import pylo_runtime  # noqa: F401
    base_kb = _status("VmSize")
    if base_kb:
        limit = (base_kb << 10) + (MEMORY_MB << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGPROF, _on_timer)
    signal.signal(signal.SIGALRM, _on_timer)
    results = []
    for case in cases:
        peak_ok = _reset_peak()
        rss0 = _status("VmRSS")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        signal.setitimer(signal.ITIMER_PROF, CPU_S)
        signal.setitimer(signal.ITIMER_REAL, WALL_S)
        timeout = None
        try:
            runner = _run_runtime if case["mode"] == "runtime" else _run_cli
            code, stderr, escaped = runner(case["args"])
        except CaseTimeout as e:
            code, stderr, escaped, timeout = None, "", None, str(e)
        except MemoryError:
            code, stderr, escaped = None, "", "MemoryError (the address-space limit was hit)"
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
        results.append(
            {
                "name": case["name"],
                "exit_code": code,
                "stderr": stderr.strip().splitlines(),
                "escaped": escaped,
                "timeout": timeout,
                "cpu_s": time.process_time() - cpu0,
                "wall_s": time.perf_counter() - wall0,
                "peak_mb": (_status("VmHWM") - rss0) / 1024 if peak_ok else None,
            }
        )
        with open(results_path, "w") as f:  # after each case, so a crash still leaves the earlier ones
            json.dump({"base_mb": base_kb / 1024, "limit_mb": MEMORY_MB, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
