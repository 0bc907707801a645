"""``python -m lopt_bridge.pylo_runtime.kernels.cpu build [--force] [--cc CC]``: build the C passes now.

Otherwise the first ``opt.step()`` on the CPU builds them (~5 s quiet, up to a minute on a loaded machine).
``info`` prints where the library is and whether it is built and verified. Exit 0 on success; 1 (one line on
stderr) when it cannot build; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from . import build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lopt_bridge.pylo_runtime.kernels.cpu", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile lopt_cpu.c into the cache (no-op if a verified copy is there)")
    b.add_argument("--force", action="store_true", help="rebuild even if a verified library is cached")
    b.add_argument("--cc", default=None, help="C compiler (default: $CC or cc)")
    sub.add_parser("info", help="where the library is, and whether it is built and verified")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            t0 = time.perf_counter()
            path = build.build(a.cc, force=a.force)
            print(f"{path} (verified, {time.perf_counter() - t0:.1f} s)")
            return 0
        exe = shutil.which(os.environ.get("CC", "cc"))
        if exe is None:
            print("error: no C compiler on PATH (set CC)", file=sys.stderr)
            return 1
        path = build.library_path(exe, build.timeout())
        print(f"{path}: {'built, verified' if build.verified(path) else 'not built (or not verified)'}")
        return 0
    except RuntimeError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
