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

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from . import dispatch, specs, velo
from .accumulators import (
    factored_state_shapes,
    factored_update,
    loss_buffer_features,
    loss_buffer_init,
    loss_buffer_update,
    momentum_update,
    rms_update,
)
from .base import LearnedOptimizer, ParamsT, write_param
from .distributed.reducer import TensorReducer
from .features import (
    factored_dims,
    fractional_tanh_embed,
    second_moment_normalizer,
    second_moment_normalizers,
)
from .kernels.cpu import passes
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
        step = CeloStep(
            weights=self._ff_weights(controls, device),
            lr_mult=lr_mult,
            decays=(self.mom_decays.to(device), self.rms_decays.to(device), self.fac_decays.to(device)),
            cfg=self.config,
            ff_in=self._ff_in,
            n_layers=self._ff_layers,
        )
        states = [self.state[p] for p in params]
        grads = [torch.clamp(g, -1000.0, 1000.0) for g in grads]

        def impl(name: str) -> Any:
            return functools.partial(_implementation(name), step=step)

        samples = _kernel_samples(path, params)
        path = dispatch.verified(self, path, samples, impl, params, grads, lrs, states, reducers)
        impl(path)(params, grads, lrs, states, reducers)
        global_state["iteration"] = global_state["iteration"] + 1


@dataclass
class CeloStep:
    """What every tensor's update reads at one step: the scheduler's outputs and the interpolated MLP."""

    weights: dict[str, torch.Tensor]  # the param_inits MLP copies, interpolated (Celo._ff_weights)
    lr_mult: torch.Tensor  # () the LSTM's step-size multiplier
    decays: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # momentum, rms, adafactor
    cfg: Mapping[str, Any]
    ff_in: list[str]  # first-layer weight names, one per input group
    n_layers: int

    @property
    def attrs(self) -> _Attrs:
        return _Attrs(self.cfg)

    @property
    def applied_lr_mult(self) -> torch.Tensor:
        """The multiplier the step applies: the LSTM's from phase 2 on, else 1 (``_step_from_mlp_out``)."""
        return self.lr_mult if self.cfg["train_phase"] > 1 else torch.ones_like(self.lr_mult)

    @functools.cached_property
    def mlp(self) -> tuple[torch.Tensor, ...]:
        """``(w0 (inputs, H), b0, w1, b1, w2 (H, 3), b2)``: the two-hidden-layer MLP the fast paths run."""
        w = self.weights
        w0 = torch.cat([w[name] for name in self.ff_in], dim=0)
        return w0, w["ff.b0"], w["ff.w1"], w["ff.b1"], w["ff.w2"], w["ff.b2"]


def _implementation(path: str) -> Any:
    """The function that runs ``path`` (``dispatch`` chose it): ``(params, grads, lrs, states, reducers, *,
    step)``, grads clipped."""
    if path == "reference":
        return _single_tensor_celo
    if path == "foreach-batched":
        return _batched_celo
    if path in ("foreach", "fused-cpu"):  # torch ops (any device); with the C passes on the CPU
        return functools.partial(_multi_tensor_celo, c_passes=path == "fused-cpu")
    if path == "fused-triton":
        return _triton_celo
    raise ValueError(f"Celo has no implementation {path!r}")


#: For ``dispatch.verified``: Celo runs VeLO's kernel variants (its C passes and Triton kernels), so the same
#: samples.
_kernel_samples = velo._kernel_samples


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
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: CeloStep,
) -> None:
    """Reference path: one tensor at a time, first layer summed input by input as the reference does.

    A path FSDP2 shards take: their reducers all-reduce every mean over a shard.
    """
    w, cfg, ff_in = step.weights, step.cfg, step.ff_in
    for p, g, st, red, lr in zip(params, grads, states, reducers, lrs, strict=True):
        fac_g = _accumulate(st, g, *step.decays, red)
        p32 = p.detach().to(torch.float32)
        inps = celo_features(p32, g, fac_g, st, cfg, red)
        o = inps[0] @ w[ff_in[0]]
        for x, name in zip(inps[1:], ff_in[1:], strict=True):
            o = o + x @ w[name]
        o = o + w["ff.b0"]
        for i in range(1, step.n_layers + 1):
            o = torch.relu(o) @ w[f"ff.w{i}"] + w[f"ff.b{i}"]
        u = _step_from_mlp_out(o, p32, st["rms"], step.lr_mult, cfg, red)
        _apply(p, u, lr)


def _batched_celo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: CeloStep,
) -> None:
    """Batched path for every option set: features of all tensors stacked into one matrix, the MLP run once
    for all elements (whole tensors only: it normalises flattened rows, so ``dispatch`` keeps FSDP2 shards
    off it). The foreach path for options ``_multi_tensor_celo`` does not take."""
    w, cfg = step.weights, step.cfg
    fac_gs = [
        _accumulate(st, g, *step.decays, red) for g, st, red in zip(grads, states, reducers, strict=True)
    ]
    p32s = [p.detach().to(torch.float32) for p in params]
    rows = []
    for p32, g, fac_g, st, red in zip(p32s, grads, fac_gs, states, reducers, strict=True):
        inps = celo_features(p32, g, fac_g, st, cfg, red, normalize=False)
        x = torch.cat([x.expand(*x.shape[:-1], x.shape[-1]) for x in inps], dim=-1)
        x = x.reshape(-1, x.shape[-1])  # (elements, channels): one reduction normalises every channel
        rows.append(second_moment_normalizer(x, [0], red))
    w0 = torch.cat([w[name] for name in step.ff_in], dim=0)
    o = torch.cat(rows, dim=0) @ w0 + w["ff.b0"]
    for i in range(1, step.n_layers + 1):
        o = torch.relu(o) @ w[f"ff.w{i}"] + w[f"ff.b{i}"]
    sizes = [p.numel() for p in params]
    for p, p32, o_i, st, red, lr in zip(
        params, p32s, torch.split(o, sizes), states, reducers, lrs, strict=True
    ):
        shape = tuple(p.shape) if p.dim() > 0 else (1,)
        u = _step_from_mlp_out(o_i.reshape(*shape, -1), p32, st["rms"], step.lr_mult, cfg, red)
        _apply(p, u, lr)


# ----------------------------------------------------------------------------------------------------
# The foreach path (torch ops, any device) and the fused paths' glue: the reference above, reorganised as
# VeLO's fast paths reorganise HyperV2's per-element step (velo.py), whose features, MLP and output head
# Celo's are (``velo.ff_inputs``, ``velo.output_step`` with Celo's lr multiplier):
#
# - one MLP for every tensor (the LSTM reads only global inputs): ``CeloStep.mlp``, interpolated once;
# - per tensor, the normalisation folded into the first layer and the Adafactor row / column features
#   entering it once per row / column (``velo._tensor_mlp_out``, ``folded``), the MLP over cache-sized chunks;
# - on the fused CPU path, contiguous tensors of rank >= 2 (conv kernels too) from ``velo.NATIVE_MIN``
#   elements on VeLO's C passes
#   (``velo._c_pass1`` without the per-tensor LSTM statistics, ``velo._c_pass2`` with Celo's multiplier);
# - on the fused CUDA path, VeLO's Triton kernels (``kernels.triton.velo``) with Celo's MLP in every row of
#   the weight table and its multiplier in every row of the scalars.
def _celo_ctx(step: CeloStep) -> SimpleNamespace:
    """The step context VeLO's C-pass glue reads (``ctx.cfg``: feature switches and output head options)."""
    return SimpleNamespace(cfg=step.attrs)


def _multi_tensor_celo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: CeloStep,
    c_passes: bool = False,
) -> None:
    """The foreach path (torch ops, any device, FSDP2 shards: every reduction through ``reducers[i]``), and
    with ``c_passes`` the fused CPU path: a drop-in for ``_single_tensor_celo`` (module comment above)."""
    cfg = step.attrs
    mlp = step.mlp
    lr_mult = step.applied_lr_mult
    lr_mult_f = None
    ctx = _celo_ctx(step)
    mom_d, rms_d, fac_d = step.decays
    for p, g, lr, s, red in zip(params, grads, lrs, states, reducers, strict=True):
        pf = p.detach().to(torch.float32)
        if c_passes and pf.numel() >= velo.NATIVE_MIN and passes.usable(pf, [s["mom"], s["rms"]]):
            if lr_mult_f is None:
                lr_mult_f = float(lr_mult)
            pre = velo._c_pass1(
                pf, g.to(torch.float32).contiguous(), s, fac_d, mom_d, rms_d, lstm_stats=False
            )
            velo._c_pass2(p, pf, s, pre, mlp, lr_mult_f, float(lr), ctx)
            continue
        shape = tuple(pf.shape) or (1,)
        st = dict(s)
        if pf.dim() == 0:  # the reference reshapes scalars to (1,): every feature normalised on its own
            for k in ("mom", "rms", "fac_full"):
                st[k] = s[k].reshape(1, s[k].shape[-1])
        x = pf.reshape(shape)
        o = velo._tensor_mlp_out(x, g.reshape(shape), st, *mlp, step.decays, cfg, red)
        scale = None
        if cfg.param_scale_mult:
            scale = velo.param_scale(red.mean(torch.square(x)), red.numel(x), cfg)
        for k in ("mom", "rms", "fac_row", "fac_col", "fac_full"):
            s[k] = st[k].reshape(s[k].shape) if pf.dim() == 0 else st[k]
        rms_last = st["rms"].reshape(-1, st["rms"].shape[-1])[:, -1]
        u = velo.output_step(o[:, 0], o[:, 1], scale, lr_mult, rms_last, cfg).reshape(pf.shape)
        write_param(p, pf - u if lr == 1.0 else pf - lr * u)


def _triton_celo(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lrs: list[float],
    states: list[dict[str, Any]],
    reducers: list[TensorReducer],
    *,
    step: CeloStep,
) -> None:
    """The fused CUDA path: a drop-in for ``_single_tensor_celo`` (grads clipped). The factored accumulators
    in torch (``velo._triton_inputs``), the element-wise rest in VeLO's Triton kernels, one MLP for all."""
    from .kernels.triton import velo as kernel

    device = params[0].device
    f32 = dict(dtype=torch.float32, device=device)
    cfg = step.attrs
    w0, b0, w1, b1, w2, b2 = step.mlp
    n_t = len(params)
    row = torch.cat(
        [
            w0.reshape(-1),
            b0,
            w1.reshape(-1),
            b1,
            torch.nn.functional.pad(w2, (0, 1)).reshape(-1),
            torch.nn.functional.pad(b2, (0, 1)),
        ]
    )  # fmt: skip  (the kernel's table row: w0 (30, H) | b0 | w1 (H, H) | b1 | w2 (H, 4) | b2 (4))
    weights = row.to(**f32).expand(n_t, -1).contiguous()
    gcs, fdims, auxes, caps, dec = velo._triton_inputs(params, grads, states, step.decays, cfg)
    scalars = torch.stack(
        [step.applied_lr_mult.to(**f32).expand(n_t), torch.tensor([float(lr) for lr in lrs], **f32),
         torch.tensor(caps, **f32), torch.zeros(n_t, **f32)], dim=1,
    ).contiguous()  # fmt: skip
    kernel.velo_step(
        params, gcs, [s["mom"] for s in states], [s["rms"] for s in states], [s["fac_full"] for s in states],
        fdims, auxes, weights, scalars, dec, hidden=w1.shape[0], exp_mult=cfg.exp_mult,
        step_mult=cfg.step_mult, param_scale=cfg.param_scale_mult, precondition=cfg.precondition_output,
    )  # fmt: skip
