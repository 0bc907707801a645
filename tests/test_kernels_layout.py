"""Kernel entry points take tensors and numbers: nothing under pylo_runtime/kernels imports a family module
(or anything of pylo_runtime outside kernels/), so kernels and families form no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

from lopt_bridge import pylo_runtime

KERNELS = Path(pylo_runtime.__file__).parent / "kernels"


def _imports(path: Path) -> list[str]:
    """Absolute names of the pylo_runtime modules ``path`` imports."""
    pkg = ["lopt_bridge", "pylo_runtime", *path.relative_to(KERNELS.parent).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.startswith(("lopt_bridge.pylo_runtime", "pylo_runtime"))]


def test_kernels_import_nothing_outside_kernels():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 6
    bad = {
        str(f.relative_to(KERNELS)): m
        for f in files
        for m in _imports(f)
        if not m.startswith("lopt_bridge.pylo_runtime.kernels")
    }
    assert not bad, bad


def test_kernel_entry_points_take_no_optimizer():
    for f in sorted(KERNELS.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef):
                names = {a.arg for a in [*node.args.args, *node.args.kwonlyargs]}
                assert not names & {"opt", "optimizer", "self"}, (f.name, node.name)
