"""Train a small MLP with PyTorch Lightning and a learned optimizer (Celo, VeLO, ... any converted file).

    lopt-convert celo                         # -> checkpoints/celo.safetensors
    python examples/lightning_train.py --accumulate 2
    python examples/lightning_train.py --manual

``training_step`` hands the loss to the optimizer with ``pylo_runtime.set_loss(self.optimizers(), loss)``:
under automatic optimization Lightning steps with a closure whose value would also do when nothing is
accumulated, but with ``accumulate_grad_batches=k`` that value is only the last batch's loss / k (the step
refuses it), and under fp16 the GradScaler steps without the closure. ``configure_optimizers`` tells the
optimizer the number of updates, ``self.trainer.estimated_stepping_batches``. See docs/integrations.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lopt_bridge import pylo_runtime

REPO = Path(__file__).resolve().parent.parent


def _lightning_module_class() -> type:
    import lightning

    class Classifier(lightning.LightningModule):
        def __init__(self, optimizer_path: str, manual: bool = False) -> None:
            super().__init__()
            self.optimizer_path = optimizer_path
            self.automatic_optimization = not manual
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
            self.losses: list[float] = []

        def configure_optimizers(self) -> Any:
            return pylo_runtime.load_optimizer(
                self.optimizer_path,
                self.parameters(),
                num_steps=int(self.trainer.estimated_stepping_batches),  # optimizer updates, not batches
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            pylo_runtime.set_loss(self.optimizers(), loss)  # the loss for the learned optimizer's step
            self.losses.append(loss.item())
            if not self.automatic_optimization:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

    return Classifier


def synthetic_classification(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``n`` points in 16-D, 4 classes given by a fixed random linear map (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ w).argmax(dim=1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", default=str(REPO / "checkpoints" / "celo.safetensors"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, ...")
    ap.add_argument("--manual", action="store_true", help="manual optimization")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path(args.optimizer).is_file():
        raise SystemExit(f"{args.optimizer}: not found; run `lopt-convert celo`, or pass --optimizer FILE")
    import lightning

    lightning.seed_everything(args.seed, verbose=False)
    module = _lightning_module_class()(args.optimizer, manual=args.manual)
    loader = torch.utils.data.DataLoader(
        synthetic_classification(args.examples, args.seed), batch_size=args.batch_size, shuffle=True
    )
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        accumulate_grad_batches=1 if args.manual else args.accumulate,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    k = max(1, len(loader) // 4)
    losses = module.losses
    print(f"mean loss of the first / last {k} batches {sum(losses[:k]) / k:.4f} / {sum(losses[-k:]) / k:.4f}")
    return {"losses": losses, "module": module, "trainer": trainer}


if __name__ == "__main__":
    main()
