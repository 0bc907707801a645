"""Train a small MLP with Hugging Face Accelerate and a learned optimizer (Celo, VeLO, any converted file).

    lopt-convert celo                         # -> checkpoints/celo.safetensors
    python examples/accelerate_train.py --grad-accum 2 --mixed-precision bf16

The learned optimizer needs the training loss at every step; Accelerate's prepared optimizer calls
``step()`` with no argument, so the loop adds one line after ``accelerator.backward(loss)``:
``pylo_runtime.set_loss(optimizer, loss)``. With ``gradient_accumulation_steps=k`` the optimizer steps once
per k micro-batches and uses the mean of their k losses (as the gradients are averaged); under fp16 the
GradScaler skips steps with inf gradients before the optimizer sees them. See docs/integrations.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from lopt_bridge import pylo_runtime

REPO = Path(__file__).resolve().parent.parent


def synthetic_classification(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``n`` points in 16-D, 4 classes given by a fixed random linear map (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ w).argmax(dim=1))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def optimizer_file(path: str) -> str:
    if not Path(path).is_file():
        raise SystemExit(f"{path}: not found; run `lopt-convert celo`, or pass --optimizer FILE")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", default=str(REPO / "checkpoints" / "celo.safetensors"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from accelerate import Accelerator

    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision
    )
    torch.manual_seed(args.seed)
    model = mlp()
    loader = torch.utils.data.DataLoader(
        synthetic_classification(args.examples, args.seed), batch_size=args.batch_size, shuffle=True
    )
    # One optimizer step per `grad_accum` batches (and one for a shorter last group): tell it how many.
    updates = args.epochs * math.ceil(len(loader) / args.grad_accum)
    optimizer = pylo_runtime.load_optimizer(
        optimizer_file(args.optimizer), model.parameters(), num_steps=updates
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    for _ in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                pylo_runtime.set_loss(optimizer, loss)  # the loss for the learned optimizer's next step
                optimizer.step()  # a no-op until the last micro-batch of the group
                optimizer.zero_grad()
            losses.append(loss.item())
    k = max(1, len(loader) // 4)
    print(
        f"{type(optimizer.optimizer).__name__}: {updates} updates, mean loss of the first / last {k} batches "
        f"{sum(losses[:k]) / k:.4f} / {sum(losses[-k:]) / k:.4f}"
    )
    return {"losses": losses, "updates": updates, "optimizer": optimizer}


if __name__ == "__main__":
    main()
