"""Shared by the distributed / integration tests: random-theta optimizers, a small model, a 2-rank launcher.

Random theta is enough here: these tests check that distribution does not change the update, not the update
itself (the parity fixtures do that).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

#: Families with a random-theta factory below (the ones these tests run).
FAMILIES = ("small_fc_lopt", "velo", "mlp_lopt", "mulo", "celo", "celo_adam", "rnn_mlp_lopt", "nn_adam")


def random_theta(family: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Theta of the right shapes with random values, and the config, for a small instance of ``family``."""
    gen = torch.Generator().manual_seed(seed)
    if family in ("small_fc_lopt", "mulo"):
        from lopt_bridge.pylo_runtime.adafac import DEFAULTS, n_inputs

        config = dict(DEFAULTS)
        if family == "mulo":
            config["clip_grad"] = True  # a global-norm reduction over tensors
        sizes = [n_inputs(config)] + [config["hidden_size"]] * config["hidden_layers"] + [2]
        theta = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            theta[f"nn.w{i}"] = torch.randn(a, b, generator=gen) / a**0.5
            theta[f"nn.b{i}"] = 0.1 * torch.randn(b, generator=gen)
        for key, init in (
            ("momentum_decays", "initial_momentum_decays"),
            ("rms_decays", "initial_rms_decays"),
            ("adafactor_decays", "initial_adafactor_decays"),
        ):
            theta[key] = 0.01 * torch.randn(len(config[init]), generator=gen)
        return theta, config
    if family == "velo":
        from lopt_bridge.pylo_runtime.velo import VeLOConfig, expected_theta_shapes

        config = {"lstm_hidden_size": 8, "param_inits": 4, "ff_hidden_size": 4}
        shapes = expected_theta_shapes(VeLOConfig.from_mapping(config))
        theta = {k: 0.3 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        for k in theta:
            if k.startswith("ff."):  # mixed as 100 * mean(copy * control): keep the per-element MLP O(1)
                theta[k] = theta[k] / 3.0
        return theta, config
    if family == "mlp_lopt":
        from lopt_bridge.pylo_runtime.mlp_lopt import DECAYS

        config = {"hidden_size": 8, "hidden_layers": 2}
        sizes = [2 + len(DECAYS) + 11, 8, 8, 2]
        theta = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            theta[f"linear_{i}.w"] = torch.randn(a, b, generator=gen) / a**0.5
            theta[f"linear_{i}.b"] = 0.1 * torch.randn(b, generator=gen)
        return theta, config
    if family in ("celo", "celo_adam", "celo2"):  # the random-weight parity fixture's own checkpoint
        return _fixture_theta(f"{family}_random")
    if family in ("rnn_mlp_lopt", "nn_adam"):
        return spec_theta(family, seed)
    raise ValueError(f"no random-theta factory for {family!r}")


#: Small configs for ``spec_theta`` (steps large enough that 10 steps move the parameters).
SPEC_CONFIGS: dict[str, dict[str, Any]] = {
    "rnn_mlp_lopt": {"lstm_hidden_size": 8, "hidden_size": 8, "from_mlp_size": 3, "from_lstm_size": 4,
                     "lstm_to_ff": 5, "step_multiplier": 0.01},
    "nn_adam": {"lstm_hidden_size": 8, "output_scale": 0.05, "decay_strength": 0.1},
}  # fmt: skip


def spec_theta(family: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Random theta for the spec table of ``family`` at ``SPEC_CONFIGS``: matrices ``N(0, 1/fan_in)``,
    vectors ``0.1 N(0, 1)``; NNAdam's scaled hparams at lr 1e-2, betas 0.9 / 0.99, epsilon 1e-8."""
    import math

    from lopt_bridge.pylo_runtime import specs

    spec = specs.family(family)
    config = spec.validate(SPEC_CONFIGS[family]).to_dict()
    gen = torch.Generator().manual_seed(seed)
    theta = {}
    for name, ts in spec.tensor_table(config).items():
        if len(ts.shape) == 2 and ts.shape[0] > 1:
            theta[name] = torch.randn(ts.shape, generator=gen) / ts.shape[0] ** 0.5
        else:
            theta[name] = 0.1 * torch.randn(ts.shape, generator=gen)
    if family == "nn_adam":
        for name, value in (("lr", 0.1 * math.log(1e-2)), ("beta1", 0.1 * math.log(0.1)),
                            ("beta2", 0.1 * math.log(0.01)), ("epsilon", 0.1 * math.log(1e-8))):  # fmt: skip
            theta[f"per_layer_{name}"] = torch.tensor(value)
    return theta, config


def _fixture_theta(case: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Theta and config of a committed parity fixture, converted by our architecture module."""
    from lopt_bridge.converter.architectures import by_name
    from lopt_bridge.converter.flax_msgpack import load
    from lopt_bridge.parity_tests.fixture import load_fixture, repo_root

    fx = load_fixture(repo_root() / "parity_tests" / "fixtures" / case)
    src = fx.source_path()
    spec = by_name(fx.meta["architecture"]).build(
        load(src), dict(fx.meta.get("convert_sets") or {}), source=str(src)
    )
    return {k: torch.from_numpy(v) for k, v in spec.tensors.items()}, spec.config


def make_optimizer(
    family: str, params: Any, *, num_steps: int = 100, **options: Any
) -> torch.optim.Optimizer:
    """A ``family`` optimizer with random theta (the same theta on every call and every rank)."""
    from lopt_bridge.pylo_runtime.loading import optimizer_class

    theta, config = random_theta(family)
    return optimizer_class(family)(params, theta, config, num_steps=num_steps, **options)


class Net(torch.nn.Module):
    """Awkward parameters: dim 0 of size 7 and 3 (odd), a (1, 7) row, a 4-D kernel, a 0-d scale."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 7)  # weight (7, 5), bias (7,)
        self.kernel = torch.nn.Parameter(0.3 * torch.randn(3, 2, 2, 5))
        self.row = torch.nn.Parameter(torch.randn(1, 7))
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) * self.row  # (B, 7)
        k = torch.einsum("bi,ocdi->bo", x, self.kernel)  # (B, 3)
        return self.scale * h.sum(-1) + torch.tanh(k).sum(-1)


def batches(n: int, rows: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` regression batches of ``rows`` rows (the same on every rank for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 5, generator=gen), torch.randn(rows, generator=gen)) for _ in range(n)]


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ``|a - b|_inf / |b|_inf``; inf if either holds NaN/inf (max() would drop a NaN)."""
    out = 0.0
    for k, ref in b.items():
        if not (torch.isfinite(a[k]).all() and torch.isfinite(ref).all()):
            return float("inf")
        den = float(ref.abs().max()) or 1.0
        out = max(out, float((a[k] - ref).abs().max()) / den)
    return out


# --------------------------------------------------------------------------------------------------------
# Launching 2 ranks on the CPU with gloo.
def _entry(rank: int, world: int, fn: Callable[[int, int], Any], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store in this run's own folder: no TCP port to pick (a port found free can be taken before the
    # store binds it).
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # Leave together: a rank that tears down gloo while its peer's connections are still open can make the
        # peer's gloo thread abort the process ("terminate called without an active exception", seen in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int, int], Any], world: int = 2) -> list[Any]:
    """Run module-level ``fn(rank, world)`` on ``world`` gloo ranks; return each rank's JSON result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, fn, out_dir), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results
