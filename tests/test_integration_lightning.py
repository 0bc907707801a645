"""PyTorch Lightning (issue #14): automatic optimization (Lightning calls ``optimizer.step(closure)``), with
and without gradient accumulation, manual optimization, and fp16 with a GradScaler, each against the
hand-written loop (tests.integration_support.hand_loop) bit for bit where the arithmetic is the same.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from lopt_bridge import pylo_runtime
from lopt_bridge.parity_tests.fixture import repo_root
from tests.integration_support import (
    classification_batches,
    flat,
    hand_loop,
    mlp,
    optimizer_files,
    record_step_losses,
    require,
)

#: Lightning's own deprecation notice (its pytree helper), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
BATCHES = classification_batches(6, 8)
DATASET = torch.utils.data.TensorDataset(*(torch.cat(part) for part in zip(*BATCHES, strict=True)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return optimizer_files(tmp_path_factory.mktemp("optimizers"))


def _module(path, *, manual: bool = False, record: bool = True):
    lightning = require("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = not manual
            self.net = mlp(0)
            self.fed: list[float] = []

        def configure_optimizers(self):
            opt = pylo_runtime.load_optimizer(str(path), self.parameters(), num_steps=100)
            self.fed = record_step_losses(opt)
            return opt

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            if record:
                pylo_runtime.set_loss(self.optimizers(), loss)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

    return Module()


def _fit(module, *, accumulate: int = 1, **trainer_options):
    lightning = require("lightning")
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, torch.utils.data.DataLoader(DATASET, batch_size=8, shuffle=False))
    return flat(module.net), trainer


@pytest.mark.parametrize("family", ["velo", "celo"])
def test_automatic_optimization_uses_the_closure_loss(files, family):
    # No set_loss line at all: Lightning's closure returns the batch loss, which step() reads.
    module = _module(files[family], record=False)
    got, _ = _fit(module)
    want, _ = hand_loop(files[family], BATCHES, 1)
    assert torch.equal(got, want) and len(module.fed) == 6


@pytest.mark.parametrize("family", ["velo", "celo"])
def test_automatic_optimization_with_accumulation_and_set_loss(files, family):
    module = _module(files[family])
    got, _ = _fit(module, accumulate=2)
    want, opt = hand_loop(files[family], BATCHES, 2)
    assert torch.equal(got, want)  # one step per 2 batches, with the mean of their losses
    assert len(module.fed) == 3 and int(module.optimizers().optimizer.state["global"]["iteration"]) == 3


def test_accumulation_without_set_loss_is_refused(files):
    # The closure alone would give the last batch's loss / 2: refused, pointing at the fix.
    module = _module(files["celo"], record=False)
    with pytest.raises(ValueError, match=r"accumulates 2 batches .* lopt_bridge.set_loss\(self.optimizers"):
        _fit(module, accumulate=2)


@pytest.mark.parametrize("family", ["velo", "celo"])
def test_manual_optimization(files, family):
    module = _module(files[family], manual=True)
    got, _ = _fit(module)
    want, _ = hand_loop(files[family], BATCHES, 1)
    assert torch.equal(got, want) and len(module.fed) == 6


def test_fp16_grad_scaler_feeds_the_unscaled_loss(files):
    lightning = require("lightning")
    from lightning.pytorch.plugins import MixedPrecision

    # Lightning swaps 16-mixed for bf16 on the CPU; the plugin given directly keeps fp16 and its GradScaler,
    # which then steps our optimizer without the closure: only set_loss can carry the loss there.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    module = _module(files["celo"])
    losses = []
    original = module.training_step

    def training_step(batch, batch_idx):
        loss = original(batch, batch_idx)
        losses.append(float(loss.detach()))
        return loss

    module.training_step = training_step
    got, _ = _fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert lightning is not None and torch.isfinite(got).all()
    assert module.fed == losses  # unscaled (not x 1024), one per step
    assert int(module.optimizers().optimizer.state["global"]["iteration"]) == 6


def test_example_runs(files):
    require("lightning")
    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import lightning_train
    finally:
        sys.path.pop(0)
    out = lightning_train.main(
        ["--optimizer", str(files["celo"]), "--epochs", "1", "--examples", "64", "--accumulate", "2"]
    )
    assert len(out["losses"]) == 2 and int(out["trainer"].global_step) == 1
