"""Random theta of the right shapes for timing our optimizers (no checkpoint needed).

Shapes come from the runtime's own tables; values are small random numbers, which is all timing needs.
"""

from __future__ import annotations

from typing import Any

import torch

#: The sizes benchmarked: VeLO as published (lstm 512, 256 param inits), small_fc_lopt as PyLO/muLO use it.
CONFIGS: dict[str, dict[str, Any]] = {
    "velo": {"lstm_hidden_size": 512, "param_inits": 256, "use_bugged_next_lstm_state": True},
    "small_fc_lopt": {"hidden_size": 32, "hidden_layers": 2, "step_mult": 0.01},
    # The published configurations (celo.factory.get_optimizer): the family specs' defaults.
    "celo": {},
    "celo_adam": {},
}


def theta_shapes(arch: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every theta tensor ``arch`` reads under ``config``, with its shape."""
    if arch == "velo":
        from lopt_bridge.pylo_runtime.velo import VeLOConfig, expected_theta_shapes

        return expected_theta_shapes(VeLOConfig.from_mapping(config))
    if arch == "small_fc_lopt":
        from lopt_bridge.pylo_runtime.adafac import DEFAULTS, n_inputs

        c = {**DEFAULTS, **config}
        sizes = [n_inputs(c)] + [int(c["hidden_size"])] * int(c["hidden_layers"]) + [2]
        shapes = {
            "momentum_decays": (len(c["initial_momentum_decays"]),),
            "rms_decays": (len(c["initial_rms_decays"]),),
            "adafactor_decays": (len(c["initial_adafactor_decays"]),),
        }
        for i in range(len(sizes) - 1):
            shapes[f"nn.w{i}"] = (sizes[i], sizes[i + 1])
            shapes[f"nn.b{i}"] = (sizes[i + 1],)
        return shapes
    if arch in ("celo", "celo_adam"):
        from lopt_bridge.pylo_runtime import specs

        spec = getattr(specs, arch)
        return {name: t.shape for name, t in spec.tensor_table(spec.validate(config)).items()}
    raise ValueError(f"no random theta for {arch!r}")


def random_theta(arch: str, config: dict[str, Any] | None = None, seed: int = 0):
    """``(theta, config)``: N(0, 1/fan_in) weights, N(0, 0.01) vectors, for ``arch`` under ``config``."""
    config = dict(CONFIGS[arch] if config is None else config)
    gen = torch.Generator().manual_seed(seed)
    theta = {}
    for name, shape in theta_shapes(arch, config).items():
        fan_in = shape[-2] if len(shape) >= 2 else 100
        t = torch.randn(shape, generator=gen) / fan_in**0.5
        if arch == "velo" and name.startswith("ff."):
            t = t / 30.0  # the MLP copies are mixed as 100 * mean(copy * control): keep the mix O(1)
        theta[name] = t
    return theta, config
