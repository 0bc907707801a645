"""Hugging Face Accelerate (issue #14): ``accelerator.prepare``, ``accelerator.backward`` and stepping through
the ``AcceleratedOptimizer`` (whose ``step(closure=None)`` takes no ``loss=``), with ``set_loss`` feeding the
loss. Each run is compared bit for bit with the hand-written loop (tests.integration_support.hand_loop).
"""

from __future__ import annotations

import pytest
import torch

from lopt_bridge import pylo_runtime
from tests.integration_support import classification_batches, flat, hand_loop, mlp, optimizer_files, require

BATCHES = classification_batches(6, 8)
DATASET = torch.utils.data.TensorDataset(*(torch.cat(part) for part in zip(*BATCHES, strict=True)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return optimizer_files(tmp_path_factory.mktemp("optimizers"))


def _accelerate_run(path, k: int, *, mixed_precision: str = "no", scaler=None, poison_update=None):
    """The loop of examples/accelerate_train.py on BATCHES (no shuffle); returns (params, optimizer, log)."""
    accelerate = require("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # Accelerator is a process-wide singleton: start each run afresh
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=k, mixed_precision=mixed_precision)
    if scaler is not None:
        # Accelerate makes its fp16 GradScaler only off the CPU; the optimizer-side path (AcceleratedOptimizer
        # -> GradScaler.step -> our step()) is the same, so give it one here.
        accelerator.scaler = scaler
    model = mlp(0)
    opt = pylo_runtime.load_optimizer(str(path), model.parameters(), num_steps=100)
    loader = torch.utils.data.DataLoader(DATASET, batch_size=8, shuffle=False)
    model, prepared, loader = accelerator.prepare(model, opt, loader)
    log = {"iterations": [], "skipped": []}
    update = 0
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            pylo_runtime.set_loss(prepared, loss)
            if accelerator.sync_gradients:
                if update == poison_update:
                    next(model.parameters()).grad[0, 0] = float("inf")
                update += 1
            prepared.step()
            prepared.zero_grad()
            if accelerator.sync_gradients:
                log["iterations"].append(int(opt.state["global"]["iteration"]))
                log["skipped"].append(bool(accelerator.optimizer_step_was_skipped))
    return flat(model), opt, log


@pytest.mark.parametrize("family", ["velo", "celo"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_accelerate_steps_once_per_update_with_the_mean_loss(files, family, k):
    got, opt, log = _accelerate_run(files[family], k)
    want, _ = hand_loop(files[family], BATCHES, k)
    assert torch.equal(got, want)  # the loss fed is the mean over the k micro-batches, like the gradients
    assert log["iterations"] == list(range(1, 6 // k + 1))  # one optimizer step per update, not per batch
    assert not torch.equal(got, flat(mlp(0)))  # it did train


def test_prepared_optimizer_takes_no_loss_keyword(files):
    # Why set_loss exists: AcceleratedOptimizer.step(closure=None) has no loss= (the TypeError).
    accelerate = require("accelerate")
    model = mlp(0)
    opt = pylo_runtime.load_optimizer(str(files["velo"]), model.parameters(), num_steps=10)
    _, prepared = accelerate.Accelerator().prepare(model, opt)
    with pytest.raises(TypeError):
        prepared.step(loss=1.0)
    with pytest.raises(ValueError, match=r"needs the training loss: call lopt_bridge.set_loss"):
        torch.nn.functional.cross_entropy(model(BATCHES[0][0]), BATCHES[0][1]).backward()
        prepared.step()


@pytest.mark.parametrize("family", ["velo", "celo"])
def test_accelerate_grad_scaler_path_is_exact_and_skips_inf(files, family):
    # Power-of-two scaling is exact in backward and unscale_: the same parameters as without a scaler.
    got, _, log = _accelerate_run(files[family], 2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    want, _ = hand_loop(files[family], BATCHES, 2)
    assert torch.equal(got, want) and log["skipped"] == [False] * 3
    # An inf gradient in update 1: GradScaler skips it before our step (the optimizer never sees it).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got, opt, log = _accelerate_run(files[family], 2, scaler=scaler, poison_update=1)
    assert log["skipped"] == [False, True, False] and log["iterations"] == [1, 1, 2]
    assert scaler.get_scale() == 2.0**9 and opt.skipped_steps == 0
    assert torch.isfinite(got).all()
    # The losses recorded for the skipped update stay for the next step (losses at the same parameters,
    # since nothing moved): the next step averages all four. That is hand_loop on batches 0-1, then 2-5 as
    # one update whose gradient is only that of batches 4-5 (the skipped gradients were zeroed).
    model = mlp(0)
    ref = pylo_runtime.load_optimizer(str(files[family]), model.parameters(), num_steps=100)
    losses = []
    for i, (x, y) in enumerate(BATCHES):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i not in (2, 3):
            (loss / 2).backward()
        losses.append(loss.detach())
        if i in (1, 5):
            total = losses[0]
            for extra in losses[1:]:
                total = total + extra
            ref.step(loss=total / len(losses))
            ref.zero_grad()
            losses = []
    assert torch.equal(got, flat(model))


def test_accelerate_bf16_matches_autocast_hand_loop(files):
    got, _, log = _accelerate_run(files["celo"], 2, mixed_precision="bf16")
    want, _ = hand_loop(files["celo"], BATCHES, 2, autocast=torch.bfloat16)
    assert torch.equal(got, want) and log["iterations"] == [1, 2, 3]
    plain, _ = hand_loop(files["celo"], BATCHES, 2)
    assert not torch.equal(got, plain)  # bf16 autocast really was on


def test_example_runs(files):
    require("accelerate")
    import sys

    from lopt_bridge.parity_tests.fixture import repo_root

    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import accelerate_train
    finally:
        sys.path.pop(0)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = accelerate_train.main(
        ["--optimizer", str(files["celo"]), "--epochs", "1", "--examples", "96", "--grad-accum", "2"]
    )
    assert out["updates"] == 2 and int(out["optimizer"].state["global"]["iteration"]) == 2
