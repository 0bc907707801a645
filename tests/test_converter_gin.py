"""config.gin parsing: files written by the reference's gin, and every malformed case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.converter.gin_config import (
    GinReference,
    load_optimizer_config,
    parse_bindings,
    parse_optimizer,
)

DATA = Path(__file__).parent / "data" / "gin"
EXPECTED = json.loads((DATA / "expected.json").read_text())
KNOWN = ("HyperV2", "AdafacMLPLOpt", "MLPLOpt")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_matches_what_gin_itself_binds(name):
    got = load_optimizer_config(DATA / name, known_classes=KNOWN)
    assert got.class_name == EXPECTED[name]["class"]
    assert got.bindings == EXPECTED[name]["bindings"]


def test_scope_and_continuations():
    text = (DATA / "hyperv2_scoped_config.gin").read_text()
    assert "\\\n" in text  # the fixture really has a backslash continuation
    got = parse_optimizer(text, source="c.gin", known_classes=KNOWN)
    assert got.scope == "lopt" and got.selector == "HyperV2"


def test_macro_reference_scoped_run_train_and_module_selector():
    text = """
# a comment
from learned_optimization.research.general_lopt import hyper_v2
LOPT = @hyper_v2.HyperV2()
SIZE = %OTHER
OTHER = 7
outer/run_train.lopt = %LOPT
hyper_v2.HyperV2.lstm_hidden_size = %SIZE
HyperV2.inits = [1, %OTHER, {'a': %OTHER}]
HyperV2.fn = @jnp.tanh
"""
    got = parse_optimizer(text, source="c.gin", known_classes=KNOWN)
    assert got.class_name == "HyperV2" and got.scope == "outer"
    assert got.bindings["lstm_hidden_size"] == 7
    assert got.bindings["inits"] == [1, 7, {"a": 7}]
    assert got.bindings["fn"] == GinReference("jnp.tanh", False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("Adam.learning_rate = 0.1\n", r"no 'run_train.lopt = @Name\(\)' binding"),
        ("run_train.lopt = @FancyOpt()\n", "unknown learned optimizer class 'FancyOpt'"),
        ("run_train.lopt = 3\n", "expected a configurable reference"),
        ("run_train.lopt = @HyperV2()\nHyperV2.x = %NOPE\n", "macro %NOPE is used but never defined"),
        ("A = %B\nB = %A\nrun_train.lopt = %A\n", "refers to itself"),
        ("run_train.lopt = @HyperV2(\n", "gin syntax error"),
        ("include 'other.gin'\nrun_train.lopt = @HyperV2()\n", "not supported"),
        ("a/run_train.lopt = @HyperV2()\nb/run_train.lopt = @MLPLOpt()\n", "several scoped"),
    ],
)
def test_bad_configs(text, match):
    with pytest.raises(ConversionError, match=match) as info:
        parse_optimizer(text, source="/x/config.gin", known_classes=KNOWN)
    assert str(info.value).startswith("/x/config.gin: ") and "\n" not in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        load_optimizer_config(tmp_path / "config.gin")
    (tmp_path / "bin.gin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConversionError, match="not UTF-8"):
        load_optimizer_config(tmp_path / "bin.gin")


def test_parse_bindings_for_set_files():
    got = parse_bindings("N = 3\nHyperV2.param_inits = %N\ns/HyperV2.x = 'a'\n", source="u.gin")
    assert got == {"HyperV2": {"param_inits": 3}, "s/HyperV2": {"x": "a"}}


def test_hundreds_of_unrelated_bindings():
    noise = "\n".join(f"Task{i}.arg{j} = {i * j}" for i in range(60) for j in range(10))
    text = noise + "\nrun_train.lopt = @HyperV2()\nHyperV2.param_inits = 3\n" + noise.replace("Task", "Other")
    got = parse_optimizer(text, source="big.gin", known_classes=KNOWN)
    assert got.bindings == {"param_inits": 3}
