"""The on-disk parity fixture: ``meta.json`` + ``trajectory.npz`` (+ ``checkpoint/``), written and read here.

``trajectory.npz`` (compressed, float32) holds, for a recording of ``T`` steps:

- ``loss``: (T,) the loss given to the reference at each step;
- ``params.<name>``: (T + 1, *shape): ``params[t]`` is ``param_before[t]`` and ``params[t + 1]`` is
  ``param_after[t]`` (the reference runs closed loop, so one step's "after" is the next step's "before";
  storing it once halves the file);
- ``grads.<name>``: (T, *shape) the gradient given to the reference at step ``t``.

Tensors too large to store every step (``SAMPLED_MIN_SIZE`` elements or more; only quadratic-only task
tensors qualify, whose gradient is bit-reproducible from the parameters) are stored sampled:
``sample_index.<name>`` (K,) flat indices and ``params_sampled.<name>`` (T + 1, K); their initial value is
regenerated from the task seed and checked against ``meta["storage"][name]["init_sha256"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lopt_bridge.converter.files import current_umask

from .tasks import Task

META = "meta.json"
TRAJECTORY = "trajectory.npz"
CHECKPOINT_DIR = "checkpoint"
#: Tensors with at least this many elements are stored sampled (if the task allows it).
SAMPLED_MIN_SIZE = 16384
#: Number of sampled elements per sampled tensor.
SAMPLE_COUNT = 1024
#: Bump when the layout changes incompatibly.
FIXTURE_VERSION = 1


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_array(a: np.ndarray) -> str:
    """Hex sha256 of a float32 array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def repo_root() -> Path:
    """The project root (the folder holding parity_tests/); fixture paths to ../shared are relative to it.

    Installed from a wheel this is the ``lopt_bridge`` package folder, which holds no fixtures (they are not
    package data): ``default_fixtures`` says so, and commands then need ``--fixtures`` / ``--out``."""
    return Path(__file__).resolve().parent.parent


def default_fixtures() -> Path | None:
    """The checkout's ``parity_tests/fixtures`` (this code's, else the working directory's, for a non-editable
    install run from a clone), or None: installed from a wheel with no checkout in sight."""
    for root in (repo_root(), Path.cwd()):
        path = root / "parity_tests" / "fixtures"
        if path.is_dir():
            return path
    return None


@dataclass
class Fixture:
    """A loaded fixture: metadata, losses, full per-step tensors and sampled large tensors."""

    path: Path
    meta: dict[str, Any]
    loss: np.ndarray
    params: dict[str, np.ndarray]  # name -> (T + 1, *shape), full tensors only
    grads: dict[str, np.ndarray]  # name -> (T, *shape), full tensors only
    sample_index: dict[str, np.ndarray]  # name -> (K,), sampled tensors only
    params_sampled: dict[str, np.ndarray]  # name -> (T + 1, K)

    @property
    def label(self) -> str:
        """Name in reports: the directory name (one case may be recorded in several variants)."""
        return self.path.name

    @property
    def steps(self) -> int:
        return int(self.loss.shape[0])

    @property
    def names(self) -> list[str]:
        return sorted(self.meta["shape_dict"])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.meta["shape_dict"].items()}

    def task(self) -> Task:
        return Task(self.meta["shapes"], seed=int(self.meta["seed"]), init=self.meta.get("init", "unit"))

    def initial_params(self) -> dict[str, np.ndarray]:
        """Every tensor's value before step 0 (sampled ones regenerated from the task and hash-checked)."""
        out = {name: arr[0] for name, arr in self.params.items()}
        if self.sample_index:
            init = self.task().init_params()
            for name in self.sample_index:
                want = self.meta["storage"][name]["init_sha256"]
                if sha256_array(init[name]) != want:
                    raise ValueError(
                        f"{self.path}: initial value of sampled tensor {name!r} regenerated from the task "
                        "does not match the recording (numpy's random stream changed?)"
                    )
                out[name] = init[name]
        return out

    def source_path(self) -> Path:
        """The checkpoint to convert: inside the fixture, or relative to the repo root (../shared)."""
        src = self.meta["source"]
        base = self.path if self.meta.get("source_base", "fixture") == "fixture" else _fixture_repo(self.path)
        return (base / src).resolve()


def _fixture_repo(path: Path) -> Path:
    """The checkout holding a fixture (``<root>/parity_tests/fixtures/<case>``), else repo_root()."""
    parents = path.resolve().parents
    if len(parents) > 2 and parents[0].name == "fixtures" and parents[1].name == "parity_tests":
        return parents[2]
    return repo_root()


def load_fixture(path: str | Path) -> Fixture:
    """Read a fixture directory; ValueError naming the file on anything malformed."""
    path = Path(path)
    meta_path, traj_path = path / META, path / TRAJECTORY
    for f in (meta_path, traj_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (not a parity fixture directory?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not JSON ({e})") from None
    if meta.get("fixture_version") != FIXTURE_VERSION:
        raise ValueError(
            f"{meta_path}: fixture_version {meta.get('fixture_version')!r}, expected {FIXTURE_VERSION}"
        )
    with np.load(traj_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    groups: dict[str, dict[str, np.ndarray]] = {
        g: {} for g in ("params", "grads", "sample_index", "params_sampled")
    }
    for key, arr in arrays.items():
        if key == "loss":
            continue
        group, _, name = key.partition(".")
        if group not in groups or not name:
            raise ValueError(f"{traj_path}: unexpected array {key!r}")
        groups[group][name] = arr
    if "loss" not in arrays:
        raise ValueError(f"{traj_path}: no 'loss' array")
    loss = arrays["loss"]
    fx = Fixture(path, meta, loss, **groups)
    t = fx.steps
    for name, shape in fx.shapes.items():
        if name in fx.params:
            ok = fx.params[name].shape == (t + 1, *shape) and fx.grads.get(name, np.empty(0)).shape == (
                t,
                *shape,
            )
        else:
            ok = name in fx.params_sampled and fx.params_sampled[name].shape[0] == t + 1
        if not ok:
            raise ValueError(
                f"{traj_path}: arrays for tensor {name!r} missing or not {t} steps of shape {shape}"
            )
    return fx


def write_fixture(
    out_dir: Path,
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    checkpoint_from: Path | None = None,
    force: bool = False,
) -> Path:
    """Write meta.json + trajectory.npz (+ ``checkpoint_from`` as checkpoint/) atomically as ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (pass force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; a fixture folder is shared like any other
        meta = {"fixture_version": FIXTURE_VERSION, **meta}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        np.savez_compressed(tmp / TRAJECTORY, **arrays)
        if checkpoint_from is not None and any(Path(checkpoint_from).iterdir()):
            shutil.copytree(checkpoint_from, tmp / CHECKPOINT_DIR)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def discover(root: str | Path) -> list[Path]:
    """Every fixture directory (one holding meta.json) under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/{META}"))
