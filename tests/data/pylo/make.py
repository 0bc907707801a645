"""PyLO-format files made by PyLO's own classes, and PyLO's naive optimizers recorded on them.

For each of PyLO's published formats (``Pauljanson002/VeLO_RNN`` + ``Pauljanson002/VeLO_MLP``,
``btherien/mulo``, ``DiamondXL/celo2``) this builds PyLO's model class with seeded random weights, writes it
with PyLO's own ``save_pretrained`` (huggingface_hub ``PyTorchModelHubMixin``: ``model.safetensors``,
``config.json``, ``README.md``), loads it back through PyLO's naive optimizer (``from_pretrained`` of the
local folder, as PyLO loads the hub repo) and records that optimizer on the synthetic task's ``pylo`` shape
set (parity_tests/tasks.py: no 0-d or tied tensors, which PyLO is known to get wrong). Each folder then holds
a parity fixture (``meta.json`` + ``trajectory.npz``, parity_tests/fixture.py's layout) whose "reference" is
PyLO, and ``provenance.json`` beside every model folder.

Needs PyLO importable (Belilovsky-Lab/pylo at d05c6c1; not installed: its CUDA extensions are opt-in and not
needed, pylo.optim falls back to its naive optimizers with a warning) and this repository (for the task)::

    python3 -m venv /work/venvs/pylo
    /work/venvs/pylo/bin/pip install torch==2.13.0 torchvision==0.28.0 huggingface_hub safetensors==0.4.5 \\
        mup==1.0.0 numpy            # torch first: mup pulls torchvision, which must not pull another torch
    PYTHONPATH=$REPO:$PYLO_SRC /work/venvs/pylo/bin/python tests/data/pylo/make.py [velo] [mulo] [celo2]

The recordings are bit-reproducible on one machine (run it twice and compare). crosscheck.py (JAX side)
measures how far each PyLO update is from the JAX reference given the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lopt_bridge.parity_tests.tasks import Task  # noqa: E402

PYLO_REPO = "Belilovsky-Lab/pylo"
PYLO_COMMIT = "d05c6c1e4f4d7c46a91828a0826c2699bfe48211"
SEED = 0
STEPS = 40
NUM_STEPS = 100
PACKAGES = ("torch", "huggingface_hub", "safetensors", "mup", "numpy")
#: The VeLO file's step-size head: one-signed with this sign (the one with which this random optimizer
#: descends), then times this scale (steps thousands of ulps of the parameters, loss still falling).
VELO_STEP_SIGN = -1.0
VELO_STEP_SCALE = 1.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packages() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def save_model(model: torch.nn.Module, folder: Path, how: str) -> dict[str, Any]:
    """PyLO's ``save_pretrained`` into ``folder`` (replaced), plus its provenance.json; returns the latter."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder))
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    prov = {
        "made_by": f"{type(model).__module__}.{type(model).__name__}(...).save_pretrained (PyLO's own code)",
        "pylo": {"repo": PYLO_REPO, "commit": PYLO_COMMIT},
        "weights": how,
        "seed": SEED,
        "script": "tests/data/pylo/make.py",
        "script_sha256": sha256(Path(__file__)),
        "command": "PYTHONPATH=$REPO:$PYLO_SRC python tests/data/pylo/make.py",
        "files_sha256": files,
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        "packages": packages(),
        "platform": platform.platform(),
    }
    (folder / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return prov


def record(
    out: Path,
    task: Task,
    make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    loss_tensor: bool,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Run PyLO's optimizer for STEPS steps on ``task`` (numpy gradients, as the JAX recorder feeds them)."""
    names = task.names
    p0 = task.init_params()
    params = [torch.nn.Parameter(torch.tensor(p0[n])) for n in names]
    opt = make_opt(params)
    hist: dict[str, list[np.ndarray]] = {n: [p0[n]] for n in names}
    grads: dict[str, list[np.ndarray]] = {n: [] for n in names}
    losses: list[float] = []
    for t in range(STEPS):
        before = {n: p.detach().numpy().copy() for n, p in zip(names, params, strict=True)}
        loss, g = task.loss_and_grads(before, t)
        for n, p in zip(names, params, strict=True):
            p.grad = torch.tensor(g[n])
            grads[n].append(g[n])
        loss32 = np.float32(loss)
        if loss_tensor:
            opt.step(torch.tensor(loss32))
        else:
            opt.step(loss=float(loss32))
        for n, p in zip(names, params, strict=True):
            hist[n].append(p.detach().numpy().copy())
        losses.append(float(loss32))
    arrays: dict[str, np.ndarray] = {"loss": np.asarray(losses, dtype=np.float32)}
    for n in names:
        arrays[f"params.{n}"] = np.stack(hist[n]).astype(np.float32)
        arrays[f"grads.{n}"] = np.stack(grads[n]).astype(np.float32)
        if not np.all(np.isfinite(arrays[f"params.{n}"])):
            raise RuntimeError(f"{out.name}: PyLO's trajectory of {n} is not finite")
    return arrays, losses


def write_fixture(
    out: Path,
    task: Task,
    arrays: dict[str, np.ndarray],
    losses: list[float],
    *,
    architecture: str,
    sources: dict[str, str],
    options: dict[str, Any],
    optimizer: str,
    model_provenance: dict[str, Any],
) -> None:
    """meta.json + trajectory.npz in parity_tests/fixture.py's layout (PyLO in the reference's place)."""
    np.savez_compressed(out / "trajectory.npz", **arrays)
    first = next(iter(sources.values()))
    meta = {
        "fixture_version": 1,
        "case": f"pylo_{out.name}",
        "family": "pylo",
        "architecture": architecture,
        "source": first,
        "sources": sources,
        "source_base": "fixture",
        "source_format": "pylo",
        "sources_sha256": {
            k: {p.name: sha256(p) for p in sorted((out / v).iterdir()) if p.name != "provenance.json"}
            for k, v in sources.items()
        },
        "convert_sets": {},
        "options": options,
        "seed": SEED,
        "steps": STEPS,
        "num_steps": NUM_STEPS,
        "shapes": task.shape_set,
        "init": task.init,
        "shape_dict": {n: list(task.shapes[n]) for n in task.names},
        "storage": {},
        "loss_first_last": [losses[0], losses[-1]],
        "excluded_tensors": {
            "a_scalar": "0-d: PyLO's VeLO crashes, its AdafacLO / MuLO normalise over the feature axis too "
            "(torch.mean(dim=[]) reduces over everything)",
            "g_square, h_tied": "tied largest dims: PyLO's VeLO has its own factored-dim tie rule",
        },
        "provenance": {
            "reference": {
                "repo": PYLO_REPO,
                "commit": PYLO_COMMIT,
                "optimizer": optimizer,
                "models": model_provenance,
            },
            "packages": packages(),
            "platform": platform.platform(),
            "command": "PYTHONPATH=$REPO:$PYLO_SRC python tests/data/pylo/make.py "
            + out.name
            + "  (script sha256 "
            + sha256(Path(__file__))
            + ")",
            "gradients": "numpy float32 (lopt_bridge.parity_tests.tasks.Task.loss_and_grads), "
            "fed to PyLO's optimizer",
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------
def make_velo() -> None:
    """VeLORNN + VeLOMLP (two hub repos in PyLO: VeLO_RNN and VeLO_MLP), sizes 32 / 8, and VeLO_naive."""
    from pylo.models import VeLOMLP, VeLORNN
    from pylo.optim import VeLO_naive

    out = HERE / "velo"
    out.mkdir(exist_ok=True)
    torch.manual_seed(SEED)
    rnn = VeLORNN(input_size=30, lstm_hidden_size=32, param_inits=8, mix_layers=True)
    mlp = VeLOMLP(param_inits=8, input_size=30, hidden_size=4, hidden_layers=1, output_size=3)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        # The per-element MLP copies: haiku's init scale (1 / sqrt(fan_in)) instead of PyLO's randn, which
        # the x100 interpolation makes enormous; biases nonzero; last layer x0.1 (as recorders/velo.py).
        for w in [mlp.input_weights_, *mlp.hidden_weights_, mlp.output_weights_]:
            w.copy_(torch.randn(w.shape, generator=gen) / w.shape[-1] ** 0.5)
        mlp.output_weights_.mul_(0.1)
        for b in [mlp.input_bias_, *mlp.hidden_bias_, mlp.output_bias_]:
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        # Nonzero initial LSTM state; the step-size head one-signed (recorders/velo.py: keeps its output away
        # from zero, where float32 cannot resolve it; the sign with which it descends here).
        for s in rnn.lstm_init_state:
            s.copy_(0.1 * torch.randn(s.shape, generator=gen))
        bound = rnn.step_size.bias.abs() + rnn.step_size.weight.abs().sum(dim=1)
        rnn.step_size.bias.copy_(VELO_STEP_SIGN * bound)
        rnn.step_size.weight.mul_(VELO_STEP_SCALE)
        rnn.step_size.bias.mul_(VELO_STEP_SCALE)
    how = (
        f"torch.manual_seed({SEED}); VeLORNN(input_size=30, lstm_hidden_size=32, param_inits=8) and "
        "VeLOMLP(param_inits=8) (PyLO's init); then with torch.Generator().manual_seed(1): MLP copies "
        "*_weights_ ~ N(0, 1/fan_in) (output_weights_ x0.1), *_bias_ ~ 0.1 N(0, 1), lstm_init_state ~ "
        f"0.1 N(0, 1), step_size.bias = {VELO_STEP_SIGN} * (|b| + sum|w|), step_size x{VELO_STEP_SCALE}; the "
        "non-underscore "
        "VeLOMLP tensors keep PyLO's random init (VeLO_naive overwrites them every step)"
    )
    prov = {"rnn": save_model(rnn, out / "rnn", how), "mlp": save_model(mlp, out / "mlp", how)}
    task = Task("pylo", seed=SEED, init="unit")
    kwargs = dict(lr=1.0, num_steps=NUM_STEPS, lstm_hidden_size=32, param_inits=8)

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return VeLO_naive(params, hf_key_rnn=str(out / "rnn"), hf_key_mlp=str(out / "mlp"), **kwargs)

    arrays, losses = record(out, task, make, loss_tensor=True)
    write_fixture(
        out, task, arrays, losses, architecture="velo", sources={"rnn": "rnn", "mlp": "mlp"},
        options={"pylo_kwargs": kwargs}, optimizer="pylo.optim.VeLO_naive", model_provenance=prov,
    )  # fmt: skip


def mup_base_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A base shape that makes rank >= 2 tensors "matrix-like" for mup (fan-out halved, fan-in / 4)."""
    if len(shape) < 2:
        return shape
    return (max(1, shape[0] // 2), max(1, shape[1] // 4), *shape[2:])


def make_mulo() -> None:
    """MetaMLP(39, 32, 1) (btherien/mulo's shapes) and MuLO_naive with real mup base shapes."""
    import mup
    from pylo.models import MetaMLP
    from pylo.optim import MuLO_naive

    out = HERE / "mulo"
    out.mkdir(exist_ok=True)
    torch.manual_seed(SEED)
    net = MetaMLP(39, 32, 1)  # PyLO's init (torch.nn.Linear's)
    how = f"torch.manual_seed({SEED}); MetaMLP(39, 32, 1) with PyLO's (torch.nn.Linear's) init"
    prov = {"model": save_model(net, out / "model", how)}
    task = Task("pylo", seed=SEED, init="small")

    class Holder(torch.nn.Module):
        def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
            super().__init__()
            for n, s in shapes.items():
                self.register_parameter(n, torch.nn.Parameter(torch.zeros(s)))

    kwargs = dict(lr=1.0)
    scales: dict[str, float] = {}

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        model = Holder(task.shapes)
        base = Holder({n: mup_base_shape(s) for n, s in task.shapes.items()})
        mup.set_base_shapes(model, base, rescale_params=False)
        for (_, hp), p in zip(sorted(model.named_parameters()), params, strict=True):
            p.infshape = hp.infshape  # the task's tensors, with the infshapes mup computed
        opt = MuLO_naive(params, hf_key=str(out / "model"), **kwargs)
        for g in opt.param_groups:
            for p in g["params"]:
                scales[task.names[[q is p for q in params].index(True)]] = float(g["lr"])
        return opt

    arrays, losses = record(out, task, make, loss_tensor=False)
    options = {
        "pylo_kwargs": kwargs,
        "mup_base_shapes": {n: list(mup_base_shape(s)) for n, s in task.shapes.items()},
        # The per-tensor lr MuLO_naive gave each tensor (1 / width_mult): our MuLO's mup_scale option.
        "param_group_options": {n: {"mup_scale": scales[n]} for n in task.names},
        "pylo_decay_offsets": "AdafacLO_naive's defaults (not in the file): momentum_decays [0.15216392, "
        "0.14245212, 0.06812963], rms_decays [0.01079706], adafactor_decays [0.18621896, -0.10864615, "
        "-0.06185547]",
    }
    write_fixture(
        out, task, arrays, losses, architecture="mulo", sources={"model": "model"}, options=options,
        optimizer="pylo.optim.MuLO_naive (impl=AdafacLO_naive)", model_provenance=prov,
    )  # fmt: skip


def make_celo2() -> None:
    """CELO2MLP() (DiamondXL/celo2's shapes) and CELO2_naive (1-D tensors to its AdamW, the rest learned)."""
    from pylo.models import CELO2MLP
    from pylo.optim import CELO2_naive

    out = HERE / "celo2"
    out.mkdir(exist_ok=True)
    torch.manual_seed(SEED)
    net = CELO2MLP()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # PyLO zero-initialises the biases: make them matter
        for b in [net.b0, *net.dense_b]:
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    how = (
        f"torch.manual_seed({SEED}); CELO2MLP() with PyLO's init (truncated normal weights); then biases "
        "b0, dense_b.* ~ 0.1 N(0, 1) from torch.Generator().manual_seed(1)"
    )
    prov = {"model": save_model(net, out / "model", how)}
    task = Task("pylo", seed=SEED, init="small")
    kwargs = dict(lr=0.005, adam_lr_mult=20.0)

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return CELO2_naive(params, hf_key=str(out / "model"), **kwargs)

    arrays, losses = record(out, task, make, loss_tensor=False)
    routing = {n: ("adam" if len(s) <= 1 else "learned") for n, s in task.shapes.items()}
    options = {
        "pylo_kwargs": kwargs,
        "routing": routing,
        "pylo_adamw": "bias-corrected AdamW, eps outside the sqrt, betas (0.9, 0.95), lr * adam_lr_mult: "
        "celo's Celo2 Adam branch with adam_bias_correction=True differs by the eps placement only",
    }
    write_fixture(
        out, task, arrays, losses, architecture="celo2", sources={"model": "model"}, options=options,
        optimizer="pylo.optim.CELO2_naive", model_provenance=prov,
    )  # fmt: skip


MAKERS = {"velo": make_velo, "mulo": make_mulo, "celo2": make_celo2}

if __name__ == "__main__":
    torch.set_num_threads(1)  # reproducible reductions
    for name in sys.argv[1:] or list(MAKERS):
        MAKERS[name]()
        print(f"wrote {HERE / name}")
