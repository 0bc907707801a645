"""muLO: ``MuAdafacMLPLOpt`` (bentherien/mu_learned_optimization): small_fc_lopt with per-tensor muP scales.

The reference multiplies each tensor's learned step by a per-tensor learning-rate scale taken from the model
(``hidden_lr_mult / fan_in`` for hidden weights, 1 elsewhere), optionally clips gradients to global norm 1
(``clip_grad``) and always replaces NaN/Inf gradients (``nan_to_num``). Here the scale is the param-group
option ``mup_scale`` (default 1.0); ``mup_param_groups`` derives it from the ``mup`` package's base shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from . import specs
from .adafac import SmallFCLOpt
from .base import ParamsT
from .distributed.reducer import ALL_TENSORS, WHOLE, TensorReducer, TensorsReducer

#: Every constructor argument of ``MuAdafacMLPLOpt`` with its default: the family spec's. ``mup_lrs`` is
#: stored by the reference but unused: the scales come from the model's state at each step.
DEFAULTS = specs.mulo.DEFAULTS


class MuLO(SmallFCLOpt):
    """muLO as a torch optimizer. Give each tensor's muP scale as the param-group option ``mup_scale``.

    Example::

        groups = [{"params": hidden_weights, "mup_scale": 1 / 1024}, {"params": others}]
        opt = MuLO.from_checkpoint("mulo.safetensors", groups, num_steps=1000)
        # or, with the mup package: mup.set_base_shapes(model, base); groups = mup_param_groups(model)
    """

    architecture: ClassVar[str] = "mulo"
    DEFAULTS: ClassVar[Mapping[str, Any]] = DEFAULTS
    SPEC = specs.mulo

    def __init__(
        self,
        params: ParamsT,
        theta: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        *,
        num_steps: int,
        **options: Any,
    ) -> None:
        super().__init__(params, theta, config, num_steps=num_steps, **options)
        self.defaults["mup_scale"] = 1.0
        for group in self.param_groups:
            group.setdefault("mup_scale", 1.0)
            if not float(group["mup_scale"]) > 0.0:
                raise ValueError(f"mup_scale must be > 0, got {group['mup_scale']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Like torch's; a group without ``mup_scale`` gets 1.0."""
        if hasattr(self, "defaults"):
            self.defaults.setdefault("mup_scale", 1.0)
        super().add_param_group(param_group)

    def _scales(self, params: list[torch.Tensor]) -> list[float]:
        by_id = {id(p): float(g["mup_scale"]) for g in self.param_groups for p in g["params"]}
        return [by_id[id(p)] for p in params]

    def _prepare_grads(
        self, grads: list[torch.Tensor], reducers: list[TensorReducer], across: TensorsReducer
    ) -> list[torch.Tensor]:
        if self.config["clip_grad"]:
            grads = clip_by_global_norm(grads, 1.0, reducers, across)
        return [torch.nan_to_num(g) for g in grads]


def clip_by_global_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    reducers: list[TensorReducer] | None = None,
    across: TensorsReducer = ALL_TENSORS,
) -> list[torch.Tensor]:
    """optax's ``clip_by_global_norm``: ``g / norm * max_norm`` when the global norm is ``>= max_norm``.

    ``reducers[i]`` sums the squares of ``grads[i]`` (over all its shards for an FSDP2 shard; default: every
    grad whole); ``across`` sums over tensors (over all ranks' tensors under ``ShardedOptimizer``).
    """
    reducers = reducers or [WHOLE] * len(grads)
    sums = [red.sum(g * g) for g, red in zip(grads, reducers, strict=True)]
    norm = torch.sqrt(across.sum(sum(sums)))
    keep = norm < max_norm
    return [torch.where(keep, g, (g / norm) * max_norm) for g in grads]


def mup_scale(p: torch.Tensor) -> float:
    """muP's Adam rule for one parameter with ``infshape`` (set by ``mup.set_base_shapes``).

    Matrix-like tensors (two infinite dims) get ``1 / width_mult``; vector-like and scalar ones 1.0.
    """
    infshape = getattr(p, "infshape", None)
    if infshape is None:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} has no 'infshape': "
            "call mup.set_base_shapes(model, base) first"
        )
    ninf = infshape.ninf()
    if ninf > 2:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} has {ninf} infinite dims; muP handles at most 2"
        )
    return 1.0 / float(infshape.width_mult()) if ninf == 2 else 1.0


def mup_param_groups(params: Iterable[Any] | torch.nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """Split params (a module, tensors or param groups) into groups with ``mup_scale`` from their base shapes.

    Works with the optional ``mup`` package (imported lazily, only to give a clear error when it is missing
    and no parameter carries ``infshape``). Extra ``group_options`` (lr, weight_decay, ...) go to every group.
    """
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    groups_in = list(params)
    if groups_in and not isinstance(groups_in[0], dict):
        groups_in = [{"params": groups_in}]
    if not any(hasattr(p, "infshape") for g in groups_in for p in g["params"]):
        try:
            import mup  # noqa: F401
        except ImportError:
            raise ImportError(
                "mup_param_groups needs parameters with muP base shapes: pip install mup, "
                "then mup.set_base_shapes(model, base_model); or give 'mup_scale' per param group yourself"
            ) from None
    out: list[dict[str, Any]] = []
    for group in groups_in:
        by_scale: dict[float, dict[str, Any]] = {}
        for p in group["params"]:
            s = mup_scale(p)
            if s not in by_scale:
                by_scale[s] = {**{k: v for k, v in group.items() if k != "params"}, **group_options}
                by_scale[s].update(params=[], mup_scale=s)
            by_scale[s]["params"].append(p)
        out.extend(by_scale.values())
    return out
