"""pylo_runtime/specs: one torch-free spec per family, used by the converter and the runtime.

Every family refuses the same hostile or broken configs and thetas, at construction, at ``load_optimizer``
/ ``from_checkpoint`` (naming the file) and at conversion, before anything is built from them.
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_bridge.converter import architectures
from lopt_bridge.converter.architectures.base import table_shapes
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.pylo_runtime import load_optimizer, optimizer_class, specs
from lopt_bridge.pylo_runtime.checkpoint import FORMAT_NAME, FORMAT_VERSION
from lopt_bridge.pylo_runtime.specs import SpecError, common

ROOT = Path(__file__).resolve().parents[1]

#: A small valid config per family, and the size option an absurd value is tried on.
SMALL: dict[str, dict] = {
    "velo": {"lstm_hidden_size": 8, "param_inits": 2},
    "celo": {"lstm_hidden_size": 8, "param_inits": 2},
    "celo_adam": {"lstm_hidden_size": 8},
    "celo2": {"ff_hidden_size": 4},
    "small_fc_lopt": {"hidden_size": 4},
    "mlp_lopt": {"hidden_size": 4},
    "mulo": {"hidden_size": 4, "clip_grad": True},
    "rnn_mlp_lopt": {"lstm_hidden_size": 8, "hidden_size": 4, "from_mlp_size": 3, "from_lstm_size": 2},
    "nn_adam": {"lstm_hidden_size": 8},
}
SIZE_KEY = {
    "velo": "ff_hidden_layers",
    "celo": "ff_hidden_layers",
    "celo_adam": "lstm_hidden_size",
    "celo2": "ff_hidden_layers",
    "small_fc_lopt": "hidden_layers",
    "mlp_lopt": "hidden_layers",
    "mulo": "hidden_layers",
    "rnn_mlp_lopt": "hidden_layer",
    "nn_adam": "lstm_hidden_size",
}
#: A float option (refused when not finite) and a second one (refused as a string), per family.
FLOAT_KEYS = {
    "rnn_mlp_lopt": ("step_multiplier", "magnitude_rate"),
    "nn_adam": ("output_scale", "decay_strength"),
}
#: The decay list checked for a decay outside [0, 1] (MLPLOpt and NNAdam have none).
DECAY_KEY = {"rnn_mlp_lopt": "decays", "mlp_lopt": None, "nn_adam": None}
FAMILIES = sorted(SMALL)


def float_keys(arch: str) -> tuple[str, str]:
    return FLOAT_KEYS.get(arch, ("step_mult", "exp_mult"))


def make_theta(arch: str, config: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Small random theta with the spec's names and shapes (construction only: the values do not matter)."""
    spec = specs.family(arch)
    gen = torch.Generator().manual_seed(0)
    table = spec.tensor_table(spec.validate(config))
    return {k: (0.1 * torch.randn(ts.shape, generator=gen)).to(dtype) for k, ts in table.items()}


_SMALL = object()


def build(arch: str, theta=None, config=_SMALL):
    """The runtime class of ``arch`` over two small params."""
    config = SMALL[arch] if config is _SMALL else config
    theta = make_theta(arch, SMALL[arch]) if theta is None else theta
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(4, requires_grad=True)]
    return optimizer_class(arch)(params, theta, config, num_steps=10)


def write_file(path: Path, arch: str, config_json: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A lopt-convert-style file with the given raw config JSON (no validation on the way in)."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": arch}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**meta, "config": config_json}
    )
    return path


# ----------------------------------------------------------------------------------------------------
# The specs themselves.
def test_every_family_has_a_spec_and_a_runtime_class():
    assert set(specs.FAMILIES) == set(SMALL) == set(architectures.names())
    for arch, spec in specs.FAMILIES.items():
        assert spec.ARCH == arch and optimizer_class(arch).SPEC is spec
        cfg = spec.validate({})
        assert dict(cfg) == spec.validate(cfg).to_dict()  # validating a validated config changes nothing
        assert set(cfg) == set(spec.DEFAULTS)
        # The converter's defaults are the spec's.
        assert architectures.by_name(arch).defaults() == cfg.to_dict()


def test_constants_agree_with_the_runtime():
    from lopt_bridge.pylo_runtime.features import STEP_TIMESCALES

    assert specs.adafac.N_TIME_FEATURES == len(STEP_TIMESCALES)
    assert specs.adafac.n_inputs(specs.adafac.DEFAULTS) == 39
    assert specs.mlp_lopt.N_INPUTS == 19


def test_config_is_read_only_and_hashable():
    cfg = specs.velo.validate({"lstm_hidden_size": 8})
    assert cfg.lstm_hidden_size == 8 and cfg["initial_rms_decays"] == [0.999]
    with pytest.raises(AttributeError):
        cfg.lstm_hidden_size = 9
    with pytest.raises(TypeError):
        cfg["lstm_hidden_size"] = 9  # type: ignore[index]
    assert hash(cfg) == hash(specs.velo.validate({"lstm_hidden_size": 8}))
    d = cfg.to_dict()
    d["initial_rms_decays"].append(0.5)
    assert cfg["initial_rms_decays"] == [0.999]
    for copied in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), copy.copy(cfg)):
        assert copied == cfg and copied.arch == "velo" and copied.lstm_hidden_size == 8
    velo_cfg = specs.velo.VeLOConfig.from_config(cfg)
    assert copy.deepcopy(velo_cfg) == velo_cfg and velo_cfg.mom_decays == (0.9, 0.99, 0.999)
    with pytest.raises(AttributeError, match="velo config has no option 'nope'"):
        cfg.nope  # noqa: B018


def test_check_theta_message_names_found_and_expected():
    table = {"a": common.TensorSpec(("x", "a"), (2, 3), "why"), "s": common.TensorSpec(("x", "s"), ())}
    common.check_theta("T", table, {"a": (2, 3), "s": (1,)}, {"a": "float32", "s": "bfloat16"})  # 0-d as (1,)
    with pytest.raises(
        SpecError, match=r"^T: theta tensor a has shape \(3, 2\), config expects \(2, 3\) \(why\)$"
    ):
        common.check_theta("T", table, {"a": (3, 2), "s": ()})
    with pytest.raises(SpecError, match=r"theta lacks s \(config expects 2 tensors\); theta has unexpected"):
        common.check_theta("T", table, {"a": (2, 3), "b": ()})
    with pytest.raises(SpecError, match=r"theta tensor a has dtype int32, expected a float dtype") as e:
        common.check_theta("T", table, {"a": (2, 3), "s": ()}, {"a": "int32", "s": "float32"})
    assert e.value.key == "a"


def test_sizes_at_the_bounds_are_accepted_and_tables_stay_small():
    cfg = specs.velo.validate({"ff_hidden_layers": common.MAX_LAYERS, "lstm_hidden_size": common.MAX_WIDTH})
    assert len(specs.velo.tensor_table(cfg)) == 14 + 14 + 2 * common.MAX_LAYERS + 1
    # make_separate_weights: one 0-d tensor per MLP weight, so the count is bounded before any table.
    sep = {"concat_weights": False, "make_separate_weights": True}
    assert len(specs.adafac.tensor_table(specs.adafac.validate({**sep, "hidden_size": 3}))) == 143
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"describes \d+ theta tensors .*at most 65536"):
        specs.adafac.validate({**sep, "hidden_size": 4096})
    assert time.perf_counter() - t0 < 1.0


def test_mulo_mup_lrs():
    v = specs.mulo.validate({"mup_lrs": {"linear": {"w": 0.5, "b": 1}, "ln": [1, 2]}})
    assert v["mup_lrs"]["linear"]["w"] == 0.5
    deep: list = [1.0]
    for _ in range(20):
        deep = [deep]
    for bad in [{"w": float("inf")}, "x", {"w": True}, deep]:
        with pytest.raises(SpecError, match="mup_lrs"):
            specs.mulo.validate({"mup_lrs": bad})


@pytest.mark.parametrize("arch", FAMILIES)
def test_converter_table_is_the_spec_table(arch):
    """The converter checks the tree against exactly the spec's tensors (names, paths and shapes)."""
    spec = specs.family(arch)
    cfg = spec.validate(SMALL[arch])
    table = spec.tensor_table(cfg)
    tree: dict = {}
    for ts in table.values():
        node = tree
        for k in ts.keys[:-1]:
            node = node.setdefault(k, {})
        node[ts.keys[-1]] = np.zeros(ts.shape, np.float32)
    built = architectures.by_name(arch).build(tree, dict(SMALL[arch]), source="t")
    assert built.config == cfg.to_dict()
    assert {k: v.shape for k, v in built.tensors.items()} == {k: ts.shape for k, ts in table.items()}
    assert {k: tuple(v["keys"]) for k, v in built.source_paths.items()} == {
        k: ts.keys for k, ts in table.items()
    }
    assert len(table_shapes(table)) == len(table)  # no two tensors share a source path
    build(arch, make_theta(arch, SMALL[arch]))  # and the runtime accepts the same table


# ----------------------------------------------------------------------------------------------------
# Runtime constructors: every family refuses the same inputs, naming the key and the expected value.
def _bad_configs(arch: str) -> list[tuple[object, str]]:
    key = SIZE_KEY[arch]
    (step, other), decay = float_keys(arch), DECAY_KEY.get(arch, "initial_rms_decays")
    return [
        (None, "config must be a mapping of option names to values, got null"),
        ([1, 2], "config must be a mapping of option names to values, got a list"),
        (
            {**SMALL[arch], "bogus_flag": 1},
            r"unknown constructor argument\(s\) bogus_flag \(not an option of",
        ),
        ({**SMALL[arch], key: True}, rf"option {key} must be an int in \[\d, \d+\], got True"),
        ({**SMALL[arch], key: "2"}, rf"option {key} must be an int in \[\d, \d+\], got '2'"),
        ({**SMALL[arch], key: [2]}, rf"option {key} must be an int in \[\d, \d+\], got \[2\]"),
        ({**SMALL[arch], key: 2.0}, rf"option {key} must be an int in \[\d, \d+\], got 2.0"),
        ({**SMALL[arch], key: 100000000}, rf"option {key} must be an int in \[\d, \d+\], got 100000000"),
        ({**SMALL[arch], key: 1e9}, rf"option {key} must be an int in \[\d, \d+\], got 1000000000.0"),
        ({**SMALL[arch], step: float("inf")}, f"option {step} must be a finite number, got inf"),
        ({**SMALL[arch], step: float("nan")}, f"option {step} must be a finite number, got nan"),
        ({**SMALL[arch], other: "0.1"}, f"option {other} must be a finite number, got '0.1'"),
    ] + ([] if decay is None else [
        ({**SMALL[arch], decay: [1.5]}, rf"option {decay} must be a list of 1 to 64"),
    ])  # fmt: skip


@pytest.mark.parametrize("arch", FAMILIES)
def test_constructor_refuses_bad_configs(arch):
    cls = optimizer_class(arch).__name__
    theta = make_theta(arch, SMALL[arch])
    for config, pattern in _bad_configs(arch):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=rf"^{cls}: {pattern}"):
            build(arch, theta, config)
        assert time.perf_counter() - t0 < 2.0, (config, "refusals must not build anything first")


@pytest.mark.parametrize("arch", FAMILIES)
def test_constructor_refuses_bad_theta(arch):
    cls = optimizer_class(arch).__name__
    good = make_theta(arch, SMALL[arch])
    name, tensor = next(iter(good.items())) if arch != "mlp_lopt" else ("linear_0.w", good["linear_0.w"])
    wrong = {**good, name: torch.zeros(*tensor.shape, 5)}
    with pytest.raises(ValueError, match=rf"^{cls}: theta tensor {name} has shape .*, config expects "):
        build(arch, wrong)
    with pytest.raises(
        ValueError, match=rf"^{cls}: theta lacks {name} \(config expects {len(good)} tensors\)"
    ):
        build(arch, {k: v for k, v in good.items() if k != name})
    with pytest.raises(ValueError, match=rf"^{cls}: theta has unexpected tensor\(s\) extra.w"):
        build(arch, {**good, "extra.w": torch.zeros(2)})
    for dtype in (torch.int32, torch.bool, torch.complex64):
        with pytest.raises(
            ValueError, match=rf"^{cls}: theta tensor .* has dtype {str(dtype)[6:]}.*, expected a float"
        ):
            build(arch, make_theta(arch, SMALL[arch], dtype=dtype))
    with pytest.raises(ValueError, match=rf"^{cls}: theta entry '{name}' is a ndarray, not a torch.Tensor"):
        build(arch, {**good, name: tensor.numpy()})
    # A config whose sizes disagree with the theta (one more hidden layer / a wider LSTM).
    key = SIZE_KEY[arch]
    bigger = {**SMALL[arch], key: specs.family(arch).validate(SMALL[arch])[key] + 1}
    with pytest.raises(ValueError, match=rf"^{cls}: theta "):
        build(arch, good, bigger)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # float theta of any width is fine
        build(arch, make_theta(arch, SMALL[arch], dtype=dtype))


# ----------------------------------------------------------------------------------------------------
# From a file: load_optimizer and from_checkpoint name the file, and refuse before loading tensors.
@pytest.mark.parametrize("arch", FAMILIES)
def test_files_with_bad_config_or_theta_are_refused_naming_the_file(tmp_path, arch):
    cls = optimizer_class(arch)
    theta = make_theta(arch, SMALL[arch])
    full = specs.family(arch).validate(SMALL[arch]).to_dict()
    good = write_file(tmp_path / "good.safetensors", arch, json.dumps(full), theta)
    params = [torch.zeros(3, 2, requires_grad=True)]
    assert type(load_optimizer(str(good), params, num_steps=5)) is cls
    assert type(cls.from_checkpoint(str(good), params, num_steps=5)) is cls
    key = SIZE_KEY[arch]
    cases = [
        ("null", "metadata 'config' must be a JSON object of option names, got null"),
        ("[1, 2]", "metadata 'config' must be a JSON object of option names, got a JSON list"),
        (
            json.dumps({**full, key: 1e9}),
            rf"{arch}: option {key} must be an int in \[\d, \d+\], got 1000000000.0",
        ),
        (
            json.dumps({**full, key: 10**9}),
            rf"{arch}: option {key} must be an int in \[\d, \d+\], got 1000000000",
        ),
        (
            json.dumps({**full, float_keys(arch)[0]: float("inf")}),
            f"{arch}: option {float_keys(arch)[0]} must be a finite number",
        ),
        (json.dumps({**full, "bogus_flag": 1}), rf"{arch}: unknown constructor argument\(s\) bogus_flag"),
        (json.dumps({**full, key: full[key] + 1}), f"{arch}: theta "),
    ]
    for i, (config_json, pattern) in enumerate(cases):
        path = write_file(tmp_path / f"bad{i}.safetensors", arch, config_json, theta)
        for load in (load_optimizer, cls.from_checkpoint):
            t0 = time.perf_counter()
            with pytest.raises(ValueError, match=rf"^{path}: {pattern}"):
                load(str(path), params, num_steps=5)
            assert time.perf_counter() - t0 < 2.0, config_json
    name = next(iter(theta))
    for tensors, pattern in [
        (
            {**theta, name: theta[name].to(torch.int32)},
            rf"theta tensor {name} has dtype int32, expected a float",
        ),
        ({**theta, name: torch.zeros(7)}, rf"theta tensor {name} has shape \(7,\), config expects"),
        ({k: v for k, v in theta.items() if k != name}, rf"theta lacks {name}"),
    ]:
        path = write_file(tmp_path / "bad_theta.safetensors", arch, json.dumps(full), tensors)
        with pytest.raises(ValueError, match=rf"^{path}: {arch}: {pattern}"):
            load_optimizer(str(path), params, num_steps=5)


def test_unknown_architecture_in_a_file_names_the_file(tmp_path):
    path = write_file(tmp_path / "x.safetensors", "no_such_family", "{}", {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=rf"^{path}: unknown architecture 'no_such_family'; known: celo, "):
        load_optimizer(str(path), [torch.zeros(2, requires_grad=True)], num_steps=5)


# ----------------------------------------------------------------------------------------------------
# The converter: absurd bindings are refused by the spec, naming the key and the bound, before any table.
@pytest.mark.parametrize("arch", FAMILIES)
def test_converter_refuses_absurd_bindings_quickly(arch):
    spec = specs.family(arch)
    table = spec.tensor_table(spec.validate(SMALL[arch]))
    tree: dict = {}
    for ts in table.values():
        node = tree
        for k in ts.keys[:-1]:
            node = node.setdefault(k, {})
        node[ts.keys[-1]] = np.zeros(ts.shape, np.float32)
    key = SIZE_KEY[arch]
    for value, shown in [(100000000, "100000000"), (1e9, "1000000000.0"), ("4", "'4'"), (True, "True")]:
        t0 = time.perf_counter()
        with pytest.raises(
            ConversionError, match=rf"^src: {arch}: option {key} must be an int in \[\d, \d+\], got {shown}$"
        ):
            architectures.by_name(arch).build(tree, {**SMALL[arch], key: value}, source="src")
        assert time.perf_counter() - t0 < 1.0
    step = float_keys(arch)[0]
    with pytest.raises(
        ConversionError, match=rf"^src: {arch}: option {step} must be a finite number, got inf$"
    ):
        architectures.by_name(arch).build(tree, {**SMALL[arch], step: float("inf")}, source="src")


def _run_cli(*args: str, block_torch: bool, timeout: float = 120) -> subprocess.CompletedProcess:
    """``lopt-convert ARGS`` in a fresh interpreter; with ``block_torch`` any import of torch fails."""
    code = (
        "import sys\n"
        + ("sys.modules['torch'] = None\nsys.modules['triton'] = None\n" if block_torch else "")
        + f"sys.argv = ['lopt-convert', *{list(args)!r}]\n"
        + "from lopt_bridge import cli\n"
        + "try:\n    cli.convert_main()\nfinally:\n"
        + "    assert sys.modules.get('torch') is None, 'torch was imported'\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_the_converter_never_imports_torch(tmp_path):
    """Convert, inspect and verify with torch made unimportable (``sys.modules['torch'] = None``)."""
    src = ROOT / "tests" / "data" / "lo" / "velo_small" / "params"
    out = tmp_path / "v.safetensors"
    for args in (["auto", "--source", str(src), "-o", str(out)], ["inspect", str(out)], ["verify", str(out)]):
        r = _run_cli(*args, block_torch=True)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert out.is_file()
    # The specs import nothing heavier than the standard library.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
        "import lopt_bridge.pylo_runtime.specs"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}).returncode == 0
    )


def test_tiny_config_gin_with_absurd_layers_is_refused_at_once(tmp_path):
    """Issue 12 part 3: a 200-byte config.gin with hidden_layers = 100000000 (58 s and 3.4 GB before)."""
    fixture = ROOT / "parity_tests" / "fixtures" / "small_fc_lopt_pylo" / "checkpoint" / "params"
    (tmp_path / "params").write_bytes(fixture.read_bytes())
    (tmp_path / "config.gin").write_text(
        "AdafacMLPLOpt.hidden_layers = 100000000\nrun_train.lopt = @AdafacMLPLOpt()\n"
    )
    out = tmp_path / "o.safetensors"
    t0 = time.perf_counter()
    r = _run_cli("auto", "--source", str(tmp_path / "params"), "-o", str(out), block_torch=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "option hidden_layers must be an int in [0, 1024], got 100000000" in lines[0]
    assert str(tmp_path / "params") in lines[0] and not out.exists()
    assert elapsed < 20.0, elapsed  # interpreter start included; the refusal itself takes milliseconds
