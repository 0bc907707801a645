"""Train a tiny GPT-2 (from GPT2Config, no download) with the Hugging Face Trainer and a learned optimizer.

    lopt-convert celo                         # -> checkpoints/celo.safetensors
    python examples/hf_trainer_gpt2.py --max-steps 60 --grad-accum 2

The Trainer calls ``optimizer.step()`` with no argument and computes the loss inside ``training_step``; one
line, ``pylo_runtime.integrations.hf_trainer.attach(trainer)``, hands the optimizer each update's loss (the
sum of the micro-batch shares, the number the Trainer logs) and sets ``num_steps`` from the Trainer's
schedule (``max_steps``, or epochs x updates per epoch). ``lr_scheduler_type="constant"``: lr multiplies the
learned step, so a decaying schedule would shrink it; ``max_grad_norm=0``: the learned optimizer gets the raw
gradients, as it was meta-trained. See docs/integrations.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from lopt_bridge import pylo_runtime
from lopt_bridge.pylo_runtime.integrations.hf_trainer import attach

REPO = Path(__file__).resolve().parent.parent


class RepeatingSequences(torch.utils.data.Dataset):
    """Token sequences that repeat a random 4-token motif: learnable by a tiny causal LM (no download)."""

    def __init__(self, n: int, length: int = 16, vocab: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab, (n, 4), generator=g)
        self.ids = motifs.repeat(1, length // 4)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(vocab: int = 32, length: int = 16) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", default=str(REPO / "checkpoints" / "celo.safetensors"))
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not Path(args.optimizer).is_file():
        raise SystemExit(f"{args.optimizer}: not found; run `lopt-convert celo`, or pass --optimizer FILE")
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    model = tiny_gpt2()
    # num_steps here is a placeholder: attach() sets it from the Trainer's schedule before the first step.
    optimizer = pylo_runtime.load_optimizer(args.optimizer, model.parameters(), num_steps=args.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.out or tmp,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            logging_steps=max(1, args.max_steps // 6),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=RepeatingSequences(args.examples, seed=args.seed),
            optimizers=(optimizer, None),
        )
        attach(trainer)  # the one line: loss and num_steps for the learned optimizer
        trainer.train()
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print("step / logged training loss: " + ", ".join(f"{s}: {v:.3f}" for s, v in logged))
    return {"logged": logged, "optimizer": optimizer, "trainer": trainer}


if __name__ == "__main__":
    main()
