"""muLO's pickled meta-training output converts through lopt-convert (allowed globals only) and verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lopt_bridge.converter.commands import main

PICKLE = (
    Path(__file__).parents[1]
    / "parity_tests"
    / "fixtures"
    / "mulo_pylo"
    / "checkpoint"
    / "global_step1.pickle"
)


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    out = tmp_path / "mulo.safetensors"
    args = ["auto", "--source", str(PICKLE), "-o", str(out), "--allow-pickle"]
    args += ["--set", "architecture=mulo", "--set", "hidden_size=32", "--set", "step_mult=0.01"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_pickle_refused_without_flag(tmp_path: Path) -> None:
    out = tmp_path / "mulo.safetensors"
    result = CliRunner().invoke(
        main, ["auto", "--source", str(PICKLE), "-o", str(out), "--set", "architecture=mulo"]
    )
    assert result.exit_code == 2
    assert "--allow-pickle" in result.output and str(PICKLE) in result.output
    assert not out.exists()


def test_mulo_pickle_converts_and_verifies_bit_exactly(converted: Path) -> None:
    from lopt_bridge.pylo_runtime import read_checkpoint

    ckpt = read_checkpoint(converted)
    assert ckpt.architecture == "mulo"
    assert ckpt.metadata["source_format"] == "pickle"
    result = CliRunner().invoke(main, ["verify", str(converted), "--source", str(PICKLE), "--allow-pickle"])
    assert result.exit_code == 0, result.output
