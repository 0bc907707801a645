"""The C passes' build cannot corrupt itself (pylo_runtime.kernels.cpu.build, issue #15.6).

Each case builds into its own cache directory (``LOPT_BRIDGE_CACHE``), with a compiler wrapper that logs
every real compilation (``-shared``) before running the system compiler, so "built once" is counted.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lopt_bridge.pylo_runtime import dispatch
from lopt_bridge.pylo_runtime.kernels.cpu import build, passes

HERE = Path(__file__).resolve().parent
CC = shutil.which(os.environ.get("CC", "cc"))
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler on PATH (CI installs one)")


def wrapper(tmp_path: Path, sleep: float = 0.0) -> tuple[str, Path]:
    """A ``CC`` that logs each compilation (and sleeps ``sleep`` s first), then runs the real compiler."""
    log = tmp_path / "compiles.log"
    script = tmp_path / "cc-wrapper"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            case " $* " in *" -shared "*) echo "$$" >> {log}; sleep {sleep};; esac
            exec {CC} "$@"
            """
        )
    )
    script.chmod(0o755)
    return str(script), log


def compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOPT_BRIDGE_NATIVE_TIMEOUT", raising=False)
    build.reset()
    yield tmp_path / "cache" / "native"
    build.reset()


def test_processes_started_together_build_once(cache, tmp_path):
    cc, log = wrapper(tmp_path, sleep=1.0)  # a slow compile: the others must wait, not compile too
    code = "from lopt_bridge.pylo_runtime.kernels.cpu import build; print(build.build())"
    env = dict(os.environ, CC=cc, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    done = [p.communicate(timeout=300) for p in procs]
    outs = [o.decode().strip() for o, _ in done]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-500:] for _, e in done]
    assert len(set(outs)) == 1 and build.verified(Path(outs[0])), outs
    assert compiles(log) == 1, log.read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no checksum"])
def test_damaged_cached_library_is_rebuilt_not_loaded(cache, tmp_path, monkeypatch, damage):
    cc, log = wrapper(tmp_path)
    monkeypatch.setenv("CC", cc)
    path = build.build()
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(good)))
    else:
        path.with_suffix(".sha256").unlink()
    assert not build.verified(path)
    assert build.build() == path and build.verified(path)
    assert compiles(log) == 2
    lib = build.library()  # loads (a damaged file would SIGBUS or fail to load here)
    assert lib is not None and lib.gsq_sums.restype is ctypes.c_int


def test_compiler_timeout_warns_once_and_falls_back(cache, tmp_path, monkeypatch):
    cc, _ = wrapper(tmp_path, sleep=5.0)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("LOPT_BRIDGE_NATIVE_TIMEOUT", "0.5")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # fused=True on the CPU: the C passes
    monkeypatch.setattr(dispatch, "_VERIFIED", set())
    from fused_support import adafac_theta, make_params

    from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt

    theta, cfg = adafac_theta(8)
    params = make_params([(300, 300)])
    opt = SmallFCLOpt(params, theta, cfg, num_steps=10)  # default flags: the build happens at the step
    with pytest.warns(RuntimeWarning, match=r"took more than 0.5 s on lopt_cpu.c") as rec:
        params[0].grad = torch.ones(300, 300)
        opt.step()
    assert len([w for w in rec if "lopt-bridge" in str(w.message)]) == 1
    assert opt.last_path == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once, not at every step
        opt.step()
        with pytest.raises(dispatch.FusedUnavailableError, match="took more than 0.5 s"):
            SmallFCLOpt(make_params([(3, 4)]), theta, cfg, num_steps=10, fused=True)
    assert not list(cache.glob("*.so"))


def test_waiting_for_another_build_times_out(cache, monkeypatch):
    import fcntl

    monkeypatch.setenv("LOPT_BRIDGE_NATIVE_TIMEOUT", "0.3")
    path = build.library_path(CC, 10.0)
    path.parent.mkdir(parents=True)
    with open(path.with_suffix(".lock"), "a+") as held:  # "another process" is building
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(
            RuntimeError, match=r"another process has been building lopt_cpu-\w+\.so for more"
        ):
            build.build()
    monkeypatch.delenv("LOPT_BRIDGE_NATIVE_TIMEOUT")  # (0.3 s is too short for the compiler itself)
    assert build.build() == path  # the lock released: it builds


def test_cache_key_is_what_the_compiler_makes_of_march_native(cache, monkeypatch):
    target = build.native_target(CC, 10.0)
    assert "-march=" in target or "-target-cpu" in target, target  # the driver's own expansion
    paths = set()
    for fake in ("x86 skylake -mavx2", "arm64 -target-cpu apple-m1 -target-feature +neon"):
        monkeypatch.setattr(build, "native_target", lambda exe, s, fake=fake: fake)
        paths.add(build.library_path(CC, 10.0))
    assert len(paths) == 2


def test_c_entry_points_check_their_arguments(cache):
    assert build.library() is not None
    g = torch.ones(6, 4)
    fdims = (1, 0)  # features.factored_dims((6, 4)): the row arrays drop axis 0, the column arrays axis 1
    lay = passes.layout((6, 4), fdims)
    assert lay == (4, 6, 1, 4)  # (stride, size) of axis 0, then of axis 1
    rows, cols = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64)
    ptr = passes.ptr
    with pytest.raises(RuntimeError, match="gsq_sums refused its arguments: a bad size"):
        passes._call("gsq_sums", 24, 1, 4, 5, 1, 4, ptr(g), ptr(rows), ptr(cols))  # 24 is not 4 x 5 blocks
    with pytest.raises(RuntimeError, match="a bad number of thread slots"):
        passes._call("gsq_sums", 24, 0, *lay, ptr(g), ptr(rows), ptr(cols))
    with pytest.raises(RuntimeError, match="a null pointer"):
        passes._call("gsq_sums", 24, 1, *lay, None, ptr(rows), ptr(cols))
    pf, st = torch.ones(6, 4), torch.zeros(6, 4, 3)
    fa, fb = torch.ones(4, 3), torch.ones(6, 3)
    decays = torch.full((3,), 0.9), torch.full((1,), 0.99)
    with pytest.raises(ValueError, match="the row array has 18 floats, not 4 x 3"):  # checked before C
        passes.sfc_pass1(pf, fdims, g, st, torch.zeros(6, 4, 1), fb, fb, *decays)
    with pytest.raises(RuntimeError, match="decay counts the passes do not take"):
        passes.sfc_pass1(pf, fdims, g, torch.zeros(6, 4, 2), torch.zeros(6, 4, 1), fa, fb, decays[0][:2],
                         decays[1])  # fmt: skip
    assert torch.equal(pf, torch.ones(6, 4))  # refused before touching memory
    with pytest.raises(RuntimeError, match="a hidden layer width outside 1..256"):
        w = torch.zeros(16, 300)
        layers = (torch.zeros(300, 300), torch.zeros(300), torch.zeros(300, 2), torch.zeros(2))
        passes.sfc_pass2(pf, fdims, g, st, torch.zeros(6, 4, 1), fa, fb, w, torch.zeros(4, 300),
                         torch.zeros(6, 300), layers, 0.001, 0.001, 1.0, 1.0)  # fmt: skip


def test_build_ahead_of_time_command(tmp_path):
    env = dict(os.environ, LOPT_BRIDGE_CACHE=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "lopt_bridge.pylo_runtime.kernels.cpu"]
    res = subprocess.run([*cmd, "build"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "(verified" in res.stdout, res.stderr
    path = Path(res.stdout.split()[0])
    assert path.is_file() and path.with_suffix(".sha256").is_file()
    res = subprocess.run([*cmd, "info"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "built, verified" in res.stdout
    res = subprocess.run([*cmd, "build"], env={**env, "CC": "no-such-cc"}, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip() == "error: no C compiler 'no-such-cc' on PATH (set CC)"
