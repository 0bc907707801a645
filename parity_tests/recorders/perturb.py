"""The random-theta perturbation every recorder applies, so that zero-initialised parts matter too."""

from __future__ import annotations

from typing import Any

import numpy as np


def perturb_theta(theta: Any, seed: int) -> Any:
    """``x * (1 + 0.3 z1) + 0.1 z2`` for every leaf, z ~ N(0, 1) from numpy ``default_rng([seed, 1234])``
    in jax's leaf order, so zero-initialised parts (biases, decay offsets, LSTM state) become nonzero."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree_util.tree_flatten(theta)
    rng = np.random.default_rng([seed, 1234])
    out = []
    for leaf in leaves:
        a = np.asarray(leaf, dtype=np.float32)
        z1 = rng.standard_normal(a.shape).astype(np.float32)
        z2 = rng.standard_normal(a.shape).astype(np.float32)
        out.append(jnp.asarray(a * (1.0 + 0.3 * z1) + 0.1 * z2, dtype=jnp.float32))
    return jax.tree_util.tree_unflatten(tree, out)


def perturbation_note(init: str, seed: int) -> str:
    """The provenance line for ``perturb_theta(<init>, seed)``, ``init`` saying where the theta came from."""
    return (
        f"{init}, every leaf x -> x * (1 + 0.3 z1) + 0.1 z2 with z ~ N(0, 1) from numpy "
        f"default_rng([{seed}, 1234])"
    )
