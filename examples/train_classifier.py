"""Train an MLP and a small CNN on scikit-learn's 8x8 digits with the converted Celo and Celo-Adam, AdamW at a
tuned learning rate, and the Celo architecture with random weights; write loss curves and a results table.

    python examples/train_classifier.py          # well under 2 minutes; writes examples/out/classifier/
    python examples/train_classifier.py --out DIR   # or into DIR

Checkpoints: ``--celo`` / ``--celo-adam`` point at files from ``lopt-convert celo`` / ``lopt-convert
celo-adam``; without them the published ``theta.state`` files in ``--weights-dir`` are converted first.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from lopt_bridge.parity_tests.digits import MODELS, load_digits_split
from lopt_bridge.parity_tests.digits import train_torch as train
from lopt_bridge.pylo_runtime import Celo, load_optimizer, read_checkpoint

REPO = Path(__file__).resolve().parent.parent
#: Where results go unless --out says otherwise: examples/out/ is git-ignored.
DEFAULT_OUT = REPO / "examples" / "out" / "classifier"
ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


# ------------------------------------------------------------------------------------------------ training
def random_celo_theta(real: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The Celo architecture with haiku-style random weights: N(0, 1/fan_in) weights, zero biases/state."""
    g = torch.Generator().manual_seed(seed)
    n_ff_inputs = sum(v.shape[-2] for k, v in real.items() if k.startswith("ff.w0."))
    out = {}
    for name, v in real.items():
        if name.startswith("lstm_init") or name.endswith(".b") or name.startswith("ff.b"):
            out[name] = torch.zeros_like(v)
        else:
            fan_in = n_ff_inputs if name.startswith("ff.w0.") else v.shape[-2]
            out[name] = torch.randn(v.shape, generator=g) / fan_in**0.5
    return out


def converted(path: str | None, name: str, weights_dir: Path, out: Path) -> str:
    """The converted checkpoint: ``path`` if given, else convert ``weights_dir/<name>/theta.state``."""
    if path:
        return path
    src = weights_dir / name / "theta.state"
    if not src.is_file():
        raise SystemExit(
            f"{src}: not found; run `lopt-convert {name.replace('_', '-')} -o {name}.safetensors` and pass "
            f"--{name.replace('_', '-')} {name}.safetensors"
        )
    from lopt_bridge.converter.convert import convert_source

    return str(convert_source(str(src), out / f"{name}.safetensors", architecture=name, force=True))


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--celo", help="converted Celo .safetensors (lopt-convert celo)")
    ap.add_argument("--celo-adam", help="converted Celo-Adam .safetensors (lopt-convert celo-adam)")
    ap.add_argument("--weights-dir", type=Path, default=REPO.parent / "shared" / "checkpoints")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fair timing on a busy box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    celo_path = converted(args.celo, "celo", args.weights_dir, args.out)
    celo_adam_path = converted(args.celo_adam, "celo_adam", args.weights_dir, args.out)
    ck = read_checkpoint(celo_path)
    rand_theta = random_celo_theta(ck.tensors, args.seed)
    data = load_digits_split(args.seed)
    kw = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed)

    rows, sweep, curves = [], [], {}
    for model in args.models.split(","):
        # AdamW: pick the lr with the lowest mean training loss over the last 10% of steps (no test data).
        best = None
        for lr in ADAMW_LRS:
            r = train(model, lambda ps, n, lr=lr: torch.optim.AdamW(ps, lr=lr), data, **kw)
            tail = float(np.mean(r["losses"][-max(1, args.steps // 10) :]))
            sweep.append({"model": model, "lr": lr, "final_train_loss_tail": tail, "test_acc": r["test_acc"]})
            if best is None or tail < best[0]:
                best = (tail, lr, r)
        assert best is not None
        runs = {
            "celo": train(model, lambda ps, n: load_optimizer(celo_path, ps, num_steps=n), data, **kw),
            "celo_adam": train(
                model, lambda ps, n: load_optimizer(celo_adam_path, ps, num_steps=n), data, **kw
            ),
            f"adamw (lr={best[1]:g})": best[2],
            "celo_random_weights": train(
                model, lambda ps, n: Celo(ps, rand_theta, ck.config, num_steps=n), data, **kw
            ),
        }
        for opt_name, r in runs.items():
            curves[(model, opt_name)] = r["losses"]
            rows.append(
                {"model": model, "optimizer": opt_name, **{k: v for k, v in r.items() if k != "losses"}}
            )

    write_outputs(args.out, rows, sweep, curves, args)
    print((args.out / "results.md").read_text())
    print(f"total wall time {time.perf_counter() - t0:.1f} s; outputs in {args.out}")


def write_outputs(out: Path, rows: list[dict], sweep: list[dict], curves: dict, args) -> None:
    """results.csv / results.md (final metrics), lr_sweep.csv, loss_curves.png."""
    cols = ["model", "optimizer", "train_loss", "test_loss", "train_acc", "test_acc", "wall_s"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({c: r[c] for c in cols} for r in rows)
    with open(out / "lr_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(sweep[0]))
        w.writeheader()
        w.writerows(sweep)
    lines = [
        f"Digits 8x8, {args.steps} steps, batch {args.batch_size}, seed {args.seed} "
        f"(final losses on the full train / test split)",
        "",
        "| model | optimizer | train loss | test loss | train acc | test acc | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['train_loss']:.4f} | {r['test_loss']:.4f} | "
            f"{r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['wall_s']:.2f} |"
        )
    lines += ["", "AdamW lr sweep (mean train loss, last 10% of steps):", ""]
    lines += [f"- {s['model']} lr={s['lr']:g}: {s['final_train_loss_tail']:.4f}" for s in sweep]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in curves}, key=lambda m: list(MODELS).index(m))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for (m, name), losses in curves.items():
            if m == model:
                k = 10
                smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
                ax.plot(np.arange(k - 1, len(losses)), smooth, label=name)
        ax.set_yscale("log")
        ax.set_title(f"digits 8x8: {model}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (10-step mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
