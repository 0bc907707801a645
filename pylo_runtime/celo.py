"""Celo (``amoudgl/celo``): a learned LSTM step-size scheduler over a learned per-element MLP update rule.

Per step (``celo.optimizers.celo.Celo``): the loss goes into rolling loss statistics; the LSTM reads only
global inputs (a tanh embedding of the fraction of training done and 9 loss features), so every tensor gets
the same step-size multiplier and the same mix of the ``param_inits`` MLP copies. Gradients are clipped to
[-1000, 1000], momentum / rms / adafactor accumulators are updated, 14 per-element features are normalised
per tensor, and a small MLP gives a direction and a magnitude; the step is
``lr_mult * direction * param_scale * exp(exp_mult * magnitude) * step_mult`` (phase 2, as published).

Because the LSTM inputs are identical for every tensor, its state is kept once (shape ``(1, hidden)``)
instead of once per tensor: the reference's rows are all equal, so nothing changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import specs
from .accumulators import (
    factored_state_shapes,
    factored_update,
    loss_buffer_features,
    loss_buffer_init,
    loss_buffer_update,
    momentum_update,
    rms_update,
)
from .base import LearnedOptimizer, ParamsT
from .distributed.reducer import TensorReducer
from .features import (
    factored_dims,
    fractional_tanh_embed,
    second_moment_normalizer,
    second_moment_normalizers,
)
from .lstm import lstm_step
from .velo import ff_inputs

#: Constructor arguments of ``celo.optimizers.celo.Celo`` as ``get_optimizer('celo')`` sets them (phase 2,
#: the published meta-test configuration): the family spec's.
CELO_DEFAULTS = specs.celo.DEFAULTS

#: Options whose value only changes the reference's logging.
_LOGGING_ONLY = ("summarize_each_layer", "summarize_all_control")


class _CeloScheduler(LearnedOptimizer):
    """What Celo and Celo-Adam share: loss statistics and the LSTM that predicts the step-size multiplier."""

    uses_loss = True
    shard_local = True  # FSDP2 shards are stepped rank-locally (distributed.py)

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
        cfg = self.config
        f32 = torch.float32
        self.mom_decays = torch.tensor(cfg["initial_momentum_decays"], dtype=f32)
        self.rms_decays = torch.tensor(cfg["initial_rms_decays"], dtype=f32)
        self.fac_decays = torch.tensor(cfg["initial_adafactor_decays"], dtype=f32)

    # ----------------------------------------------------------------------------------------------------
    def _init_global(self, device: torch.device) -> dict[str, Any]:
        th = self._theta_on(device)
        return {
            "iteration": torch.zeros((), dtype=torch.int32, device=device),
            "loss_buffer": loss_buffer_init(self.inner_num_steps, device),
            "lstm_hidden": th["lstm_init.hidden"].clone(),
            "lstm_cell": th["lstm_init.cell"].clone(),
        }

    def _schedule(
        self, loss: torch.Tensor, global_state: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance loss statistics and LSTM; return (step-size multiplier ``()``, LSTM output ``(1, H)``)."""
        cfg = self.config
        th = self._theta_on(device)
        if cfg["constant_loss"]:
            loss = torch.ones((), dtype=torch.float32, device=device)
        buf = loss_buffer_update(global_state["loss_buffer"], loss)
        global_state["loss_buffer"] = buf
        it = global_state["iteration"]
        fraction = it.to(torch.float32) / torch.tensor(float(self.inner_num_steps), dtype=torch.float32)
        inputs = [fractional_tanh_embed(fraction.to(device)), loss_buffer_features(buf)]  # sorted by name
        if cfg["with_validation_feature_dim"]:
            inputs.append(torch.full((1,), float(cfg["validation_mode"]), dtype=torch.float32, device=device))
        x = torch.cat(inputs).unsqueeze(0)  # (1, n_in): every tensor's row is this same row

        if cfg["mix_layers"]:
            # The reference also computes ``linear`` (rnn.mix_unused) and overwrites it: skipped here.
            mix = torch.relu(x @ th["rnn.mix.w"] + th["rnn.mix.b"])
            x = (x @ th["rnn.in.w"] + th["rnn.in.b"]) + mix  # max over identical rows is the row itself
        h, c = global_state["lstm_hidden"], global_state["lstm_cell"]
        h, c = lstm_step(x, h, c, th["rnn.lstm.w"], th["rnn.lstm.b"])
        lr_mult = torch.exp((h @ th["rnn.step_size.w"] + th["rnn.step_size.b"]).squeeze(-1)) * 0.1
        out = h
        if cfg["rnn_state_decay"] > 0.0:
            h = h * (1.0 - cfg["rnn_state_decay"])
            c = c * (1.0 - cfg["rnn_state_decay"])
        global_state["lstm_hidden"], global_state["lstm_cell"] = h, c
        return lr_mult.reshape(()), out

    def _init_moments(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        shape = tuple(p.shape)
        f32 = torch.float32
        state["mom"] = torch.zeros((*shape, len(self.mom_decays)), dtype=f32, device=p.device)
        state["rms"] = torch.zeros((*shape, len(self.rms_decays)), dtype=f32, device=p.device)


class Celo(_CeloScheduler):
    """Celo: ``pylo_runtime.Celo.from_checkpoint("celo.safetensors", model.parameters(), num_steps=N)``.

    ``step(loss=...)`` (or a closure) is required: the scheduler reads the training loss.
    """

    architecture = "celo"
    SPEC = specs.celo

    def __init__(
        self, params: ParamsT, theta: Mapping[str, torch.Tensor], config: Mapping[str, Any], **kw: Any
    ):
        super().__init__(params, theta, config, **kw)  # refuses the configs the reference cannot run
        cfg = self.config
        n_inputs = sum(1 for k in self.theta if k.startswith("ff.w0."))
        self._ff_in = [f"ff.w0.{i}" for i in range(n_inputs)]
        self._ff_layers = cfg["ff_hidden_layers"]

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        self._init_moments(p, state)
        shape = tuple(p.shape) if p.dim() > 0 else (1,)
        fdims = factored_dims(red.global_shape(shape))  # FSDP2 shard: local state, global dims
        rows, cols, full = factored_state_shapes(shape, fdims, len(self.fac_decays))
        for key, s in (("fac_row", rows), ("fac_col", cols), ("fac_full", full)):
            state[key] = torch.zeros(s, dtype=torch.float32, device=p.device)

    # ----------------------------------------------------------------------------------------------------
    def _ff_weights(self, controls: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Interpolate the ``param_inits`` MLP copies: ``mean(ff_p * softmax(controls), axis=0)``."""
        th = self._theta_on(device)
        c = torch.softmax(controls.reshape(-1), dim=-1)
        out = {}
        for name in [*self._ff_in, *[f"ff.w{i}" for i in range(1, self._ff_layers + 1)]]:
            out[name] = torch.mean(th[name] * c.reshape(-1, 1, 1), dim=0)
        for i in range(self._ff_layers + 1):
            out[f"ff.b{i}"] = torch.mean(th[f"ff.b{i}"] * c.reshape(-1, 1), dim=0)
        return out

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
        across: Any,
    ) -> None:
        assert loss is not None
        device = params[0].device
        lr_mult, rnn_out = self._schedule(loss, global_state, device)
        th = self._theta_on(device)
        controls = rnn_out @ th["rnn.to_controls.w"] + th["rnn.to_controls.b"]
        weights = self._ff_weights(controls, device)
        states = [self.state[p] for p in params]
        grads = [torch.clamp(g, -1000.0, 1000.0) for g in grads]
        decays = (self.mom_decays.to(device), self.rms_decays.to(device), self.fac_decays.to(device))
        # (An FSDP2 shard: means over its sharded dim are all-reduced by its reducer.)
        fac_gs = [
            _accumulate(st, g, *decays, red) for g, st, red in zip(grads, states, reducers, strict=True)
        ]
        fn = _multi_tensor_celo if path == "foreach" else _single_tensor_celo
        fn(
            params,
            grads,
            fac_gs,
            states,
            reducers,
            lrs,
            lr_mult,
            weights,
            self.config,
            self._ff_in,
            self._ff_layers,
        )
        global_state["iteration"] = global_state["iteration"] + 1


# ----------------------------------------------------------------------------------------------------
# The per-element update rule (Celo._ff_mod), as pure functions.
def _accumulate(
    st: dict[str, Any],
    g: torch.Tensor,
    mom_d: torch.Tensor,
    rms_d: torch.Tensor,
    fac_d: torch.Tensor,
    red: TensorReducer,
) -> torch.Tensor:
    """Update one tensor's momentum, rms and adafactor accumulators; return the adafactor-normalised g."""
    st["mom"] = momentum_update(st["mom"], g, mom_d)
    st["rms"] = rms_update(st["rms"], g, rms_d)
    g1 = g.reshape(1) if g.dim() == 0 else g
    fdims = factored_dims(red.global_shape(g1.shape))
    row, col, full, fac_g = factored_update(
        st["fac_row"], st["fac_col"], st["fac_full"], g1, fac_d, fdims, red
    )
    st["fac_row"], st["fac_col"], st["fac_full"] = row, col, full
    return fac_g


class _Attrs:
    """A config mapping read as attributes (``velo.ff_inputs`` reads the HyperV2 feature switches so)."""

    __slots__ = ("_m",)

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self._m = mapping

    def __getattr__(self, name: str) -> Any:
        return self._m[name]


def celo_features(
    p: torch.Tensor,
    g: torch.Tensor,
    fac_g: torch.Tensor,
    st: Mapping[str, Any],
    cfg: Mapping[str, Any],
    red: TensorReducer,
    *,
    normalize: bool = True,
) -> list[torch.Tensor]:
    """The MLP inputs of one tensor, each ``shape + (channels,)``, in the reference's order (0-d as (1,)):
    HyperV2's per-element features (``velo.ff_inputs``), which Celo inherits unchanged.

    Each channel is normalised by its second moment over the tensor's elements (``normalize=False`` leaves
    that to the caller, which can do it for all channels in one reduction).
    """
    if p.dim() == 0:
        p, g = p.reshape(1), g.reshape(1)
    m = st["mom"].reshape(*p.shape, st["mom"].shape[-1])  # (explicit width: a shard may be empty)
    rms = st["rms"].reshape(*p.shape, st["rms"].shape[-1])
    inps = ff_inputs(p, g, m, rms, fac_g, st["fac_row"], st["fac_col"], st["fac_full"], _Attrs(cfg), red)
    if not normalize:
        return inps
    dims = list(range(p.dim()))
    return second_moment_normalizers(inps, dims, red)


def _step_from_mlp_out(
    o: torch.Tensor,
    p: torch.Tensor,
    rms: torch.Tensor,
    lr_mult: torch.Tensor,
    cfg: Mapping[str, Any],
    red: TensorReducer,
) -> torch.Tensor:
    """The step ``p_ref - p_new`` from MLP outputs ``o`` (shape ``p.shape + (3,)``, 0-d as (1,))."""
    direction = o[..., 0]
    mag_param = torch.exp(o[..., 1] * cfg["exp_mult"])
    p1 = p.reshape(1) if p.dim() == 0 else p
    if cfg["param_scale_mult"]:
        param_scale = torch.sqrt(red.mean(torch.square(p1)) + 1e-9)
        if cfg["clip_param_scale_amount"] is not None:
            n = red.numel(p1)
            max_scale = torch.tensor(cfg["clip_param_scale_amount"] * n**0.5, dtype=torch.float32)
            param_scale = torch.minimum(param_scale, max_scale.to(p.device))
        step = direction * (param_scale * mag_param) * cfg["step_mult"]
    else:
        step = direction * mag_param * cfg["step_mult"]
    if cfg["train_phase"] > 1:
        step = lr_mult * step
    if cfg["precondition_output"]:
        step = step * torch.rsqrt(rms.reshape(*p1.shape, rms.shape[-1])[..., -1] + 1e-6)
    return step.reshape(p.shape)


def _apply(p: torch.Tensor, step: torch.Tensor, lr: float) -> None:
    """``p - lr * step`` in float32, stored into ``p`` (``lr == 1`` is the reference exactly)."""
    p32 = p.detach().to(torch.float32)
    new = p32 - step if lr == 1.0 else p32 - lr * step
    p.copy_(new)


def _single_tensor_celo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    fac_gs: list[torch.Tensor],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    lrs: list[float],
    lr_mult: torch.Tensor,
    w: dict[str, torch.Tensor],
    cfg: Mapping[str, Any],
    ff_in: list[str],
    n_layers: int,
) -> None:
    """Reference path: one tensor at a time, first layer summed input by input as the reference does.

    The path FSDP2 shards take: their reducers all-reduce every mean over a shard.
    """
    for p, g, fac_g, st, red, lr in zip(params, grads, fac_gs, states, reducers, lrs, strict=True):
        p32 = p.detach().to(torch.float32)
        inps = celo_features(p32, g, fac_g, st, cfg, red)
        o = inps[0] @ w[ff_in[0]]
        for x, name in zip(inps[1:], ff_in[1:], strict=True):
            o = o + x @ w[name]
        o = o + w["ff.b0"]
        for i in range(1, n_layers + 1):
            o = torch.relu(o) @ w[f"ff.w{i}"] + w[f"ff.b{i}"]
        step = _step_from_mlp_out(o, p32, st["rms"], lr_mult, cfg, red)
        _apply(p, step, lr)


def _multi_tensor_celo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    fac_gs: list[torch.Tensor],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    lrs: list[float],
    lr_mult: torch.Tensor,
    w: dict[str, torch.Tensor],
    cfg: Mapping[str, Any],
    ff_in: list[str],
    n_layers: int,
) -> None:
    """Batched path: features of all tensors stacked into one matrix, the MLP run once for all elements
    (whole tensors only: it normalises flattened rows, so ``dispatch`` keeps FSDP2 shards off it)."""
    p32s = [p.detach().to(torch.float32) for p in params]
    rows = []
    for p32, g, fac_g, st, red in zip(p32s, grads, fac_gs, states, reducers, strict=True):
        inps = celo_features(p32, g, fac_g, st, cfg, red, normalize=False)
        x = torch.cat([x.expand(*x.shape[:-1], x.shape[-1]) for x in inps], dim=-1)
        x = x.reshape(-1, x.shape[-1])  # (elements, channels): one reduction normalises every channel
        rows.append(second_moment_normalizer(x, [0], red))
    w0 = torch.cat([w[name] for name in ff_in], dim=0)
    o = torch.cat(rows, dim=0) @ w0 + w["ff.b0"]
    for i in range(1, n_layers + 1):
        o = torch.relu(o) @ w[f"ff.w{i}"] + w[f"ff.b{i}"]
    sizes = [p.numel() for p in params]
    for p, p32, o_i, st, red, lr in zip(
        params, p32s, torch.split(o, sizes), states, reducers, lrs, strict=True
    ):
        shape = tuple(p.shape) if p.dim() > 0 else (1,)
        step = _step_from_mlp_out(o_i.reshape(*shape, -1), p32, st["rms"], lr_mult, cfg, red)
        _apply(p, step, lr)
