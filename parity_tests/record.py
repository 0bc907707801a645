"""The JAX side: run a family's reference optimizer on the synthetic task and write a parity fixture.

This is the only module of the harness that touches jax, and only inside functions (through the recorders
in ``parity_tests/recorders/`` and ``jax.grad`` for closed-loop runs), so importing it needs no jax.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .fixture import SAMPLE_COUNT, SAMPLED_MIN_SIZE, repo_root, sha256_array, sha256_file, write_fixture
from .tasks import Task

#: Packages whose versions go into every fixture's provenance.
PROVENANCE_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "dm-haiku",
    "optax",
    "chex",
    "gin-config",
    "numpy",
    "tensorflow",
    "tensorflow-cpu",
)


class ReferenceUnavailable(RuntimeError):
    """The family's reference code (learned_optimization, celo, jax) cannot be imported here."""


def load_recorder(family: str) -> ModuleType:
    """Import ``parity_tests.recorders.<family>``; ReferenceUnavailable with a how-to when it cannot be."""
    name = f"lopt_bridge.parity_tests.recorders.{family}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise ValueError(f"no recorder for family {family!r} ({name} does not exist)") from None
        raise ReferenceUnavailable(_unavailable(family, e)) from e
    return module


def _unavailable(family: str, err: BaseException) -> str:
    return (
        f"the JAX reference for {family!r} is not importable ({type(err).__name__}: {err}); install the "
        "parity extra (pip install -e '.[parity]') and put the fetched reference on PYTHONPATH: "
        "google/learned_optimization for velo/small_fc_lopt/mlp_lopt, amoudgl/celo for celo, "
        "bentherien/mu_learned_optimization for mulo (celo and learned_optimization in separate processes)"
    )


def make_reference(family: str, case: str, ckpt_dir: Path, seed: int) -> tuple[Any, dict[str, Any]]:
    """Build the reference for ``case`` and write its checkpoint into ``ckpt_dir``; returns (ref, options)."""
    module = load_recorder(family)
    cases = getattr(module, "CASES", {})
    if case not in cases:
        raise ValueError(
            f"family {family!r} has no case {case!r}; known: {', '.join(sorted(cases)) or 'none'}"
        )
    options = cases[case]
    try:
        ref = module.make_reference(options, Path(ckpt_dir), seed)
    except ImportError as e:
        raise ReferenceUnavailable(_unavailable(family, e)) from e
    return ref, options


def _f32(tree: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in dict(tree).items()}


@dataclass
class RefStep:
    """One reference step: the loss and gradients it was given and its parameters before and after."""

    step: int
    loss: float
    grads: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]


def run_reference(
    ref: Any, task: Task, *, steps: int, num_steps: int, grads_from: str = "numpy"
) -> Iterator[RefStep]:
    """Step the reference closed loop on ``task``; gradients from the numpy task or from ``jax.grad``."""
    if grads_from not in ("numpy", "jax"):
        raise ValueError(f"grads_from must be 'numpy' or 'jax', got {grads_from!r}")
    value_and_grad = None
    if grads_from == "jax":
        import jax

        value_and_grad = jax.value_and_grad(task.loss_jax)
    state = ref.init(task.init_params(), num_steps)
    before = _f32(ref.params(state))
    for t in range(steps):
        if value_and_grad is None:
            loss, grads = task.loss_and_grads(before, t)
        else:
            loss_j, grads_j = value_and_grad(before, t)
            loss, grads = float(loss_j), _f32(grads_j)
        state = ref.update(state, grads, loss)
        after = _f32(ref.params(state))
        yield RefStep(t, float(np.float32(loss)), grads, before, after)
        before = after


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that can change the reference's numbers."""
    out = {"python": platform.python_version()}
    for pkg in PROVENANCE_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def harness_commit() -> str | None:
    """This project's git commit (with ``-dirty`` if the work tree differs), or None outside a checkout."""
    root = repo_root()
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "parity_tests"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _source_entry(ref: Any, ckpt_dir: Path) -> dict[str, Any]:
    """Where the checkpoint to convert lives: inside the fixture (copied) or in ../shared (path + sha256)."""
    src = Path(ref.source)
    full = src if src.is_absolute() else ckpt_dir / src
    full = full.resolve()
    if not full.is_file():
        raise FileNotFoundError(f"{full}: the recorder's checkpoint source does not exist")
    try:
        rel = full.relative_to(ckpt_dir.resolve())
        return {
            "source": f"checkpoint/{rel.as_posix()}",
            "source_base": "fixture",
            "source_sha256": sha256_file(full),
        }
    except ValueError:
        rel_repo = os.path.relpath(full, repo_root())
        return {
            "source": Path(rel_repo).as_posix(),
            "source_base": "repo",
            "source_sha256": sha256_file(full),
        }


def default_command(
    family: str, case: str, out_dir: Path, seed: int, steps: int, num_steps: int, shapes: str, init: str
) -> str:
    return shlex.join(
        ["lopt-parity", "record", family, "--case", case, "--out", str(out_dir), "--seed", str(seed),
         "--steps", str(steps), "--num-steps", str(num_steps), "--shapes", shapes, "--init", init]
    )  # fmt: skip


def record_case(
    family: str,
    case: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 50,
    num_steps: int = 100,
    shapes: str = "default",
    init: str = "unit",
    force: bool = False,
    command: str | None = None,
) -> Path:
    """Record ``case`` of ``family`` with the reference code and write the fixture directory ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (use --force to re-record)")
    if steps <= 0 or num_steps <= 0:
        raise ValueError("steps and num_steps must be positive")
    task = Task(shapes, seed=seed, init=init)
    with tempfile.TemporaryDirectory(prefix="lopt-parity-record-") as tmp:
        ckpt_dir = Path(tmp) / "checkpoint"
        ckpt_dir.mkdir()
        ref, options = make_reference(family, case, ckpt_dir, seed)
        source = _source_entry(ref, ckpt_dir)

        p0 = task.init_params()
        sampled = {
            n: np.sort(np.random.default_rng([seed, 7]).choice(a.size, size=SAMPLE_COUNT, replace=False))
            for n, a in p0.items()
            if task.quadratic_only(n) and a.size >= SAMPLED_MIN_SIZE
        }
        full = [n for n in task.names if n not in sampled]
        losses: list[float] = []
        params: dict[str, list[np.ndarray]] = {n: [] for n in full}
        grads: dict[str, list[np.ndarray]] = {n: [] for n in full}
        psamp: dict[str, list[np.ndarray]] = {n: [] for n in sampled}
        last = None
        for st in run_reference(ref, task, steps=steps, num_steps=num_steps):
            losses.append(st.loss)
            for n in full:
                params[n].append(st.before[n])
                grads[n].append(st.grads[n])
            for n, idx in sampled.items():
                psamp[n].append(st.before[n].reshape(-1)[idx])
            last = st
        assert last is not None
        for n in full:
            params[n].append(last.after[n])
        for n, idx in sampled.items():
            psamp[n].append(last.after[n].reshape(-1)[idx])

        arrays: dict[str, np.ndarray] = {"loss": np.asarray(losses, dtype=np.float32)}
        for n in full:
            arrays[f"params.{n}"] = np.stack(params[n]).astype(np.float32)
            arrays[f"grads.{n}"] = np.stack(grads[n]).astype(np.float32)
        for n, idx in sampled.items():
            arrays[f"sample_index.{n}"] = idx.astype(np.int64)
            arrays[f"params_sampled.{n}"] = np.stack(psamp[n]).astype(np.float32)

        meta = {
            "case": case,
            "family": family,
            "architecture": ref.architecture,
            **source,
            "source_format": ref.source_format,
            "convert_sets": dict(getattr(ref, "convert_sets", {}) or {}),
            "options": _jsonable(options),
            "seed": seed,
            "steps": steps,
            "num_steps": num_steps,
            "shapes": shapes,
            "init": init,
            "shape_dict": {n: list(task.shapes[n]) for n in task.names},
            "storage": {
                n: {"mode": "sampled", "count": int(len(idx)), "init_sha256": sha256_array(p0[n])}
                for n, idx in sampled.items()
            },
            "loss_first_last": [losses[0], losses[-1]],
            "provenance": {
                "reference": _jsonable(dict(getattr(ref, "provenance", {}) or {})),
                "packages": package_versions(),
                "platform": platform.platform(),
                "machine": platform.machine(),
                "harness_commit": harness_commit(),
                "command": command
                or default_command(family, case, out_dir, seed, steps, num_steps, shapes, init),
                "gradients": "numpy float32 (lopt_bridge.parity_tests.tasks.Task.loss_and_grads), "
                "fed to the reference",
            },
        }
        copy_ckpt = ckpt_dir if source["source_base"] == "fixture" else None
        return write_fixture(out_dir, meta, arrays, checkpoint_from=copy_ckpt, force=force)


def _jsonable(x: Any) -> Any:
    """Options / provenance as JSON-friendly values (tuples to lists, numpy scalars to Python, else str)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return repr(x)


# convenience: python -m lopt_bridge.parity_tests.record FAMILY CASE OUT
if __name__ == "__main__":  # pragma: no cover
    fam, cs, out = sys.argv[1:4]
    print(record_case(fam, cs, out))
