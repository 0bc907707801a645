"""Our side: convert a fixture's checkpoint with our converter and replay its recorded steps in our runtime.

Two modes over the same recorded losses and gradients:

- ``reset``: before each step our parameters are set to the recorded ``param_before[t]`` (our optimizer
  state still evolves on its own), so the update we compare is not swamped by float32 rounding of ``p + u``
  when steps are far smaller than the parameters;
- ``open``: never reset; we follow our own trajectory and report how far it drifts from the recorded one.

Sampled tensors (see fixture.py) are reset at their sampled elements and get their bit-reproducible gradient
recomputed from our own parameters; their update is compared at the sampled elements.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .compare import TOLERANCES, X64_FACTOR, CaseResult, drift, resolution, update_error
from .conditioning import X64_FILE
from .fixture import Fixture, load_fixture, sha256_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``factory(fixture, params, checkpoint_path) -> optimizer with .step(loss=...)``
OptimizerFactory = Callable[[Fixture, list[torch.Tensor], Path], Any]


def convert_fixture(fx: Fixture, out_dir: Path) -> Path:
    """Convert the fixture's recorded checkpoint with our converter into ``out_dir``; returns the file."""
    from lopt_bridge.converter.convert import convert_source

    src = fx.source_path()
    if not src.exists():
        raise FileNotFoundError(f"{src}: checkpoint of fixture {fx.path.name} not found")
    want = fx.meta.get("source_sha256")
    if want and src.is_file() and sha256_file(src) != want:
        raise ValueError(f"{src}: sha256 differs from the one recorded in {fx.path / 'meta.json'}")
    out = Path(out_dir) / f"{fx.meta['case']}.safetensors"
    sets = fx.meta.get("convert_sets") or None
    # A committed recording is trusted: its pickle (muLO) is read by the restricted unpickler.
    allow_pickle = fx.meta.get("source_format") == "pickle"
    return Path(
        convert_source(
            str(src),
            out,
            architecture=fx.meta["architecture"],
            sets=sets,
            force=True,
            allow_pickle=allow_pickle,
        )
    )


def default_factory(fx: Fixture, params: list[torch.Tensor], ckpt: Path) -> Any:
    """``pylo_runtime.load_optimizer`` on the converted file, told the recorded ``num_steps``.

    Per-tensor options recorded under ``options.param_group_options`` (muLO's ``mup_scale``) become one
    param group per tensor; so does ``options.routing`` (Celo2: the branch the reference's regex chose for
    each tensor, given as the group's ``celo2_branch``).
    """
    from lopt_bridge.pylo_runtime import load_optimizer

    options = fx.meta.get("options") or {}
    per_tensor = {n: dict(v) for n, v in (options.get("param_group_options") or {}).items()}
    for n, branch in (options.get("routing") or {}).items():
        per_tensor.setdefault(n, {})["celo2_branch"] = branch
    groups: Any = params
    if per_tensor:
        groups = [{"params": [p], **per_tensor.get(n, {})} for n, p in zip(fx.names, params, strict=True)]
    return load_optimizer(str(ckpt), groups, num_steps=int(fx.meta["num_steps"]))


def load_x64(fx: Fixture) -> dict[str, np.ndarray] | None:
    """The fixture's float64 replay (``parity_tests.conditioning --write``), or None if it has none."""
    path = fx.path / X64_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for n in fx.names:
        want = {f"after64_minus_recorded.{n}": (fx.steps, *fx.shapes[n]), f"floor.{n}": (fx.steps,)}
        for key, shape in want.items():
            if key not in arrays or arrays[key].shape != shape:
                raise ValueError(f"{path}: array {key} missing or not of shape {shape}")
    return arrays


def replay(
    fx: Fixture,
    ckpt: Path | None,
    *,
    mode: str = "reset",
    dtype: str = "float32",
    device: str = "cpu",
    factory: OptimizerFactory = default_factory,
    x64: dict[str, np.ndarray] | None = None,
    x64_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Replay ``fx``: (``errors[t, i]``, ``resolution[t, i]``) in mode "reset", (``drifts[t, i]``, None) in
    mode "open". With ``x64`` (``load_x64``) in mode "reset", ``x64_out[t, i]`` receives our update's error
    against the float64 reference."""
    if mode not in ("reset", "open"):
        raise ValueError(f"mode must be 'reset' or 'open', got {mode!r}")
    tdtype = DTYPES[dtype]
    names = fx.names
    task = fx.task() if fx.sample_index else None
    init = fx.initial_params()
    params = [torch.tensor(init[n], dtype=torch.float32).to(device=device, dtype=tdtype) for n in names]
    opt = factory(fx, params, ckpt)
    out = np.zeros((fx.steps, len(names)), dtype=np.float64)
    res = np.zeros_like(out) if mode == "reset" else None
    sidx = {n: torch.as_tensor(fx.sample_index[n], device=device) for n in fx.sample_index}
    for t in range(fx.steps):
        before: list[np.ndarray] = []
        for n, p in zip(names, params, strict=True):
            if mode == "reset":
                with torch.no_grad():
                    if n in fx.params:
                        p.copy_(torch.as_tensor(fx.params[n][t], device=device))
                    else:
                        p.view(-1)[sidx[n]] = torch.as_tensor(fx.params_sampled[n][t], device=device).to(
                            tdtype
                        )
            pb = p.detach().to(torch.float32).cpu().numpy().copy()
            before.append(pb)
            if n in fx.grads:
                g = torch.tensor(fx.grads[n][t], device=device)  # a copy: the fixture stays intact
            else:
                assert task is not None
                g = torch.as_tensor(task.grad_quadratic(n, pb, t), device=device)
            p.grad = g.to(tdtype)
        opt.step(loss=float(fx.loss[t]))
        for i, (n, p) in enumerate(zip(names, params, strict=True)):
            after = p.detach().to(torch.float32).cpu().numpy()
            if n in fx.params:
                ref_b, ref_a, ours_b, ours_a = fx.params[n][t], fx.params[n][t + 1], before[i], after
                ref0 = fx.params[n][0]
            else:
                idx = fx.sample_index[n]
                ref_b, ref_a = fx.params_sampled[n][t], fx.params_sampled[n][t + 1]
                ours_b, ours_a = before[i].reshape(-1)[idx], after.reshape(-1)[idx]
                ref0 = fx.params_sampled[n][0]
            if mode == "reset":
                out[t, i] = update_error(ours_b, ours_a, ref_b, ref_a, dtype)
                res[t, i] = resolution(ours_a, ref_a, ref_b, dtype)
                if x64 is not None and x64_out is not None and n in fx.params:
                    a64 = ref_a.astype(np.float64) + x64[f"after64_minus_recorded.{n}"][t].astype(np.float64)
                    x64_out[t, i] = update_error(ours_b, ours_a, ref_b, a64, dtype)
            else:
                out[t, i] = drift(ours_a, ref_a, ref0)
    return out, res


def check_fixture(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    open_loop: bool = True,
    factory: OptimizerFactory = default_factory,
    convert: Callable[[Fixture, Path], Path] | None = convert_fixture,
) -> CaseResult:
    """Convert, replay in reset mode (and open loop), and return the case's parity numbers."""
    fx = load_fixture(path)
    x64 = load_x64(fx)
    x64_ours = np.zeros((fx.steps, len(fx.names))) if x64 is not None else None
    with tempfile.TemporaryDirectory(prefix="lopt-parity-") as tmp:
        ckpt = convert(fx, Path(tmp)) if convert is not None else None
        errors, resolutions = replay(
            fx, ckpt, mode="reset", dtype=dtype, device=device, factory=factory, x64=x64, x64_out=x64_ours
        )
        drifts = None
        if open_loop:
            drifts, _ = replay(fx, ckpt, mode="open", dtype=dtype, device=device, factory=factory)
    notes = []
    if fx.sample_index:
        notes.append(f"sampled tensors ({', '.join(sorted(fx.sample_index))}): compared at recorded elements")
    x64_ref = None if x64 is None else np.stack([x64[f"floor.{n}"] for n in fx.names], axis=1)
    result = CaseResult(
        case=fx.label,
        family=str(fx.meta["family"]),
        architecture=str(fx.meta["architecture"]),
        names=fx.names,
        errors=errors,
        drifts=drifts,
        dtype=dtype,
        mode="replay",
        tolerance=TOLERANCES[dtype],
        notes=notes,
        resolutions=resolutions,
        x64_ours=x64_ours,
        x64_ref=x64_ref,
    )
    for n, s in result.x64_summary().items():
        verdict = "accepted" if s["accepted"] else "NOT accepted"
        result.notes.append(
            f"float64 rule, {n}: ours vs reference {s['ours_vs_reference']:.2e} on {s['missed_steps']} "
            f"step(s); ours vs float64 {s['ours_vs_float64']:.2e}, reference vs float64 "
            f"{s['reference_vs_float64']:.2e} (ratio {s['ratio']:.2f}, bound {X64_FACTOR:g}): {verdict} as "
            "float32 conditioning"
        )
    return result
