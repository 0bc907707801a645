"""What is installed: one top-level package, ``lopt_bridge``, never the bare folder names (issue #15.10).

The repository's top-level folders (converter, pylo_runtime, parity_tests, checkpoints) are installed as
``lopt_bridge.<folder>``. In a checkout the bare names are importable too (the root is on sys.path), and
importing a module under both names loads it twice: two class objects, so isinstance checks and registries
break. So no code may import a bare name, and a conversion plus an optimizer step must not load one.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lopt_bridge.parity_tests import commands

ROOT = Path(__file__).resolve().parents[1]
BARE = ("cli", "converter", "checkpoints", "parity_tests", "pylo_runtime")
MAPPED = ("checkpoints", "converter", "parity_tests", "pylo_runtime")
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".venv"}
#: A code string that imports or names a module by its bare path (subprocess code, importlib, -m, patches).
BARE_IN_STRING = re.compile(
    r"(?<![\w.])(?<!lopt_bridge )(?:import|from) (?:" + "|".join(BARE) + r")\b"
    r"|^(?:converter|parity_tests|pylo_runtime)\.[\w.]+(?::\w+)?$"
)


def _python_files() -> list[Path]:
    return [
        p
        for p in ROOT.rglob("*.py")
        if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
    ]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the module/class/function docstring constants (prose, not code)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _node_findings(node: ast.AST) -> list[str]:
    """Bare names one AST node imports or (a code string) names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in BARE]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in BARE:
        return [node.module]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and BARE_IN_STRING.search(node.value):
        return [node.value]
    return []


def _findings(src: str) -> list[str]:
    """What the repository walk below reports for one source text (docstrings are prose: not checked)."""
    tree = ast.parse(src)
    skip = _docstring_nodes(tree)
    return [name for node in ast.walk(tree) if id(node) not in skip for name in _node_findings(node)]


def test_the_check_catches_a_bare_import():
    """The check sees each form it forbids (so its silence means something); the examples are built from
    parts so that neither the check nor the rewrite script sees them in this file."""
    p, c, q, cli = "pylo" + "_runtime", "con" + "verter", "parity" + "_tests", "import " + "cli"
    src = f"import {p}\nfrom {c}.convert import x\nimport {q}.digits as d\n"
    src += f'Y = "{p}.velo:VeLO"\nZ = "{cli}"\n'
    assert sorted(_findings(src)) == sorted([p, f"{c}.convert", f"{q}.digits", f"{p}.velo:VeLO", cli])
    ok = f"from lopt_bridge import {p}\nimport lopt_bridge.{q}.digits\n"
    ok += 'Z = "import sys; from lopt_bridge import cli"\n'
    assert _findings(ok) == []


def test_no_python_file_imports_a_bare_package_name():
    """Every import is ``lopt_bridge.<pkg>`` or relative; code strings name modules the same way."""
    files = _python_files()
    assert len(files) > 100, "the walk found too few files"
    bad = [
        f"{path.relative_to(ROOT)}: {name[:80]!r}" for path in files for name in _findings(path.read_text())
    ]
    assert not bad, "bare package names (use lopt_bridge.<pkg>; /work/scratch/pkg/rewrite.py):\n" + "\n".join(
        bad
    )


def test_a_conversion_and_a_step_load_no_bare_module(tmp_path):
    """In a fresh interpreter with the checkout on sys.path (so a stray bare import would succeed):
    ``import lopt_bridge``, convert a small VeLO checkpoint, take one optimizer step; no module is loaded
    under a bare name, and the short names are the package's own objects."""
    code = f"""
import sys
import lopt_bridge
from lopt_bridge.converter.convert import convert_source
convert_source({str(ROOT / "tests/data/lo/velo_small/params")!r}, {str(tmp_path / "v.safetensors")!r},
               architecture="velo", progress=False)
import torch
p = torch.nn.Parameter(torch.ones(3, 2))
opt = lopt_bridge.load_optimizer({str(tmp_path / "v.safetensors")!r}, [p], num_steps=10)
p.grad = torch.full_like(p, 0.5)
opt.step(loss=1.0)
assert isinstance(opt, lopt_bridge.VeLO), type(opt)
assert lopt_bridge.VeLO is lopt_bridge.pylo_runtime.velo.VeLO
assert not torch.equal(p.detach(), torch.ones(3, 2)), "the step changed nothing"
bare = sorted(m for m in sys.modules if m.split(".")[0] in {BARE!r})
assert not bare, bare
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_pyproject_installs_one_namespace_with_every_subpackage():
    """pyproject's package list = every folder with an __init__.py under the mapped folders, as lopt_bridge.*;
    fixtures and test data are not package data, the registry is."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = conf["tool"]["setuptools"]
    want = {"lopt_bridge"} | {
        "lopt_bridge." + ".".join(p.parent.relative_to(ROOT).parts)
        for top in MAPPED
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(st["packages"]) == want
    assert st["package-dir"] == {"lopt_bridge": "lopt_bridge", **{f"lopt_bridge.{t}": t for t in MAPPED}}
    assert all(name.split(".")[0] == "lopt_bridge" for name in st["package-data"])
    assert st["package-data"]["lopt_bridge.checkpoints"] == ["registry.toml"]
    assert "py-modules" not in st
    assert not any("fixtures" in "".join(v) or "tests" in k for k, v in st["package-data"].items())
    scripts = conf["project"]["scripts"]
    assert scripts and all(v.startswith("lopt_bridge.cli:") for v in scripts.values())


def test_lopt_parity_without_a_checkout_says_where_to_point_it(monkeypatch, tmp_path):
    """Installed from a wheel (no parity_tests/fixtures next to the package): one line naming --fixtures,
    exit 2; with --fixtures it runs."""
    monkeypatch.setattr(commands, "default_fixtures", lambda: None)
    res = CliRunner().invoke(commands.main, ["run", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--fixtures PATH" in lines[0] and lines[0].startswith("error: "), res.output
    res = CliRunner().invoke(commands.main, ["record", "velo", "--case", "velo_default"])
    assert res.exit_code == 2 and "--out" in res.output, res.output
    empty = tmp_path / "none"
    empty.mkdir()
    res = CliRunner().invoke(commands.main, ["run", "--fixtures", str(empty), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "no parity fixtures" in res.output, res.output


@pytest.mark.slow
def test_the_wheel_holds_only_lopt_bridge(tmp_path):
    """``pip wheel .``: one top-level package plus the dist-info, the registry and C source inside, no
    fixtures or test data (it was 29 MB with five top-level names)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this venv")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for name in ("lopt_bridge", *MAPPED):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp_path), "--no-deps",
         "--no-build-isolation", "-q"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lopt_bridge", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    assert "lopt_bridge/checkpoints/registry.toml" in names
    assert "lopt_bridge/cli.py" in names and "lopt_bridge/pylo_runtime/velo.py" in names
    assert "lopt_bridge/pylo_runtime/kernels/cpu/lopt_cpu.c" in names
    assert not [n for n in names if "/fixtures/" in n or n.endswith((".npz", ".safetensors"))]
    assert wheel.stat().st_size < 2_000_000, wheel.stat().st_size


def test_default_fixtures_are_the_checkouts(monkeypatch, tmp_path):
    """This code's checkout, else the working directory's (a non-editable install run from a clone), else
    None (an installed wheel: the fixtures are not in it)."""
    from lopt_bridge.parity_tests import fixture

    assert fixture.default_fixtures() == ROOT / "parity_tests" / "fixtures"
    monkeypatch.setattr(fixture, "repo_root", lambda: tmp_path)  # as if installed in site-packages
    monkeypatch.chdir(ROOT)
    assert fixture.default_fixtures() == ROOT / "parity_tests" / "fixtures"
    monkeypatch.chdir(tmp_path)
    assert fixture.default_fixtures() is None
