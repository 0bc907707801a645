"""Issue #12.1: a source URL (typed, or recorded in a file's metadata) can write nothing outside the cache.

A loopback server answers every GET with attacker bytes; each trick is run through the CLI and the whole
temp tree is compared before and after: the only new files may lie inside the cache root (after resolving
links), the output may appear only where ``-o`` says, and the victim folder stays empty.
"""

from __future__ import annotations

import http.server
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner
from http_support import serve
from safetensors import safe_open
from safetensors.numpy import save_file

from lopt_bridge.converter.commands import main

VELO_DIR = Path(__file__).parent / "data" / "lo" / "velo_small"
EVIL = b"import os; os.system('echo owned')\n"


class _Evil(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Evil.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(EVIL)))
        self.end_headers()
        self.wfile.write(EVIL)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def world(tmp_path, monkeypatch):
    """(base URL, cache root, victim folder); cwd is an empty work folder."""
    cache, victim, work = tmp_path / "cache", tmp_path / "victim", tmp_path / "work"
    for d in (cache, victim, work):
        d.mkdir()
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(cache))
    monkeypatch.chdir(work)
    _Evil.hits.clear()
    with serve(_Evil) as url:
        yield url, cache, victim


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _escaped(tmp_path: Path, cache: Path, before: set[Path], allowed: set[Path] = frozenset()) -> list[Path]:
    """New files outside the cache root (links resolved), other than ``allowed``."""
    root = cache.resolve()
    out = []
    for p in _files(tmp_path) - before - set(allowed):
        try:
            p.resolve().relative_to(root)
        except ValueError:
            out.append(p)
    return out


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _tricks(base: str, victim: Path) -> dict[str, str]:
    absolute = urllib.parse.quote(str(victim / "evil.pth"), safe="")
    return {
        "absolute path via %2F": f"{base}/x/{absolute}",
        "plain ..": f"{base}/x/../../../../{victim.name}/evil.pth",
        "%2e%2e": f"{base}/x/%2e%2e/%2e%2e/%2e%2e/evil.pth",
        "%2e%2e%2f in one segment": f"{base}/x/%2e%2e%2f%2e%2e%2fevil.pth",
        "backslashes": f"{base}/x/..\\..\\..\\evil.pth",
        "%5C backslashes": f"{base}/x/..%5C..%5Cevil.pth",
        "last segment ..": f"{base}/x/..",
        "last segment .": f"{base}/x/.",
        "empty last segment": f"{base}/x/",
        "gs with %2e%2e": "gs://bucket/%2e%2e/%2e%2e/evil.pth",
        "hf with ..": "hf://owner/repo/../../evil.pth",
        "hf with %2F": f"hf://owner/repo/{absolute}",
    }


def test_url_tricks_write_nothing_outside_the_cache(world, tmp_path):
    base, cache, victim = world
    for name, uri in _tricks(base, victim).items():
        before = _files(tmp_path)
        r = CliRunner().invoke(main, ["auto", "--source", uri, "-o", "out.safetensors"])
        line = _one_line_exit_2(r)
        assert "not allowed" in line or "holds" in line or "empty" in line or "names no file" in line, line
        assert _escaped(tmp_path, cache, before) == [], name
        assert not any(victim.iterdir()), name
    assert _Evil.hits == []  # every trick was refused before a request was made


def test_symlinked_cache_entries(world, tmp_path, monkeypatch):
    base, cache, victim = world
    uri = f"{base}/run/theta.state"
    host = cache / "http" / f"127.0.0.1_{urllib.parse.urlsplit(base).port}"
    host.parent.mkdir(parents=True)
    host.symlink_to(victim, target_is_directory=True)
    before = _files(tmp_path)
    line = _one_line_exit_2(CliRunner().invoke(main, ["auto", "--source", uri, "-o", "out.safetensors"]))
    assert "symbolic link" in line
    assert not any(victim.iterdir()) and _escaped(tmp_path, cache, before) == []
    # the cache root itself may be a link (a user's choice): downloads land inside its target
    host.unlink()
    real_root = tmp_path / "real_cache"
    real_root.mkdir()
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache_link"))
    (tmp_path / "cache_link").symlink_to(real_root, target_is_directory=True)
    before = _files(tmp_path)
    r = CliRunner().invoke(main, ["auto", "--source", uri, "-o", "out.safetensors"])
    assert "not a flax msgpack file" in _one_line_exit_2(r)  # downloaded, then refused as a checkpoint
    new = _files(tmp_path) - before
    assert new and all(p.resolve().is_relative_to(real_root.resolve()) for p in new), new


def _crafted(tmp_path: Path, source_uri: str) -> Path:
    """A genuine converted file whose metadata names ``source_uri``."""
    out = tmp_path / "genuine.safetensors"
    r = CliRunner().invoke(main, ["velo", "--source", str(VELO_DIR), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    with safe_open(str(out), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["source_uri"] = source_uri
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata=meta)
    return crafted


def test_verify_never_fetches_a_recorded_url_unasked(world, tmp_path):
    base, cache, victim = world
    for name, uri in {**_tricks(base, victim), "plain URL": f"{base}/run/params"}.items():
        crafted = _crafted(tmp_path, uri)
        before = _files(tmp_path)
        line = _one_line_exit_2(CliRunner().invoke(main, ["verify", str(crafted)]))
        if name == "plain URL":
            assert uri in line and "--fetch-recorded-source" in line  # says what it would fetch
        assert _escaped(tmp_path, cache, before) == [] and not any(victim.iterdir()), name
        if name != "plain URL":  # the flag does not make a trick acceptable
            r = CliRunner().invoke(main, ["verify", str(crafted), "--fetch-recorded-source"])
            _one_line_exit_2(r)
            assert _escaped(tmp_path, cache, before) == [] and not any(victim.iterdir()), name
    assert _Evil.hits == []
    # asked explicitly, a plain recorded URL is fetched, into the cache only, and then fails as a source
    crafted = _crafted(tmp_path, f"{base}/run/params")
    before = _files(tmp_path)
    r = CliRunner().invoke(main, ["verify", str(crafted), "--fetch-recorded-source"])
    assert "not a flax msgpack file" in _one_line_exit_2(r)
    assert _Evil.hits == ["/run/params"] and _escaped(tmp_path, cache, before) == []


def test_verify_reads_a_recorded_local_path_but_no_device(world, tmp_path):
    crafted = _crafted(tmp_path, "/dev/zero")
    line = _one_line_exit_2(CliRunner().invoke(main, ["verify", str(crafted)]))
    assert "not a regular file" in line
    genuine = tmp_path / "genuine.safetensors"
    r = CliRunner().invoke(main, ["verify", str(genuine)])  # recorded local source: no flag needed
    assert r.exit_code == 0, r.output
