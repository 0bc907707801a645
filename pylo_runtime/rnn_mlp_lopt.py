"""RNNMLPLOpt: a per-tensor LSTM that conditions a per-parameter MLP (arXiv:2009.11243), in PyTorch.

Reproduces learned_optimization's ``learned_optimizers/rnn_mlp_lopt.py`` at 32186aa4 (and amoudgl/celo's
copy, which differs only in ``corrected_mean``'s epsilon: the ``corrected_mean_eps`` option) exactly, in its
training update (``update(..., is_valid=False)``; the reference runs it op by op, not jitted):

1. loss statistics: the train normalizer (decay 0.9) takes the loss; ``train_loss_feat`` and
   ``valid_loss_feat`` (the validation normalizer's corrected mean, weighted by the TRAIN normalizer);
2. the dynamic gradient clip, global over tensors: ``clip(g, +-10 * value / (1 - 0.99 ** t))``, then
   ``value`` follows ``sqrt(1e-8 + mean over tensors of mean(g**2))`` (no +-1000 clip);
3. momentum and second moment over the 5 decays, from the clipped gradient;
4. 18 statistics per tensor (new moments, clipped gradient, parameter before the step; ``_clip_log_abs``
   without the 0.5 of VeLO's) + the tensor's ``from_mlp`` + the global ``from_lstm`` -> one haiku LSTM step
   on all tensors; ``from_lstm`` = mean over tensors of ``rnn_to_in``; ``rnn_to_ff`` per tensor;
5. per element: 23 features normalised over the tensor (eps 1e-5), 11 ``sin`` time features of the step
   count, log tensor count, log parameter norm, log size, the tensor's ``rnn_to_ff`` -> the MLP ->
   ``step = direction * exp(magnitude * magnitude_rate) * step_multiplier``, ``p - step``; ``from_mlp`` = the
   mean of the other outputs.

``record_validation_loss`` is the reference's ``update(..., is_valid=True)``. Per-parameter state: ``mom``,
``rms`` (trailing axis of 5 decays), ``lstm_hidden``, ``lstm_cell``, ``from_mlp``; optimizer-wide:
``iteration``, ``from_lstm``, ``train_loss`` / ``valid_loss`` (mean, var, updates), ``clip`` (iteration,
value). Shape follows ``torch/optim/adam.py``: ``_single_tensor_rnn_mlp_lopt`` is the reference path,
``_multi_tensor_rnn_mlp_lopt`` (foreach) runs one MLP over all tensors' rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import accumulators as acc
from . import specs
from .base import GLOBAL, LearnedOptimizer, ParamsT, write_param
from .distributed.reducer import TensorReducer, TensorsReducer
from .features import second_moment_normalizer
from .lstm import lstm_step

#: Every constructor argument of ``RNNMLPLOpt`` with its default (+ ``corrected_mean_eps``): the spec's.
DEFAULTS = specs.rnn_mlp_lopt.DEFAULTS
#: The loss normalizers' decays (``_LossNormalizer(0.9)`` for training, ``(0.95)`` for validation losses).
TRAIN_LOSS_DECAY = 0.9
VALID_LOSS_DECAY = 0.95
#: ``_DynamicGradientClipper(alpha=0.99, clip_mult=10.)``.
CLIP_ALPHA = 0.99
CLIP_MULT = 10.0
#: Time scales (in steps) of the ``sin`` step embedding (``_sin_embedding``).
SIN_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


# ----------------------------------------------------------------------------------------------------
# Loss statistics (rnn_mlp_lopt._LossNormalizer) and the dynamic clip (_DynamicGradientClipper).
def loss_normalizer_init(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``mean = var = 0``, ``updates = 0``."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return {"mean": zero, "var": zero.clone(), "updates": torch.zeros((), dtype=torch.int32, device=device)}


def loss_normalizer_next(
    s: dict[str, torch.Tensor], loss: torch.Tensor, decay: float
) -> dict[str, torch.Tensor]:
    """``mean' = d mean + (1 - d) loss``, ``var' = d var + (1 - d) (mean' - loss)**2`` (the NEW mean)."""
    mean = decay * s["mean"] + (1.0 - decay) * loss
    var = decay * s["var"] + (1.0 - decay) * torch.square(mean - loss)
    return {"mean": mean, "var": var, "updates": s["updates"] + 1}


def _correction(s: dict[str, torch.Tensor], decay: float, eps: float) -> torch.Tensor:
    """``1 / (1 - decay ** updates + eps)`` in float32."""
    return 1.0 / (1.0 - torch.pow(decay, s["updates"].to(torch.float32)) + eps)


def weight_loss(s: dict[str, torch.Tensor], loss: torch.Tensor, decay: float) -> torch.Tensor:
    """``clip((loss - mean c) * rsqrt(var c + 1e-8), -5, 5)``, ``c`` the bias correction (eps 1e-8)."""
    c = _correction(s, decay, 1e-8)
    return torch.clamp((loss - s["mean"] * c) * torch.rsqrt(s["var"] * c + 1e-8), -5.0, 5.0)


def corrected_mean(s: dict[str, torch.Tensor], decay: float, eps: float) -> torch.Tensor:
    """``mean * c`` with ``c = 1 / (1 - decay ** updates + eps)``: eps 1e-8 in learned_optimization, 1e-7
    in amoudgl/celo (the one place the two copies differ)."""
    return s["mean"] * _correction(s, decay, eps)


def clip_init(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The clipper's float32 counter (1.0) and second-moment estimate ``1.0 * (1 - alpha)``."""
    one = torch.ones((), dtype=torch.float32, device=device)
    return {"iteration": one, "value": one * (1.0 - CLIP_ALPHA)}


def clip_amount(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(value / (1 - alpha ** t)) * clip_mult``: gradients are clipped to +- this."""
    return (s["value"] / (1.0 - torch.pow(CLIP_ALPHA, s["iteration"]))) * CLIP_MULT


def clip_next(s: dict[str, torch.Tensor], avg_square_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """``value' = value * alpha + sqrt(1e-8 + avg) * (1 - alpha)``, ``t + 1``; ``avg`` is the mean over
    tensors of ``mean(g_clipped**2)``."""
    new = torch.sqrt(1e-8 + avg_square_mean)
    return {"iteration": s["iteration"] + 1, "value": s["value"] * CLIP_ALPHA + new * (1.0 - CLIP_ALPHA)}


def avg_square_mean(
    grads: Sequence[torch.Tensor], reducers: Sequence[TensorReducer], across: TensorsReducer
) -> torch.Tensor:
    """``sum(mean(g**2) for each tensor) / n_tensors`` (the reference's Python sum, in tensor order;
    ``across``: over all ranks' tensors under ``ShardedOptimizer``)."""
    total = None
    for g, red in zip(grads, reducers, strict=True):
        m = red.mean(torch.square(g))
        total = m if total is None else total + m
    assert total is not None
    count = torch.tensor(float(len(grads)), dtype=torch.float32, device=total.device)
    return across.sum(total) / across.sum(count)


# ----------------------------------------------------------------------------------------------------
# Per tensor (rnn_mlp_lopt._Opt.lstm_features_for_tensor / mlp_features_for_tensor).
def _clip_log_abs(x: torch.Tensor) -> torch.Tensor:
    """``clip(log(1e-8 + |x|), -5, 5)`` (RNNMLPLOpt's: no 0.5 factor)."""
    return torch.clamp(torch.log(1e-8 + torch.abs(x)), -5.0, 5.0)


def _norm(x: torch.Tensor, red: TensorReducer) -> torch.Tensor:
    """``jnp.linalg.norm(x)`` over every element: ``sqrt(sum(x * x))``."""
    return torch.sqrt(red.sum(x * x))


def lstm_features_for_tensor(
    ms: torch.Tensor,
    rms: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    from_mlp: torch.Tensor,
    from_lstm: torch.Tensor,
    train_loss_feat: torch.Tensor,
    valid_loss_feat: torch.Tensor,
    red: TensorReducer,
) -> torch.Tensor:
    """One tensor's LSTM row: ``from_lstm``, ``from_mlp``, then 18 statistics in the reference's sorted key
    order (means and variances over every element, the decay axis included; ``v`` the parameter)."""
    mean_ms = red.mean(ms)
    var_ms = red.mean(torch.square(ms - mean_ms))
    mean_rms = red.mean(rms)
    var_rms = red.mean(torch.square(rms - mean_rms))
    mean_v = red.mean(v)
    var_v = red.mean(torch.square(v - mean_v))
    shape = red.global_shape(v.shape)
    dims = [float(s) for s in shape] + [1.0] * (4 - len(shape))
    shape_feat = torch.log(torch.tensor(dims[:4], dtype=torch.float32, device=v.device)) - 1.0
    one = torch.ones((), dtype=torch.float32, device=v.device)
    scalars = [
        _clip_log_abs(_norm(g, red)),  # g_norm
        one if len(shape) == 0 else -one,  # is_scalar
        _clip_log_abs(mean_ms),  # mean_ms_mag
        torch.sign(mean_ms),  # mean_ms_sign
        _clip_log_abs(mean_rms),  # mean_rms
        torch.sign(mean_rms),  # mean_sign
        _clip_log_abs(mean_v),  # mean_v_mag
        torch.sign(mean_v),  # mean_v_sign
        _clip_log_abs(_norm(v, red)),  # norm_weight
        *shape_feat.unbind(0),  # shape_0 .. shape_3
        train_loss_feat,
        valid_loss_feat,
        _clip_log_abs(var_ms),  # var_ms
        _clip_log_abs(var_rms),  # var_rms
        _clip_log_abs(var_v),  # var_v
    ]
    return torch.cat([from_lstm, from_mlp, torch.stack([x.reshape(()) for x in scalars])])


def sin_embedding(iteration: torch.Tensor) -> torch.Tensor:
    """``sin(iteration / (float32(ts) * pi))`` for the 11 time scales (``iteration``: int32 0-d)."""
    ts = torch.tensor(SIN_TIMESCALES, dtype=torch.float32, device=iteration.device) * math.pi
    return torch.sin(iteration.to(torch.float32) / ts)


def mlp_features_for_tensor(
    m: torch.Tensor,
    rms: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    ff_inputs: torch.Tensor,
    time_feat: torch.Tensor,
    log_num_tensors: torch.Tensor,
    red: TensorReducer,
) -> torch.Tensor:
    """The per-element MLP inputs of one tensor as rows ``(numel, 37 + lstm_to_ff)``: 23 features
    normalised over all its elements (eps 1e-5), then the step, tensor-count, norm and size features and
    the tensor's ``ff_inputs``. 0-d tensors are one row (the reference reshapes them to (1, ...))."""
    shape = tuple(v.shape) or (1,)
    g_, v_ = g.reshape(shape).unsqueeze(-1), v.reshape(shape).unsqueeze(-1)
    m_, r_ = m.reshape(shape + m.shape[-1:]), rms.reshape(shape + rms.shape[-1:])
    rsqrt = torch.rsqrt(r_ + 1e-6)
    # sorted keys: flat_g, flat_v, log_abs_v, m, rms, rms_scaled_g, rsqrt
    inp = torch.cat([g_, v_, torch.log(torch.abs(v_) + 1e-8), m_, r_, m_ * rsqrt, rsqrt], dim=-1)
    inp = second_moment_normalizer(inp, tuple(range(len(shape))), red).reshape(-1, inp.shape[-1])
    n = inp.shape[0]
    dev = v.device
    log_norm = torch.log(_norm(v, red) + 1e-8)
    log_n_weight = torch.log(torch.tensor(float(red.numel(v)), dtype=torch.float32, device=dev))
    tail = torch.cat([time_feat, torch.stack([log_num_tensors, log_norm, log_n_weight]), ff_inputs])
    return torch.cat([inp, tail.expand(n, tail.shape[0])], dim=1)


def mlp_apply(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> torch.Tensor:
    """haiku ``hk.nets.MLP``: ``x @ w + b`` per layer, relu between layers, none after the last."""
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ w + b
        if i < len(weights) - 1:
            x = torch.relu(x)
    return x


def output_step(o: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """``direction * exp(magnitude * magnitude_rate) * step_multiplier`` per row (``p_new = p - step``)."""
    return o[:, 0:1] * torch.exp(o[:, 1:2] * cfg["magnitude_rate"]) * cfg["step_multiplier"]


def _mean_rows(o: torch.Tensor, shape: tuple[int, ...], red: TensorReducer) -> torch.Tensor:
    """Mean over a tensor's elements of per-element rows ``o`` (numel, k): the new ``from_mlp``."""
    return red.mean(o.reshape(shape + (o.shape[-1],)), tuple(range(len(shape))))


# ----------------------------------------------------------------------------------------------------
@dataclass
class _StepContext:
    """What every tensor's per-element part reads at one step."""

    ff_inputs: torch.Tensor  # (T, lstm_to_ff)
    time_feat: torch.Tensor
    log_num_tensors: torch.Tensor
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    cfg: Mapping[str, Any]


def _apply(p: torch.Tensor, pf: torch.Tensor, step: torch.Tensor, lr: float) -> None:
    step = step.reshape(pf.shape)
    write_param(p, pf - step if lr == 1.0 else pf - lr * step)


def _single_tensor_rnn_mlp_lopt(params, pfs, grads, lrs, states, reducers, ctx: _StepContext) -> None:
    """Reference path: each tensor's features, MLP and step, one tensor at a time (a path FSDP2 shards
    take: ``reducers[i]`` reduces over all the shards of ``params[i]``)."""
    for i, (p, pf, g, lr, s, red) in enumerate(zip(params, pfs, grads, lrs, states, reducers, strict=True)):
        x = mlp_features_for_tensor(
            s["mom"], s["rms"], g, pf, ctx.ff_inputs[i], ctx.time_feat, ctx.log_num_tensors, red
        )
        o = mlp_apply(x, ctx.weights, ctx.biases)
        s["from_mlp"] = _mean_rows(o[:, 2:], tuple(pf.shape) or (1,), red)
        _apply(p, pf, output_step(o, ctx.cfg), lr)


def _multi_tensor_rnn_mlp_lopt(params, pfs, grads, lrs, states, reducers, ctx: _StepContext) -> None:
    """Foreach path: the reference's per-tensor features, then ONE MLP over all tensors' rows (the MLP is
    per element, so only the matmuls' summation order can change)."""
    xs = [
        mlp_features_for_tensor(s["mom"], s["rms"], g, pf, ctx.ff_inputs[i], ctx.time_feat,
                                ctx.log_num_tensors, red)
        for i, (pf, g, s, red) in enumerate(zip(pfs, grads, states, reducers, strict=True))
    ]  # fmt: skip
    outs = torch.split(mlp_apply(torch.cat(xs), ctx.weights, ctx.biases), [x.shape[0] for x in xs])
    for p, pf, o, lr, s, red in zip(params, pfs, outs, lrs, states, reducers, strict=True):
        s["from_mlp"] = _mean_rows(o[:, 2:], tuple(pf.shape) or (1,), red)
        _apply(p, pf, output_step(o, ctx.cfg), lr)


class RNNMLPLOpt(LearnedOptimizer):
    """RNNMLPLOpt as a torch optimizer; ``step`` needs the training loss (``loss=``, ``set_loss`` or a
    closure). ``record_validation_loss(loss)`` feeds a validation loss, as the reference's ``is_valid``.

    Parameters whose ``.grad`` is None are skipped: not updated, their state untouched, and (unlike the
    reference, which always sees every tensor) they count in neither the dynamic clip's mean nor the LSTM's
    mean over tensors nor the tensor count feature.
    """

    architecture = "rnn_mlp_lopt"
    uses_loss = True
    shard_local = True
    SPEC = specs.rnn_mlp_lopt

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        **options: Any,
    ) -> None:
        # Config (5 decays) and theta names / shapes / dtypes are validated through SPEC before anything else.
        super().__init__(params, theta, config, num_steps=num_steps, **options)
        n = int(self.config["hidden_layer"]) + 1
        self._layers = [f"mlp.linear_{i}" for i in range(n)]

    def _init_global(self, device: torch.device) -> dict[str, Any]:
        return {
            "iteration": torch.zeros((), dtype=torch.int32, device=device),
            "from_lstm": self.theta["initial_from_lstm"].to(device).clone(),
            "train_loss": loss_normalizer_init(device),
            "valid_loss": loss_normalizer_init(device),
            "clip": clip_init(device),
        }

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        f32 = dict(dtype=torch.float32, device=p.device)
        n = len(self.config["decays"])
        state["mom"] = torch.zeros(*p.shape, n, **f32)
        state["rms"] = torch.zeros(*p.shape, n, **f32)
        state["lstm_hidden"] = self.theta["lstm_init.hidden"][0].to(**f32).clone()
        state["lstm_cell"] = self.theta["lstm_init.cell"][0].to(**f32).clone()
        state["from_mlp"] = self.theta["initial_from_mlp"].to(**f32).clone()

    def _decays_on(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_decay_cache", {})
        if device not in cache:
            cache[device] = torch.tensor(self.config["decays"], dtype=torch.float32, device=device)
        return cache[device]

    @torch.no_grad()
    def record_validation_loss(self, loss: Any) -> None:
        """The reference's ``update(state, grads, loss, is_valid=True)``: the validation normalizer (decay
        0.95) takes ``loss`` and the step count advances; parameters and everything else stay. Give every
        rank the same value."""
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if GLOBAL not in self.state:
            self.state[GLOBAL] = self._init_global(device)
        gs = self.state[GLOBAL]
        loss_t = self._as_loss(loss, gs["iteration"].device)
        gs["valid_loss"] = loss_normalizer_next(gs["valid_loss"], loss_t, VALID_LOSS_DECAY)
        gs["iteration"] = gs["iteration"] + 1

    def _update(self, params, grads, lrs, loss, global_state, *, path, reducers, across) -> None:
        assert loss is not None
        device = params[0].device
        theta = self._theta_on(device)
        cfg = self.config
        gs = global_state
        # 1. loss features (the train normalizer's new state weights both losses).
        gs["train_loss"] = loss_normalizer_next(gs["train_loss"], loss, TRAIN_LOSS_DECAY)
        train_feat = weight_loss(gs["train_loss"], loss, TRAIN_LOSS_DECAY)
        valid = corrected_mean(gs["valid_loss"], VALID_LOSS_DECAY, cfg["corrected_mean_eps"])
        valid_feat = weight_loss(gs["train_loss"], valid, TRAIN_LOSS_DECAY)
        # 2. the dynamic clip, global over tensors.
        amount = clip_amount(gs["clip"])
        grads = [torch.clamp(g, -amount, amount) for g in grads]
        gs["clip"] = clip_next(gs["clip"], avg_square_mean(grads, reducers, across))
        # 3. accumulators; 4. per-tensor LSTM rows from the new moments and the parameters before the step.
        decays = self._decays_on(device)
        states = [self.state[p] for p in params]
        pfs = [p.detach().to(torch.float32) for p in params]
        rows = []
        for pf, g, s, red in zip(pfs, grads, states, reducers, strict=True):
            s["mom"] = acc.momentum_update(s["mom"], g, decays)
            s["rms"] = acc.rms_update(s["rms"], g, decays)
            rows.append(
                lstm_features_for_tensor(
                    s["mom"], s["rms"], g, pf, s["from_mlp"], gs["from_lstm"], train_feat, valid_feat, red
                )
            )
        hidden = torch.stack([s["lstm_hidden"] for s in states])
        cell = torch.stack([s["lstm_cell"] for s in states])
        h, c = lstm_step(torch.stack(rows), hidden, cell, theta["rnn.lstm.w"], theta["rnn.lstm.b"])
        for i, s in enumerate(states):
            s["lstm_hidden"], s["lstm_cell"] = h[i], c[i]
        n_tensors = across.sum(torch.tensor(float(len(params)), dtype=torch.float32, device=device))
        to_in = h @ theta["rnn_to_in.w"] + theta["rnn_to_in.b"]
        gs["from_lstm"] = across.sum(torch.sum(to_in, dim=0)) / n_tensors
        # 5. the per-element MLP and the step.
        ctx = _StepContext(
            ff_inputs=h @ theta["rnn_to_ff.w"] + theta["rnn_to_ff.b"],
            time_feat=sin_embedding(gs["iteration"]),
            log_num_tensors=torch.log(n_tensors) - 1.0,
            weights=[theta[f"{k}.w"] for k in self._layers],
            biases=[theta[f"{k}.b"] for k in self._layers],
            cfg=cfg,
        )
        fn = _multi_tensor_rnn_mlp_lopt if path == "foreach" else _single_tensor_rnn_mlp_lopt
        fn(params, pfs, grads, lrs, states, reducers, ctx)
        gs["iteration"] = gs["iteration"] + 1
