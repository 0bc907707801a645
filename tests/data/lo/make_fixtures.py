"""Write small learned_optimization checkpoints in both published layouts (ref venv, LO_SRC on PYTHONPATH).

- velo_small/params + config.gin: what outer_train writes for a HyperV2 run (ParameterCheckpoint saved with
  checkpoints.save_state, config.gin = gin.config_str()), checked by loading it with opt_from_checkpoint;
- velo_small_no_config.checkpoint: pretrained_optimizers' no_config layout (theta, '', 0), checked by
  loading it the way _pretrained_lopt_load_baseline does.
"""

import os
import sys

import gin
import jax
import numpy as np
from flax import serialization
from learned_optimization import (
    checkpoints,
    outer_train,  # noqa: F401  (registers run_train)
)
from learned_optimization.learned_optimizers import opt_from_checkpoint
from learned_optimization.outer_trainers.gradient_learner import ParameterCheckpoint
from learned_optimization.research.general_lopt import hyper_v2

out = sys.argv[1]
CONFIG = dict(lstm_hidden_size=8, param_inits=2, use_bugged_loss_features=False)

gin.parse_config(
    [
        "run_train.lopt = @HyperV2()",
        "run_train.num_steps = 100000",
        "run_train.trainer_batch_size = 512",
        "Adam.learning_rate = 0.0003",
    ]
    + [f"HyperV2.{k} = {v!r}" for k, v in CONFIG.items()]
)
lopt = hyper_v2.HyperV2(**CONFIG)
theta = lopt.init(jax.random.PRNGKey(0))
# Give every leaf distinct values (init zeroes some), so a wrong tensor mapping cannot go unnoticed.
rng = np.random.RandomState(1)
theta = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.randn(*x.shape).astype(np.float32) * 0.01, theta)

os.makedirs(f"{out}/velo_small", exist_ok=True)
checkpoints.save_state(f"{out}/velo_small/params", ParameterCheckpoint(theta, "gen_abc", 123))
with open(f"{out}/velo_small/config.gin", "w") as f:
    f.write(gin.config_str())
gin.clear_config()
checkpoints.save_state(f"{out}/velo_small_no_config.checkpoint", (theta, "", 0))

# Checks: the reference's own loaders read both files back to the same theta.
opt = opt_from_checkpoint.opt_from_checkpoint(f"{out}/velo_small/params")
restored = opt.lopt.init(jax.random.PRNGKey(0))
restored = checkpoints.load_state(f"{out}/velo_small/params", ParameterCheckpoint(restored, "", 0)).params
same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), theta, restored)
assert all(jax.tree_util.tree_leaves(same)), "params did not round-trip through opt_from_checkpoint"
nc_theta, _, _ = checkpoints.load_state(
    f"{out}/velo_small_no_config.checkpoint", (lopt.init(jax.random.PRNGKey(0)), "", 0)
)
same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), theta, nc_theta)
assert all(jax.tree_util.tree_leaves(same)), "no_config checkpoint did not round-trip"
print("ok", sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(theta)), "values")

# A bfloat16 copy of the theta in Celo's theta.state layout (flax bytes of theta alone).
import jax.numpy as jnp  # noqa: E402

bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), theta)
with open(f"{out}/velo_small_bf16.theta.state", "wb") as f:
    f.write(serialization.to_bytes(bf16))
