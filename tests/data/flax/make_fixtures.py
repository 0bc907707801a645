"""Write small flax-serialised converter test fixtures (ref venv, LO_SRC on PYTHONPATH)."""

import collections
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from learned_optimization.outer_trainers.gradient_learner import ParameterCheckpoint

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.RandomState(0)
LSTMState = collections.namedtuple("LSTMState", ["hidden", "cell"])


@flax.struct.dataclass
class Pair:
    a: jax.Array
    b: int


expected = {}


def keep(name, tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in leaves:
        expected[
            name
            + ":"
            + "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        ] = np.asarray(leaf)


# 1. mixed tree: haiku-style names, namedtuple, tuple, list, dataclass, scalars of each kind, odd dtypes
mixed = {
    "rnn_params": {
        "rnn/linear": {
            "w": jnp.asarray(rng.randn(6, 8).astype(np.float32)),
            "b": jnp.zeros((8,), jnp.float32),
        }
    },
    "ff_mod_stack/~": {
        "w0__0": rng.randn(2, 3, 4).astype(np.float32),
        "w0__10": np.float32(1.5) * np.ones((1,), np.float32),
    },
    "lstm_init_state": LSTMState(hidden=np.arange(3, dtype=np.float32), cell=-np.arange(3, dtype=np.float32)),
    "tup": (np.array([1, 2, 3], np.int32), "text", 7),
    "lst": [np.float64(2.25), 3.5, True, None],
    "dc": Pair(a=np.array([[1.0, 2.0]], np.float64), b=4),
    "scalar0d": np.array(3.25, np.float32),
    "npscalar": np.float32(0.125),
    "complex_py": 1.5 - 2j,
    "complex_arr": np.array([1 + 2j, 3 - 4j], np.complex64),
    "empty": np.zeros((0, 3), np.float32),
    "u8": np.arange(5, dtype=np.uint8),
    "f16": np.array([0.5, -1.0], np.float16),
    "boolarr": np.array([True, False]),
}
with open(f"{out}/mixed.msgpack", "wb") as f:
    f.write(serialization.to_bytes(mixed))
keep("mixed", serialization.to_state_dict(mixed))

# 2. bfloat16: values chosen to use all mantissa bits of bf16, plus inf and a subnormal
bf = {
    "w": jnp.asarray(np.array([1.0, -3.140625, 1e-40, np.inf, 65280.0, 0.0078125], np.float32), jnp.bfloat16)
}
with open(f"{out}/bfloat16.msgpack", "wb") as f:
    f.write(serialization.to_bytes(bf))
expected["bfloat16:w"] = np.asarray(bf["w"]).astype(np.float32)

# 3. chunked: flax only chunks arrays over MAX_CHUNK_SIZE (1 GiB); lower the limit to 64 bytes so flax's own
#    chunking code writes the chunked form for a small array.
serialization.MAX_CHUNK_SIZE = 64
big = {"layer": {"w": rng.randn(5, 7).astype(np.float32), "small": np.ones((4,), np.float32)}}
with open(f"{out}/chunked.msgpack", "wb") as f:
    f.write(serialization.to_bytes(big))
serialization.MAX_CHUNK_SIZE = 2**30
keep("chunked", big)

# 4. learned_optimization ParameterCheckpoint (a pretrained folder's `params`) and the no_config tuple
theta = {"lstm/w": rng.randn(3, 4).astype(np.float32), "step_size": {"b": np.zeros((1,), np.float32)}}
with open(f"{out}/parameter_checkpoint.msgpack", "wb") as f:
    f.write(serialization.to_bytes(ParameterCheckpoint(params=theta, gen_id="abc123", step=5620)))
keep("parameter_checkpoint", {"params": theta})
with open(f"{out}/no_config.msgpack", "wb") as f:
    f.write(serialization.to_bytes((theta, "", 0)))

np.savez_compressed(f"{out}/expected.npz", **expected)
print(sorted(os.listdir(out)))
