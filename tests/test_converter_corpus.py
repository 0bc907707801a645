"""Issue #12.3: every input under 1 MB finishes (success or refusal) in under 5 s of CPU and 500 MB of peak
memory, under an address-space limit.

The whole bad-input corpus (tests/hostile_inputs.py, gin and metadata cases, the fuzz crash corpus under
tests/data/fuzz_corpus/, plus good files that must still convert) runs in one subprocess
(tests/corpus_driver.py) with ``RLIMIT_AS`` = its size after imports + 500 MiB. CPU time, not wall time,
is the time measure: on a shared machine wall time measures the neighbours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile_inputs import MSGPACK_CASES, PICKLE_CASES
from safetensors import safe_open
from safetensors.numpy import save_file

from lopt_bridge.converter import flax_msgpack

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
VELO_DIR = DATA / "lo" / "velo_small"
FUZZ = DATA / "fuzz_corpus"
SMALL_SETS = ["--set", "architecture=velo", "--set", "use_bugged_loss_features=False"]
MULO_PICKLE = ROOT / "parity_tests" / "fixtures" / "mulo_pylo" / "checkpoint" / "global_step1.pickle"
CPU_LIMIT_S = 5.0
MEMORY_LIMIT_MB = 500.0
Case = tuple[str, list[str], set[int]]  # (mode, args, accepted exit codes)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    assert len(data) < 1 << 20, f"{name}: the corpus is for inputs under 1 MB ({len(data)} bytes)"
    return path


def _gin_folder(folder: Path, params: bytes, gin: str) -> Path:
    _write(folder, "params", params)
    _write(folder, "config.gin", gin.encode())
    return folder


def _converted_with(folder: Path, **config: object) -> Path:
    """The small VeLO fixture converted, then its metadata config changed."""
    from click.testing import CliRunner

    from lopt_bridge.converter.commands import main

    good = folder / "velo_small.safetensors"
    if not good.exists():
        assert CliRunner().invoke(main, ["velo", "--source", str(VELO_DIR), "-o", str(good)]).exit_code == 0
    with safe_open(str(good), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
    path = folder / f"crafted-{len(list(folder.glob('crafted-*')))}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _builders() -> dict[str, Callable[[Path], Case]]:
    """name -> function(case folder) -> (mode, args, accepted exit codes)."""
    out: dict[str, Callable[[Path], Case]] = {}
    for name, (data, _) in MSGPACK_CASES.items():
        out[f"msgpack: {name}"] = lambda d, data=data: (
            "cli",
            ["auto", "--source", str(_write(d, "theta.state", data)), "-o", str(d / "o.safetensors")],
            {2},
        )
    for name, (make, _) in PICKLE_CASES.items():
        out[f"pickle: {name}"] = lambda d, make=make: (
            "cli",
            [
                "auto",
                "--source",
                str(_write(d, "theta.pkl", make())),
                "-o",
                str(d / "o.safetensors"),
                "--allow-pickle",
                *SMALL_SETS,
            ],
            {2},
        )
    velo_gin = (VELO_DIR / "config.gin").read_text()
    velo_params = (VELO_DIR / "params").read_bytes()
    macro_bomb = "\n".join(["M0 = [1, 1]", *(f"M{i} = [%M{i - 1}, %M{i - 1}]" for i in range(1, 25))])
    gin_cases = {
        "gin: values 600 deep": "HyperV2.param_inits = " + "[" * 600 + "]" * 600,
        "gin: 5000-digit int": "HyperV2.param_inits = " + "9" * 5000,
        "gin: macro bomb (2**25 values)": macro_bomb + "\nHyperV2.param_inits = %M24",
        "gin: lstm_hidden_size = 100000000": "HyperV2.lstm_hidden_size = 100000000",
        "gin: 1 MB of bindings": "\n".join(f"HyperV2.x{i} = {i}" for i in range(40000)),
    }
    for name, extra in gin_cases.items():
        out[name] = lambda d, extra=extra: (
            "cli",
            [
                "velo",
                "--source",
                str(_gin_folder(d, velo_params, velo_gin + "\n" + extra + "\n")),
                "-o",
                str(d / "o.safetensors"),
            ],
            {2},
        )
    empty = flax_msgpack.encode({"params": {}, "gen_id": "", "step": 0})
    out["config: AdafacMLPLOpt.hidden_layers = 100000000, empty theta (issue: 58 s, 3.4 GB)"] = lambda d: (
        "cli",
        [
            "auto",
            "--source",
            str(
                _gin_folder(
                    d, empty, "run_train.lopt = @AdafacMLPLOpt()\nAdafacMLPLOpt.hidden_layers = 100000000\n"
                )
            ),
            "-o",
            str(d / "o.safetensors"),
        ],
        {2},
    )
    out["config: ff_hidden_layers 1e9 in a converted file, verify"] = lambda d: (
        "cli",
        ["verify", str(_converted_with(d, ff_hidden_layers=10**9)), "--source", str(VELO_DIR)],
        {1},
    )
    out["config: ff_hidden_layers 1e9 in a converted file, runtime load + step (issue: hangs)"] = lambda d: (
        "runtime",
        [str(_converted_with(d, ff_hidden_layers=10**9))],
        {2},
    )
    out["metadata: config value nested 900 deep (inspect)"] = lambda d: (
        "cli",
        ["inspect", str(_converted_with(d, x=json.loads("[" * 900 + "]" * 900)))],
        {0},
    )
    # good inputs must still convert within the same limits
    out["good: velo_small folder"] = lambda d: (
        "cli",
        ["velo", "--source", str(VELO_DIR), "-o", str(d / "o.safetensors")],
        {0},
    )
    out["good: celo-style small_fc_lopt theta.state"] = lambda d: (
        "cli",
        [
            "small-fc-lopt",
            "--source",
            str(DATA / "adafac" / "celo_adafac_theta.state"),
            "-o",
            str(d / "o.safetensors"),
        ],
        {0},
    )
    out["good: muLO pickle"] = lambda d: (
        "cli",
        [
            "auto",
            "--source",
            str(MULO_PICKLE),
            "-o",
            str(d / "o.safetensors"),
            "--allow-pickle",
            "--set",
            "architecture=mulo",
            "--set",
            "hidden_size=32",
            "--set",
            "step_mult=0.01",
        ],
        {0},
    )
    out["good: runtime load + step of velo_small"] = lambda d: ("runtime", [str(_converted_with(d))], {0})
    for path in sorted(FUZZ.glob("*")) if FUZZ.is_dir() else []:
        if path.name.endswith((".md", ".json")):
            continue
        extra = ["--allow-pickle", *SMALL_SETS] if path.suffix == ".pkl" else []
        out[f"fuzz corpus: {path.name}"] = lambda d, path=path, extra=extra: (
            "cli",
            ["auto", "--source", str(path), "-o", str(d / "o.safetensors"), *extra],
            {0, 2},
        )
    return out


BUILDERS = _builders()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    cases, expected = [], {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        folder = root / f"case{i:03d}"
        folder.mkdir()
        mode, args, codes = build(folder)
        cases.append({"name": name, "mode": mode, "args": args})
        expected[name] = codes
    (root / "cases.json").write_text(json.dumps(cases))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LOPT_BRIDGE_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "corpus_driver.py"),
        str(root / "cases.json"),
        str(root / "results.json"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((root / "results.json").read_text())
    return {"doc": doc, "by_name": {r["name"]: r for r in doc["results"]}, "expected": expected}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_corpus_case(results, name):
    r = results["by_name"][name]
    assert r["timeout"] is None, f"stopped after {CPU_LIMIT_S} s of CPU / 60 s wall ({r['timeout']})"
    assert r["escaped"] is None, f"exception escaped: {r['escaped']}"
    assert r["exit_code"] in results["expected"][name], (r["exit_code"], r["stderr"])
    if r["exit_code"] != 0:
        assert len(r["stderr"]) == 1, r["stderr"]
        assert "internal error" not in r["stderr"][0] and "memory" not in r["stderr"][0].lower(), r["stderr"]
    assert r["cpu_s"] < CPU_LIMIT_S, f"{r['cpu_s']:.2f} s of CPU"
    if r["peak_mb"] is not None:
        assert r["peak_mb"] < MEMORY_LIMIT_MB, f"{r['peak_mb']:.0f} MB peak"


def test_corpus_ran_under_the_limit(results):
    doc = results["doc"]
    assert doc["limit_mb"] == 500 and doc["base_mb"] > 0  # RLIMIT_AS was set from a real baseline
    assert len(doc["results"]) == len(BUILDERS)
