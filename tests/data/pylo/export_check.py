"""Proof that ``lopt-convert export-pylo`` output runs in PyLO's own classes exactly as our runtime runs it.

Two phases, two environments (PyLO and the converter are never imported together):

1. ``prepare OUT`` (the converter's environment): the committed JAX fixtures ``velo_default`` (HyperV2
   ``params`` + ``config.gin``) and ``mulo_pylo`` (a muLO meta-training pickle) -> ``lopt-convert`` -> our
   ``.safetensors`` -> ``export-pylo`` folders, under OUT, with ``manifest.json``.
2. ``run OUT`` (PyLO's environment, PyLO d05c6c1 on PYTHONPATH): every exported folder loaded with PyLO's
   model class ``from_pretrained(folder, strict=True)`` (no key missing or unexpected; every tensor compared
   with the file); then PyLO's optimizer built from the folders with the arguments export-pylo recorded
   (``pylo_optimizer.json``) and our runtime (reference path, ``foreach=False``) on our file, stepped in
   lockstep on the synthetic task (our parameters reset to PyLO's before every step, as
   ``parity_tests.replay`` does) and compared with ``parity_tests.compare.update_error``. Tensors PyLO is
   known to get wrong (0-d, tied largest dims) run in a second task and are reported, not held to 1e-5. Writes
   OUT/export_check.json; tests/data/pylo/export_check.json is that file, committed, and
   tests/test_pylo_format.py checks that today's export-pylo writes the same bytes it records.

    PYTHONPATH=$REPO /work/venv/bin/python tests/data/pylo/export_check.py prepare /tmp/x
    PYTHONPATH=$REPO:$PYLO_SRC /work/venvs/pylo/bin/python tests/data/pylo/export_check.py run /tmp/x
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: case -> (JAX fixture, task init, --set at conversion). velo: step_mult 0.003 instead of 0.001 makes the
#: updates larger against a parameter ulp (median resolution <= 9e-6 instead of 1e-5 .. 3e-5) and exercises
#: the VeLO_naive argument export-pylo records for an option PyLO's files cannot hold. (At 0.01 PyLO's
#: VeLO_naive leaves the JAX reference after step 27, up to 2e-5, while ours stays within 3.7e-6 of it on
#: PyLO's own trajectory: docs/formats.md.)
CASES = {
    "velo_jax": ("velo_default", "unit", {"step_mult": 0.003}),
    "mulo_jax": ("mulo_pylo", "small", {}),
}
STEPS = 40
NUM_STEPS = 100
SEED = 0
PYLO_COMMIT = "d05c6c1e4f4d7c46a91828a0826c2699bfe48211"
#: The tensors PyLO is known to get wrong, run in a separate task: 0-d, and tied largest dims.
EXCLUDED_SHAPES = {"a_scalar": (), "g_square": (16, 16), "h_tied": (4, 4, 3, 3)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(out: Path) -> None:
    """JAX fixtures -> our files -> export-pylo folders, and a manifest."""
    from lopt_bridge.converter import pylo_format
    from lopt_bridge.converter.convert import convert_source
    from lopt_bridge.parity_tests.fixture import load_fixture

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    for case, (fixture, init, sets) in CASES.items():
        fx = load_fixture(ROOT / "parity_tests" / "fixtures" / fixture)
        ours = Path(
            convert_source(
                str(fx.source_path()), out / f"{fixture}.safetensors", architecture=fx.meta["architecture"],
                sets={**(fx.meta.get("convert_sets") or {}), **sets}, force=True,
                allow_pickle=fx.meta.get("source_format") == "pickle",
            )
        )  # fmt: skip
        done = pylo_format.export(ours, out / case, force=True)
        manifest[case] = {
            "fixture": f"parity_tests/fixtures/{fixture}",
            "fixture_source_sha256": fx.meta.get("source_sha256"),
            "sets": sets,
            "ours": ours.name,
            "ours_sha256": sha256(ours),
            "architecture": done.architecture,
            "init": init,
            "param_group_options": (fx.meta.get("options") or {}).get("param_group_options"),
            "folders": {
                f.name: {
                    "model_class": cls,
                    "files_sha256": {n: sha256(f / n) for n in ("model.safetensors", "config.json")},
                }
                for f, cls in zip(done.folders, done.model_classes, strict=True)
            },
            "call": done.call.replace(str(out) + "/", ""),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"prepared {out}")


# ---------------------------------------------------------------------------------------------- PyLO side
def _load_strict(folder: Path, cls_name: str) -> dict[str, Any]:
    """PyLO's class from_pretrained(strict=True); every state-dict tensor equal to the file's."""
    import pylo.models
    import torch
    from safetensors.numpy import load_file

    cls = getattr(pylo.models, cls_name)
    model = cls.from_pretrained(str(folder), strict=True)
    on_disk = load_file(str(folder / "model.safetensors"))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    same = set(sd) == set(on_disk) and all(np.array_equal(sd[k], on_disk[k]) for k in sd)
    config = json.loads((folder / "config.json").read_text())
    attrs = {k: getattr(model, k) for k in ("mix_layers", "hidden_layers") if hasattr(model, k)}
    assert isinstance(model, torch.nn.Module)
    return {"class": cls_name, "strict_load": True, "state_dict_equals_file": bool(same), "config": config,
            "attributes": attrs, "keys": len(sd)}  # fmt: skip


def _lockstep(
    case: str, spec: dict[str, Any], out: Path, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """PyLO's optimizer and ours, our parameters reset to PyLO's before every step: per-tensor errors."""
    import torch
    from pylo.optim import MuLO_naive, VeLO_naive

    from lopt_bridge.parity_tests import tasks
    from lopt_bridge.parity_tests.compare import FLOAT32_TOLERANCE, resolution, update_error
    from lopt_bridge.pylo_runtime import load_optimizer

    tasks.SHAPE_SETS["_export_check"] = shapes
    task = tasks.Task("_export_check", seed=SEED, init=spec["init"])
    names = task.names
    p0 = task.init_params()
    theirs = [torch.nn.Parameter(torch.tensor(p0[n])) for n in names]
    ours = [torch.nn.Parameter(torch.tensor(p0[n])) for n in names]
    folders = {f: out / case / f for f in spec["folders"]}
    kwargs = json.loads((next(iter(folders.values())) / "pylo_optimizer.json").read_text())["kwargs"]
    ckpt = str(out / spec["ours"])
    if spec["architecture"] == "velo":
        opt = VeLO_naive(theirs, hf_key_rnn=str(folders["VeLO_RNN"]), hf_key_mlp=str(folders["VeLO_MLP"]),
                         num_steps=NUM_STEPS, **kwargs)  # fmt: skip
        mine = load_optimizer(ckpt, ours, num_steps=NUM_STEPS, foreach=False)
    else:
        import mup

        sys.path.insert(0, str(HERE))
        from make import mup_base_shape

        class Holder(torch.nn.Module):
            def __init__(self, s: dict[str, tuple[int, ...]]) -> None:
                super().__init__()
                for n, shape in s.items():
                    self.register_parameter(n, torch.nn.Parameter(torch.zeros(shape)))

        model, base = Holder(task.shapes), Holder({n: mup_base_shape(s) for n, s in task.shapes.items()})
        mup.set_base_shapes(model, base, rescale_params=False)
        for (_, hp), p in zip(sorted(model.named_parameters()), theirs, strict=True):
            p.infshape = hp.infshape
        opt = MuLO_naive(theirs, hf_key=str(folders["mulo"]), **kwargs)
        scale = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
        groups = [{"params": [q], "mup_scale": scale[id(p)]} for p, q in zip(theirs, ours, strict=True)]
        mine = load_optimizer(ckpt, groups, num_steps=NUM_STEPS, foreach=False)
    errors = np.zeros((STEPS, len(names)))
    res = np.zeros_like(errors)
    losses = []
    crashed = None
    for t in range(STEPS):
        before = {n: p.detach().numpy().copy() for n, p in zip(names, theirs, strict=True)}
        loss, g = task.loss_and_grads(before, t)
        losses.append(float(loss))
        for n, p, q in zip(names, theirs, ours, strict=True):
            p.grad = torch.tensor(g[n])
            with torch.no_grad():
                q.copy_(torch.tensor(before[n]))
            q.grad = torch.tensor(g[n])
        loss32 = np.float32(loss)
        try:
            if spec["architecture"] == "velo":
                opt.step(torch.tensor(loss32))
            else:
                opt.step(loss=float(loss32))
        except Exception as e:  # PyLO's VeLO on a 0-d tensor
            crashed = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
            break
        mine.step(loss=float(loss32))
        for i, (n, p, q) in enumerate(zip(names, theirs, ours, strict=True)):
            a_ref, a_ours = p.detach().numpy(), q.detach().numpy()
            errors[t, i] = update_error(before[n], a_ours, before[n], a_ref)
            res[t, i] = resolution(a_ours, a_ref, before[n])
    done = t if crashed else STEPS
    per = {
        n: {
            "max_rel_update_error": float(errors[:done, i].max()) if done else None,
            "median_resolution": float(np.median(res[:done, i])) if done else None,
            "within_1e-5": bool(done and errors[:done, i].max() <= FLOAT32_TOLERANCE),
        }
        for i, n in enumerate(names)
    }
    return {"steps": done, "crashed": crashed, "loss_first_last": [losses[0], losses[-1]], "tensors": per}


def run(out: Path) -> None:
    """Load every exported folder in PyLO's classes and step PyLO's optimizers against ours."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Custom CUDA optimizers")
    from lopt_bridge.parity_tests import tasks

    manifest = json.loads((out / "manifest.json").read_text())
    result: dict[str, Any] = {}
    for case, spec in manifest.items():
        loads = {f: _load_strict(out / case / f, v["model_class"]) for f, v in spec["folders"].items()}
        faithful = _lockstep(case, spec, out, tasks.SHAPE_SETS["pylo"])
        arch = spec["architecture"]
        known_bad: dict[str, Any] = {}
        for name, shape in EXCLUDED_SHAPES.items():
            known_bad[name] = _lockstep(case, spec, out, {name: shape})
        result[case] = {**spec, "pylo_loads": loads, "agreement": faithful, "excluded": known_bad}
        worst = max(v["max_rel_update_error"] for v in faithful["tensors"].values())
        print(case, arch, f"faithful tensors max {worst:.2e}",
              {k: (v["crashed"] or f"{max(t['max_rel_update_error'] for t in v['tensors'].values()):.1e}")
               for k, v in known_bad.items()})  # fmt: skip
    packages = {"python": platform.python_version()}
    for p in ("torch", "huggingface_hub", "safetensors", "mup", "numpy"):
        try:
            packages[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    doc = {
        "what": "export-pylo output of two JAX fixtures loaded by PyLO's own classes (from_pretrained, "
        "strict=True) and run by PyLO's naive optimizers in lockstep with our runtime's reference path; "
        "max over steps of lopt_bridge.parity_tests.compare.update_error per tensor",
        "pylo": {"repo": "Belilovsky-Lab/pylo", "commit": PYLO_COMMIT},
        "steps": STEPS,
        "num_steps": NUM_STEPS,
        "seed": SEED,
        "script": "tests/data/pylo/export_check.py",
        "script_sha256": sha256(Path(__file__)),
        "command": "export_check.py prepare OUT (converter venv); export_check.py run OUT (PyLO venv)",
        "packages": packages,
        "platform": platform.platform(),
        "cases": result,
    }
    (out / "export_check.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out / 'export_check.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "run"):
        sys.exit(__doc__)
    target = Path(sys.argv[2]) if sys.argv[2] else Path(tempfile.mkdtemp())
    (prepare if sys.argv[1] == "prepare" else run)(target)
