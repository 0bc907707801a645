"""The torch.optim.Optimizer shell every learned optimizer shares.

It owns what the reference puts in wrappers around the learned update (``prefab.LearnedOptimizer``:
gradient accumulation; ``WeightDecayWrapper``: weight decay; the ``lr`` multiplier torch schedulers drive)
and the loss plumbing, so that each family module only implements the learned update itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, ClassVar

import torch

from . import step_inputs as _inputs
from .checkpoint import read_checkpoint
from .distributed import dcp as _dcp
from .distributed import fsdp
from .distributed.reducer import ALL_TENSORS, WHOLE, ShardReducer, TensorReducer, TensorsReducer
from .specs import Config, SpecError

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

#: Key of the optimizer-wide state in ``self.state`` (torch keeps non-tensor keys as they are in state_dict).
GLOBAL = "global"


class LearnedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``architecture`` and implement the three hooks below.

    Args:
        params: tensors or param groups, as for any torch optimizer.
        theta: the meta-learned weights, by runtime tensor name (as written by the converter).
        config: every constructor argument of the reference class (as written by the converter).
        num_steps: the length of training the optimizer is told about (the reference's ``num_steps``).
        lr: multiplier on the learned step; ``1.0`` reproduces the reference, schedulers may change it.
        weight_decay: ``WeightDecayWrapper`` semantics: ``g += wd * p`` and ``loss += wd * sum(p**2)``.
        max_training_steps: if ``num_steps`` exceeds it, accumulate ``ceil(num_steps / max)`` gradients per
            update and tell the optimizer ``num_steps // accumulate`` steps (``prefab.LearnedOptimizer``).
        foreach / fused: like torch.optim.Adam, for every family (``pylo_runtime.dispatch`` decides and has
            the coverage table); ``None`` picks the fastest correct implementation for the device.
        nonfinite: a step whose loss or any gradient is NaN/Inf: ``"skip"`` it (no parameter or state changes,
            counted in ``skipped_steps``, warned about once), ``"raise"`` :class:`NonFiniteError`, or
            ``"propagate"`` the numbers as the reference does (no check). Empty tensors are always skipped.
        loss_reduction: ``"mean"`` averages the loss over torch.distributed's default group inside ``step``
            (one scalar all-reduce, families that read the loss only); ``"none"``: the loss is used as given.
    """

    architecture: ClassVar[str] = ""
    #: Whether the update reads the training loss (VeLO and Celo loss features); small_fc_lopt does not.
    uses_loss: ClassVar[bool] = False
    #: Whether FSDP2 shards may be stepped rank-locally: every reduction over a tensor's elements goes through
    #: the tensor's reducer (``reducers[i]`` in ``_update``), shapes through ``red.global_shape``. False:
    #: DTensor params are all-gathered and stepped whole (the fallback).
    shard_local: ClassVar[bool] = False
    #: The reference constructor's defaults: ``config`` (as the converter wrote it) is merged over them.
    DEFAULTS: ClassVar[Mapping[str, Any]] = {}
    #: The family's torch-free spec (``pylo_runtime.specs.<family>``): config and theta are validated through
    #: it before anything is built. None (subclasses outside this package): config merged over DEFAULTS.
    SPEC: ClassVar[ModuleType | None] = None
    #: Per-parameter state keys of older releases -> today's (one naming across families: ``mom``, ``rms``,
    #: ``fac_row``, ``fac_col``, ``fac_full``); ``load_state_dict`` renames them.
    LEGACY_STATE_KEYS: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        max_training_steps: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "skip",
        loss_reduction: str = "mean",
    ) -> None:
        if not isinstance(num_steps, int) or num_steps <= 0:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if nonfinite not in _inputs.NONFINITE_MODES:
            modes = ", ".join(_inputs.NONFINITE_MODES)
            raise ValueError(f"nonfinite must be one of {modes}, got {nonfinite!r}")
        if loss_reduction not in _inputs.LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {', '.join(_inputs.LOSS_REDUCTIONS)}, got {loss_reduction!r}"
            )
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        #: The validated config (``specs.Config``), None without a SPEC.
        self.spec_config: Config | None = self._validate_inputs(theta, config)
        defaults = dict(lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self.theta = {k: v.detach().to(torch.float32) for k, v in theta.items()}
        if self.spec_config is not None:
            self.config = self.spec_config.to_dict()
        else:
            self.config = {**self.DEFAULTS, **dict(config)}
        self.nonfinite = nonfinite
        self.loss_reduction = loss_reduction
        self._inputs = _inputs.StepInputs()
        self.max_training_steps = max_training_steps
        self._set_num_steps(num_steps)
        from . import dispatch

        dispatch.check_construction(self)  # fused=True that cannot run: refused now, not at the first step

    def _set_num_steps(self, num_steps: int) -> None:
        self.num_accumulate = 1
        if self.max_training_steps is not None and num_steps > self.max_training_steps:
            self.num_accumulate = math.ceil(num_steps / self.max_training_steps)
        self.num_steps = num_steps
        self.inner_num_steps = num_steps // self.num_accumulate

    def _validate_inputs(self, theta: Any, config: Any) -> Config | None:
        """Config and theta names / shapes / dtypes through the family spec; ValueError naming the key."""
        if self.SPEC is None:
            return None
        who = type(self).__name__
        if not isinstance(theta, Mapping):
            raise ValueError(
                f"{who}: theta must be a mapping of tensor names to tensors, got {type(theta).__name__}"
            )
        for k, v in theta.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{who}: theta entry {k!r} is a {type(v).__name__}, not a torch.Tensor")
        cfg = self.SPEC.validate(config, who)
        shapes = {k: tuple(v.shape) for k, v in theta.items()}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in theta.items()}
        self.SPEC.check_theta(cfg, shapes, dtypes, who)
        return cfg

    def set_num_steps(self, num_steps: int) -> None:
        """Change the training length before the first step (an integration reads it from a Trainer)."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if GLOBAL in self.state:
            raise RuntimeError(
                f"{type(self).__name__}.set_num_steps: the optimizer has already stepped with num_steps="
                f"{self.num_steps}; its state depends on it, so it can only be set before the first step"
            )
        self._set_num_steps(num_steps)

    # ----------------------------------------------------------------------------------------------------
    # The loss and the non-finite guard (pylo_runtime/step_inputs.py, docs/integrations.md).
    def set_loss(self, loss: Any) -> None:
        """Record one training loss for the next ``step()``, which uses the mean of those recorded since the
        last step. ``pylo_runtime.set_loss(opt, loss)`` does the same through wrappers (Accelerate, ...)."""
        self._inputs.record(loss)

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` has skipped (kept in the state, so state_dict carries it)."""
        return int(self.state[GLOBAL].get("skipped_steps", 0)) if GLOBAL in self.state else 0

    def _take_loss(self, loss: Any, closure: Any, closure_loss: Any) -> Any:
        """The step's loss: ``loss=``, else the mean of the ``set_loss`` records, else the closure's value."""
        recorded = self._inputs.take()
        if loss is not None:
            if recorded is not None:
                raise ValueError(
                    f"{type(self).__name__}.step got loss= and also losses recorded with set_loss since the "
                    "last step: give the loss one way"
                )
            return loss
        if recorded is not None:
            return recorded
        if closure_loss is not None:
            if self.uses_loss:
                problem = _inputs.closure_loss_problem(closure)
                if problem:
                    raise ValueError(f"{type(self).__name__}.step: {problem}")
            return closure_loss
        if self.uses_loss:
            raise ValueError(
                f"{type(self).__name__}.step needs the training loss: call lopt_bridge.set_loss(optimizer, "
                "loss) before step(), or step(loss=loss), or step(closure) (see docs/integrations.md)"
            )
        return None

    def _loss_and_guard(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], loss: Any, *, shards: bool = False
    ) -> tuple[Any, bool]:
        """The loss every rank uses (all-reduced mean) and whether ``nonfinite=`` skips this step
        (``shards``: some params are FSDP2 shards stepped rank-locally).

        At most one all-reduce (the loss and, for rank-local FSDP2 shards, the count of non-finite gradients,
        in one tensor) and one host sync per step with finite input; a skipped step changes nothing but
        ``skipped_steps``.
        """
        inputs = self._inputs
        device = params[0].device
        uses_loss = self.uses_loss and loss is not None
        loss_t = _inputs.as_loss_tensor(loss, device) if uses_loss else None
        check = self.nonfinite != "propagate" and not inputs.checked_outside and not _inputs.is_compiling()
        world = _inputs.loss_world_size()
        reduce = uses_loss and self.loss_reduction == "mean" and world > 1 and not inputs.checked_outside
        bad = _inputs.count_nonfinite_tensors(grads, device) if check else None
        share_bad = check and world > 1 and shards  # FSDP2 shards: each rank sees its own grads
        if reduce or share_bad:  # one all-reduce: the loss, the count of bad tensors, or both in one tensor
            parts = ([loss_t] if reduce else []) + ([bad] if share_bad else [])
            vec = parts[0].clone() if len(parts) == 1 else torch.stack(parts)
            torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
            if reduce:
                loss_t = vec.reshape(-1)[0] / world if share_bad else vec / world
            if share_bad:
                bad = vec.reshape(-1)[-1]
        if not check:
            return (loss_t if uses_loss else loss), False
        loss_bad = None if loss_t is None else torch.logical_not(torch.isfinite(loss_t)).to(torch.float32)
        if not bool(bad > 0 if loss_bad is None else bad + loss_bad > 0):  # the one host sync
            return (loss_t if uses_loss else loss), False
        # Rare path: confirm tensor by tensor (a 2-norm overflows for finite gradients above ~1e19).
        bad = _inputs.count_nonfinite_tensors(grads, device, exact=True)
        if share_bad:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.SUM)
        if not bool(bad > 0 if loss_bad is None else bad + loss_bad > 0):
            return (loss_t if uses_loss else loss), False
        names = [self._param_name(p) for p in params]
        detail = _inputs.describe_nonfinite(names, grads, loss_t)
        name = type(self).__name__
        if self.nonfinite == "raise":
            raise _inputs.NonFiniteError(f"{name}: non-finite step input: {detail}; nothing was changed")
        if GLOBAL not in self.state:
            self.state[GLOBAL] = self._new_global(device)
        global_state = self.state[GLOBAL]
        global_state["skipped_steps"] = int(global_state.get("skipped_steps", 0)) + 1
        if not inputs.warned_nonfinite:
            inputs.warned_nonfinite = True
            warnings.warn(
                f"{name}: skipped a step ({detail}); parameters and optimizer state are unchanged. "
                f"{global_state['skipped_steps']} step(s) skipped so far; later skips are only counted in "
                "optimizer.skipped_steps (nonfinite='raise' makes them errors)",
                RuntimeWarning,
                stacklevel=6,  # _loss_and_guard, _step, step, torch.no_grad, torch's step hook, the caller
            )
        return loss_t, True

    def _param_name(self, p: torch.Tensor) -> str:
        """``p``'s name from its group's ``param_names`` (named params), else its place in param_groups."""
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return repr(names[pi]) if names else f"param_groups[{gi}]['params'][{pi}]"
        return "a parameter"

    # ----------------------------------------------------------------------------------------------------
    # Construction from a converted file.
    @classmethod
    def from_checkpoint(
        cls, path: str, params: ParamsT, *, num_steps: int, **options: Any
    ) -> LearnedOptimizer:
        """Build the optimizer from a ``.safetensors`` file written by ``lopt-convert``.

        Config and theta are validated (``read_checkpoint``) before the tensors are loaded.
        """
        ckpt = read_checkpoint(path)
        if cls.architecture and ckpt.architecture != cls.architecture:
            raise ValueError(
                f"{path}: holds a '{ckpt.architecture}' optimizer, not '{cls.architecture}'; "
                "use lopt_bridge.load_optimizer to pick the class from the file"
            )
        try:
            return cls(params, ckpt.tensors, ckpt.config, num_steps=num_steps, **options)
        except SpecError as e:
            raise ValueError(f"{path}: {e}") from None

    # ----------------------------------------------------------------------------------------------------
    # Hooks for subclasses.
    def _init_global(self, device: torch.device) -> dict[str, Any]:
        """Optimizer-wide state (loss buffer, iteration, ...), created at the first step."""
        return {}

    def _init_param(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        """Fill ``state`` (empty dict) with float32 per-parameter state for ``p`` (``red``: its reducer; an
        FSDP2 shard's state has the local shape, its factored dims come from ``red.global_shape``)."""
        raise NotImplementedError

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
        """Apply one learned step in place, on the implementation ``path`` (``dispatch.choose``'s name).

        Every reduction over the elements of ``params[i]`` goes through ``reducers[i]`` (all its shards, for
        an FSDP2 shard stepped rank-locally), every reduction over tensors through ``across``.

        ``grads`` are float32 (weight decay and accumulation already applied); ``lrs[i]`` multiplies the step
        of ``params[i]``; ``loss`` is a float32 0-d tensor (or None when ``uses_loss`` is False).
        Per-parameter state is ``self.state[p]``. Params may be float32, bfloat16 or float16.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------
    def _theta_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Theta on ``device``, moved once and cached."""
        cache = self.__dict__.setdefault("_theta_cache", {})
        if device not in cache:
            cache[device] = {k: v.to(device) for k, v in self.theta.items()}
        return cache[device]

    @staticmethod
    def _as_loss(loss: Any, device: torch.device) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
            return loss.detach().reshape(()).to(device=device, dtype=torch.float32)
        return torch.tensor(float(loss), dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss: Any = None,
        across: TensorsReducer | None = None,
    ) -> Any:
        """One optimizer step. The loss: ``loss=``, else the losses given to ``set_loss`` since the last step,
        else ``closure()``'s value; VeLO and Celo need one (docs/integrations.md).

        ``across``: how reductions over tensors reduce (``ShardedOptimizer`` passes its group's; default: this
        process steps every tensor)."""
        # (is_compiling first: reading self.state here would make torch.compile guard on its keys' gradients.)
        if not _inputs.is_compiling() and not self.state and _dcp.initialising_state():
            self._init_state_for_checkpoint()  # DCP's zero-gradient, lr=0 step: make the state, step nothing
            return None
        if self.__dict__.get("_global_linked_to") is not None:  # after a DCP state_dict: the family never
            self._unlink_global()  # sees the optimizer-wide state inside a parameter's state
        return self._step(closure, loss, across)

    def _step(self, closure: Callable[[], Any] | None, loss: Any, across: TensorsReducer | None) -> Any:
        """``step``'s body: collect the tensors (FSDP2 stand-ins), the loss and the guard, the update."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        loss = self._take_loss(loss, closure, closure_loss)

        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        lrs: list[float] = []
        reducers: list[TensorReducer] = []
        wd_loss: list[torch.Tensor] = []
        # FSDP2: (DTensor param, what the update runs on: its local shard or a gathered full copy, its
        # group's params list, index in it); ``gathered``: the (param, full copy) pairs to scatter back.
        swapped: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]] = []
        gathered: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for group in self.param_groups:
                wd = group["weight_decay"]
                for i, p in enumerate(group["params"]):
                    # Like torch optimizers: no gradient, no update, no state change. An empty tensor likewise
                    # (its mean is NaN, which VeLO's mix layer would spread to every tensor).
                    if p.grad is None or p.numel() == 0:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    g = p.grad.detach()
                    red: TensorReducer = WHOLE
                    if fsdp.is_dtensor(p):  # FSDP2: step the local shard, or gather (distributed/fsdp.py)
                        spec = fsdp.shard_spec(p, g) if self.shard_local else None
                        if spec is not None:
                            stand_in, g = p.to_local(), g.to_local()
                            red = ShardReducer(spec)
                        else:
                            stand_in, g = fsdp.gather_param(p, g)
                            gathered.append((p, stand_in))
                        # For this step the stand-in replaces p: in its group and as its state's key.
                        swapped.append((p, stand_in, group["params"], i))
                        self.state[stand_in] = self.state[p]
                        group["params"][i] = stand_in
                        p = stand_in
                    g = g.to(torch.float32)
                    if wd != 0.0:
                        pf = p.detach().to(torch.float32)
                        g = g + wd * pf
                        wd_loss.append(wd * red.sum(pf * pf))
                    params.append(p)
                    reducers.append(red)
                    grads.append(g)
                    lrs.append(float(group["lr"]))
            if params:
                loss, skip = self._loss_and_guard(
                    params, grads, loss, shards=any(r.is_shard for r in reducers)
                )
                if skip:
                    return closure_loss
                self._step_tensors(params, grads, lrs, wd_loss, loss, reducers, across or ALL_TENSORS)
                for p, full in gathered:
                    fsdp.scatter_back(p, full)
        finally:
            for p, stand_in, group_params, i in swapped:
                group_params[i] = p
                del self.state[stand_in]
        return closure_loss

    def _step_tensors(self, params, grads, lrs, wd_loss, loss, reducers, across) -> None:
        """Lazy state init, accumulation and the family's ``_update`` on the collected tensors."""
        device = params[0].device
        loss_t = None
        if loss is not None:
            loss_t = self._as_loss(loss, device)
            for extra in wd_loss:
                loss_t = loss_t + extra.to(device)

        self._ensure_state(params, reducers, device)
        global_state = self.state[GLOBAL]

        if self.num_accumulate > 1:
            params, grads, lrs, loss_t = self._accumulate(params, grads, lrs, loss_t, global_state)
            if not params:
                return

        from . import dispatch

        path = dispatch.choose(self, device, shard=any(r.is_shard for r in reducers))
        self._update(params, grads, lrs, loss_t, global_state, path=path, reducers=reducers, across=across)

    def _ensure_state(self, params: list[torch.Tensor], reducers: list[TensorReducer], device) -> None:
        """The optimizer-wide state and each parameter's, where missing (created at the first step)."""
        if GLOBAL not in self.state:
            self.state[GLOBAL] = self._new_global(device)
        for p, red in zip(params, reducers, strict=True):
            if len(self.state[p]) == 0:
                self._new_param_state(p, self.state[p], red)

    def _new_global(self, device: torch.device) -> dict[str, Any]:
        """``_init_global`` plus the base class's keys: every key exists from the first step on, so that a
        fresh optimizer's state has the keys of a checkpoint (DCP loads by key and drops keys it lacks)."""
        out = self._init_global(device)
        out.setdefault("skipped_steps", 0)
        if self.num_accumulate > 1:
            out.setdefault("accum_count", 0)
            if self.uses_loss:
                out.setdefault("loss_accum", torch.zeros((), dtype=torch.float32, device=device))
        return out

    def _new_param_state(self, p: torch.Tensor, state: dict[str, Any], red: TensorReducer) -> None:
        """``_init_param`` plus the gradient accumulation buffer (with ``max_training_steps``)."""
        self._init_param(p, state, red)
        if self.num_accumulate > 1:
            state["grad_accum"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _accumulate(self, params, grads, lrs, loss_t, global_state):
        """``GradientAccumulator``: sum gradients and losses, update with their mean every k-th call."""
        k = self.num_accumulate
        for p, g in zip(params, grads, strict=True):
            st = self.state[p]
            if "grad_accum" not in st:
                st["grad_accum"] = torch.zeros_like(g)
            st["grad_accum"].add_(g)
        if loss_t is not None:
            acc = global_state.get("loss_accum")
            global_state["loss_accum"] = loss_t if acc is None else acc + loss_t
        count = global_state.get("accum_count", 0) + 1
        global_state["accum_count"] = count
        if count % k != 0:
            return [], [], [], None
        mean_grads = []
        for p in params:
            st = self.state[p]
            mean_grads.append(st["grad_accum"] / k)
            st["grad_accum"].zero_()
        mean_loss = None
        if "loss_accum" in global_state:  # reset, not removed: the state keeps its keys (DCP loads by key)
            acc = global_state["loss_accum"]
            mean_loss = acc / k
            global_state["loss_accum"] = torch.zeros_like(acc)
        return params, mean_grads, lrs, mean_loss

    # ----------------------------------------------------------------------------------------------------
    # State dicts: torch's format, keyed by parameters only, as torch.distributed.checkpoint needs
    # (docs/distributed.md#checkpointing).
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the optimizer-wide state (iteration, loss statistics, LSTM state,
        ``skipped_steps``, ...) in the first trainable parameter's entry under ``"global"``, and each FSDP2
        shard's per-element state as DTensors sharded like the parameter (resharding checkpoints)."""
        if _dcp.called_from("_get_optim_state_dict"):
            # DCP's set_optimizer_state_dict(flatten_optimizer_state_dict=True) rebuilds each parameter's
            # entry from the keys the optimizer holds for it: keep the optimizer-wide state there until the
            # next step.
            self._link_global()
        sd = super().state_dict()
        state = sd["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        glob = state.pop(GLOBAL, None)
        anchor = self._anchor()
        if glob is not None:
            if anchor is None:  # no trainable parameter (nothing DCP would save): as before
                state[GLOBAL] = glob
            else:
                pid = next(i for i, p in enumerate(params) if p is anchor)
                state[pid] = {**state.get(pid, {}), GLOBAL: glob}
        for pid, p in enumerate(params):
            if pid in state and fsdp.is_dtensor(p):
                spec = _dcp.rank_local_spec(p, self.shard_local)
                if spec is not None:
                    state[pid] = _dcp.saved_state(p, state[pid], self._state_axes(p, spec))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, for ``state_dict()``'s dicts (also DCP's) and those of c91f35a and before (a
        top-level ``"global"`` entry, FSDP2 shards as each rank's plain local tensors). DTensors become this
        rank's local state, a whole tensor saved by one process is cut to this rank's shard; the
        optimizer-wide state is deep-copied, so the source dict is never aliased."""
        state_dict = dict(state_dict)
        state = dict(state_dict["state"])
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            super().load_state_dict(state_dict)  # raises torch's error
        glob = state.pop(GLOBAL, None) if GLOBAL not in saved_ids else None  # c91f35a and before
        for pid in saved_ids:
            st = state.get(pid)
            if isinstance(st, Mapping) and GLOBAL in st:
                st = dict(st)
                nested = st.pop(GLOBAL)
                if nested and glob is None:
                    glob = nested
                state[pid] = st
        if glob is None and any(state.get(pid) for pid in saved_ids):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict has per-parameter state but no "
                "optimizer-wide state (the 'global' entry of the first trainable parameter). With DCP's "
                "set_optimizer_state_dict(..., flatten_optimizer_state_dict=True), call "
                "get_optimizer_state_dict on this optimizer first (it makes the dict dcp.load fills)"
            )
        for pid, p in zip(saved_ids, params, strict=True):
            st = state.get(pid)
            if not st:
                state.pop(pid, None)
                continue
            if self.LEGACY_STATE_KEYS:
                st = {self.LEGACY_STATE_KEYS.get(k, k): v for k, v in st.items()}
            state[pid] = self._local_state(p, st)
        state_dict["state"] = state
        super().load_state_dict(state_dict)
        # torch casts floating state to each param's dtype; ours is float32 for bf16/fp16 params too, so put
        # the saved tensors back (copied, never aliased) with their own dtype, on the param's device.
        for pid, p in zip(saved_ids, params, strict=True):
            for k, v in state.get(pid, {}).items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device, copy=True)
        if glob is not None:
            self.state[GLOBAL] = _clone_tree(glob)

    def _local_state(self, p: torch.Tensor, st: Mapping[str, Any]) -> dict[str, Any]:
        """Loaded state of ``p`` as the step keeps it (``distributed.dcp.local_state``)."""
        spec = _dcp.rank_local_spec(p, self.shard_local) if fsdp.is_dtensor(p) else None
        axes = self._state_axes(p, spec) if spec is not None else {}
        return _dcp.local_state(p, st, spec, axes, self._param_name(p))

    def _state_axes(self, p: torch.Tensor, spec: Any) -> dict[str, tuple[int | None, tuple[int, ...]]]:
        """How each state tensor of FSDP2 shard ``p`` is sharded (``distributed.dcp.state_axes``), cached."""
        return _dcp.state_axes(self._new_param_state, p, spec, self.__dict__.setdefault("_dcp_axes", {}))

    def _anchor(self) -> torch.Tensor | None:
        """The parameter whose state entry carries the optimizer-wide state: the first trainable one (DCP
        keeps the state of trainable parameters only)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    return p
        return None

    def _link_global(self) -> None:
        """Put the optimizer-wide state (the same dict, as LBFGS keeps its own) into the anchor's entry."""
        anchor = self._anchor()
        if anchor is not None and GLOBAL in self.state:
            self._unlink_global()
            self.state[anchor][GLOBAL] = self.state[GLOBAL]
            self.__dict__["_global_linked_to"] = anchor

    def _unlink_global(self) -> None:
        """Take the optimizer-wide state out of the anchor's entry again (at the next step)."""
        p = self.__dict__.pop("_global_linked_to", None)
        if p is not None and p in self.state and GLOBAL in self.state[p]:
            st = self.state[p]
            del st[GLOBAL]
            if not st:
                del self.state[p]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's (unpickling, deepcopy), remembering where the optimizer-wide state's alias is, if any."""
        super().__setstate__(state)
        for p, st in self.state.items():
            if isinstance(p, torch.Tensor) and isinstance(st, dict) and GLOBAL in st:
                self.__dict__["_global_linked_to"] = p

    def _init_state_for_checkpoint(self) -> None:
        """What DCP's zero-gradient, ``lr=0`` step asks for: the state of every parameter with a gradient and
        the optimizer-wide state, as the first step would make them; nothing is updated, nothing advances."""
        found: list[tuple[torch.Tensor, torch.Tensor, TensorReducer]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                view, red = p, WHOLE
                if fsdp.is_dtensor(p):
                    spec = fsdp.shard_spec(p, p.grad) if self.shard_local else None
                    if spec is not None:
                        view, red = p.to_local(), ShardReducer(spec)
                    else:  # stepped whole: whole-shaped state (only the shape is read)
                        view = torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device)
                found.append((p, view, red))
        if not found:
            return
        if GLOBAL not in self.state:
            self.state[GLOBAL] = self._new_global(found[0][1].device)
        for p, view, red in found:
            if len(self.state[p]) == 0:
                self._new_param_state(view, self.state[p], red)
        self._link_global()


def _clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_clone_tree(v) for v in x)
    return x


def write_param(p: torch.Tensor, new_value_f32: torch.Tensor) -> None:
    """Store a float32 result into ``p`` (rounding to bf16/fp16 params once, at the end)."""
    p.copy_(new_value_f32)
