"""small_fc_lopt: learned_optimization's ``AdafacMLPLOpt`` (a per-element MLP over Adafactor-style features).

The update is the reference's ``opt_fn(theta).update`` exactly: momentum / rms / factored accumulators with
decays read from theta, 28 per-element features normalised per tensor, 11 tanh time features, an MLP
``[hidden_size] * hidden_layers + [2]`` and ``step = direction * exp(exp_mult * magnitude) * step_mult``.

Paths (``pylo_runtime.dispatch`` picks one; all take the same arguments, see ``_implementation``):
``_adafac_reference`` (the specification: per tensor, or ``batched`` one MLP over all rows) and
``_multi_tensor_adafac``, the same math reorganised around a few big matrix products (the foreach path,
any device; with ``c_passes`` the fused CPU path), and the Triton kernels (``_triton_adafac``):

- the per-tensor feature normalisation is folded into the first-layer weights (``folded``), and the 11 tanh
  time features, constant over a step, into its bias;
- the 12 Adafactor row/column features of a factored tensor are constant along one axis: their share of the
  first layer is computed once per row and once per column and broadcast, so per element the first layer
  reads 16 features, not 28;
- 2-D factored tensors run on the hand-fused C passes (``kernels.cpu``, fused path only): one pass updates
  the accumulators and sums the features' squares, one recomputes the features and runs the MLP and the
  update per tile of 48 elements, so nothing per element is written but the state and the parameter;
- other factored tensors run the MLP over cache-sized chunks of elements (``addmm`` + in-place relu);
  small and non-factored tensors are batched into one product.

Float32 results differ from the reference by summation order (torch ops, about 1e-7 relative), and in the
C passes also by FMA contraction and a polynomial exp (at most 2e-6 relative per update in the tests).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import dispatch, folded, specs
from .accumulators import factored_rolling, factored_update, momentum_update, rms_update, row_col_factors
from .base import LearnedOptimizer, ParamsT, write_param
from .distributed.reducer import WHOLE, TensorReducer, TensorsReducer
from .features import (
    STEP_TIMESCALES,
    factored_dims,
    second_moment_normalizer,
    step_tanh_embedding,
)
from .kernels.cpu import passes

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


def second_moment_normalize(x: torch.Tensor, red: TensorReducer, eps: float = 1e-5) -> torch.Tensor:
    """Divide each feature (last axis) by its root mean square over the tensor's elements (all other axes)."""
    return second_moment_normalizer(x, tuple(range(x.dim() - 1)), red, eps)


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
    red: TensorReducer,
) -> torch.Tensor:
    """The 28 un-normalised per-element inputs of ``AdafacMLPLOpt._mod``, shape ``p.shape + (28,)``."""
    rsqrt = torch.rsqrt(rms + 1e-6)
    inps = [g.unsqueeze(-1), p.unsqueeze(-1), m, rms, m * rsqrt, rsqrt, fac_g]
    full = p.shape + (v_row.shape[-1] if fdims is not None else v_diag.shape[-1],)
    if fdims is not None:
        d1, d0 = fdims
        row_feat = v_row.unsqueeze(d0).expand(full)
        col_feat = v_col.unsqueeze(d1).expand(full)
        row_factor, col_factor = row_col_factors(v_row, v_col, fdims, red)
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
    LEGACY_STATE_KEYS: ClassVar[Mapping[str, str]] = {
        "m": "mom", "v_row": "fac_row", "v_col": "fac_col", "v_diag": "fac_full"
    }  # fmt: skip
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

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        shape = tuple(p.shape) or (1,)  # the reference reshapes 0-d params to (1,)
        n_mom, n_rms, n_fac = self._n_decays
        kw = dict(dtype=torch.float32, device=p.device)
        state["mom"] = torch.zeros(shape + (n_mom,), **kw)
        state["rms"] = torch.zeros(shape + (n_rms,), **kw)
        fdims = factored_dims(red.global_shape(shape))  # FSDP2 shard: state local, dims from the whole
        if fdims is None:
            state["fac_full"] = torch.zeros(shape + (n_fac,), **kw)
        else:
            d1, d0 = fdims
            state["fac_row"] = torch.zeros(tuple(s for i, s in enumerate(shape) if i != d0) + (n_fac,), **kw)
            state["fac_col"] = torch.zeros(tuple(s for i, s in enumerate(shape) if i != d1) + (n_fac,), **kw)

    def _scales(self, params: list[torch.Tensor]) -> list[Any] | None:
        """Per-tensor multipliers applied to the step before ``lr`` (muLO's muP scales); None here."""
        return None

    def _prepare_grads(
        self, grads: list[torch.Tensor], reducers: list[TensorReducer], across: TensorsReducer
    ) -> list[torch.Tensor]:
        """Hook for muLO's gradient clipping (a norm over all tensors) and nan_to_num; identity here."""
        return grads

    def _update(self, params, grads, lrs, loss, global_state, *, path, reducers, across) -> None:
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
        grads = self._prepare_grads(grads, reducers, across)
        scales = self._scales(params) or [1.0] * len(params)
        states = [self.state[p] for p in params]

        def impl(name: str) -> Any:
            return functools.partial(_implementation(name), step=step)

        samples = _kernel_samples(path, params)
        path = dispatch.verified(self, path, samples, impl, params, grads, lrs, scales, states, reducers)
        impl(path)(params, grads, lrs, scales, states, reducers)
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
    ``(params, grads, lrs, scales, states, reducers, step=AdafacStep)``, grads already prepared (muLO's
    clip); ``reducers[i]`` reduces over the elements of ``params[i]``."""
    if path == "reference":
        return functools.partial(_adafac_reference, batched=False)
    if path == "foreach-batched":
        return functools.partial(_adafac_reference, batched=True)
    if path in ("foreach", "fused-cpu"):  # torch ops (any device); with the C passes on the CPU
        return functools.partial(_multi_tensor_adafac, c_passes=path == "fused-cpu")
    if path == "fused-triton":
        return _triton_adafac
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
            if not (factored and p.numel() >= SMALL):
                continue  # the torch ops take it: nothing fused to check
            key = ("c-passes", len(shape))  # each rank's layouts checked once
        else:
            return {}
        if key not in out or p.numel() < params[out[key]].numel():
            out[key] = i
    return out


def _tensor_features(
    p: torch.Tensor, g: torch.Tensor, st: dict[str, Any], decays: tuple[torch.Tensor, ...], red: TensorReducer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update ``p``'s accumulators in ``st``; return (float32 param in the reference's shape, features)."""
    shape = tuple(p.shape) or (1,)
    pf = p.detach().to(torch.float32).reshape(shape)
    g = g.reshape(shape)
    mom_d, rms_d, fac_d = decays
    fdims = factored_dims(red.global_shape(shape))  # an FSDP2 shard: dims from the whole tensor
    st["mom"] = update_momentum(st["mom"], g, mom_d)
    st["rms"] = update_rms(st["rms"], g, rms_d)
    empty = st["mom"].new_zeros(())
    v_row, v_col, v_diag, fac_g = update_factored(
        st.get("fac_row", empty), st.get("fac_col", empty), st.get("fac_full", empty), g, fac_d, fdims, red
    )
    if fdims is None:
        st["fac_full"] = v_diag
    else:
        st["fac_row"], st["fac_col"] = v_row, v_col
    feats = adafac_features(pf, g, st["mom"], st["rms"], fac_g, v_row, v_col, v_diag, fdims, red)
    return pf, feats


def _adafac_reference(
    params, grads, lrs, scales, states, reducers, *, step: AdafacStep, batched: bool
) -> None:
    """The reference path: features per tensor, then the MLP per tensor, or (``batched``, the foreach-batched
    path) once over the rows of all tensors; ``concat_weights=False`` is the scalar-math MLP, per tensor."""
    prepared = [
        _tensor_features(p, g, st, step.decays, red)
        for p, g, st, red in zip(params, grads, states, reducers, strict=True)
    ]
    normed = [second_moment_normalize(f, red) for (_, f), red in zip(prepared, reducers, strict=True)]
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


# --------------------------------------------------------------------------------------------------------
# The foreach path (torch ops) and the fused paths' glue: the reference math above, reorganised.
#: Factored tensors smaller than this go to the batched small-tensor product instead.
SMALL = 65536

# Column layout of the 28 reference features (AdafacMLPLOpt._mod, standard decay counts 3 / 1 / 3).
_G, _P, _M, _RMS, _MR, _RSQ, _FG = 0, 1, slice(2, 5), 5, slice(6, 9), 9, slice(10, 13)
_ROW, _COL, _RROW, _RCOL, _FMM = slice(13, 16), slice(16, 19), slice(19, 22), slice(22, 25), slice(25, 28)
#: Per-element columns of a factored tensor, in the order ``_elem_features`` writes them.
_ELEM_ROWS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 25, 26, 27]


def _factored_update(
    st: dict, g: torch.Tensor, fac_d: torch.Tensor, fdims: tuple[int, int], red: TensorReducer
):
    """``accumulators.factored_update`` of a factored tensor, returning the row / column factors (each with
    its reduced axis kept) instead of the preconditioned gradient."""
    grad_sqr = g * g + 1e-30
    d1, d0 = fdims
    mean_d0, mean_d1 = red.mean(grad_sqr, d0), red.mean(grad_sqr, d1)
    st["fac_row"], st["fac_col"] = factored_rolling(st["fac_row"], st["fac_col"], mean_d0, mean_d1, fac_d)
    row_factor, col_factor = row_col_factors(st["fac_row"], st["fac_col"], fdims, red)
    return row_factor.unsqueeze(d0), col_factor.unsqueeze(d1)


def _elem_features(pf, g, m, rms, fac, out: torch.Tensor) -> None:
    """Write the 16 per-element features (g, p, m, rms, m*rsqrt, rsqrt, fac_g, fac_mom_mult) into ``out``.

    One concatenation writes each row once (16 strided column writes cost several times more).
    """
    rsqrt = torch.rsqrt(rms + 1e-6)
    gu = g.unsqueeze(-1)
    parts = [gu, pf.unsqueeze(-1), m, rms, m * rsqrt, rsqrt, gu * fac, m * fac]
    torch.cat(parts, dim=-1, out=out.view(pf.shape + (16,)))


def _mlp_tail(h: torch.Tensor, h2: torch.Tensor, weights, biases, out: torch.Tensor) -> None:
    """relu(h) -> hidden layers -> ``out`` (in place on the chunk buffers)."""
    h.relu_()
    n = len(weights)
    for i in range(1, n - 1):
        torch.addmm(biases[i], h, weights[i], out=h2)
        h2.relu_()
        h, h2 = h2, h
    torch.addmm(biases[n - 1], h, weights[n - 1], out=out)


def _c_passes_factored(step, st, p, pf, g, fdims, w1_parts, b1, scale, lr) -> None:
    """The whole step of one factored tensor (any rank >= 2, contiguous) on the C passes: accumulators,
    features, MLP, update."""
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    w_elem, w_rowf, w_colf = w1_parts
    g = g.to(torch.float32).contiguous()
    mean_d0, mean_d1 = passes.gsq_means(g, fdims)
    st["fac_row"], st["fac_col"] = factored_rolling(st["fac_row"], st["fac_col"], mean_d0, mean_d1, fac_d)
    rf, cf = row_col_factors(st["fac_row"], st["fac_col"], fdims, WHOLE)
    fa, fb = rf.contiguous(), cf.contiguous()
    sumsq = passes.sfc_pass1(pf, fdims, g, st["mom"], st["rms"], fa, fb, mom_d, rms_d)
    w_e = folded.rms_scale(sumsq, pf.numel()).unsqueeze(1) * w_elem
    a0, a1 = folded.first_layer_shares(st["fac_row"], st["fac_col"], w_rowf, w_colf, b1, fdims, WHOLE)
    layers = (weights[1], biases[1], weights[2], biases[2])
    passes.sfc_pass2(pf, fdims, g, st["mom"], st["rms"], fa, fb, w_e, a0, a1, layers,
                     step.exp_mult, step.step_mult, scale, lr)  # fmt: skip
    _write_back(p, pf)


def _multi_tensor_adafac(
    params, grads, lrs, scales, states, reducers, *, step: AdafacStep, c_passes: bool = False
):
    """The foreach path (torch ops, any device), and with ``c_passes`` the fused CPU path: the reference
    math (``_adafac_reference``) reorganised, same state, same result to float32 rounding (module doc)."""
    device = params[0].device
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    time_feat = step.time_feat
    exp_mult, step_mult = step.exp_mult, step.step_mult
    w1 = weights[0]
    hidden = w1.shape[1]
    b1 = biases[0] + time_feat @ w1[28:]  # time features are not normalised: fold them into the bias
    w_elem = w1[_ELEM_ROWS]
    w_rowf = torch.cat([w1[_ROW], w1[_RROW]])
    w_colf = torch.cat([w1[_COL], w1[_RCOL]])

    small_x: list[torch.Tensor] = []  # normalised 28-wide features of batched tensors
    small_idx: list[int] = []
    outs: list[torch.Tensor | None] = [None] * len(params)
    pfs: list[torch.Tensor] = []
    bufs: dict[str, torch.Tensor] = {}

    def buf(name: str, rows: int, cols: int) -> torch.Tensor:
        b = bufs.get(name)
        if b is None or b.shape[0] < rows * cols:
            b = bufs[name] = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return b[: rows * cols].view(rows, cols)

    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        red = reducers[i]  # an FSDP2 shard's statistics are all-reduced over its shard group
        st = states[i]
        shape = tuple(p.shape) or (1,)
        pf = p.detach().to(torch.float32).reshape(shape)
        pfs.append(pf)
        g = g.reshape(shape)
        n = pf.numel()
        fdims = factored_dims(red.global_shape(shape))
        big = fdims is not None and red.numel(pf) >= SMALL  # (a shard: all ranks agree)
        if (
            big
            and c_passes
            and len(weights) == 3
            and hidden <= passes.MAXH
            and passes.usable(pf, [st["mom"], st["rms"]])
        ):
            w1_parts = (w_elem, w_rowf, w_colf)
            _c_passes_factored(step, st, p, pf, g, fdims, w1_parts, b1, float(scales[i]), float(lrs[i]))
            continue
        st["mom"] = update_momentum(st["mom"], g, mom_d)
        st["rms"] = update_rms(st["rms"], g, rms_d)
        m, rms = st["mom"], st["rms"]
        if not big:
            # Reference features, normalised, batched with the other small tensors.
            empty = m.new_zeros(())
            v_row, v_col, v_diag, fac_g = update_factored(
                st.get("fac_row", empty),
                st.get("fac_col", empty),
                st.get("fac_full", empty),
                g,
                fac_d,
                fdims,
                red,
            )
            if fdims is None:
                st["fac_full"] = v_diag
            else:
                st["fac_row"], st["fac_col"] = v_row, v_col
            f = adafac_features(pf, g, m, rms, fac_g, v_row, v_col, v_diag, fdims, red)
            small_x.append(f.reshape(n, 28) * folded.shard_rms_scale(f, shape + (28,), red))
            small_idx.append(i)
            continue

        rf, cf = _factored_update(st, g, fac_d, fdims, red)
        d1, d0 = fdims
        e = buf("e", n, 16)
        _elem_features(pf, g, m, rms, rf * cf, e)
        w_e = folded.shard_rms_scale(e, shape + (16,), red).unsqueeze(1) * w_elem
        # Row / column features: normalise over the tensor (each value repeats along one axis).
        a_row, a_col = folded.first_layer_shares(st["fac_row"], st["fac_col"], w_rowf, w_colf, b1, fdims, red)
        a_row = a_row.unsqueeze(d0)  # shape with 1 at d0, + (hidden,)
        a_col = a_col.unsqueeze(d1)
        out = torch.empty(n, 2, dtype=torch.float32, device=device)
        inner = n // shape[0] if shape[0] else 0  # an empty shard: no rows to run
        rows_per = max(1, folded.CHUNK // max(inner, 1))
        for r0 in range(0, shape[0], rows_per):
            r1 = min(shape[0], r0 + rows_per)
            c0, c1 = r0 * inner, r1 * inner
            ar = a_row[r0:r1] if a_row.shape[0] != 1 else a_row
            ac = a_col[r0:r1] if a_col.shape[0] != 1 else a_col
            h = buf("h", c1 - c0, hidden)
            torch.add(ar, ac, out=h.view((r1 - r0,) + shape[1:] + (hidden,)))
            h.addmm_(e[c0:c1], w_e)
            _mlp_tail(h, buf("h2", c1 - c0, hidden), weights, biases, out[c0:c1])
        outs[i] = out

    if small_x:
        x = torch.cat(small_x) if len(small_x) > 1 else small_x[0]
        out = torch.empty(x.shape[0], 2, dtype=torch.float32, device=device)
        w_s = w1[:28]
        for c0 in range(0, x.shape[0], folded.CHUNK):
            c1 = min(x.shape[0], c0 + folded.CHUNK)
            h = buf("h", c1 - c0, hidden)
            torch.addmm(b1, x[c0:c1], w_s, out=h)
            _mlp_tail(h, buf("h2", c1 - c0, hidden), weights, biases, out[c0:c1])
        for i, o in zip(small_idx, torch.split(out, [pfs[j].numel() for j in small_idx]), strict=True):
            outs[i] = o

    for i, (p, pf, o, lr) in enumerate(zip(params, pfs, outs, lrs, strict=True)):
        if o is None:  # stepped by the C passes
            continue
        u = _step(o[:, 0], o[:, 1], exp_mult, step_mult).reshape(pf.shape)
        if scales[i] != 1.0:
            u = u * scales[i]
        if lr != 1.0:
            u = u * lr
        write_param(p, (pf - u).reshape(p.shape))


def _write_back(p: torch.Tensor, pf: torch.Tensor) -> None:
    """Store the C passes' result ``pf`` into ``p`` unless they wrote ``p`` itself."""
    if not (p.dtype == torch.float32 and p.data_ptr() == pf.data_ptr() and p.is_contiguous()):
        write_param(p, pf.reshape(p.shape))


def _triton_adafac(params, grads, lrs, scales, states, reducers, *, step: AdafacStep) -> None:
    """The fused CUDA path: the factored accumulators (whole-tensor reductions) in torch, then the Triton
    kernels for the element-wise rest (``kernels.triton.adafac``, the math of ``_adafac_reference``)."""
    from .kernels.triton import adafac as kernel
    from .kernels.triton.common import aux_rows

    device = params[0].device
    mom_d, rms_d, fac_d = step.decays
    weights, biases = step.weights, step.biases
    f32 = dict(dtype=torch.float32, device=device)
    n_feat = kernel.N_FEAT
    n_mid = len(weights) - 2
    mlp = (
        weights[0][:n_feat].contiguous(),
        (biases[0] + step.time_feat @ weights[0][n_feat:]).contiguous(),  # time features folded in
        torch.stack(weights[1:-1]).contiguous() if n_mid else torch.zeros(1, **f32),
        torch.stack(biases[1:-1]).contiguous() if n_mid else torch.zeros(1, **f32),
        weights[-1].contiguous(),
        biases[-1].contiguous(),
    )
    dec = torch.cat([mom_d, torch.clamp(rms_d, 0.0, 1.0), torch.clamp(fac_d, 0.0, 1.0)]).to(**f32)
    gcs, fdims, auxes = [], [], []
    for p, g, st in zip(params, grads, states, strict=True):
        shape = tuple(p.shape) or (1,)
        fd = factored_dims(shape)
        gc = g.reshape(shape).to(torch.float32).contiguous()
        aux = None
        if fd is not None:
            gsq = gc * gc + 1e-30
            mean_d0, mean_d1 = torch.mean(gsq, dim=fd[1]), torch.mean(gsq, dim=fd[0])
            st["fac_row"], st["fac_col"] = factored_rolling(
                st["fac_row"], st["fac_col"], mean_d0, mean_d1, fac_d
            )
            rf, cf = row_col_factors(st["fac_row"], st["fac_col"], fd, WHOLE)
            aux = aux_rows(st["fac_row"], st["fac_col"], rf, cf)
        for k in ("mom", "rms", "fac_full"):
            if k in st and not st[k].is_contiguous():
                st[k] = st[k].contiguous()
        gcs.append(gc)
        fdims.append(fd)
        auxes.append(aux)
    kernel.adafac_step(
        params, gcs, [st["mom"] for st in states], [st["rms"] for st in states],
        [st.get("fac_full") for st in states], fdims, auxes,
        [float(s) * float(lr) for s, lr in zip(scales, lrs, strict=True)], dec, mlp,
        exp_mult=step.exp_mult, step_mult=step.step_mult,
    )  # fmt: skip


def _with_time(x: torch.Tensor, time_feat: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, time_feat.expand(x.shape[:-1] + time_feat.shape)], dim=-1)


def _step(
    direction: torch.Tensor, magnitude: torch.Tensor, exp_mult: float, step_mult: float
) -> torch.Tensor:
    return direction * torch.exp(magnitude * exp_mult) * step_mult
