"""The dispatch coverage table (pylo_runtime.dispatch), walked entry by entry for every family.

Each entry is checked both ways: a path the table claims is the one that runs (``opt.last_path``) and its
updates match the reference path (``foreach=False``) within the project's bound (float32, max over steps and
tensors of ``|u - u_ref|_inf / |u_ref|_inf <= 1e-5``, one ulp of ``p + u`` forgiven); a refusal raises
``FusedUnavailableError`` at construction with the table's reason. CPU entries run here; the Triton entries
run in a child process under ``TRITON_INTERPRET=1`` (triton reads it when the kernels are defined). CUDA,
FSDP2-shard and other-device entries are checked as decisions (no GPU here; the shard paths run in
tests/test_distributed_fsdp_ddp.py); the kernels they name are the ones the CPU and interpreter entries run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fused_support import SHAPES, grad_stream, make_params, update_error

from lopt_bridge.pylo_runtime import adafac, dispatch, velo

HERE = Path(__file__).resolve().parent
TOL = 1e-5
STEPS = 2


def build(family: str, options: dict, params, **flags):
    """An optimizer of ``family`` with random theta shaped for ``options``."""
    from distributed_support import random_theta
    from fused_support import celo_theta, velo_theta
    from test_adafac_runtime import make_theta as adafac_theta

    from lopt_bridge.pylo_runtime.loading import optimizer_class

    if family == "velo":
        theta, cfg = velo_theta(**options, param_scale_mult=False, step_mult=0.3)
    elif family == "celo":
        theta, cfg = celo_theta(**options)
    elif family in ("small_fc_lopt", "mulo"):
        cfg = {"hidden_size": 8, "step_mult": 0.01, **options}
        theta = adafac_theta(cfg)
    else:
        theta, cfg = random_theta(family)
        cfg = {**cfg, **options}
    return optimizer_class(family)(params, theta, cfg, num_steps=50, **flags)


def run_entry(family: str, options: dict, flags: dict) -> tuple[float, str]:
    """(max update error vs the reference over STEPS steps, the path the optimizer ran)."""
    pa, pb = make_params(SHAPES), make_params(SHAPES)
    ref, opt = build(family, options, pa, foreach=False), build(family, options, pb, **flags)
    err = 0.0
    for t, gs in enumerate(grad_stream(SHAPES, STEPS)):
        before = [p.detach().clone() for p in pa]
        with torch.no_grad():
            for a, b in zip(pa, pb, strict=True):
                b.copy_(a)
        for p, g in zip(pa + pb, gs + gs, strict=True):
            p.grad = g.clone()
        ref.step(loss=3.0 - 0.1 * t)
        opt.step(loss=3.0 - 0.1 * t)
        err = max(err, update_error(before, pa, pb))
    assert ref.last_path == "reference"
    return err, opt.last_path


ENTRIES = dispatch.coverage_table()
CPU = [e for e in ENTRIES if e.where == "cpu"]
ARGS = {"default": {}, "foreach=False": {"foreach": False}, "foreach=True": {"foreach": True}}
ARGS["fused=True"] = {"fused": True}


@pytest.fixture
def c_passes_everywhere(monkeypatch):
    """Every 2-D tensor through the C passes on fused-cpu entries (the size thresholds are about speed)."""
    monkeypatch.setattr(adafac, "SMALL", 1)
    monkeypatch.setattr(velo, "NATIVE_MIN", 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the "cpu" rows: the interpreter's are below


@pytest.mark.parametrize("entry", CPU, ids=[f"{e.family}-{e.options}-{e.request}" for e in CPU])
def test_cpu_entry(entry, c_passes_everywhere):
    options = dispatch.OPTION_SETS[entry.family][entry.options]
    flags = ARGS[entry.request]
    if entry.decision.refused:
        with pytest.raises(dispatch.FusedUnavailableError) as info:
            build(entry.family, options, make_params([(3, 4)]), **flags)
        assert entry.decision.reason in str(info.value)
        return
    err, ran = run_entry(entry.family, options, flags)
    assert ran == entry.decision.path.name
    assert err <= TOL, err


@pytest.mark.parametrize("family", list(dispatch.FAMILIES))
def test_both_flags_true_is_refused_and_fused_false_is_foreach(family):
    with pytest.raises(dispatch.FusedUnavailableError, match="cannot both be set"):
        build(family, {}, make_params([(3, 4)]), foreach=True, fused=True)
    cfg = dispatch.full_config(family, {})
    for device, _, env, shard in dispatch.DEVICES:
        kw = dict(shard=shard, env=env)
        want = dispatch.decide(family, cfg, device, foreach=True, fused=None, **kw)
        for foreach in (None, True):
            assert dispatch.decide(family, cfg, device, foreach=foreach, fused=False, **kw) == want
        assert dispatch.decide(family, cfg, device, foreach=False, fused=False, **kw).path.kind == "reference"
        fused = dispatch.decide(family, cfg, device, foreach=None, fused=True, **kw)
        assert dispatch.decide(family, cfg, device, foreach=False, fused=True, **kw) == fused


def test_every_family_answers_fused_true_the_same_way(monkeypatch):
    """One error type and message shape at construction for every family that cannot fuse."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for family in ("mlp_lopt", "celo2", "rnn_mlp_lopt", "nn_adam"):
        with pytest.raises(dispatch.FusedUnavailableError, match="fused=True is not available: .* no fused"):
            build(family, {}, make_params([(3, 4)]), fused=True)
    with pytest.raises(dispatch.FusedUnavailableError, match="fused=True is not available: .*with_p"):
        build("celo", {"with_p": False}, make_params([(3, 4)]), fused=True)
    with pytest.raises(dispatch.FusedUnavailableError, match="ff_hidden_size=512"):
        build("velo", {"ff_hidden_size": 512}, make_params([(3, 4)]), fused=True)


def test_an_undeclared_family_is_told_where_to_declare_itself():
    with pytest.raises(ValueError, match="not declared in lopt_bridge.pylo_runtime.dispatch.FAMILIES"):
        dispatch.decide("no_such_family", {}, "cpu", foreach=None, fused=None)


def test_table_prints_and_names_every_reason():
    text = dispatch.format_table()
    for e in ENTRIES:
        for r in e.decision.reasons:
            assert r in text
    proc = subprocess.run(
        [sys.executable, "-m", "lopt_bridge.pylo_runtime.dispatch"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        cwd=HERE.parent,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == text.strip(), proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr


def test_architecture_doc_shows_the_current_table():
    """docs/architecture.md carries the table that ``python -m lopt_bridge.pylo_runtime.dispatch`` prints."""
    doc = (HERE.parent / "docs" / "architecture.md").read_text()
    start = doc.index("<!-- dispatch-table")
    block = doc[doc.index("\n", start) + 1 : doc.index("<!-- end dispatch-table -->")]
    assert block.strip() == dispatch.format_table().strip()


def test_cuda_and_shard_rows_use_the_kernels_the_cpu_rows_run():
    """Rows not runnable here: CUDA fuses exactly where the interpreter does; shards never fuse."""
    rows = {(e.family, e.options, e.where, e.request): e.decision for e in ENTRIES}
    for (family, options, where, request), d in rows.items():
        interp = rows[(family, options, "cpu, TRITON_INTERPRET=1", "fused=True")]
        if where == "cuda" and request == "fused=True":
            assert d == interp
        if where == "cuda" and request == "default" and not interp.refused:
            assert d.path.name == "fused-triton"
        if "shards" in where:
            assert d.refused or d.path.kind != "fused"
        if where.startswith("other"):
            assert d.refused if request == "fused=True" else d.path.kind != "fused"


CHILD = r"""
import json, sys
from lopt_bridge.pylo_runtime import dispatch
from test_dispatch import build, run_entry
from fused_support import make_params
out = []
for e in dispatch.coverage_table():
    if e.where != "cpu, TRITON_INTERPRET=1" or e.request != "fused=True":
        continue
    options = dispatch.OPTION_SETS[e.family][e.options]
    if e.decision.refused:
        try:
            build(e.family, options, make_params([(3, 4)]), fused=True)
            out.append([e.family, e.options, "built", ""])
        except dispatch.FusedUnavailableError as exc:
            out.append([e.family, e.options, "refused", str(exc)])
    elif options.get("ff_hidden_size", 4) > 64:  # the interpreter materialises BLOCK x H x H: minutes
        out.append([e.family, e.options, "decision only", e.decision.path.name])
    else:
        err, ran = run_entry(e.family, options, {"fused": True})
        out.append([e.family, e.options, ran, err])
print("RESULT " + json.dumps(out))
"""


def test_triton_entries_under_the_interpreter():
    pytest.importorskip(
        "triton", reason="triton is an optional dependency (pip install 'lopt-bridge[triton]')"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900, cwd=HERE
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    assert len(results) == sum(len(v) for v in dispatch.OPTION_SETS.values())
    table = {
        (e.family, e.options): e.decision
        for e in ENTRIES
        if e.where == "cpu, TRITON_INTERPRET=1" and e.request == "fused=True"
    }
    for family, options, what, detail in results:
        d = table[(family, options)]
        if d.refused:
            assert what == "refused" and d.reason in detail, (family, options, what, detail)
        elif what == "decision only":
            assert detail == "fused-triton"
        else:
            assert what == d.path.name == "fused-triton", (family, options, what)
            assert detail <= TOL, (family, options, detail)
