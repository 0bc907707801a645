"""VeLO: learned_optimization's ``HyperV2`` (a per-tensor LSTM that writes a per-parameter MLP) in PyTorch.

Reproduces ``research/general_lopt/hyper_v2.py`` at commit 32186aa4 exactly, quirks included (see
REFERENCE_NOTES.md): LSTM inputs from the previous step's accumulators, ``var_rms`` centred on ``mean_m``,
the overwritten first mix layer, ``mean(ff_p * c) * ff_mult`` interpolation of the ``param_inits`` MLP copies
(``ff_mult`` 100: Google's hard-coded constant; amoudgl/celo's copy makes it an option, VeLO-S uses 1),
``numpy.argsort`` factored dims, 0-d params reshaped to (1,), the doubled 1-D ``with_fac_*`` inputs.

Shape follows ``torch/optim/adam.py``: ``_single_tensor_velo`` is the reference path (one tensor at a time),
``_multi_tensor_velo`` batches tensors of equal shape with ``torch.func.vmap``; both run the LSTM once on
all tensors' stacked features (its mix layer takes a max over tensors, so it cannot run per tensor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import accumulators as acc
from . import dispatch, folded, specs
from . import features as feat
from .base import LearnedOptimizer, ParamsT, write_param
from .distributed.reducer import WHOLE, TensorReducer, TensorsReducer
from .kernels.cpu import passes
from .lstm import lstm_step

# The family spec (torch-free, shared with the converter): options, config validation and theta names.
from .specs.velo import DEFAULTS as HYPERV2_DEFAULTS  # noqa: F401  (every HyperV2 argument + default)
from .specs.velo import VeLOConfig as VeLOConfig
from .specs.velo import expected_theta_shapes as expected_theta_shapes
from .specs.velo import ff_layer_names as ff_layer_names

#: Gradients are clipped to this magnitude before anything else (hyper_v2 update).
GRAD_CLIP = 1000.0
#: Loss-buffer horizon used when ``use_bugged_loss_features`` (hyper_v2 ``buffer_loss_fns.init(10)``).
BUGGED_LOSS_HORIZON = 10


# ----------------------------------------------------------------------------------------------------
# Per-tensor LSTM features and the LSTM (hyper_v2.lstm_features_for_tensor / _rnn_forward).
def _mean_leading(x: torch.Tensor, n_lead: int, keepdim: bool, red: TensorReducer) -> torch.Tensor:
    """Mean over the first ``n_lead`` axes; over none (0-d params) the identity, as jnp.mean(axis=[])."""
    if n_lead == 0:
        return x
    return red.mean(x, tuple(range(n_lead)), keepdim=keepdim)


def lstm_features_for_tensor(
    p: torch.Tensor,
    m: torch.Tensor,
    rms: torch.Tensor,
    fraction_left: torch.Tensor,
    loss_features: torch.Tensor,
    rank_feature: torch.Tensor,
    cfg: VeLOConfig,
    red: TensorReducer,
) -> torch.Tensor:
    """The LSTM input row of one tensor, from the PREVIOUS step's momentum ``m`` and second moment ``rms``
    (``red``: reductions over the tensor, all its shards for an FSDP2 shard)."""
    norm_mult = torch.rsqrt(torch.clamp(red.mean(p * p), min=1e-9))
    m = m * norm_mult
    rms = rms * norm_mult
    n_lead = p.dim()
    mean_m = _mean_leading(m, n_lead, True, red)
    var_m = _mean_leading(torch.square(m - mean_m), n_lead, False, red)
    mean_rms = _mean_leading(rms, n_lead, True, red)
    var_rms = _mean_leading(torch.square(rms - mean_m), n_lead, False, red)  # sic: centred on mean_m
    parts = [
        fraction_left,
        loss_features,
        feat.clip_log_abs(mean_rms.reshape(mean_rms.shape[-1]), scale=10.0),
        rank_feature,
        feat.clip_log_abs(var_m, scale=10.0),
        feat.clip_log_abs(var_rms, scale=10.0),
    ]  # sorted by the reference's dict keys: fraction_left, loss_features, mean_rms, rank, var_m, var_rms
    if cfg.with_validation_feature_dim:
        parts.append(torch.full((1,), float(cfg.validation_mode), dtype=torch.float32, device=p.device))
    return torch.cat(parts)


def rnn_forward(
    theta: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    cfg: VeLOConfig,
    across: TensorsReducer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix layers + one LSTM step + heads on all tensors' rows ``x`` (T, F): ``(controls, lr_mult, h, c)``;
    ``across``: the mix layer's max over tensors (over all ranks' tensors under ``ShardedOptimizer``)."""
    if cfg.mix_layers:
        # The reference also evaluates rnn.mix_unused (haiku "linear") and overwrites the result.
        mix = torch.relu(x @ theta["rnn.mix.w"] + theta["rnn.mix.b"])
        v = across.max(torch.amax(mix, dim=0, keepdim=True))  # max over TENSORS
        x = x @ theta["rnn.in.w"] + theta["rnn.in.b"] + v
    h, c = lstm_step(x, hidden, cell, theta["rnn.lstm.w"], theta["rnn.lstm.b"])
    controls = h @ theta["rnn.to_controls.w"] + theta["rnn.to_controls.b"]
    lr_mult = (h @ theta["rnn.step_size.w"] + theta["rnn.step_size.b"]).squeeze(-1)
    return controls, lr_mult, h, c


# ----------------------------------------------------------------------------------------------------
# The per-element part for one tensor (hyper_v2._ff_mod and apply_one).
def interpolate_ff(
    control: torch.Tensor, ff_theta: Sequence[torch.Tensor], ff_mult: float = 100.0
) -> list[torch.Tensor]:
    """``mean(ff_p * c, axis=0) * ff_mult`` over the ``param_inits`` copies of each MLP tensor (no softmax).

    celo's ``interpolate_theta`` (learned_optimization's ``100. * mean(...)`` is ``ff_mult=100``: one float32
    product either way, IEEE multiplication commutes)."""
    out = []
    for t in ff_theta:
        c = control.reshape((t.shape[0],) + (1,) * (t.dim() - 1))
        out.append(torch.mean(t * c, dim=0) * ff_mult)
    return out


def ff_inputs(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    rms: torch.Tensor,
    fac_g: torch.Tensor,
    v_row: torch.Tensor,
    v_col: torch.Tensor,
    v_full: torch.Tensor,
    cfg: Any,
    red: TensorReducer,
) -> list[torch.Tensor]:
    """The per-element MLP inputs (each ``p.shape + (width,)``), before normalisation; ``p`` has rank >= 1.

    HyperV2's ``_ff_mod`` inputs, which Celo inherits (``cfg``: anything with the ``with_*`` switches)."""
    inps: list[torch.Tensor] = []
    if cfg.with_g:
        inps.append(g.unsqueeze(-1))
    if cfg.with_grad_clip_feat:
        inps.append(torch.clamp(g, -0.1, 0.1).unsqueeze(-1))
    if cfg.with_p:
        inps.append(p.unsqueeze(-1))
    if cfg.with_m and cfg.with_m_feat:
        inps.append(m)
    if cfg.with_rms and cfg.with_rms_feat:
        inps.append(rms)
    rsqrt = None
    if cfg.with_rms_norm_g or (cfg.with_rsqrt_rms and cfg.with_rms_only_norm_g):
        rsqrt = torch.rsqrt(rms + 1e-6)
    if cfg.with_rms_norm_g:
        inps.append(m * rsqrt)
    if cfg.with_rsqrt_rms:
        inps.append(rsqrt)
    if cfg.with_fac_norm_g:
        inps.append(fac_g)
    if cfg.with_rms_only_norm_g:
        inps.append(g.unsqueeze(-1) * rsqrt)
    if cfg.adafactor_accumulator:
        fdims = feat.factored_dims(red.global_shape(g.shape))
        if fdims is not None:
            d1, d0 = fdims
            full = (*g.shape, v_row.shape[-1])
            row_feat = v_row.unsqueeze(d0).expand(full)
            col_feat = v_col.unsqueeze(d1).expand(full)
            if cfg.with_fac_rms:
                inps += [row_feat, col_feat]
            if cfg.with_fac_rsqrt:
                inps += [torch.rsqrt(row_feat + 1e-8), torch.rsqrt(col_feat + 1e-8)]
            if cfg.with_fac_mom_mult:
                row_factor, col_factor = acc.row_col_factors(v_row, v_col, fdims, red)
                inps.append(m * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1))
        else:  # rank <= 1: the reference appends each of these twice
            if cfg.with_fac_rms:
                inps += [v_full, v_full]
            if cfg.with_fac_rsqrt:
                r = torch.rsqrt(v_full + 1e-8)
                inps += [r, r]
            if cfg.with_fac_mom_mult:
                inps.append(m * torch.pow(v_full, -0.5))
    return inps


def ff_step(
    p: torch.Tensor,
    inps: Sequence[torch.Tensor],
    rms: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    lr_mult: torch.Tensor,
    n_first: int,
    cfg: VeLOConfig,
    red: TensorReducer,
) -> torch.Tensor:
    """The step (``p_new = p - step``) of one tensor of rank >= 1 from its MLP inputs and weights."""
    dims = tuple(range(p.dim()))
    normed = feat.second_moment_normalizers(inps, dims, red)
    o = normed[0] @ weights[0]
    for x, w in zip(normed[1:], weights[1:n_first], strict=True):
        o = o + x @ w
    o = torch.relu(o + biases[0])
    for li, (w, b) in enumerate(zip(weights[n_first:], biases[1:], strict=True)):
        o = o @ w + b
        if li != len(biases) - 2:
            o = torch.relu(o)
    scale = None
    if cfg.param_scale_mult:
        scale = param_scale(red.mean(torch.square(p)), red.numel(p), cfg)
    return output_step(o[..., 0], o[..., 1], scale, lr_mult, rms[..., -1], cfg)


def param_scale_cap(numel: int, cfg: VeLOConfig) -> float | None:
    """``clip_param_scale_amount * sqrt(numel)`` rounded to float32 (the cap on ``param_scale``), or None."""
    if cfg.clip_param_scale_amount is None:
        return None
    return float(torch.tensor(cfg.clip_param_scale_amount * math.sqrt(numel), dtype=torch.float32))


def param_scale(mean_square: torch.Tensor, numel: int, cfg: VeLOConfig) -> torch.Tensor:
    """``sqrt(mean(p**2) + 1e-9)`` of a tensor of ``numel`` elements, capped by :func:`param_scale_cap`."""
    scale = torch.sqrt(mean_square + 1e-9)
    cap = param_scale_cap(numel, cfg)
    return scale if cap is None else torch.clamp(scale, max=cap)


def output_step(
    direction: torch.Tensor,
    magnitude: torch.Tensor,
    scale: torch.Tensor | None,
    lr_mult: torch.Tensor,
    rms_last: torch.Tensor,
    cfg: VeLOConfig,
) -> torch.Tensor:
    """The output head, ``p_new = p - step``: ``lr_mult * direction * (scale * exp(exp_mult * magnitude))
    * step_mult`` (``scale`` None without param_scale_mult), times ``rsqrt(rms_last + 1e-6)`` (the last rms
    decay) with precondition_output."""
    mag_param = torch.exp(magnitude * cfg.exp_mult)
    if scale is not None:
        step = direction * (scale * mag_param) * cfg.step_mult
    else:
        step = direction * mag_param * cfg.step_mult
    step = lr_mult * step
    if cfg.precondition_output:
        step = step * torch.rsqrt(rms_last + 1e-6)
    return step


def velo_tensor_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    rms: torch.Tensor,
    v_row: torch.Tensor,
    v_col: torch.Tensor,
    v_full: torch.Tensor,
    control: torch.Tensor,
    lr_mult: torch.Tensor,
    ff_theta: Sequence[torch.Tensor],
    decays: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: VeLOConfig,
    red: TensorReducer,
) -> tuple[torch.Tensor, ...]:
    """One tensor's accumulators and step: ``(m, rms, v_row, v_col, v_full, step)``, all float32, pure.

    ``g`` is already clipped; ``step`` has ``p``'s shape and the new parameter is ``p - step``.
    """
    mom_d, rms_d, fac_d = decays
    m = acc.momentum_update(m, g, mom_d)
    rms = acc.rms_update(rms, g, rms_d)
    fdims = feat.factored_dims(red.global_shape(g.shape))
    v_row, v_col, v_full, fac_g = acc.factored_update(v_row, v_col, v_full, g, fac_d, fdims, red)

    n_w = len(ff_theta) - (cfg.ff_hidden_layers + 1)
    params = interpolate_ff(control, ff_theta, cfg.ff_mult)
    weights, biases = params[:n_w], params[n_w:]
    n_first = n_w - cfg.ff_hidden_layers

    shape = p.shape
    if p.dim() == 0:  # the reference reshapes scalars to (1,) so each feature is normalised on its own
        pp, gg, mm, rr, ff, vf = (x.unsqueeze(0) for x in (p, g, m, rms, fac_g, v_full))
        inps = ff_inputs(pp, gg, mm, rr, ff, v_row, v_col, vf, cfg, red)
        step = ff_step(pp, inps, rr, weights, biases, lr_mult, n_first, cfg, red).reshape(shape)
    else:
        inps = ff_inputs(p, g, m, rms, fac_g, v_row, v_col, v_full, cfg, red)
        step = ff_step(p, inps, rms, weights, biases, lr_mult, n_first, cfg, red)
    return m, rms, v_row, v_col, v_full, step


# ----------------------------------------------------------------------------------------------------
class VeLO(LearnedOptimizer):
    """VeLO (HyperV2) as a torch optimizer; ``step`` needs the training loss (``loss=`` or a closure).

    Args beyond :class:`LearnedOptimizer`: none; every HyperV2 option comes from the converted file's config.
    Parameters whose ``.grad`` is None are skipped: not updated, their state untouched, and (unlike the
    reference, which always sees every tensor) they do not enter the LSTM mix layer's max over tensors.
    """

    architecture = "velo"
    uses_loss = True
    shard_local = True
    SPEC = specs.velo

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        **options: Any,
    ) -> None:
        # Config and theta names / shapes / dtypes are validated through SPEC before anything is built.
        super().__init__(params, theta, config, num_steps=num_steps, **options)
        self.cfg = VeLOConfig.from_config(self.spec_config)
        if self.cfg.constant_loss:
            self.uses_loss = False  # the reference replaces the loss by 1.0

    # ----------------------------------------------------------------------------------------------------
    def _init_global(self, device: torch.device) -> dict[str, Any]:
        horizon = BUGGED_LOSS_HORIZON if self.cfg.use_bugged_loss_features else self.inner_num_steps
        return {
            "iteration": torch.zeros((), dtype=torch.int32, device=device),
            "loss_buffer": acc.loss_buffer_init(horizon, device=device),
        }

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        cfg = self.cfg
        f32 = dict(dtype=torch.float32, device=p.device)
        shape = tuple(p.shape)
        state["mom"] = torch.zeros(*shape, len(cfg.mom_decays), **f32)
        state["rms"] = torch.zeros(*shape, len(cfg.rms_decays), **f32)
        fdims = feat.factored_dims(red.global_shape(shape))  # FSDP2 shard: local state, global dims
        rows, cols, full = acc.factored_state_shapes(shape, fdims, len(cfg.fac_decays))
        state["fac_row"] = torch.zeros(rows, **f32)
        state["fac_col"] = torch.zeros(cols, **f32)
        state["fac_full"] = torch.zeros(full, **f32)
        state["lstm_hidden"] = self.theta["lstm_init.hidden"][0].to(**f32).clone()
        state["lstm_cell"] = self.theta["lstm_init.cell"][0].to(**f32).clone()

    # ----------------------------------------------------------------------------------------------------
    def _update(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        lrs: list[float],
        loss: torch.Tensor | None,
        global_state: dict[str, Any],
        *,
        path: str,
        reducers: list[TensorReducer],
        across: TensorsReducer,
    ) -> None:
        device = params[0].device
        theta = self._theta_on(device)
        cfg = self.cfg
        if cfg.constant_loss or loss is None:
            loss = torch.ones((), dtype=torch.float32, device=device)
        buf = acc.loss_buffer_update(global_state["loss_buffer"], loss)
        global_state["loss_buffer"] = buf
        ctx = _StepContext(
            theta=theta,
            cfg=cfg,
            loss_features=acc.loss_buffer_features(buf),
            fraction_left=feat.fractional_tanh_embed(
                global_state["iteration"].to(torch.float32)
                / torch.tensor(float(self.inner_num_steps), dtype=torch.float32, device=device)
            ),
            decays=self._decays_on(device),
            across=across,
        )
        grads = [torch.clamp(g, -GRAD_CLIP, GRAD_CLIP) for g in grads]
        states = [self.state[p] for p in params]

        def impl(name: str) -> Any:
            return functools.partial(_implementation(name), ctx=ctx)

        samples = _kernel_samples(path, params)
        path = dispatch.verified(self, path, samples, impl, params, grads, lrs, states, reducers)
        impl(path)(params, grads, lrs, states, reducers)
        global_state["iteration"] = global_state["iteration"] + 1

    def _decays_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_decay_cache", {})
        if device not in cache:
            cfg = self.cfg
            cache[device] = tuple(
                torch.tensor(d, dtype=torch.float32, device=device)
                for d in (cfg.mom_decays, cfg.rms_decays, cfg.fac_decays)
            )
        return cache[device]


def _implementation(path: str):
    """The function that runs ``path`` (``dispatch`` chose it), a drop-in for ``_single_tensor_velo``:
    ``(params, grads, lrs, states, reducers, ctx)``."""
    if path == "reference":
        return _single_tensor_velo
    if path == "foreach-vmap":
        return _vmap_velo
    if path in ("foreach", "fused-cpu"):  # torch ops (any device); with the C passes on the CPU
        return functools.partial(_multi_tensor_velo, c_passes=path == "fused-cpu")
    if path == "fused-triton":
        return _triton_velo
    raise ValueError(f"VeLO has no implementation {path!r}")


def _kernel_samples(path: str, params: list[torch.Tensor]) -> dict[tuple, int]:
    """For ``dispatch.verified``: the smallest tensor of each kernel variant ``path`` would run."""
    out: dict[tuple, int] = {}
    for i, p in enumerate(params):
        if path == "fused-triton":
            key: tuple = (p.dtype, p.dim() >= 2)
        elif path == "fused-cpu":
            if p.dim() < 2 or p.numel() < NATIVE_MIN:
                continue  # the torch ops take it: nothing fused to check
            key = ("c-passes", p.dim())  # each rank's layouts checked once
        else:
            return {}
        if key not in out or p.numel() < params[out[key]].numel():
            out[key] = i
    return out


@dataclass
class _StepContext:
    """What every tensor's update reads at one step."""

    theta: Mapping[str, torch.Tensor]
    cfg: VeLOConfig
    loss_features: torch.Tensor
    fraction_left: torch.Tensor
    decays: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    across: TensorsReducer  # the LSTM mix layer's max over tensors

    def ff_theta(self) -> list[torch.Tensor]:
        weights, biases = ff_layer_names(self.cfg)
        return [self.theta[k] for k in weights + biases]


def _run_lstm(
    rows: list[torch.Tensor], states: list[dict[str, Any]], ctx: _StepContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LSTM once on all tensors' rows, advance each tensor's state; return controls, lr_mult."""
    dev = rows[0].device
    x = torch.stack([r.to(dev) for r in rows])
    hidden = torch.stack([s["lstm_hidden"].to(dev) for s in states])
    cell = torch.stack([s["lstm_cell"].to(dev) for s in states])
    controls, lr_mult, h, c = rnn_forward(ctx.theta, x, hidden, cell, ctx.cfg, ctx.across)
    cfg = ctx.cfg
    if not cfg.use_bugged_next_lstm_state:
        hidden, cell = h, c
    if cfg.rnn_state_decay > 0.0:
        hidden = hidden * (1.0 - cfg.rnn_state_decay)
        cell = cell * (1.0 - cfg.rnn_state_decay)
    for i, s in enumerate(states):
        s["lstm_hidden"] = hidden[i].to(s["lstm_hidden"].device)
        s["lstm_cell"] = cell[i].to(s["lstm_cell"].device)
    return controls, lr_mult


def _rank_feature(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return feat.rank_one_hot(tuple(shape), 5, device=device)


def _apply_step(p: torch.Tensor, step: torch.Tensor, lr: float) -> None:
    pf = p.detach().to(torch.float32)
    write_param(p, pf - step if lr == 1.0 else pf - lr * step)


def _single_tensor_velo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    ctx: _StepContext,
) -> None:
    """Reference path: the per-tensor functions one tensor at a time (the LSTM on all at once).

    A path FSDP2 shards take: ``reducers[i]`` reduces over all the shards of ``params[i]``.
    """
    cfg = ctx.cfg
    rows = []
    for p, s, red in zip(params, states, reducers, strict=True):
        pf = p.detach().to(torch.float32)
        dev = pf.device
        rows.append(
            lstm_features_for_tensor(
                pf,
                s["mom"],
                s["rms"],
                ctx.fraction_left.to(dev),
                ctx.loss_features.to(dev),
                _rank_feature(red.global_shape(p.shape), dev),
                cfg,
                red,
            )
        )
    controls, lr_mult = _run_lstm(rows, states, ctx)
    ff_theta = ctx.ff_theta()
    for i, (p, g, lr, s, red) in enumerate(zip(params, grads, lrs, states, reducers, strict=True)):
        dev = p.device
        pf = p.detach().to(torch.float32)
        m, rms, v_row, v_col, v_full, step = velo_tensor_update(
            pf,
            g,
            s["mom"],
            s["rms"],
            s["fac_row"],
            s["fac_col"],
            s["fac_full"],
            controls[i].to(dev),
            lr_mult[i].to(dev),
            [t.to(dev) for t in ff_theta],
            tuple(d.to(dev) for d in ctx.decays),
            cfg,
            red,
        )
        s["mom"], s["rms"], s["fac_row"], s["fac_col"], s["fac_full"] = m, rms, v_row, v_col, v_full
        _apply_step(p, step, lr)


#: Cap on the number of elements of one batched group in the multi-tensor path (bounds the feature memory).
GROUP_MAX_ELEMENTS = 1 << 22


def _groups(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of params grouped by (shape, device), each group capped at ``GROUP_MAX_ELEMENTS`` elements."""
    by_key: dict[tuple, list[list[int]]] = {}
    for i, p in enumerate(params):
        key = (tuple(p.shape), p.device)
        lists = by_key.setdefault(key, [[]])
        if lists[-1] and (len(lists[-1]) + 1) * max(p.numel(), 1) > GROUP_MAX_ELEMENTS:
            lists.append([])
        lists[-1].append(i)
    return [g for lists in by_key.values() for g in lists]


def _vmap_velo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    ctx: _StepContext,
) -> None:
    """Batched path: tensors of equal shape stacked and run through the same pure functions under vmap
    (whole tensors only: ``dispatch`` keeps FSDP2 shards off it, their all-reduces cannot run under vmap)."""
    cfg = ctx.cfg
    groups = _groups(params)
    rows: list[torch.Tensor | None] = [None] * len(params)
    stacked = []
    for idx in groups:
        p0 = params[idx[0]]
        dev = p0.device
        pf = torch.stack([params[i].detach().to(torch.float32) for i in idx])
        m = torch.stack([states[i]["mom"] for i in idx])
        rms = torch.stack([states[i]["rms"] for i in idx])
        fl, lf = ctx.fraction_left.to(dev), ctx.loss_features.to(dev)
        rank = _rank_feature(p0.shape, dev)
        feats_fn = functools.partial(
            lstm_features_for_tensor,
            fraction_left=fl,
            loss_features=lf,
            rank_feature=rank,
            cfg=cfg,
            red=WHOLE,
        )
        feats = torch.func.vmap(feats_fn)(pf, m, rms)
        for j, i in enumerate(idx):
            rows[i] = feats[j]
        stacked.append((idx, pf, m, rms))
    controls, lr_mult = _run_lstm(rows, states, ctx)  # type: ignore[arg-type]
    ff_theta = ctx.ff_theta()
    for idx, pf, m, rms in stacked:
        dev = pf.device
        sel = torch.tensor(idx, device=controls.device)
        g = torch.stack([grads[i] for i in idx])
        v_row = torch.stack([states[i]["fac_row"] for i in idx])
        v_col = torch.stack([states[i]["fac_col"] for i in idx])
        v_full = torch.stack([states[i]["fac_full"] for i in idx])
        th = [t.to(dev) for t in ff_theta]
        decays = tuple(d.to(dev) for d in ctx.decays)

        one = functools.partial(velo_tensor_update, ff_theta=th, decays=decays, cfg=cfg, red=WHOLE)
        out = torch.func.vmap(one)(
            pf, g, m, rms, v_row, v_col, v_full, controls.index_select(0, sel).to(dev), lr_mult[sel].to(dev)
        )
        new_m, new_rms, new_row, new_col, new_full, step = out
        for j, i in enumerate(idx):
            s = states[i]
            s["mom"], s["rms"] = new_m[j], new_rms[j]
            s["fac_row"], s["fac_col"], s["fac_full"] = new_row[j], new_col[j], new_full[j]
        lr_vals = [lrs[i] for i in idx]
        if all(lr == 1.0 for lr in lr_vals):
            new_p = pf - step
        else:
            lr_t = torch.tensor(lr_vals, dtype=torch.float32, device=dev).reshape(
                (-1,) + (1,) * (pf.dim() - 1)
            )
            new_p = pf - lr_t * step
        for j, i in enumerate(idx):
            write_param(params[i], new_p[j])


# ----------------------------------------------------------------------------------------------------
# The foreach path (torch ops, any device) and the fused paths' glue: the reference above, reorganised.
# Same LSTM (run once on all tensors), accumulators and per-element MLP as the reference path; what
# changes is how the per-element part is computed:
#
# - the ``param_inits`` MLP copies are interpolated for all tensors in one matrix product
#   (``interpolate_all``);
# - the per-tensor feature normalisation ``x * rsqrt(1e-5 + mean(x**2))`` is folded into the first-layer
#   weights (``folded``), and the 12 Adafactor row/column features of a factored tensor, constant along one
#   axis, enter the first layer once per row and once per column (broadcast), so per element it reads 18
#   features, not 30;
# - the 30 -> 4 -> 4 -> 3 MLP runs over cache-sized chunks of elements;
# - on the fused CPU path, 2-D tensors (from NATIVE_MIN elements) run on the hand-fused C passes
#   (``kernels.cpu``): one pass for this step's g**2 row / column sums, one that updates the accumulators and
#   sums the features' squares and the previous state's LSTM statistics (float64), one for the features, MLP
#   and update.
#
# Float32 results differ from the reference by summation order (torch ops, about 1e-7 relative), and in the
# C passes also by FMA contraction and a polynomial exp (at most 2e-6 relative per update in the tests).
#: Smallest 2-D tensor the C passes take (below, the torch path's few ops cost less than a thread hand-off).
NATIVE_MIN = 4096

#: Columns (of the 30 reference inputs) that vary per element in a factored tensor.
_ELEM = list(range(15)) + [27, 28, 29]
_ROW = [15, 16, 17, 21, 22, 23]  # v_row, rsqrt(v_row + 1e-8)
_COL = [18, 19, 20, 24, 25, 26]  # v_col, rsqrt(v_col + 1e-8)


def interpolate_all(
    controls: torch.Tensor, ff_theta: list[torch.Tensor], ff_mult: float = 100.0
) -> list[torch.Tensor]:
    """``mean(ff_p * c, axis=0) * ff_mult`` (``interpolate_ff``) for every tensor at once: list over ff
    tensors of (T, ...). The fused kernels (C passes, Triton) take its result, so they follow ff_mult."""
    n_inits = controls.shape[1]
    flat = torch.cat([t.reshape(n_inits, -1) for t in ff_theta], dim=1)
    mixed = (controls @ flat) / n_inits * ff_mult
    out, start = [], 0
    for t in ff_theta:
        k = t[0].numel()
        out.append(mixed[:, start : start + k].reshape((controls.shape[0],) + tuple(t.shape[1:])))
        start += k
    return out


def _elem_chunk(pf, g, m, rms, rf_u, cf_u, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """The 18 per-element inputs of rows ``r0:r1`` (axis 0) of a factored tensor, in reference order.

    ``rf_u`` / ``cf_u`` are the row / column factors with their reduced axis kept (size 1). Written into
    ``out`` (a cache-sized buffer) and returned as a (rows, 18) matrix.
    """

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[r0:r1] if t.shape[0] != 1 else t

    gc = g[r0:r1].unsqueeze(-1)
    mc, rc = m[r0:r1], rms[r0:r1]
    fac = rows(rf_u) * rows(cf_u)
    rsqrt = torch.rsqrt(rc + 1e-6)
    parts = [gc, torch.clamp(gc, -0.1, 0.1), pf[r0:r1].unsqueeze(-1), mc, rc, mc * rsqrt, rsqrt]
    parts += [gc * fac, gc * rsqrt, mc * fac]
    o = out[: gc.numel() * 18].view(gc.shape[:-1] + (18,))
    torch.cat(parts, dim=-1, out=o)
    return o.view(-1, 18)


def _row_chunks(shape: tuple[int, ...]):
    """``(r0, r1, c0, c1)``: slices of axis 0 of about ``folded.CHUNK`` elements, and their element ranges."""
    inner = 1
    for s_ in shape[1:]:
        inner *= s_
    rows_per = max(1, folded.CHUNK // max(inner, 1))
    for r0 in range(0, shape[0], rows_per):
        r1 = min(shape[0], r0 + rows_per)
        yield r0, r1, r0 * inner, r1 * inner


def _mlp_chunks(e_of, w_e, bias_of, shape, weights, out) -> None:
    """Chunked ``relu(e @ w_e + bias) -> relu(@ w1 + b1) -> @ w2 + b2`` into ``out`` (n, 3)."""
    (w1, b1), (w2, b2) = weights
    hidden = w_e.shape[1]
    for r0, r1, c0, c1 in _row_chunks(shape):
        h = bias_of(r0, r1, c1 - c0, hidden)
        h.addmm_(e_of(r0, r1, c0, c1), w_e)
        h.relu_()
        h = torch.addmm(b1, h, w1)
        h.relu_()
        torch.addmm(b2, h, w2, out=out[c0:c1])


def _tensor_mlp_out(pf, g, st, w0, b0, w1, b1, w2, b2, decays, cfg, red: TensorReducer) -> torch.Tensor:
    """Update one tensor's accumulators in ``st``; return its MLP output (n, 3). ``pf`` has rank >= 1.

    ``red``: an FSDP2 shard's statistics are reduced over its shard group.
    """
    mom_d, rms_d, fac_d = decays
    shape = tuple(pf.shape)
    n = pf.numel()
    m = acc.momentum_update(st["mom"], g, mom_d)
    rms = acc.rms_update(st["rms"], g, rms_d)
    st["mom"], st["rms"] = m, rms
    fdims = feat.factored_dims(red.global_shape(shape))
    out = torch.empty(n, 3, dtype=torch.float32, device=pf.device)
    layers = ((w1, b1), (w2, b2))
    if fdims is None:
        v_row, v_col, v_full, fac_g = acc.factored_update(
            st["fac_row"], st["fac_col"], st["fac_full"], g, fac_d, None, red
        )
        st["fac_full"] = v_full
        x = torch.cat(
            [t.reshape(n, -1) for t in ff_inputs(pf, g, m, rms, fac_g, v_row, v_col, v_full, cfg, red)], 1
        )
        w = folded.shard_rms_scale(x, shape + (x.shape[1],), red).unsqueeze(1) * w0
        bias = lambda r0, r1, c, h: b0.expand(c, h).clone()  # noqa: E731
        _mlp_chunks(lambda r0, r1, c0, c1: x[c0:c1], w, bias, (n,), layers, out)
        return out
    d1, d0 = fdims
    gsq = g * g + 1e-30
    mean_d0, mean_d1 = red.mean(gsq, d0), red.mean(gsq, d1)
    st["fac_row"], st["fac_col"] = acc.factored_rolling(st["fac_row"], st["fac_col"], mean_d0, mean_d1, fac_d)
    row_factor, col_factor = acc.row_col_factors(st["fac_row"], st["fac_col"], fdims, red)
    rf_u, cf_u = row_factor.unsqueeze(d0), col_factor.unsqueeze(d1)
    # The 18 per-element features, written once by one concatenation (strided column writes cost more).
    e = _elem_chunk(
        pf, g, m, rms, rf_u, cf_u, 0, shape[0], torch.empty(n * 18, dtype=torch.float32, device=pf.device)
    )
    w_e = folded.shard_rms_scale(e, shape + (18,), red).unsqueeze(1) * w0[_ELEM]
    a_row, a_col = folded.first_layer_shares(st["fac_row"], st["fac_col"], w0[_ROW], w0[_COL], b0, fdims, red)
    a_row, a_col = a_row.unsqueeze(d0), a_col.unsqueeze(d1)

    def bias_of(r0: int, r1: int, c: int, hidden: int) -> torch.Tensor:
        ar = a_row[r0:r1] if a_row.shape[0] != 1 else a_row
        ac = a_col[r0:r1] if a_col.shape[0] != 1 else a_col
        return torch.add(ar, ac).reshape(c, hidden)

    def e_of(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        return e[c0:c1]

    _mlp_chunks(e_of, w_e, bias_of, shape, layers, out)
    return out


def _c_pass1(
    pf: torch.Tensor, g: torch.Tensor, s: dict, fac_d, mom_d, rms_d, *, lstm_stats: bool = True
) -> dict:
    """A factored tensor's first C passes (any rank >= 2, contiguous): this step's ``g**2`` sums over its
    factored dims (factored accumulators updated in ``s``), then the momentum / rms update with the features'
    sums of squares and the previous state's LSTM statistics (``gsq_sums``, ``velo_pass1`` in lopt_cpu.c;
    ``lstm_stats=False``: not those, for Celo). Returns what the MLP pass needs."""
    fdims = feat.factored_dims(tuple(pf.shape))
    mean_d0, mean_d1 = passes.gsq_means(g, fdims)
    s["fac_row"], s["fac_col"] = acc.factored_rolling(s["fac_row"], s["fac_col"], mean_d0, mean_d1, fac_d)
    row_factor, col_factor = acc.row_col_factors(s["fac_row"], s["fac_col"], fdims, WHOLE)
    fa, fb = row_factor.contiguous(), col_factor.contiguous()
    sumsq, stats = passes.velo_pass1(
        pf, fdims, g, s["mom"], s["rms"], fa, fb, mom_d, rms_d, lstm_stats=lstm_stats
    )
    return {"fa": fa, "fb": fb, "sumsq": sumsq, "stats": stats, "fdims": fdims, "g": g}


def _lstm_row_from_stats(sums: torch.Tensor, n: int, ctx: Any, rank: torch.Tensor) -> torch.Tensor:
    """``lstm_features_for_tensor`` from ``_c_pass1``'s state sums: means of ``m * norm_mult`` and
    ``rms * norm_mult`` and their (sic) variances, as E[x**2] - E[x]**2 in float64."""
    mean_p2 = (sums[0] / n).to(torch.float32)
    nm = torch.rsqrt(torch.clamp(mean_p2, min=1e-9)).double()
    mean_m = sums[1:4] / n * nm
    var_m = sums[4:7] / n * nm**2 - mean_m**2
    mean_rms = sums[7:8] / n * nm
    var_rms = sums[8] / n * nm**2 - 2.0 * mean_m * mean_rms + mean_m**2  # centred on mean_m, as the reference
    parts = [ctx.fraction_left, ctx.loss_features, feat.clip_log_abs(mean_rms.float(), scale=10.0), rank]
    parts += [feat.clip_log_abs(var_m.float(), scale=10.0), feat.clip_log_abs(var_rms.float(), scale=10.0)]
    if ctx.cfg.with_validation_feature_dim:
        parts.append(torch.full((1,), float(ctx.cfg.validation_mode), dtype=torch.float32))
    return torch.cat(parts)


def _c_pass2(p, pf, s, pre: dict, mlp, lr_mult: float, lr: float, ctx) -> None:
    """The MLP pass and update of a factored tensor on the C passes, after ``_c_pass1``."""
    cfg = ctx.cfg
    w0, b0, w1, b1, w2, b2 = mlp
    n = pf.numel()
    w_e = folded.rms_scale(pre["sumsq"], n).unsqueeze(1) * w0[_ELEM]
    a0, a1 = folded.first_layer_shares(
        s["fac_row"], s["fac_col"], w0[_ROW], w0[_COL], b0, pre["fdims"], WHOLE
    )
    pscale = -1.0  # lopt_cpu.c: no param scale
    if cfg.param_scale_mult:  # mean(p**2): from the LSTM statistics, else the p feature's sum of squares
        sum_p2 = pre["stats"][0] if pre["stats"] is not None else pre["sumsq"][2]
        pscale = float(param_scale((sum_p2 / n).to(torch.float32), n, cfg))
    passes.velo_pass2(pf, pre["fdims"], pre["g"], s["mom"], s["rms"], pre["fa"], pre["fb"], w_e, a0, a1,
                      (w1, b1, w2, b2), cfg.exp_mult, cfg.step_mult, pscale, lr_mult, cfg.precondition_output,
                      lr)  # fmt: skip
    if not (p.dtype == torch.float32 and p.data_ptr() == pf.data_ptr() and p.is_contiguous()):
        write_param(p, pf.reshape(p.shape))


def _multi_tensor_velo(params, grads, lrs, states, reducers, ctx, *, c_passes: bool = False) -> None:
    """The foreach path (torch ops, any device), and with ``c_passes`` the fused CPU path: a drop-in for
    ``_single_tensor_velo`` (grads clipped), the reference math reorganised as the comment above says."""
    cfg = ctx.cfg
    rows = []
    pfs, stats = [], []
    for p, g, s, red in zip(params, grads, states, reducers, strict=True):
        pf = p.detach().to(torch.float32)
        # (An FSDP2 shard: ``red`` all-reduces the means over it.)
        rank = _rank_feature(red.global_shape(p.shape), pf.device)
        st = None
        if c_passes and pf.numel() >= NATIVE_MIN and passes.usable(pf, [s["mom"], s["rms"]]):
            mom_d, rms_d, fac_d = ctx.decays
            st = _c_pass1(pf, g.to(torch.float32).contiguous(), s, fac_d, mom_d, rms_d)
            rows.append(_lstm_row_from_stats(st["stats"], pf.numel(), ctx, rank))
        else:
            rows.append(
                lstm_features_for_tensor(
                    pf, s["mom"], s["rms"], ctx.fraction_left, ctx.loss_features, rank, cfg, red
                )
            )
        pfs.append(pf)
        stats.append(st)
    controls, lr_mult = _run_lstm(rows, states, ctx)
    w_names, b_names = ff_layer_names(cfg)
    n_first = len(w_names) - cfg.ff_hidden_layers
    mixed = interpolate_all(controls, [ctx.theta[k] for k in w_names + b_names], cfg.ff_mult)
    w0_all = torch.cat(mixed[:n_first], dim=1)  # (T, 30, hidden)
    w1_all, w2_all = mixed[n_first], mixed[n_first + 1]
    b0_all, b1_all, b2_all = mixed[len(w_names) :]
    for i, (p, pf, g, lr, s, red) in enumerate(zip(params, pfs, grads, lrs, states, reducers, strict=True)):
        if stats[i] is not None:
            mlp = (w0_all[i], b0_all[i], w1_all[i], b1_all[i], w2_all[i], b2_all[i])
            _c_pass2(p, pf, s, stats[i], mlp, float(lr_mult[i]), float(lr), ctx)
            continue
        shape = tuple(pf.shape) or (1,)
        st = dict(s)
        if pf.dim() == 0:  # the reference reshapes scalars to (1,): every feature normalised on its own
            st = {k: (v.unsqueeze(0) if k in ("mom", "rms", "fac_full") else v) for k, v in st.items()}
        x = pf.reshape(shape)
        o = _tensor_mlp_out(
            x, g.reshape(shape), st, w0_all[i], b0_all[i], w1_all[i], b1_all[i], w2_all[i], b2_all[i],
            ctx.decays, cfg, red,
        )  # fmt: skip
        scale = None
        if cfg.param_scale_mult:
            scale = param_scale(red.mean(torch.square(x)), red.numel(x), cfg)
        if pf.dim() == 0:
            st = {k: (v.squeeze(0) if k in ("mom", "rms", "fac_full") else v) for k, v in st.items()}
        for k in ("mom", "rms", "fac_row", "fac_col", "fac_full"):
            s[k] = st[k]
        rms_last = st["rms"].reshape(-1, st["rms"].shape[-1])[:, -1]
        step = output_step(o[:, 0], o[:, 1], scale, lr_mult[i], rms_last, cfg).reshape(pf.shape)
        write_param(p, pf - step if lr == 1.0 else pf - lr * step)


def _triton_velo(params, grads, lrs, states, reducers, ctx) -> None:
    """The fused CUDA path: a drop-in for ``_single_tensor_velo`` (grads clipped). LSTM, weight mixing and
    the factored accumulators in torch; the element-wise rest in the Triton kernels (``kernels.triton.velo``,
    the math of ``velo_tensor_update``)."""
    from .kernels.triton import velo as kernel

    cfg = ctx.cfg
    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    rows = []
    for p, s in zip(params, states, strict=True):
        pf = p.detach().to(torch.float32)
        rank = _rank_feature(p.shape, device)
        rows.append(
            lstm_features_for_tensor(
                pf, s["mom"], s["rms"], ctx.fraction_left, ctx.loss_features, rank, cfg, WHOLE
            )
        )
    controls, lr_mult = _run_lstm(rows, states, ctx)
    w_names, b_names = ff_layer_names(cfg)
    n_first = len(w_names) - cfg.ff_hidden_layers
    mixed = interpolate_all(controls, [ctx.theta[k] for k in w_names + b_names], cfg.ff_mult)
    n_t = len(params)
    w2 = torch.nn.functional.pad(mixed[n_first + 1], (0, 1))  # (T, H, 4): 3 outputs padded to 4
    b2 = torch.nn.functional.pad(mixed[len(w_names) + 2], (0, 1))
    weights = torch.cat(
        [
            torch.cat(mixed[:n_first], dim=1).reshape(n_t, -1),  # w0 (30, H)
            mixed[len(w_names)],  # b0
            mixed[n_first].reshape(n_t, -1),  # w1 (H, H)
            mixed[len(w_names) + 1],  # b1
            w2.reshape(n_t, -1),
            b2,
        ],
        dim=1,
    ).contiguous()
    gcs, fdims, auxes, caps, dec = _triton_inputs(params, grads, states, ctx.decays, cfg)
    scalars = torch.stack(
        [lr_mult.to(**f32), torch.tensor([float(lr) for lr in lrs], **f32), torch.tensor(caps, **f32),
         torch.zeros(n_t, **f32)], dim=1,
    ).contiguous()  # fmt: skip
    kernel.velo_step(
        params, gcs, [s["mom"] for s in states], [s["rms"] for s in states], [s["fac_full"] for s in states],
        fdims, auxes, weights, scalars, dec, hidden=cfg.ff_hidden_size, exp_mult=cfg.exp_mult,
        step_mult=cfg.step_mult, param_scale=cfg.param_scale_mult, precondition=cfg.precondition_output,
    )  # fmt: skip


def _triton_inputs(params, grads, states, decays, cfg) -> tuple[list, list, list, list, torch.Tensor]:
    """What ``kernels.triton.velo.velo_step`` takes besides the MLP table, for VeLO and Celo: contiguous
    float32 gradients in the reference's shape, factored dims, the factored accumulators (updated in
    ``states`` here: reductions over whole tensors) as ``aux_rows``, param-scale caps (inf: none), decays."""
    from .kernels.triton.common import aux_rows

    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    mom_d, rms_d, fac_d = (d.to(device) for d in decays)
    dec = torch.cat([mom_d, torch.clamp(rms_d, 0.0, 1.0), torch.clamp(fac_d, 0.0, 1.0)]).to(**f32)
    gcs, fdims, auxes, caps = [], [], [], []
    for p, g, s in zip(params, grads, states, strict=True):
        shape = tuple(p.shape) or (1,)
        fd = feat.factored_dims(tuple(p.shape))
        gc = g.reshape(shape).to(torch.float32).contiguous()
        aux = None
        if fd is not None:
            gsq = gc * gc + 1e-30
            mean_d0, mean_d1 = torch.mean(gsq, dim=fd[1]), torch.mean(gsq, dim=fd[0])
            s["fac_row"], s["fac_col"] = acc.factored_rolling(
                s["fac_row"], s["fac_col"], mean_d0, mean_d1, fac_d
            )
            rf, cf = acc.row_col_factors(s["fac_row"], s["fac_col"], fd, WHOLE)
            aux = aux_rows(s["fac_row"], s["fac_col"], rf, cf)
        for k in ("mom", "rms", "fac_full"):
            if not s[k].is_contiguous():
                s[k] = s[k].contiguous()
        gcs.append(gc)
        fdims.append(fd)
        auxes.append(aux)
        cap = param_scale_cap(p.numel(), cfg)
        caps.append(float("inf") if cap is None else cap)
    return gcs, fdims, auxes, caps, dec
