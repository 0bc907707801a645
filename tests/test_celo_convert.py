"""Celo / Celo-Adam conversion: theta.state -> validated, named tensors -> a file the runtime loads."""

from __future__ import annotations

import numpy as np
import pytest

from lopt_bridge.converter import architectures
from lopt_bridge.converter.architectures.celo import CELO, CELO_ADAM
from lopt_bridge.converter.convert import convert_source
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.converter.flax_msgpack import flatten_tree, load
from lopt_bridge.parity_tests.fixture import repo_root
from lopt_bridge.pylo_runtime import load_optimizer, read_checkpoint
from lopt_bridge.pylo_runtime.celo import Celo
from lopt_bridge.pylo_runtime.celo_adam import CeloAdam
from lopt_bridge.pylo_runtime.specs.celo import DEFAULTS as CELO_DEFAULTS
from lopt_bridge.pylo_runtime.specs.celo import ff_input_widths
from lopt_bridge.pylo_runtime.specs.celo_adam import DEFAULTS as CELO_ADAM_DEFAULTS

SHARED = repo_root().parent / "shared" / "checkpoints"
FIXTURES = repo_root() / "parity_tests" / "fixtures"
REAL = {"celo": (CELO, Celo), "celo_adam": (CELO_ADAM, CeloAdam)}


def _shared(name: str):
    path = SHARED / name / "theta.state"
    if not path.is_file():
        pytest.skip(f"{path} absent (published weights are read from ../shared/checkpoints)")
    return path


@pytest.mark.parametrize("name", ["celo", "celo_adam"])
def test_real_weights_convert_and_load(name, tmp_path):
    src = _shared(name)
    arch, cls = REAL[name]
    tree = load(src)
    assert architectures.detect(tree, source=str(src)).name == name
    out = convert_source(str(src), tmp_path / f"{name}.safetensors", architecture=name)
    ck = read_checkpoint(out)
    assert ck.architecture == name
    assert ck.config == arch.defaults()  # every size inferred from the shapes equals factory.py's
    flat = {"/".join(k): v for k, v in flatten_tree(tree).items()}
    for tname, info in arch.build(tree, {}, source=str(src)).source_paths.items():
        assert np.array_equal(ck.tensors[tname].numpy(), flat[info["path"]]), tname
    assert len(ck.tensors) == len(flat)  # every leaf carried, including the (inert) rnn_to_controls
    import torch

    opt = load_optimizer(str(out), [torch.zeros(3, requires_grad=True)], num_steps=10)
    assert type(opt) is cls


def test_celo_carries_rnn_to_controls_and_orders_w0_numerically():
    tree = load(FIXTURES / "celo_random_inits3" / "checkpoint" / "random_theta.state")
    spec = CELO.build(tree, {"step_mult": 1.0}, source="t")
    assert spec.config["param_inits"] == 3
    assert spec.tensors["rnn.to_controls.w"].shape == (64, 3)
    assert spec.source_paths["ff.w0.10"]["path"] == "ff_mod_stack/~/w0__10"
    assert spec.source_paths["rnn.lstm.w"]["keys"] == ["rnn_params", "rnn/linear", "w"]
    widths = [spec.tensors[f"ff.w0.{i}"].shape[1] for i in range(len(ff_input_widths(spec.config)))]
    assert widths == ff_input_widths(spec.config) == [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]


def test_detection_tells_the_two_apart():
    celo = load(FIXTURES / "celo_random" / "checkpoint" / "random_theta.state")
    adam = load(FIXTURES / "celo_adam_random" / "checkpoint" / "random_theta.state")
    assert CELO.matches(celo) and not CELO_ADAM.matches(celo)
    assert CELO_ADAM.matches(adam) and not CELO.matches(adam)
    # A VeLO-like LSTM (many per-tensor inputs) is not Celo's.
    velo_like = {k: dict(v) for k, v in celo.items()}
    velo_like["rnn_params"] = dict(celo["rnn_params"])
    velo_like["rnn_params"]["linear_2"] = {"w": np.zeros((30, 64), np.float32), "b": np.zeros(64, np.float32)}
    assert not CELO.matches(velo_like)


def test_gin_names_do_not_claim_learned_optimizations_classes():
    names = set(CELO.gin_names) | set(CELO_ADAM.gin_names)
    assert names == {"celo.optimizers.celo.Celo", "celo.optimizers.celo_adam.Celo"}
    assert not {"HyperV2", "AdafacMLPLOpt", "Celo"} & names


def test_defaults_are_factory_arguments():
    assert CELO_DEFAULTS["param_inits"] == 1 and CELO_DEFAULTS["train_phase"] == 2
    assert CELO_DEFAULTS["initial_momentum_decays"] == [0.9, 0.99, 0.999]
    assert (
        CELO_ADAM_DEFAULTS["initial_momentum_decays"] == [0.9]
        and CELO_ADAM_DEFAULTS["initial_epsilon"] == 1e-8
    )
    assert CELO_ADAM_DEFAULTS["param_scale_mult"] is False and CELO_ADAM_DEFAULTS["mom_decay"] is True


def test_bad_theta_is_a_one_line_error_naming_the_file():
    tree = load(FIXTURES / "celo_random" / "checkpoint" / "random_theta.state")
    tree["rnn_params"]["step_size"]["w"] = np.zeros((3, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        CELO.build(tree, {}, source="some/theta.state")
    msg = str(err.value)
    assert msg.startswith("some/theta.state: ") and "\n" not in msg
    assert "rnn_params/step_size/w (3, 1) (expected (64, 1))" in msg
    with pytest.raises(ConversionError, match="lstm_init_state/hidden"):
        CELO.build(
            load(FIXTURES / "celo_random" / "checkpoint" / "random_theta.state"),
            {"lstm_hidden_size": 32},
            source="x",
        )
    with pytest.raises(ConversionError, match="missing ff_mod_stack"):
        CELO.build(load(FIXTURES / "celo_adam_random" / "checkpoint" / "random_theta.state"), {}, source="x")
    with pytest.raises(ConversionError, match="unknown constructor argument"):
        CELO_ADAM.build(
            load(FIXTURES / "celo_adam_random" / "checkpoint" / "random_theta.state"), {"nope": 1}, source="x"
        )
