"""Both VeLO code paths (the reference single-tensor path and the batched path) replay every committed VeLO
parity fixture within the float32 acceptance bound.

The generic fixture test (test_parity_fixtures.py) replays with the default dispatch; this one pins each of
our two paths (``fused=False``), so neither can drift from the reference unnoticed. Tolerance: 1e-5 max over
steps and tensors of the relative update error with one ulp of the result allowed (issue 3, compare.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lopt_bridge.parity_tests.commands import DEFAULT_FIXTURES
from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE
from lopt_bridge.parity_tests.fixture import discover, load_fixture, repo_root
from lopt_bridge.parity_tests.replay import convert_fixture, replay

#: learned_optimization's HyperV2 recordings and amoudgl/celo's (VeLO-S / velo_4000: ff_mult).
VELO_FIXTURES = [
    p for p in discover(repo_root() / DEFAULT_FIXTURES) if load_fixture(p).meta["architecture"] == "velo"
]


def test_velo_fixtures_are_committed():
    assert any(load_fixture(p).meta["options"].get("form") == "lo_no_config" for p in VELO_FIXTURES)
    ff_mults = {load_fixture(p).meta["convert_sets"].get("ff_mult") for p in VELO_FIXTURES}
    assert {1.0, 100.0} <= ff_mults  # celo's VeLO-S (1) and velo_4000 (100) configurations


def _factory(fx, params, ckpt, *, foreach):
    from lopt_bridge.pylo_runtime import VeLO

    return VeLO.from_checkpoint(
        str(ckpt), params, num_steps=int(fx.meta["num_steps"]), foreach=foreach, fused=False
    )


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "multi_tensor"])
@pytest.mark.parametrize("path", VELO_FIXTURES, ids=[p.name for p in VELO_FIXTURES])
def test_velo_paths_replay_fixture(path, foreach, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a shared CI box
    try:
        fx = load_fixture(path)
        ckpt = convert_fixture(fx, tmp_path)
        errors, _ = replay(fx, ckpt, factory=functools.partial(_factory, foreach=foreach))
    finally:
        torch.set_num_threads(n)
    assert errors.shape == (fx.steps, len(fx.names))
    worst = np.unravel_index(np.argmax(errors), errors.shape)
    assert errors.max() <= FLOAT32_TOLERANCE, (float(errors.max()), int(worst[0]), fx.names[worst[1]])
