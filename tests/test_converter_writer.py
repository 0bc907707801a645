"""writer: metadata contract with pylo_runtime, atomic writes, refusals; bf16 sources; CLI downloads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from http_support import fake_hub, file_server, free_port, serve

from lopt_bridge.converter import sources, writer
from lopt_bridge.converter.architectures.base import ArchSpec, apply_transform
from lopt_bridge.converter.commands import main
from lopt_bridge.converter.convert import load_source
from lopt_bridge.converter.errors import ConversionError

DATA = Path(__file__).parent / "data" / "lo"


def _spec(**tensors) -> ArchSpec:
    tensors = tensors or {"a.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    paths = {k: {"path": f"x/{k}", "keys": ["x", k], "transform": None} for k in tensors}
    # Not a real family: read_checkpoint validates the config of a known architecture against its spec.
    return ArchSpec("test_arch", {"lstm_hidden_size": 4, "decays": (0.9, 0.99)}, tensors, paths)


PROV = writer.Provenance("hf://o/r/theta.state", "ab" * 32, "theta_state")


def test_metadata_matches_the_runtime_contract(tmp_path):
    import torch

    from lopt_bridge.pylo_runtime import checkpoint

    assert (writer.FORMAT_NAME, writer.FORMAT_VERSION) == (checkpoint.FORMAT_NAME, checkpoint.FORMAT_VERSION)
    out = writer.write(_spec(), tmp_path / "o.safetensors", PROV)
    ckpt = checkpoint.read_checkpoint(out)  # the runtime's own reader accepts the file
    assert set(ckpt.metadata) == set(checkpoint.META_KEYS)
    assert ckpt.architecture == "test_arch" and ckpt.config == {"lstm_hidden_size": 4, "decays": [0.9, 0.99]}
    assert torch.equal(ckpt.tensors["a.w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert json.loads(ckpt.metadata["source_paths"])["a.w"]["keys"] == ["x", "a.w"]
    assert ckpt.metadata["source_uri"] == PROV.source_uri and ckpt.metadata["source_format"] == "theta_state"


def test_refusals_leave_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(ConversionError, match=r"x/b: dtype int64, expected a float array"):
        writer.write(_spec(b=np.arange(3)), out, PROV)
    with pytest.raises(ConversionError, match=r"x/b: 1 of 3 values are NaN/Inf"):
        writer.write(_spec(b=np.array([1.0, np.nan, 2.0], np.float32)), out, PROV)
    spec = _spec()
    spec.config["fn"] = object()
    with pytest.raises(ConversionError, match="config value fn=.* cannot be stored as JSON"):
        writer.write(spec, out, PROV)
    assert list(tmp_path.iterdir()) == []
    writer.write(_spec(b=np.array([np.inf], np.float32)), out, PROV, allow_nonfinite=True)
    with pytest.raises(ConversionError, match="already exists"):
        writer.write(_spec(), out, PROV)
    writer.write(_spec(), out, PROV, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_read_rejects_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(ConversionError, match="not a safetensors file"):
        writer.read(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="not written by lopt-convert"):
        writer.read(other)


def test_apply_transform():
    leaf = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert apply_transform(leaf, "transpose:1,0").shape == (3, 2)
    assert apply_transform(leaf, "reshape:3,2; transpose:1,0").tolist() == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="unknown transform"):
        apply_transform(leaf, "scale:2")


def test_bfloat16_source_is_widened_exactly_and_recorded(tmp_path):
    src = DATA / "velo_small_bf16.theta.state"
    spec, prov = load_source(str(src), architecture="velo", sets=["use_bugged_loss_features=False"])
    assert prov.source_format == "theta_state"
    assert all(p["transform"] == "bfloat16->float32 (exact)" for p in spec.source_paths.values())
    f32 = load_source(str(DATA / "velo_small" / "params"))[0]
    for name, arr in spec.tensors.items():
        assert arr.dtype == np.float32
        # bf16 keeps the top 16 bits of the float32 (round to nearest even): within 2**-8 relative
        np.testing.assert_allclose(arr, f32.tensors[name], rtol=2**-8, atol=0)
    out = tmp_path / "bf.safetensors"
    r = CliRunner().invoke(
        main, ["velo", "--source", str(src), "-o", str(out), "--set", "use_bugged_loss_features=False"]
    )
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


# --------------------------------------------------------------------------------------- downloads via CLI


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A loopback GCS serving the small VeLO run, and a fake Hugging Face hub serving a theta.state."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "www"
    run = root / "gresearch" / "learned_optimization" / "pretrained_lopts"
    run = run / "aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620"
    run.mkdir(parents=True)
    for name in ("params", "config.gin"):
        (run / name).write_bytes((DATA / "velo_small" / name).read_bytes())
    theta = (DATA / "velo_small_bf16.theta.state").read_bytes()
    hub = fake_hub({("amoudgl/velo-4000", "theta.state"): theta})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with serve(file_server(root)[1]) as gcs, serve(hub) as hf:
        monkeypatch.setattr(sources, "GCS_ENDPOINT", gcs)
        monkeypatch.setattr(sources, "HF_ENDPOINT", hf)
        yield gcs


def test_velo_default_downloads_params_and_config(bucket, tmp_path):
    r = CliRunner().invoke(main, ["velo"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "checkpoints" / "velo.safetensors"
    meta = writer.read(out).metadata
    assert meta["source_uri"].startswith("gs://gresearch/") and meta["source_format"] == "lo_params_gin"
    assert meta["source_sha256"] == hashlib.sha256((DATA / "velo_small" / "params").read_bytes()).hexdigest()
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached == [sources.META_NAME, sources.META_NAME, "config.gin", "params"]
    v = CliRunner().invoke(main, ["verify", str(out)])  # a recorded remote source needs the user's consent
    assert v.exit_code == 2 and "--fetch-recorded-source" in v.stderr and meta["source_uri"] in v.stderr
    v = CliRunner().invoke(main, ["verify", str(out), "--fetch-recorded-source"])  # (a cache hit)
    assert v.exit_code == 0, v.output


def test_registry_sha256_is_enforced(bucket, tmp_path):
    import dataclasses

    from lopt_bridge.converter import commands, registry

    entry = dataclasses.replace(registry.load().get("velo-4000"), sha256="0" * 64)
    cmd = commands._registry_command(entry)  # the command the registry would generate for this entry
    r = CliRunner().invoke(cmd, ["-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2
    assert "sha256 mismatch" in r.stderr and "hf://amoudgl/velo-4000/theta.state" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_offline_is_exit_code_1(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(sources, "HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LOPT_BRIDGE_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["celo", "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "offline or host unreachable" in lines[0] and "hf://amoudgl/celo" in lines[0]


def test_inspect_lists_tensors_in_natural_order(tmp_path):
    """``ff.w0.2`` before ``ff.w0.10`` (safetensors stores names in plain string order)."""
    names = ["ff.w0.10", "ff.w0.2", "ff.b1", "ff.w0.1", "lstm.w_ih", "ff.w10.0", "ff.w2.0"]
    tensors = {k: np.ones(2, np.float32) for k in names}
    out = writer.write(_spec(**tensors), tmp_path / "n.safetensors", PROV)
    expected = ["ff.b1", "ff.w0.1", "ff.w0.2", "ff.w0.10", "ff.w2.0", "ff.w10.0", "lstm.w_ih"]
    assert [t["name"] for t in writer.describe(writer.read(out))["tensors"]] == expected
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    listed = [ln.split()[0] for ln in text.splitlines() if ln.startswith(("  ff.", "  lstm."))]
    assert listed == expected
