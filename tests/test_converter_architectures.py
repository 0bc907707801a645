"""Architecture discovery and detection (converter/architectures/__init__.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lopt_bridge.converter import architectures as archs
from lopt_bridge.converter import flax_msgpack
from lopt_bridge.converter.errors import ConversionError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"


class _Fake:
    def __init__(self, name, gin, accept, expects=None, crash=False):
        self.name, self.gin_names, self._accept, self._crash = name, gin, accept, crash
        if expects:
            self.expects = expects

    def matches(self, tree):
        """Fake: a tree with the accepted key."""
        if self._crash:
            raise TypeError("boom")
        return self._accept in tree


@pytest.fixture
def fakes(monkeypatch):
    items = (
        _Fake("alpha", ("pkg.Alpha",), "a", expects="keys a/*"),
        _Fake("beta", ("Beta", "mod.Shared"), "b"),
        _Fake("gamma", ("other.Shared",), "b"),
        _Fake("delta", ("Delta",), "zz", crash=True),
    )
    monkeypatch.setattr(archs, "all_architectures", lambda: items)
    return items


def test_discovers_every_family_module():
    mods = {p.stem for p in Path(archs.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert mods, "no architecture modules"
    found = archs.names()
    assert len(found) == len(set(found)) >= len(mods)
    for name in found:
        assert archs.by_name(name).name == name
        assert archs.by_name(name.replace("_", "-")).name == name


def test_lookup_and_detect_with_fakes(fakes):
    assert archs.by_gin_name("Alpha").name == "alpha"
    assert archs.by_gin_name("pkg.Alpha").name == "alpha"
    assert archs.by_gin_name("mod.Shared").name == "beta"
    with pytest.raises(ConversionError, match="ambiguous"):
        archs.by_gin_name("Shared", source="c.gin")
    with pytest.raises(ConversionError, match="unknown learned optimizer class 'Nope'"):
        archs.by_gin_name("Nope", source="c.gin")
    with pytest.raises(ConversionError, match="unknown architecture 'nope'.*known: alpha, beta"):
        archs.by_name("nope")
    assert archs.detect({"a": {"w": 1}}).name == "alpha"
    with pytest.raises(ConversionError, match="several architectures.*beta, gamma"):
        archs.detect({"b": 1}, source="t")
    with pytest.raises(ConversionError) as info:
        archs.detect({"q": {"r": 1, "s": 2}}, source="/x/theta.state")
    msg = str(info.value)
    assert msg.startswith("/x/theta.state: theta matches no known architecture (matches() failed for delta")
    assert "alpha: keys a/*" in msg and "beta: Fake: a tree with the accepted key." in msg
    assert msg.endswith("found top-level keys [q] with 2 leaves") and "\n" not in msg


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/checkpoints is absent")
@pytest.mark.parametrize("folder, arch", [("celo", "celo"), ("celo_adam", "celo_adam")])
def test_detects_real_celo_files(folder, arch):
    assert archs.detect(flax_msgpack.load(SHARED / folder / "theta.state")).name == arch


def test_no_module_under_converter_imports_jax():
    import ast

    forbidden = {"jax", "jaxlib", "flax", "haiku", "tensorflow", "optax"}
    for path in Path(archs.__file__).parents[1].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path}: imports {name}"
