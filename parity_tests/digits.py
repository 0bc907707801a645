"""A real task for closed-loop checks and the example: scikit-learn's bundled 8x8 digits (no network).

Data split, initial weights and minibatch order come from numpy seeds here, so the JAX reference and the
PyTorch run see the same model, initialisation and batches. Models: an MLP (64-64-10) and a small CNN.
torch is imported only inside the torch-side functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

N_CLASSES = 10


@dataclass
class Digits:
    """Train/test split of the 1797 digits; pixels scaled to [0, 1], float32, images (N, 1, 8, 8)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, n_test: int = 360) -> Digits:
    """The digits, shuffled with ``seed``; the last ``n_test`` are the test set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng([seed, 17]).permutation(len(y))
    x, y = x[order], y[order]
    return Digits(x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:])


def batch_indices(seed: int, steps: int, batch_size: int, n: int) -> np.ndarray:
    """(steps, batch_size) training indices: epochs of permutations, drawn from ``seed``."""
    rng = np.random.default_rng([seed, 29])
    out: list[np.ndarray] = []
    need = steps * batch_size
    while sum(len(o) for o in out) < need:
        out.append(rng.permutation(n))
    return np.concatenate(out)[:need].reshape(steps, batch_size)


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def init_mlp(seed: int, hidden: int = 64) -> dict[str, np.ndarray]:
    """MLP 64 -> hidden -> 10 (ReLU); weights ``(in, out)``, He-normal, zero biases."""
    rng = np.random.default_rng([seed, 31])
    return {
        "w1": _he(rng, (64, hidden), 64),
        "b1": np.zeros(hidden, np.float32),
        "w2": _he(rng, (hidden, N_CLASSES), hidden),
        "b2": np.zeros(N_CLASSES, np.float32),
    }


def init_cnn(seed: int) -> dict[str, np.ndarray]:
    """CNN: conv3x3(1->8, pad 1) ReLU, conv3x3(8->16, stride 2, pad 1) ReLU, linear(16*4*4 -> 10); OIHW."""
    rng = np.random.default_rng([seed, 37])
    return {
        "c1": _he(rng, (8, 1, 3, 3), 9),
        "c1b": np.zeros(8, np.float32),
        "c2": _he(rng, (16, 8, 3, 3), 72),
        "c2b": np.zeros(16, np.float32),
        "fc": _he(rng, (256, N_CLASSES), 256),
        "fcb": np.zeros(N_CLASSES, np.float32),
    }


# ------------------------------------------------------------------------------------------------ torch side
def mlp_forward(p: dict[str, Any], x: Any) -> Any:
    """Logits of the MLP (torch tensors)."""
    import torch

    h = torch.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def cnn_forward(p: dict[str, Any], x: Any) -> Any:
    """Logits of the CNN (torch tensors, NCHW)."""
    import torch
    import torch.nn.functional as F

    h = torch.relu(F.conv2d(x, p["c1"], p["c1b"], padding=1))
    h = torch.relu(F.conv2d(h, p["c2"], p["c2b"], stride=2, padding=1))
    return h.reshape(x.shape[0], -1) @ p["fc"] + p["fcb"]


MODELS: dict[str, tuple[Callable, Callable]] = {
    "mlp": (mlp_forward, init_mlp),
    "cnn": (cnn_forward, init_cnn),
}


def train_torch(
    model: str, make_opt: Callable, data: Digits, *, steps: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """Train ``model`` from the seeded init on the seeded batches with ``make_opt(params, steps)``.

    Learned optimizers get ``step(loss=...)``; returns the per-step training losses (float32 values), the
    wall time of the loop and final loss / accuracy on the train and test sets.
    """
    import torch
    import torch.nn.functional as F

    from lopt_bridge.pylo_runtime import LearnedOptimizer

    forward, init = MODELS[model]
    params = {k: torch.tensor(v, requires_grad=True) for k, v in init(seed).items()}
    opt = make_opt(list(params.values()), steps)
    x_tr, y_tr = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    idx = torch.from_numpy(batch_indices(seed, steps, batch_size, len(y_tr)))
    losses = []
    start = time.perf_counter()
    for t in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(forward(params, x_tr[idx[t]]), y_tr[idx[t]])
        loss.backward()
        if isinstance(opt, LearnedOptimizer):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        losses.append(loss.detach())
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"losses": torch.stack(losses).numpy(), "wall_s": wall}
    with torch.no_grad():
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            logits = forward(params, torch.from_numpy(x))
            y_t = torch.from_numpy(y)
            out[f"{split}_loss"] = float(F.cross_entropy(logits, y_t))
            out[f"{split}_acc"] = float((logits.argmax(-1) == y_t).float().mean())
    return out
