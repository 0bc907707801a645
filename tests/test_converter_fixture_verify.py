"""Every committed parity fixture's checkpoint (made by the reference code) converts and verifies bit for bit.

This covers each family's source format, including 0-d theta leaves (small_fc_lopt's separate scalar
weights) that must keep their shape through the writer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lopt_bridge.converter.convert import verify
from lopt_bridge.parity_tests.fixture import load_fixture
from lopt_bridge.parity_tests.replay import convert_fixture

FIXTURES = sorted((Path(__file__).parents[1] / "parity_tests" / "fixtures").glob("*/meta.json"))


@pytest.mark.parametrize("meta", FIXTURES, ids=[m.parent.name for m in FIXTURES])
def test_fixture_checkpoint_converts_and_verifies(meta: Path, tmp_path: Path) -> None:
    fx = load_fixture(meta.parent)
    src = fx.source_path()
    if not src.exists():
        pytest.skip(f"{src} is absent (published weights live in ../shared/checkpoints)")
    out = convert_fixture(fx, tmp_path)
    summary = verify(out, str(src), allow_pickle=fx.meta.get("source_format") == "pickle")
    assert summary, "verify returned an empty summary"
