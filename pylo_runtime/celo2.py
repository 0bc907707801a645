"""Celo2 (``amoudgl/celo`` ``celo/optimizers/celo2.py`` + ``celo2_optax.py``): a learned per-element MLP
update with Newton-Schulz orthogonalisation for most tensors, Adam for those routed to its "1-D" branch.

Per step (``Celo2._Opt.update``):

- **Adam branch** (``AdamTransformation``): ``m = b1 m + (1 - b1) g``, ``v = clip(b2) v + (1 - clip(b2)) g^2``
  (bias-corrected with ``adam_bias_correction``), step ``m * rsqrt(v + adam_epsilon)`` (epsilon inside the
  root), applied with ``step_mult * mult_1d`` (the float32 product);
- **learned branch** (``Celo2Transformation``): gradients clipped to +-1000; momentum / rms / Adafactor
  accumulators at constant decays (bias-corrected with ``bias_correction``); up to 14 per-element input
  groups, each normalised by its second moment over the tensor's LAST TWO dims (eps 1e-9); an MLP gives a
  direction (and a magnitude that matters only with ``exp_mult``); tensors of rank >= 2 are orthogonalised by
  Newton-Schulz on their last two dims (leading dims batched), then normalised over the same dims; applied
  with ``step_mult``;
- both: ``p - sm * step - weight_decay * p * sm`` (the config's decoupled ``weight_decay``).

Which tensors take the Adam branch: the reference searches ``regex_1d`` in each leaf's tree path. Here (see
``Celo2`` and docs/families.md): a param group's ``celo2_branch``, else ``route=`` ("regex", "rank" or a
callable), else the regex searched in the ``named_parameters()`` names. The branch of a tensor is fixed when
its state is created (its state keys say which: the learned branch keeps ``fac_row``).

The reference path (``_single_tensor_celo2``) is the specification; the foreach path
(``_multi_tensor_celo2``) runs the same function once per group of equally shaped tensors, stacked along a
new leading axis (Newton-Schulz already batches leading dims in the reference).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import specs
from .accumulators import factored_state_shapes, factored_update, momentum_update, rms_update, row_col_factors
from .base import LearnedOptimizer, ParamsT
from .distributed.reducer import WHOLE, TensorReducer
from .features import factored_dims, second_moment_normalizer

#: Every constructor argument of ``celo.optimizers.celo2.Celo2`` with its class default: the spec's.
CELO2_DEFAULTS = specs.celo2.DEFAULTS
ADAM, LEARNED = "adam", "learned"
BRANCHES = (ADAM, LEARNED)
#: ``route=`` strings: the regex on parameter names (default), or the rank rule (rank <= 1 -> Adam).
ROUTES = ("regex", "rank")
#: Param-group key that puts every tensor of the group on one branch.
GROUP_KEY = "celo2_branch"

RouteFn = Callable[[str | None, torch.Tensor], str]


class Celo2(LearnedOptimizer):
    """Celo2 / Celo2Base: ``Celo2.from_checkpoint(path, model.named_parameters(), num_steps=N)``.

    Routing to the Adam branch (the reference: ``re.search(regex_1d, tree_path)``), first match wins:

    1. a param group's ``"celo2_branch": "adam" | "learned"``;
    2. ``route=callable(name, p) -> "adam" | "learned"`` (``name`` is None without names);
    3. ``route="rank"``: rank <= 1 -> Adam (PyLO's rule);
    4. ``route="regex"`` (default): ``re.search(regex, name)`` on the ``named_parameters()`` name, where the
       regex is ``regex_1d=`` if given, else the config's (the class default ``.*bias.*|.*embed.*``; the
       factory's haiku ``/b$`` is applied as ``(^|\\.)bias$``). ``regex_1d=""`` routes nothing to Adam.
       Parameters given without names fall back to the rank rule, with one warning at construction.

    ``lr`` (per group) multiplies ``step_mult`` (and the decoupled weight decay); ``weight_decay=`` is the
    shared wrapper's coupled decay (``g += wd * p``) of every family; Celo2's own decoupled decay is the
    config's ``weight_decay``. The loss is not read.
    """

    architecture = "celo2"
    SPEC = specs.celo2
    uses_loss = False
    shard_local = False  # Newton-Schulz needs whole matrices: FSDP2 shards are gathered (distributed.py)

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        route: str | RouteFn = "regex",
        regex_1d: str | None = None,
        **options: Any,
    ) -> None:
        if not (callable(route) or route in ROUTES):
            raise ValueError(
                f"Celo2: route must be {' or '.join(map(repr, ROUTES))} or a callable (name, param) -> "
                f"'adam' | 'learned', got {route!r}"
            )
        self._route = route
        super().__init__(params, theta, config, num_steps=num_steps, **options)
        cfg = self.config
        if regex_1d is None:  # the config's: the reference's on its tree paths, applied to PyTorch names
            regex = specs.celo2.torch_name_regex(cfg["regex_1d"])
        else:
            regex = specs.celo2.check_regex("Celo2", "regex_1d", regex_1d)
        #: The regex searched in parameter names ("": nothing routes to Adam by name).
        self.name_regex = regex
        self._pattern = re.compile(self.name_regex) if self.name_regex else None
        f32 = torch.float32
        self.mom_decays = torch.tensor(cfg["initial_momentum_decays"], dtype=f32)
        self.rms_decays = torch.tensor(cfg["initial_rms_decays"], dtype=f32)
        self.fac_decays = torch.tensor(cfg["initial_adafactor_decays"], dtype=f32)
        self.adam_decays = (
            torch.tensor([cfg["adam_b1"]], dtype=f32),
            torch.tensor([cfg["adam_b2"]], dtype=f32),
        )
        self.ns_coeffs = torch.tensor(cfg["ns_coeffs"], dtype=f32)
        # Celo2LoptState: step_mult and step_mult_1d = f32(step_mult) * f32(mult_1d), computed once.
        self.step_mult = torch.tensor(cfg["step_mult"], dtype=f32)
        self.step_mult_1d = self.step_mult * torch.tensor(cfg["mult_1d"], dtype=f32)
        self._groups = specs.celo2.input_groups(cfg)
        self._ff_in = [f"ff.w0.{i}" for i in range(len(self._groups))]
        self._warned_unnamed = False
        self._check_routing()

    # ----------------------------------------------------------------------------------------------------
    # Routing.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Like torch's; ``celo2_branch`` (if given) must be "adam" or "learned"."""
        branch = param_group.get(GROUP_KEY)
        if branch is not None and branch not in BRANCHES:
            raise ValueError(
                f"Celo2: param group option {GROUP_KEY} must be 'adam' or 'learned', got {branch!r}"
            )
        super().add_param_group(param_group)
        if hasattr(self, "_warned_unnamed"):  # a group added after construction
            self._check_routing()

    def _check_routing(self) -> None:
        """Warn once when the name rule applies but some params have no names (they take the rank rule)."""
        if self._route != "regex" or self._pattern is None or self._warned_unnamed:
            return
        unnamed = sum(
            len(g["params"]) for g in self.param_groups if g.get(GROUP_KEY) is None and "param_names" not in g
        )
        if unnamed:
            self._warned_unnamed = True
            warnings.warn(
                f"Celo2: {unnamed} parameter(s) were given without names, so the reference's rule (regex_1d "
                f"{self.name_regex!r} searched in the parameter's name) cannot route them; they take the "
                "rank rule instead (rank <= 1 -> Adam branch, else the learned update). Pass "
                "model.named_parameters(), param groups with 'celo2_branch', or route='rank' to choose "
                "(docs/families.md, Celo2)",
                UserWarning,
                stacklevel=3,
            )

    def branch_of(self, p: torch.Tensor, group: Mapping[str, Any], name: str | None) -> str:
        """The branch the routing rules give ``p`` of ``group`` named ``name`` (None: no name)."""
        fixed = group.get(GROUP_KEY)
        if fixed is not None:
            return fixed
        if callable(self._route):
            got = self._route(name, p)
            if got not in BRANCHES:
                raise ValueError(
                    f"Celo2: route({name!r}, ...) returned {got!r}, expected 'adam' or 'learned'"
                )
            return got
        if self._route == "rank" or (self._pattern is not None and name is None):
            return ADAM if p.dim() <= 1 else LEARNED
        if self._pattern is None:
            return LEARNED
        return ADAM if self._pattern.search(name) else LEARNED

    def _locate(self, p: torch.Tensor) -> tuple[Mapping[str, Any], str | None, str]:
        """(group, name or None, label) of ``p`` (a stand-in sits in its param's place during a step)."""
        where = self.__dict__.get("_where", {}).get(id(p))
        if where is None or self.param_groups[where[0]]["params"][where[1]] is not p:
            self._where = {
                id(q): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, q in enumerate(g["params"])
            }
            where = self._where.get(id(p))
            if where is None:
                raise KeyError("parameter not in this optimizer's param_groups")
        gi, pi = where
        group = self.param_groups[gi]
        names = group.get("param_names")
        name = names[pi] if names else None
        return group, name, name if name is not None else f"param_groups[{gi}]['params'][{pi}]"

    def routing(self) -> dict[str, str]:
        """Every parameter's branch by name (or ``param_groups[i]['params'][j]``): its state's once it has
        stepped, else what the routing rules give it (like the reference's ``print_routing``)."""
        out = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                label = names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"
                st = self.state.get(p)
                if st and ("mom" in st):
                    out[label] = LEARNED if "fac_row" in st else ADAM
                else:
                    out[label] = self.branch_of(p, group, names[pi] if names else None)
        return out

    # ----------------------------------------------------------------------------------------------------
    def _init_global(self, device: torch.device) -> dict[str, Any]:
        return {"iteration": torch.zeros((), dtype=torch.int32, device=device)}

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        group, name, label = self._locate(p)
        branch = self.branch_of(p, group, name)
        f32 = torch.float32
        shape = tuple(p.shape)
        shape1 = shape if shape else (1,)  # the learned branch sees a 0-d tensor as (1,) (_ff_mod)
        if branch == ADAM:  # AdamTransformation: one decay each, kept on a trailing axis of 1
            state["mom"] = torch.zeros((*shape, 1), dtype=f32, device=p.device)
            state["rms"] = torch.zeros((*shape, 1), dtype=f32, device=p.device)
            return
        if p.dim() < 2 and not any(not fac for _, _, fac in self._groups):
            raise ValueError(
                f"Celo2: parameter {label} (rank {p.dim()}) takes the learned update, but the config enables "
                "only factored MLP inputs, which tensors of rank < 2 do not have (the reference fails there)"
            )
        state["mom"] = torch.zeros((*shape1, len(self.mom_decays)), dtype=f32, device=p.device)
        state["rms"] = torch.zeros((*shape1, len(self.rms_decays)), dtype=f32, device=p.device)
        rows, cols, full = factored_state_shapes(shape1, factored_dims(shape1), len(self.fac_decays))
        for key, s in (("fac_row", rows), ("fac_col", cols), ("fac_full", full)):
            state[key] = torch.zeros(s, dtype=f32, device=p.device)

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
        across: Any,
    ) -> None:
        device = params[0].device
        cfg = self.config
        it = global_state["iteration"] + 1  # optax.safe_increment: 1 at the first step
        t = it.to(torch.float32)
        ctx = _Context(self, device, t)
        adam, learned = [], []
        for i, p in enumerate(params):
            (learned if "fac_row" in self.state[p] else adam).append(i)
        fn = _multi_tensor_celo2 if path == "foreach" else _single_tensor_celo2
        fn(
            [params[i] for i in adam],
            [grads[i] for i in adam],
            [self.state[params[i]] for i in adam],
            [lrs[i] for i in adam],
            [params[i] for i in learned],
            [grads[i] for i in learned],
            [self.state[params[i]] for i in learned],
            [lrs[i] for i in learned],
            [reducers[i] for i in learned],
            ctx,
            cfg,
        )
        global_state["iteration"] = it


class _Context:
    """What one step's tensors share: decays, bias corrections, theta and multipliers on the device."""

    def __init__(self, opt: Celo2, device: torch.device, t: torch.Tensor) -> None:
        cfg = opt.config
        self.mom_d = opt.mom_decays.to(device)
        self.rms_d = opt.rms_decays.to(device)
        self.fac_d = opt.fac_decays.to(device)
        self.adam_d = tuple(d.to(device) for d in opt.adam_decays)
        # optax.tree.bias_correction: t / (1 - decay ** count), decay float32, count int32 (pow as XLA's).
        self.corr = None
        if cfg["bias_correction"]:
            self.corr = tuple(1.0 - torch.pow(d, t) for d in (self.mom_d, self.rms_d, self.fac_d))
        self.adam_corr = None
        if cfg["adam_bias_correction"]:
            self.adam_corr = tuple(1.0 - torch.pow(d, t) for d in self.adam_d)
        self.theta = opt._theta_on(device)
        self.ff_in = opt._ff_in
        self.groups = opt._groups
        self.ns = tuple(c for c in opt.ns_coeffs.to(device))
        self.step_mult = opt.step_mult.to(device)
        self.step_mult_1d = opt.step_mult_1d.to(device)


# ----------------------------------------------------------------------------------------------------
# The Adam branch (AdamTransformation + the apply of Celo2._Opt.update).
def _adam_accumulate(st: dict[str, Any], g: torch.Tensor, ctx: _Context) -> None:
    st["mom"] = momentum_update(st["mom"], g, ctx.adam_d[0])
    st["rms"] = rms_update(st["rms"], g, ctx.adam_d[1])


def adam_step(m: torch.Tensor, v: torch.Tensor, ctx: _Context, eps: float) -> torch.Tensor:
    """``(m_hat * rsqrt(v_hat + eps))[..., 0]`` (``AdamTransformation._compute_step``)."""
    if ctx.adam_corr is not None:
        m = m / ctx.adam_corr[0]
        v = v / ctx.adam_corr[1]
    return (m * torch.rsqrt(v + eps))[..., 0]


def _apply(p: torch.Tensor, step: torch.Tensor, sm: torch.Tensor, lr: float, wd: float) -> None:
    """``p - sm * step - wd * p * sm`` in float32 (``sm * lr`` when ``lr`` is not 1), stored into ``p``."""
    p32 = p.detach().to(torch.float32)
    if lr != 1.0:
        sm = sm * lr
    new = p32 - sm * step
    if wd != 0.0:
        new = new - (wd * p32) * sm
    p.copy_(new)


# ----------------------------------------------------------------------------------------------------
# The learned branch (Celo2Transformation.update and _ff_mod), on a "layout": the tensor itself (0-d as
# (1,)), or several equally shaped tensors stacked on a leading axis (the foreach path). ``lead`` is the
# number of leading stack axes (0 or 1); parameter axes follow.
def _learned_accumulate(
    st: dict[str, Any], g: torch.Tensor, fdims: tuple[int, int] | None, ctx: _Context, red: TensorReducer
) -> torch.Tensor:
    """Momentum, rms and Adafactor accumulators of one layout; returns the Adafactor-normalised gradient."""
    st["mom"] = momentum_update(st["mom"], g, ctx.mom_d)
    st["rms"] = rms_update(st["rms"], g, ctx.rms_d)
    row, col, full, fac_g = factored_update(
        st["fac_row"], st["fac_col"], st["fac_full"], g, ctx.fac_d, fdims, red
    )
    st["fac_row"], st["fac_col"], st["fac_full"] = row, col, full
    return fac_g


def _shifted(fdims: tuple[int, int] | None, lead: int) -> tuple[int, int] | None:
    return None if fdims is None else (fdims[0] + lead, fdims[1] + lead)


def learned_step(
    p: torch.Tensor,
    g: torch.Tensor,
    st: Mapping[str, torch.Tensor],
    fac_g: torch.Tensor,
    fdims: tuple[int, int] | None,
    lead: int,
    ctx: _Context,
    cfg: Mapping[str, Any],
    red: TensorReducer,
) -> torch.Tensor:
    """``Celo2Transformation._ff_mod`` on one layout (``p``, ``g``: float32, 0-d already as (1,)): the step.

    ``fdims``: the factored dims in the layout (None below rank 2); ``st``: the accumulators (updated).
    """
    rank = p.dim() - lead
    m, rms, v_row, v_col = st["mom"], st["rms"], st["fac_row"], st["fac_col"]
    if ctx.corr is not None:  # vec_bias_correction of m, rms, v_col, v_row (not of fac_g)
        m, rms = m / ctx.corr[0], rms / ctx.corr[1]
        if fdims is not None:
            v_row, v_col = v_row / ctx.corr[2], v_col / ctx.corr[2]
    g1 = g.unsqueeze(-1)
    rsqrt = torch.rsqrt(rms + 1e-8)
    feats: dict[str, Callable[[], torch.Tensor]] = {
        "g": lambda: g1,
        "clip_g": lambda: torch.clamp(g1, -0.1, 0.1),
        "p": lambda: p.unsqueeze(-1),
        "m": lambda: m,
        "rms": lambda: rms,
        "m_rsqrt": lambda: m * rsqrt,
        "rsqrt": lambda: rsqrt,
        "fac_g": lambda: fac_g,
        "g_rsqrt": lambda: g1 * rsqrt,
    }
    if fdims is not None:
        d1, d0 = fdims
        full = (*p.shape, v_row.shape[-1])
        row_feat = v_row.unsqueeze(d0).expand(full)
        col_feat = v_col.unsqueeze(d1).expand(full)

        def fac_mom_mult() -> torch.Tensor:
            row_factor, col_factor = row_col_factors(v_row, v_col, fdims, red)
            return m * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)

        feats |= {
            "row_feat": lambda: row_feat,
            "col_feat": lambda: col_feat,
            "row_rsqrt": lambda: torch.rsqrt(row_feat + 1e-8),
            "col_rsqrt": lambda: torch.rsqrt(col_feat + 1e-8),
            "fac_mom_mult": fac_mom_mult,
        }
    used = [(name, w) for (name, _, _), w in zip(ctx.groups, ctx.ff_in, strict=True) if name in feats]
    param_axes = list(range(lead, p.dim()))
    axes = param_axes[-2:]  # normalisation over the tensor's last two dims (_ff_mod's ``axis``)
    th = ctx.theta
    o = None
    for name, w in used:
        x = feats[name]()
        if cfg["normalize_input"]:
            x = second_moment_normalizer(x, axes, red, eps=1e-9)
        y = x @ th[w]
        o = y if o is None else o + y  # from zeros, input group by input group, as the reference sums
    act = torch.relu if cfg["mlp_activation"] == "relu" else torch.tanh
    n_layers = cfg["ff_hidden_layers"]
    o = o + th["ff.b0"]
    for k in range(1, n_layers + 1):
        o = act(o) @ th[f"ff.w{k}"] + th[f"ff.b{k}"]
    direction, mag = o[..., 0], o[..., 1]
    if cfg["aggregate_mag"]:
        mag = red.mean(mag, tuple(param_axes), keepdim=True) if lead else red.mean(mag)
    mag_param = torch.exp(mag * cfg["exp_mult"])
    if cfg["param_scale_mult"]:
        sq = torch.square(p)
        mean_sq = red.mean(sq, tuple(param_axes), keepdim=True) if lead else red.mean(sq)
        step = direction * (torch.sqrt(mean_sq + 1e-9) * mag_param)
    else:
        step = direction * mag_param
    if cfg["orthogonalize"] and rank >= 2:
        step = newton_schulz(step, ctx.ns, cfg["ns_iters"], cfg["ns_eps"])
    if cfg["normalize_output"]:
        step = second_moment_normalizer(step, axes, red, eps=1e-9)
    step = step * cfg["rmsmult"]
    if cfg["precondition_output"]:
        step = step * torch.rsqrt(rms[..., -1] + 1e-6)
    return step


def newton_schulz(x: torch.Tensor, coeffs: tuple[torch.Tensor, ...], steps: int, eps: float) -> torch.Tensor:
    """``orthogonalize_via_newton_schulz`` over the last two dims (leading dims batched), float32.

    The wide orientation is iterated (transposed back after); ``b = c1 a + (c2 a) @ a`` as the reference's
    Python precedence gives it.
    """
    c0, c1, c2 = coeffs
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # one batched product for every layout (the paths agree bit for bit)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.transpose(-2, -1)
    x = x / (torch.linalg.norm(x, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        a = torch.bmm(x, x.transpose(-2, -1))
        b = c1 * a + torch.bmm(c2 * a, a)
        x = c0 * x + torch.bmm(b, x)
    return (x.transpose(-2, -1) if transposed else x).reshape(shape)


def _single_tensor_celo2(
    adam_params: list[torch.Tensor],
    adam_grads: list[torch.Tensor],
    adam_states: list[dict[str, Any]],
    adam_lrs: list[float],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    lrs: list[float],
    reducers: list[TensorReducer],
    ctx: _Context,
    cfg: Mapping[str, Any],
) -> None:
    """Reference path: one tensor at a time, as ``Celo2._Opt.update`` maps over the tree's leaves."""
    wd = cfg["weight_decay"]
    for p, g, st, lr in zip(adam_params, adam_grads, adam_states, adam_lrs, strict=True):
        _adam_accumulate(st, g, ctx)
        _apply(p, adam_step(st["mom"], st["rms"], ctx, cfg["adam_epsilon"]), ctx.step_mult_1d, lr, wd)
    for p, g, st, lr, red in zip(params, grads, states, lrs, reducers, strict=True):
        p32 = p.detach().to(torch.float32)
        g = torch.clamp(g, -1000.0, 1000.0)
        if p.dim() == 0:  # _ff_mod's did_reshape: every input gets a leading axis of 1
            p32, g = p32.reshape(1), g.reshape(1)
        fdims = factored_dims(red.global_shape(p32.shape))
        fac_g = _learned_accumulate(st, g, fdims, ctx, red)
        step = learned_step(p32, g, st, fac_g, fdims, 0, ctx, cfg, red)
        _apply(p, step.reshape(p.shape), ctx.step_mult, lr, wd)


def _multi_tensor_celo2(
    adam_params: list[torch.Tensor],
    adam_grads: list[torch.Tensor],
    adam_states: list[dict[str, Any]],
    adam_lrs: list[float],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    lrs: list[float],
    reducers: list[TensorReducer],
    ctx: _Context,
    cfg: Mapping[str, Any],
) -> None:
    """Foreach path: the Adam tensors' step in one flattened vector; the learned tensors stacked per shape
    (``learned_step`` on a leading stack axis: every reduction is over the tensor's own axes, Newton-Schulz
    batches leading dims as the reference does for rank > 2). Whole tensors only (no FSDP2 shards)."""
    wd = cfg["weight_decay"]
    if adam_params:
        for g, st in zip(adam_grads, adam_states, strict=True):
            _adam_accumulate(st, g, ctx)
        m = torch.cat([st["mom"].reshape(-1, 1) for st in adam_states])
        v = torch.cat([st["rms"].reshape(-1, 1) for st in adam_states])
        steps = adam_step(m, v, ctx, cfg["adam_epsilon"])
        for p, s, lr in zip(adam_params, torch.split(steps, [p.numel() for p in adam_params]), adam_lrs,
                            strict=True):  # fmt: skip
            _apply(p, s.reshape(p.shape), ctx.step_mult_1d, lr, wd)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    for shape, idx in by_shape.items():
        shape1 = shape if shape else (1,)
        p32 = torch.stack([params[i].detach().to(torch.float32).reshape(shape1) for i in idx])
        g = torch.clamp(torch.stack([grads[i].reshape(shape1) for i in idx]), -1000.0, 1000.0)
        stacked = {k: torch.stack([states[i][k] for i in idx]) for k in ("mom", "rms", "fac_row", "fac_col",
                                                                          "fac_full")}  # fmt: skip
        fdims = _shifted(factored_dims(shape1), 1)
        fac_g = _learned_accumulate(stacked, g, fdims, ctx, WHOLE)
        step = learned_step(p32, g, stacked, fac_g, fdims, 1, ctx, cfg, WHOLE)
        for j, i in enumerate(idx):
            for k in ("mom", "rms", "fac_row", "fac_col", "fac_full"):
                states[i][k] = stacked[k][j].clone()
            _apply(params[i], step[j].reshape(shape), ctx.step_mult, lrs[i], wd)
