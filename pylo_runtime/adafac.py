"""small_fc_lopt: learned_optimization's ``AdafacMLPLOpt`` (a per-element MLP over Adafactor-style features).

The update is the reference's ``opt_fn(theta).update`` exactly: momentum / rms / factored accumulators with
decays read from theta, 28 per-element features normalised per tensor, 11 tanh time features, an MLP
``[hidden_size] * hidden_layers + [2]`` and ``step = direction * exp(exp_mult * magnitude) * step_mult``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import dispatch, specs
from . import distributed as _dist
from .accumulators import factored_update, momentum_update, rms_update
from .base import LearnedOptimizer, ParamsT, write_param
from .features import (
    STEP_TIMESCALES,
    factored_dims,
    safe_rsqrt,
    second_moment_normalizer,
    step_tanh_embedding,
)

#: Every constructor argument of ``AdafacMLPLOpt`` with its default: the family spec's.
DEFAULTS = specs.adafac.DEFAULTS

#: Time scales of the tanh step embedding (``tanh_embedding``).
TIMESCALES = STEP_TIMESCALES

# The shared pieces (features.py / accumulators.py), under the names this module has always used.
tanh_embedding = step_tanh_embedding
update_momentum = momentum_update
update_rms = rms_update
update_factored = factored_update


# --------------------------------------------------------------------------------------------------------
# Small pure functions (optax-like): decays and features.
def decay_from_offset(initial: Any, offset: torch.Tensor) -> torch.Tensor:
    """``param_to_decay(decay_to_param(d0) + offset)`` = ``1 - exp(10 * (log(1 - d0) / 10 + offset))``."""
    d0 = torch.as_tensor(initial, dtype=torch.float32, device=offset.device)
    return 1.0 - torch.exp((torch.log(1.0 - d0) / 10.0 + offset.to(torch.float32)) * 10.0)


def second_moment_normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide each feature (last axis) by its root mean square over the tensor's elements (all other axes)."""
    return second_moment_normalizer(x, tuple(range(x.dim() - 1)), eps)


def _row_col_factors(
    v_row: torch.Tensor, v_col: torch.Tensor, fdims: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    d1, d0 = fdims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_col_mean = _dist.tensor_mean(v_row, reduced_d1, keepdim=True, dropped=d0)
    return safe_rsqrt(v_row / (row_col_mean + 1e-9)), safe_rsqrt(v_col)


def adafac_features(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    rms: torch.Tensor,
    fac_g: torch.Tensor,
    v_row: torch.Tensor,
    v_col: torch.Tensor,
    v_diag: torch.Tensor,
    fdims: tuple[int, int] | None,
) -> torch.Tensor:
    """The 28 un-normalised per-element inputs of ``AdafacMLPLOpt._mod``, shape ``p.shape + (28,)``."""
    rsqrt = torch.rsqrt(rms + 1e-6)
    inps = [g.unsqueeze(-1), p.unsqueeze(-1), m, rms, m * rsqrt, rsqrt, fac_g]
    full = p.shape + (v_row.shape[-1] if fdims is not None else v_diag.shape[-1],)
    if fdims is not None:
        d1, d0 = fdims
        row_feat = v_row.unsqueeze(d0).expand(full)
        col_feat = v_col.unsqueeze(d1).expand(full)
        row_factor, col_factor = _row_col_factors(v_row, v_col, fdims)
        fac_mom_mult = m * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
        inps += [row_feat, col_feat, torch.rsqrt(row_feat + 1e-8), torch.rsqrt(col_feat + 1e-8), fac_mom_mult]
    else:
        rs = torch.rsqrt(v_diag + 1e-8)
        inps += [v_diag, v_diag, rs, rs, m * torch.pow(v_diag + 1e-6, -0.5)]
    return torch.cat([x.expand(p.shape + (x.shape[-1],)) for x in inps], dim=-1)


def mlp_matmul(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """``relu(x @ w + b)`` per layer, no activation after the last (the concat_weights path)."""
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ w + b
        if i != len(weights) - 1:
            x = torch.relu(x)
    return x


def mlp_scalar(
    feats: list[torch.Tensor],
    time_feat: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The reference's scalar-math path (``concat_weights=False``): sums in its order, feature by feature."""
    inp = feats
    for wi, (w, b) in enumerate(zip(weights, biases, strict=True)):
        outs = []
        for oi in range(w.shape[1]):
            acc = inp[0] * w[0, oi]
            for vi in range(1, len(inp)):
                acc = acc + inp[vi] * w[vi, oi]
            if wi == 0:
                for k in range(time_feat.shape[0]):
                    acc = acc + time_feat[k] * w[len(inp) + k, oi]
            acc = acc + b[oi]
            outs.append(torch.relu(acc) if wi != len(weights) - 1 else acc)
        inp = outs
    return inp


def mlp_layers(theta: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[list, list]:
    """Weights and biases per layer: full ``nn.w{i}`` matrices, or the separate scalars stacked."""
    n_layers = int(config["hidden_layers"]) + 1
    separate = not config["concat_weights"] and config["make_separate_weights"]
    weights, biases = [], []
    for i in range(n_layers):
        if not separate:
            weights.append(theta[f"nn.w{i}"])
            biases.append(theta[f"nn.b{i}"])
            continue
        n_out = int(config["hidden_size"]) if i < n_layers - 1 else 2
        n_in = 0
        while f"nn.w{i}_{n_in}_0" in theta:
            n_in += 1
        w = torch.stack(
            [torch.stack([theta[f"nn.w{i}_{v}_{o}"].reshape(()) for o in range(n_out)]) for v in range(n_in)]
        )
        weights.append(w)
        biases.append(torch.stack([theta[f"nn.b{i}_{o}"].reshape(()) for o in range(n_out)]))
    return weights, biases


#: Width of the MLP input for a config: per-element features (broadcast as the reference does) + 11 time.
n_inputs = specs.adafac.n_inputs


# --------------------------------------------------------------------------------------------------------
class SmallFCLOpt(LearnedOptimizer):
    """small_fc_lopt (``AdafacMLPLOpt``) as a torch optimizer; ``lr`` multiplies the learned step.

    Build it with ``SmallFCLOpt.from_checkpoint(path, params, num_steps=...)`` or
    ``pylo_runtime.load_optimizer``. ``num_steps`` is kept for the interface; the reference stores it unused.
    """

    architecture: ClassVar[str] = "small_fc_lopt"
    shard_local: ClassVar[bool] = True
    DEFAULTS: ClassVar[Mapping[str, Any]] = DEFAULTS
    SPEC = specs.adafac

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        **options: Any,
    ) -> None:
        # Config and theta names / shapes / dtypes (decay offsets, MLP layers) are validated through SPEC
        # before anything is built.
        super().__init__(params, theta, config, num_steps=num_steps, **options)
        full = self.config
        self._n_decays = tuple(len(full[k]) for k in specs.common.DECAY_KEYS)

    # ----------------------------------------------------------------------------------------------------
    def _decays(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_decay_cache", {})
        if device not in cache:
            th = self._theta_on(device)
            c = self.config
            cache[device] = (
                decay_from_offset(c["initial_momentum_decays"], th["momentum_decays"]),
                decay_from_offset(c["initial_rms_decays"], th["rms_decays"]),
                decay_from_offset(c["initial_adafactor_decays"], th["adafactor_decays"]),
            )
        return cache[device]

    def _mlp(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cache = self.__dict__.setdefault("_mlp_cache", {})
        if device not in cache:
            cache[device] = mlp_layers(self._theta_on(device), self.config)
        return cache[device]

    def _init_global(self, device: torch.device) -> dict[str, Any]:
        return {"iteration": torch.zeros((), dtype=torch.int32, device=device)}

    def _init_param(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        shape = tuple(p.shape) or (1,)  # the reference reshapes 0-d params to (1,)
        n_mom, n_rms, n_fac = self._n_decays
        kw = dict(dtype=torch.float32, device=p.device)
        state["m"] = torch.zeros(shape + (n_mom,), **kw)
        state["rms"] = torch.zeros(shape + (n_rms,), **kw)
        fdims = factored_dims(_dist.global_shape(shape))  # FSDP2 shard: state local, dims from the whole
        if fdims is None:
            state["v_diag"] = torch.zeros(shape + (n_fac,), **kw)
        else:
            d1, d0 = fdims
            state["v_row"] = torch.zeros(tuple(s for i, s in enumerate(shape) if i != d0) + (n_fac,), **kw)
            state["v_col"] = torch.zeros(tuple(s for i, s in enumerate(shape) if i != d1) + (n_fac,), **kw)

    def _scales(self, params: list[torch.Tensor]) -> list[Any] | None:
        """Per-tensor multipliers applied to the step before ``lr`` (muLO's muP scales); None here."""
        return None

    def _prepare_grads(
        self, grads: list[torch.Tensor], params: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Hook for muLO's gradient clipping and nan_to_num; identity for AdafacMLPLOpt."""
        return grads

    def _update(self, params, grads, lrs, loss, global_state, *, path) -> None:
        device = params[0].device
        weights, biases = self._mlp(device)
        it = global_state["iteration"]
        step = AdafacStep(
            decays=self._decays(device),
            weights=weights,
            biases=biases,
            time_feat=tanh_embedding(it),
            exp_mult=float(self.config["exp_mult"]),
            step_mult=float(self.config["step_mult"]),
            concat=bool(self.config["concat_weights"]),
        )
        grads = self._prepare_grads(grads, params)
        scales = self._scales(params) or [1.0] * len(params)
        states = [self.state[p] for p in params]

        def impl(name: str) -> Any:
            return functools.partial(_implementation(name), step=step)

        samples = _kernel_samples(path, params)
        path = dispatch.verified(self, path, samples, impl, params, grads, lrs, scales, states)
        impl(path)(params, grads, lrs, scales, states)
        global_state["iteration"] = it + 1


@dataclass(frozen=True)
class AdafacStep:
    """What every tensor's update reads at one step: decays, MLP, time features, output multipliers."""

    decays: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    time_feat: torch.Tensor
    exp_mult: float
    step_mult: float
    concat: bool  # the matrix MLP (concat_weights=True) or the reference's scalar math


def _implementation(path: str) -> Any:
    """The function that runs ``path`` (``dispatch`` chose it); all take
    ``(params, grads, lrs, scales, states, step=AdafacStep)``, grads already prepared (muLO's clip)."""
    if path == "reference":
        return functools.partial(_adafac_reference, batched=False)
    if path == "foreach-batched":
        return functools.partial(_adafac_reference, batched=True)
    if path in ("foreach", "fused-cpu"):  # torch ops (any device); with the C passes on the CPU
        from .kernels import native
        from .kernels.adafac_cpu import adafac_step_cpu

        return functools.partial(adafac_step_cpu, lib=native.library() if path == "fused-cpu" else None)
    if path == "fused-triton":
        from .kernels.adafac_triton import adafac_step_triton

        return adafac_step_triton
    raise ValueError(f"small_fc_lopt has no implementation {path!r}")


def _kernel_samples(path: str, params: list[torch.Tensor]) -> dict[tuple, int]:
    """For ``dispatch.verified``: the smallest tensor of each kernel variant ``path`` would run."""
    out: dict[tuple, int] = {}
    for i, p in enumerate(params):
        shape = tuple(p.shape) or (1,)
        factored = len(shape) >= 2
        if path == "fused-triton":
            key: tuple = (p.dtype, factored)
        elif path == "fused-cpu":
            from .kernels import adafac_cpu

            if not (factored and len(shape) == 2 and p.numel() >= adafac_cpu.SMALL):
                continue  # the torch ops take it: nothing fused to check
            key = ("c-passes",)
        else:
            return {}
        if key not in out or p.numel() < params[out[key]].numel():
            out[key] = i
    return out


def _tensor_features(
    p: torch.Tensor, g: torch.Tensor, st: dict[str, Any], decays: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update ``p``'s accumulators in ``st``; return (float32 param in the reference's shape, features)."""
    shape = tuple(p.shape) or (1,)
    pf = p.detach().to(torch.float32).reshape(shape)
    g = g.reshape(shape)
    mom_d, rms_d, fac_d = decays
    with _dist.on_tensor(p):  # an FSDP2 shard: row/column means over the sharded dim are all-reduced
        fdims = factored_dims(_dist.global_shape(shape))
        st["m"] = update_momentum(st["m"], g, mom_d)
        st["rms"] = update_rms(st["rms"], g, rms_d)
        empty = st["m"].new_zeros(())
        v_row, v_col, v_diag, fac_g = update_factored(
            st.get("v_row", empty), st.get("v_col", empty), st.get("v_diag", empty), g, fac_d, fdims
        )
        if fdims is None:
            st["v_diag"] = v_diag
        else:
            st["v_row"], st["v_col"] = v_row, v_col
        feats = adafac_features(pf, g, st["m"], st["rms"], fac_g, v_row, v_col, v_diag, fdims)
    return pf, feats


def _adafac_reference(params, grads, lrs, scales, states, *, step: AdafacStep, batched: bool) -> None:
    """The reference path: features per tensor, then the MLP per tensor, or (``batched``, the foreach-batched
    path) once over the rows of all tensors; ``concat_weights=False`` is the scalar-math MLP, per tensor."""
    prepared = [
        _tensor_features(p, g, st, step.decays) for p, g, st in zip(params, grads, states, strict=True)
    ]
    normed = []
    for p, (_, f) in zip(params, prepared, strict=True):
        with _dist.on_tensor(p):
            normed.append(second_moment_normalize(f))
    if batched:
        # One MLP over every element of every tensor: normalise per tensor, then one matmul chain.
        rows = [_with_time(f, step.time_feat).reshape(-1, f.shape[-1] + 11) for f in normed]
        out = mlp_matmul(torch.cat(rows, dim=0), step.weights, step.biases)
        outs = torch.split(out, [r.shape[0] for r in rows], dim=0)
        steps = [_step(o[:, 0], o[:, 1], step.exp_mult, step.step_mult) for o in outs]
    else:
        steps = []
        for f in normed:
            if step.concat:
                o = mlp_matmul(_with_time(f, step.time_feat), step.weights, step.biases)
                steps.append(_step(o[..., 0], o[..., 1], step.exp_mult, step.step_mult))
            else:
                feats = [x.squeeze(-1) for x in torch.split(f, 1, dim=-1)]
                d, mag = mlp_scalar(feats, step.time_feat, step.weights, step.biases)
                steps.append(_step(d, mag, step.exp_mult, step.step_mult))
    for p, (pf, _), u, lr, scale in zip(params, prepared, steps, lrs, scales, strict=True):
        u = u.reshape(pf.shape)
        if scale != 1.0:
            u = u * scale
        if lr != 1.0:
            u = u * lr
        write_param(p, (pf - u).reshape(p.shape))


def _with_time(x: torch.Tensor, time_feat: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, time_feat.expand(x.shape[:-1] + time_feat.shape)], dim=-1)


def _step(
    direction: torch.Tensor, magnitude: torch.Tensor, exp_mult: float, step_mult: float
) -> torch.Tensor:
    return direction * torch.exp(magnitude * exp_mult) * step_mult
