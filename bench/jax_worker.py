"""Times the JAX reference update (jitted) on a bench tree; run by step_time.py in the reference venv.

Prints one JSON line: {"name", "times_s", "state_bytes_per_param", "note"}. Needs jax and
google/learned_optimization importable (PYTHONPATH); this file is never imported by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trees import num_params, tree_shapes  # noqa: E402


def _make_lopt(opt: str):
    if opt == "velo":
        from learned_optimization.research.general_lopt import hyper_v2

        # The published VeLO size (no_config checkpoints: lstm 512, 256 param inits, bugged LSTM state).
        return hyper_v2.HyperV2(lstm_hidden_size=512, param_inits=256, use_bugged_next_lstm_state=True)
    if opt == "small_fc_lopt":
        from learned_optimization.learned_optimizers import adafac_mlp_lopt

        # The 32-wide form PyLO and muLO use: 39 -> 32 -> 32 -> 2.
        return adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=32, hidden_layers=2, step_mult=0.01)
    if opt == "celo":  # needs amoudgl/celo on PYTHONPATH; as celo.factory.get_optimizer("celo") builds it
        from celo.optimizers import celo as celo_lopt

        return celo_lopt.Celo(
            lstm_hidden_size=64,
            initial_momentum_decays=(0.9, 0.99, 0.999),
            initial_rms_decays=(0.999,),
            initial_adafactor_decays=(0.9, 0.99, 0.999),
            param_inits=1,
            train_phase=2,
            summarize_each_layer=False,
        )
    if opt == "celo_adam":  # as celo.factory.get_optimizer("celo_adam") builds it
        from celo.optimizers import celo_adam

        return celo_adam.Celo(
            lstm_hidden_size=64,
            initial_epsilon=1e-8,
            initial_momentum_decays=(0.9,),
            initial_rms_decays=(0.999,),
        )
    raise ValueError(f"no JAX reference for {opt!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", required=True)
    ap.add_argument("--opt", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = tree_shapes(a.tree)
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.05) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 1e-3) for k, s in shapes.items()}
    lopt = _make_lopt(a.opt)
    theta = lopt.init(jax.random.PRNGKey(0))
    opt = lopt.opt_fn(theta)
    state = opt.init(params, num_steps=10000)
    key = jax.random.PRNGKey(1)
    update = jax.jit(lambda s, g, loss: opt.update(s, g, loss=loss, key=key))
    n_param_bytes = 4 * num_params(shapes)
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) - n_param_bytes
    times = []
    for i in range(a.warmup + a.steps):
        loss = jnp.float32(2.0 - 0.001 * i)
        t0 = time.perf_counter()
        state = update(state, grads, loss)
        jax.block_until_ready(state)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "name": f"jax_ref/{a.opt}",
                "times_s": times,
                "state_bytes_per_param": state_bytes / num_params(shapes),
                "note": f"jax {jax.__version__}, jitted opt.update, {jax.devices()[0].platform}",
            }
        )
    )


if __name__ == "__main__":
    main()
