"""MLPLOpt (LOLv2): learned_optimization's per-element MLP over gradient, parameter and six momenta.

19 inputs per element: g, p and momenta with fixed decays (0.1 ... 0.9999), normalised per tensor, then the
11 tanh time features; the haiku MLP ``[hidden_size] * hidden_layers + [2]`` gives direction and magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from . import specs
from .adafac import mlp_matmul, second_moment_normalize, tanh_embedding, update_momentum
from .base import LearnedOptimizer, write_param
from .distributed.reducer import TensorReducer

#: Every constructor argument of ``MLPLOpt`` with its default: the family spec's.
DEFAULTS = specs.mlp_lopt.DEFAULTS
#: The momentum decays are fixed in the reference, not meta-learned.
DECAYS = specs.mlp_lopt.DECAYS


def mlp_lopt_layers(theta: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[list, list]:
    """The haiku MLP's ``linear_{i}`` weights and biases in order."""
    n = int(config["hidden_layers"]) + 1
    return [theta[f"linear_{i}.w"] for i in range(n)], [theta[f"linear_{i}.b"] for i in range(n)]


class MLPLOpt(LearnedOptimizer):
    """``MLPLOpt`` as a torch optimizer; ``lr`` multiplies the learned step, ``num_steps`` is unused."""

    architecture: ClassVar[str] = "mlp_lopt"
    shard_local: ClassVar[bool] = True
    LEGACY_STATE_KEYS: ClassVar[Mapping[str, str]] = {"m": "mom"}
    DEFAULTS: ClassVar[Mapping[str, Any]] = DEFAULTS
    SPEC = specs.mlp_lopt

    def _init_global(self, device: torch.device) -> dict[str, Any]:
        return {"iteration": torch.zeros((), dtype=torch.int32, device=device)}

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        shape = tuple(p.shape) or (1,)  # the reference reshapes 0-d params to (1,)
        state["mom"] = torch.zeros(shape + (len(DECAYS),), dtype=torch.float32, device=p.device)

    def _update(self, params, grads, lrs, loss, global_state, *, path, reducers, across) -> None:
        device = params[0].device
        cache = self.__dict__.setdefault("_cache", {})
        if device not in cache:
            cache[device] = (
                torch.tensor(DECAYS, dtype=torch.float32, device=device),
                mlp_lopt_layers(self._theta_on(device), self.config),
            )
        decays, (weights, biases) = cache[device]
        it = global_state["iteration"]
        time_feat = tanh_embedding(it)
        exp_mult, step_mult = float(self.config["exp_mult"]), float(self.config["step_mult"])
        foreach = path == "foreach"  # one MLP over the rows of all tensors

        prepared = []
        for p, g, red in zip(params, grads, reducers, strict=True):
            st = self.state[p]
            shape = tuple(p.shape) or (1,)
            pf = p.detach().to(torch.float32).reshape(shape)
            g = g.reshape(shape)
            st["mom"] = update_momentum(st["mom"], g, decays)
            # An FSDP2 shard: the normaliser is all-reduced over its group (``red``).
            x = second_moment_normalize(
                torch.cat([g.unsqueeze(-1), pf.unsqueeze(-1), st["mom"]], dim=-1), red
            )
            x = torch.cat([x, time_feat.expand(shape + time_feat.shape)], dim=-1)
            prepared.append((pf, x))
        if foreach:
            rows = [x.reshape(-1, x.shape[-1]) for _, x in prepared]
            outs = torch.split(mlp_matmul(torch.cat(rows), weights, biases), [r.shape[0] for r in rows])
        else:
            outs = [mlp_matmul(x, weights, biases) for _, x in prepared]
        for p, (pf, _), out, lr in zip(params, prepared, outs, lrs, strict=True):
            step = (out[..., 0] * torch.exp(out[..., 1] * exp_mult) * step_mult).reshape(pf.shape)
            if lr != 1.0:
                step = step * lr
            write_param(p, (pf - step).reshape(p.shape))
        global_state["iteration"] = it + 1
