"""converter/architectures/velo.py: HyperV2 theta validation, size inference, naming, refusals.

Trees here are built from the layout the reference's ``HyperV2.init`` produces (checked against the reference
by the recorded fixtures, whose checkpoints were written by learned_optimization itself).
"""

from __future__ import annotations

import numpy as np
import pytest

from lopt_bridge.converter.architectures.velo import VELO, expected_shapes
from lopt_bridge.converter.errors import ConversionError
from lopt_bridge.pylo_runtime.specs.velo import ff_input_widths, tensor_table
from lopt_bridge.pylo_runtime.velo import VeLOConfig, expected_theta_shapes

SMALL = {"lstm_hidden_size": 16, "param_inits": 4}


def make_tree(bindings: dict, dtype=np.float32) -> dict:
    """A theta tree (haiku names, nested like flax's state dict) for HyperV2(**bindings)."""
    config = {**VELO.defaults(), **bindings}
    rng = np.random.default_rng(0)
    tree: dict = {}
    for keys, shape in expected_shapes(config).items():
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = rng.standard_normal(shape).astype(dtype)
    return tree


CONFIGS = [
    SMALL,
    {**SMALL, "use_bugged_loss_features": False, "use_bugged_next_lstm_state": True},
    {**SMALL, "mix_layers": False, "with_validation_feature_dim": True},
    {
        **SMALL,
        "initial_momentum_decays": [0.5, 0.9],
        "initial_rms_decays": [0.9, 0.99],
        "initial_adafactor_decays": [0.8, 0.99],
        "with_rms_norm_g": False,
        "with_rsqrt_rms": False,
        "with_rms_only_norm_g": False,
        "ff_hidden_layers": 3,
        "ff_hidden_size": 6,
    },
    {"lstm_hidden_size": 512, "param_inits": 256, "use_bugged_loss_features": False},
]


@pytest.mark.parametrize("bindings", CONFIGS)
def test_build_names_every_leaf_and_matches_the_runtime(bindings):
    tree = make_tree(bindings)
    assert VELO.matches(tree)
    spec = VELO.build(tree, bindings, source="x/params")
    assert spec.name == "velo"
    # Every leaf is carried exactly once, unchanged, and the runtime accepts the names and shapes.
    n_leaves = len(expected_shapes(spec.config))
    assert len(spec.tensors) == n_leaves == len(spec.source_paths)
    runtime = expected_theta_shapes(VeLOConfig.from_mapping(spec.config))
    assert set(runtime) <= set(spec.tensors)
    for name, shape in runtime.items():
        assert spec.tensors[name].shape == shape
    for name, entry in spec.source_paths.items():
        node = tree
        for k in entry["keys"]:
            node = node[k]
        assert node is spec.tensors[name] and entry["transform"] is None
        assert entry["path"] == "/".join(entry["keys"])


def test_w0_inputs_are_ordered_by_number_not_string():
    spec = VELO.build(make_tree(SMALL), SMALL, source="x")
    assert spec.source_paths["ff.w0.2"]["keys"][-1] == "w0__2"
    assert spec.source_paths["ff.w0.10"]["keys"][-1] == "w0__10"
    table = tensor_table(spec.config)
    w0 = [k for k in table if k.startswith("ff.w0.")]
    assert w0 == [f"ff.w0.{i}" for i in range(len(ff_input_widths(spec.config)))] and len(w0) == 14


def test_sizes_are_inferred_when_unbound():
    """The no_config form: sizes come from the shapes; --set gives the flags."""
    tree = make_tree({"lstm_hidden_size": 24, "param_inits": 5, "ff_hidden_size": 6, "ff_hidden_layers": 3})
    spec = VELO.build(tree, {"use_bugged_next_lstm_state": True}, source="x.checkpoint")
    c = spec.config
    assert (c["lstm_hidden_size"], c["param_inits"], c["ff_hidden_size"], c["ff_hidden_layers"]) == (
        24,
        5,
        6,
        3,
    )
    assert c["use_bugged_next_lstm_state"] is True and c["use_bugged_loss_features"] is True


def test_defaults_are_every_constructor_argument():
    d = VELO.defaults()
    # HyperV2's 37 arguments + amoudgl/celo's ff_mult (learned_optimization's hard-coded 100 by default).
    assert len(d) == 38 and d["lstm_hidden_size"] == 128 and d["use_bugged_loss_features"] is True
    assert d["ff_mult"] == 100.0
    assert d["initial_momentum_decays"] == [0.9, 0.99, 0.999] and d["clip_param_scale_amount"] is None


@pytest.mark.parametrize(
    "bindings, fragment",
    [
        (
            {"lstm_hidden_size": 32, "param_inits": 4},
            "lstm_hidden_size = 32 but the theta has lstm_hidden_size = 16",
        ),
        ({"lstm_hidden_size": 16, "param_inits": 8}, "param_inits = 8 but the theta has param_inits = 4"),
        ({**SMALL, "ff_hidden_layers": 1}, "ff_hidden_layers"),
        ({**SMALL, "mix_layers": False}, "rnn_params/rnn/linear/w"),
        ({**SMALL, "with_p": False}, "ff_mod_stack/~/w0__"),
    ],
)
def test_contradictions_name_the_file_key_and_shapes(bindings, fragment):
    with pytest.raises(ConversionError) as e:
        VELO.build(make_tree(SMALL), bindings, source="ckpt/params")
    msg = str(e.value)
    assert msg.startswith("ckpt/params: ") and fragment in msg and "\n" not in msg


def test_non_float_leaves_are_refused():
    tree = make_tree(SMALL)
    tree["rnn_params"]["step_size"]["b"] = np.array([1], dtype=np.int32)
    with pytest.raises(ConversionError, match="rnn_params/step_size/b is dtype int32"):
        VELO.build(tree, SMALL, source="x")
    tree["rnn_params"]["step_size"]["b"] = "abc"
    with pytest.raises(ConversionError, match="rnn_params/step_size/b"):
        VELO.build(tree, SMALL, source="x")


@pytest.mark.parametrize(
    "bindings, name",
    [
        ({"with_rms_norm_g": False, "with_rsqrt_rms": False}, "with_rms_only_norm_g"),
        ({"with_rms_norm_g": False, "with_rms_only_norm_g": False}, "with_rsqrt_rms"),
        ({"initial_adafactor_decays": [0.9, 0.99]}, "initial_adafactor_decays"),
        ({"no_such_option": 1}, "no_such_option"),
        ({"with_p": 3}, "with_p"),
    ],
)
def test_unreproducible_options_are_refused_by_name(bindings, name):
    with pytest.raises(ConversionError, match=name):
        VELO.build(make_tree(SMALL), {**SMALL, **bindings}, source="x")


def test_matches_only_hyperv2_trees():
    tree = make_tree(SMALL)
    assert VELO.matches(tree)
    assert VELO.matches(make_tree({**SMALL, "mix_layers": False}))
    assert not VELO.matches({"params": tree})
    assert not VELO.matches({k: v for k, v in tree.items() if k != "ff_mod_stack"})
    # A Celo-shaped LSTM (18 global inputs only) is not VeLO.
    celo_like = make_tree(SMALL)
    for layer in ("linear", "linear_1", "linear_2"):
        celo_like["rnn_params"][layer]["w"] = np.zeros((18, 16), np.float32)
    assert not VELO.matches(celo_like)
