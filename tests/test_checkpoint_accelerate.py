"""Hugging Face Accelerate's ``save_state`` / ``load_state`` with a prepared learned optimizer (CPU, one
process).

Accelerate saves ``optimizer.state_dict()`` with ``torch.save`` and loads it with
``torch.load(weights_only=True)`` into the prepared optimizer's ``load_state_dict``. Resuming must equal the
uninterrupted run bit for bit, with and without gradient accumulation.
"""

from __future__ import annotations

import pytest
import torch

from lopt_bridge import pylo_runtime
from tests.integration_support import classification_batches, flat, mlp, optimizer_files, require

BATCHES = classification_batches(6, 8)
SAVE_AT = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return optimizer_files(tmp_path_factory.mktemp("optimizers"))


def _prepared(path, seed: int, k: int):
    accelerate = require("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # Accelerator is a process-wide singleton: start each run afresh
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=k)
    model = mlp(seed)
    opt = pylo_runtime.load_optimizer(str(path), model.parameters(), num_steps=100)
    model, prepared = accelerator.prepare(model, opt)
    return accelerator, model, prepared, opt


def _train(accelerator, model, prepared, batches) -> None:
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            pylo_runtime.set_loss(prepared, loss)
            prepared.step()
            prepared.zero_grad()


@pytest.mark.parametrize("family", ["velo", "celo"])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
def test_accelerate_save_state_load_state_resumes_exactly(files, tmp_path, family, k):
    accelerator, model, prepared, _ = _prepared(files[family], 0, k)
    _train(accelerator, model, prepared, BATCHES)
    want = flat(model)

    accelerator, model, prepared, _ = _prepared(files[family], 0, k)
    _train(accelerator, model, prepared, BATCHES[:SAVE_AT])  # a whole number of updates (k = 1 or 3)
    accelerator.save_state(str(tmp_path / "state"))
    assert (tmp_path / "state" / "optimizer.bin").is_file()

    accelerator, model, prepared, opt = _prepared(files[family], 1, k)  # other weights, no optimizer state
    assert not torch.equal(flat(model), flat(mlp(0)))
    accelerator.load_state(str(tmp_path / "state"))
    assert int(opt.state["global"]["iteration"]) == SAVE_AT // k
    _train(accelerator, model, prepared, BATCHES[SAVE_AT:])
    assert torch.equal(flat(model), want)
    assert int(opt.state["global"]["iteration"]) == len(BATCHES) // k
