"""hf:// sources through huggingface_hub, against a loopback fake hub that speaks the ``resolve`` URLs.

In-process tests point ``sources.HF_ENDPOINT`` and huggingface_hub's cache at the fake hub and a temp
folder; one subprocess test sets the real environment variables (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE,
HF_TOKEN), which huggingface_hub reads when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from http_support import COMMIT, fake_hub, free_port, serve

from lopt_bridge.converter import registry, sources
from lopt_bridge.converter.commands import main
from lopt_bridge.converter.errors import ConversionError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "lo"
SMALL = (DATA / "velo_small_bf16.theta.state").read_bytes()
PARAMS = (DATA / "velo_small" / "params").read_bytes()
GIN = (DATA / "velo_small" / "config.gin").read_bytes()
SMALL_SETS = ["--set", "architecture=velo", "--set", "use_bugged_loss_features=False"]
FILES = {
    ("me/small", "theta.state"): SMALL,
    ("me/run", "sub/params"): PARAMS,
    ("me/run", "sub/config.gin"): GIN,
    ("me/gated", "theta.state"): SMALL,
    ("amoudgl/celo", "theta.state"): SMALL,  # not the registry's bytes: its sha256 must refuse them
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake hub class (its ``hits``) with sources and huggingface_hub pointed at it."""
    import huggingface_hub.constants as hf_constants

    cls = fake_hub(FILES, gated={"me/gated"})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "ours"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    with serve(cls) as url:
        monkeypatch.setattr(sources, "HF_ENDPOINT", url)
        yield cls


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_download_lands_in_the_hf_cache_and_converts(hub, tmp_path):
    r = _run("auto", "--source", "hf://me/small/theta.state", "-o", "o.safetensors", *SMALL_SETS)
    assert r.exit_code == 0, r.output
    snapshot = tmp_path / "hf" / "models--me--small" / "snapshots" / COMMIT / "theta.state"
    assert snapshot.read_bytes() == SMALL
    assert not (tmp_path / "ours").exists()  # hf:// never uses lopt-bridge's own cache
    assert ("GET", "/me/small/resolve/main/theta.state") in hub.hits
    meta = json.loads(_run("inspect", "o.safetensors", "--json").stdout)["provenance"]
    assert meta["source_uri"] == "hf://me/small/theta.state"
    assert meta["source_sha256"] == hashlib.sha256(SMALL).hexdigest()
    # a second conversion revalidates (HEAD) but downloads nothing
    hub.hits.clear()
    r = _run("auto", "--source", "hf://me/small/theta.state", "-o", "o2.safetensors", *SMALL_SETS)
    assert r.exit_code == 0 and [m for m, _ in hub.hits].count("GET") == 0
    # --refresh downloads again
    hub.hits.clear()
    r = _run("auto", "--source", "hf://me/small/theta.state", "-o", "o3.safetensors", "--refresh",
             *SMALL_SETS)  # fmt: skip
    assert r.exit_code == 0 and [m for m, _ in hub.hits].count("GET") == 1


def test_params_and_config_gin_pair_and_revisions(hub, tmp_path):
    r = _run("auto", "--source", f"hf://me/run@{COMMIT}/sub/params", "-o", "run.safetensors")
    assert r.exit_code == 0, r.output
    assert json.loads(_run("inspect", "run.safetensors", "--json").stdout)["config"]["lstm_hidden_size"] == 8
    assert any(p.endswith(f"/resolve/{COMMIT}/sub/config.gin") for _, p in hub.hits)
    line = _line(_run("auto", "--source", "hf://me/run@v9/sub/params", "-o", "x.safetensors"), 2)
    assert "revision not found" in line and "hf://me/run@v9/sub/params" in line


def test_hub_refusals_are_one_line(hub, monkeypatch):
    cases = {
        "hf://nobody/nothing/theta.state": "repository not found",
        "hf://me/small/missing.state": "no such file in the repository",
        "hf://me/gated/theta.state": "gated repository.*HF_TOKEN",
    }
    for uri, match in cases.items():
        line = _line(_run("auto", "--source", uri, "-o", "x.safetensors"), 2)
        assert uri in line and re.search(match, line), line
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # the fake hub only checks that one is sent
    r = _run("auto", "--source", "hf://me/gated/theta.state", "-o", "g.safetensors", *SMALL_SETS)
    assert r.exit_code == 0, r.output


def test_size_cap_is_checked_before_downloading(hub):
    line = _line(_run("auto", "--source", "hf://me/small/theta.state", "-o", "x.safetensors",
                      "--max-source-size", "1K"), 2)  # fmt: skip
    assert "announces" in line and "1024-byte source limit" in line
    assert [m for m, _ in hub.hits].count("GET") == 0


def test_registry_sha256_is_checked_for_hf_sources(hub, tmp_path):
    reg = registry.load()
    assert reg.sha256_for("hf://amoudgl/celo@main/theta.state") == reg.get("celo").sha256
    for args in (["celo"], ["auto", "--source", "hf://amoudgl/celo/theta.state"],
                 ["auto", "--source", "hf://amoudgl/celo@main/theta.state"]):  # fmt: skip
        line = _line(_run(*args, "-o", "c.safetensors", *SMALL_SETS), 2)
        assert "sha256 mismatch" in line and "hf://amoudgl/celo" in line, line
        assert not (tmp_path / "c.safetensors").exists()


def test_offline_uses_the_cache(hub, monkeypatch):
    import huggingface_hub.constants as hf_constants

    r = _run("auto", "--source", "hf://me/small/theta.state", "-o", "a.safetensors", *SMALL_SETS)
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    hub.hits.clear()
    r = _run("auto", "--source", "hf://me/small/theta.state", "-o", "b.safetensors", *SMALL_SETS)
    assert r.exit_code == 0, r.output
    assert hub.hits == []
    line = _line(_run("auto", "--source", "hf://me/run/sub/params", "-o", "c.safetensors"), 1)
    assert "HF_HUB_OFFLINE" in line and "hf://me/run/sub/params" in line


def test_unreachable_hub_is_exit_1(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    line = _line(_run("auto", "--source", "hf://me/small/theta.state", "-o", "x.safetensors"), 1)
    assert "offline or host unreachable" in line
    with pytest.raises(ConversionError, match="huggingface_hub's cache"):
        sources.cache_path("hf://me/small/theta.state")


def test_environment_variables_reach_huggingface_hub(tmp_path):
    """HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE as a user sets them (read at import time)."""
    cls = fake_hub(FILES, gated={"me/gated"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hfhome"), HF_TOKEN="hf_test_token",
               LOPT_BRIDGE_CACHE=str(tmp_path / "ours"))  # fmt: skip
    out = str(tmp_path / "o.safetensors")
    cmd = [sys.executable, "-c", "from lopt_bridge import cli; cli.convert_main()", "auto", "--source",
           "hf://me/gated/theta.state", "-o", out, "--force", *SMALL_SETS]  # fmt: skip
    with serve(cls) as url:
        r = subprocess.run(cmd, env={**env, "HF_ENDPOINT": url}, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert any(m == "GET" for m, _ in cls.hits)
    blob = tmp_path / "hfhome" / "hub" / "models--me--gated" / "snapshots" / COMMIT / "theta.state"
    assert blob.read_bytes() == SMALL
    # the server is gone: HF_HUB_OFFLINE=1 converts from the cache without a request
    r = subprocess.run(cmd, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
