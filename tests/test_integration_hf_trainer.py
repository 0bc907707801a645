"""Hugging Face ``transformers.Trainer`` (issue #14): a tiny 2-layer GPT-2 built from ``GPT2Config`` (no
download) trained with VeLO and Celo through ``Trainer(..., optimizers=(opt, None))`` and the one line
``attach(trainer)``: one optimizer step per update, the loss it reads is the update's loss the Trainer logs,
and ``num_steps`` comes from the Trainer's schedule (``max_steps``, or epochs with gradient accumulation).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from lopt_bridge import pylo_runtime
from lopt_bridge.parity_tests.fixture import repo_root
from tests.integration_support import optimizer_files, record_step_losses, require


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return optimizer_files(tmp_path_factory.mktemp("optimizers"))


@pytest.fixture(scope="module")
def example():
    require("transformers")
    sys.path.insert(0, str(repo_root() / "examples"))
    try:
        import hf_trainer_gpt2
    finally:
        sys.path.pop(0)
    return hf_trainer_gpt2


def _trainer(example, path, tmp_path, *, max_steps=-1, epochs=1.0, grad_accum=2, examples=32, **extra):
    transformers = require("transformers")
    transformers.set_seed(0)
    model = example.tiny_gpt2()
    opt = pylo_runtime.load_optimizer(str(path), model.parameters(), num_steps=1000)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        num_train_epochs=epochs,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type=extra.pop("lr_scheduler_type", "constant"),
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=example.RepeatingSequences(examples),
        optimizers=(opt, None),
    )
    return trainer, opt


@pytest.mark.parametrize("family", ["velo", "celo"])
def test_trainer_feeds_the_update_loss_and_num_steps(example, files, tmp_path, family):
    from lopt_bridge.pylo_runtime.integrations.hf_trainer import attach

    trainer, opt = _trainer(example, files[family], tmp_path, max_steps=4, grad_accum=2)
    fed = record_step_losses(opt)
    with pytest.warns(UserWarning, match="num_steps 1000 -> 4, the number of optimizer updates"):
        attach(trainer)
        trainer.train()
    assert opt.num_steps == 4  # from max_steps, before the first step
    assert int(opt.state["global"]["iteration"]) == 4  # one step per update of 2 micro-batches
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(fed) == len(logged) == 4
    # The Trainer logs the sum of the micro-batch shares of each update; the optimizer read the same number.
    assert fed == pytest.approx(logged, rel=1e-4, abs=1e-4)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_epochs_with_a_short_last_update(example, files, tmp_path):
    from lopt_bridge.pylo_runtime.integrations.hf_trainer import attach

    # 20 examples / batch 4 = 5 batches, accumulate 2: updates of 2, 2 and 1 batches, twice (2 epochs).
    trainer, opt = _trainer(example, files["celo"], tmp_path, epochs=2, grad_accum=2, examples=20)
    fed = record_step_losses(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attach(trainer)
        trainer.train()
    assert opt.num_steps == 6 and int(opt.state["global"]["iteration"]) == 6
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert fed == pytest.approx(logged, rel=1e-4, abs=1e-4)


def test_attach_needs_the_optimizer_and_warns_about_a_decaying_schedule(example, files, tmp_path):
    from lopt_bridge.pylo_runtime.integrations.hf_trainer import attach

    transformers = require("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    bare = transformers.Trainer(model=example.tiny_gpt2(), args=args)
    with pytest.raises(ValueError, match=r"optimizers=\(pylo_optimizer, scheduler\)"):
        attach(bare)
    trainer, _ = _trainer(example, files["velo"], tmp_path, max_steps=2, lr_scheduler_type="linear")
    with pytest.warns(UserWarning, match="'linear' schedule on lr, which here multiplies the learned step"):
        attach(trainer)
    assert attach(trainer) is trainer  # a second call changes nothing


def test_without_attach_the_step_asks_for_the_loss(example, files, tmp_path):
    trainer, _ = _trainer(example, files["velo"], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="needs the training loss"):
        trainer.train()


def test_example_runs(example, files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = example.main(["--optimizer", str(files["celo"]), "--max-steps", "3", "--examples", "32"])
    assert [s for s, _ in out["logged"]] == [1, 2, 3]
    assert int(out["optimizer"].state["global"]["iteration"]) == 3
