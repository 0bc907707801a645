"""Shared helpers of the fused/fast-path tests: random theta, every-rank shapes, the update-error metric."""

from __future__ import annotations

from typing import Any

import torch

#: Every rank 0-D to 4-D, size-1 dimensions, tied sizes (numpy.argsort tie order), a non-square matrix.
SHAPES: list[tuple[int, ...]] = [(), (7,), (5, 1), (3, 40), (8, 8), (2, 3, 5), (4, 4, 3, 3), (1, 1, 6)]


def adafac_theta(hidden: int = 32, layers: int = 2, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Random small_fc_lopt theta (39 -> hidden^layers -> 2) and its config."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [39] + [hidden] * layers + [2]
    theta = {
        "momentum_decays": torch.randn(3, generator=gen) * 0.1,
        "rms_decays": torch.randn(1, generator=gen) * 0.1,
        "adafactor_decays": torch.randn(3, generator=gen) * 0.1,
    }
    for i in range(layers + 1):
        theta[f"nn.w{i}"] = torch.randn(sizes[i], sizes[i + 1], generator=gen) / sizes[i] ** 0.5
        theta[f"nn.b{i}"] = torch.randn(sizes[i + 1], generator=gen) * 0.1
    return theta, {"hidden_size": hidden, "hidden_layers": layers, "step_mult": 0.01}


def velo_theta(seed: int = 0, **config: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Random VeLO theta for a small LSTM (16 hidden, 8 param inits) and its config."""
    from lopt_bridge.pylo_runtime.velo import VeLOConfig, expected_theta_shapes

    cfg = {"lstm_hidden_size": 16, "param_inits": 8, **config}
    gen = torch.Generator().manual_seed(seed)
    theta = {}
    for name, shape in expected_theta_shapes(VeLOConfig.from_mapping(cfg)).items():
        t = torch.randn(shape, generator=gen) / (shape[-2] if len(shape) >= 2 else 10) ** 0.5
        theta[name] = t / 30.0 if name.startswith("ff.") else t
    return theta, cfg


def celo_theta(seed: int = 0, **config: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Random Celo theta for a small LSTM (16 hidden) shaped for ``config`` (any option set: the MLP's
    input groups and widths follow the feature switches), and the config (step_mult 0.3: steps far above
    the params' ulp)."""
    from lopt_bridge.pylo_runtime import specs

    cfg = {"lstm_hidden_size": 16, "step_mult": 0.3, **config}
    gen = torch.Generator().manual_seed(seed)
    theta = {}
    for name, spec in specs.celo.tensor_table(specs.celo.validate(cfg)).items():
        shape = spec.shape
        t = torch.randn(shape, generator=gen) / (shape[-2] if len(shape) >= 2 else 10) ** 0.5
        theta[name] = t
    return theta, cfg


def make_params(
    shapes, scale: float = 1e-3, dtype=torch.float32, seed: int = 1, device=None
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(device, dtype).requires_grad_() for s in shapes]


def grad_stream(shapes, steps: int, seed: int = 2) -> list[list[torch.Tensor]]:
    """A fixed ("recorded") gradient stream: slowly drifting means plus noise, one list per step."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    out = []
    for t in range(steps):
        out.append([b * (1.0 + 0.5 * torch.sin(torch.tensor(t / 50.0))) + torch.randn(b.shape, generator=gen)
                    for b in base])  # fmt: skip
    return out


def update_error(before, after_ref, after_ours) -> float:
    """max over tensors of ``|u_ours - u_ref|_inf / |u_ref|_inf``, one float32 ulp of the result forgiven.

    ``u = p_after - p_before``: the rounding of ``p + u`` to float32 is not an error of the update.
    """
    worst = 0.0
    for p0, a, b in zip(before, after_ref, after_ours, strict=True):
        a, b, p0 = a.detach().double(), b.detach().double(), p0.detach().double()
        ua, ub = a - p0, b - p0
        ulp = torch.finfo(torch.float32).eps * torch.maximum(a.abs(), p0.abs())
        excess = ((ua - ub).abs() - ulp).clamp(min=0).max()
        worst = max(worst, float(excess / ua.abs().max().clamp(min=1e-30)))
    return worst


def flags(which: Any) -> dict[str, Any]:
    """Constructor flags for one side of a pair: "reference" (foreach=False), "foreach", or a ``fused``
    value (None: the device's default path; True: the fused kernels; False: foreach)."""
    if which == "reference":
        return {"foreach": False}
    if which == "foreach":
        return {"foreach": True}
    return {"fused": which}


def run_pair(
    make_opt, shapes, grads, *, losses=None, dtype=torch.float32, scale=1e-3, fast=None, device=None
):
    """Step a reference and a fast optimizer on the same params and gradients; per-step update errors.

    Before each step the fast side's params are reset to the reference's (its state evolves on its own).
    ``make_opt(params, which)`` builds one side with ``**flags(which)``: "reference" for the reference side;
    ``fast`` for the other (None: the device's default path; True: the fused kernels; "foreach").
    """
    pa, pb = (
        make_params(shapes, scale, dtype, device=device),
        make_params(shapes, scale, dtype, device=device),
    )
    oa, ob = make_opt(pa, "reference"), make_opt(pb, fast)
    errs = []
    for t, gs in enumerate(grads):
        before = [p.detach().clone() for p in pa]
        with torch.no_grad():
            for a, b in zip(pa, pb, strict=True):
                b.copy_(a)
        for p, g in zip(pa + pb, gs + gs, strict=True):
            p.grad = g.to(p.device, dtype).clone()
        kw = {} if losses is None else {"loss": losses[t]}
        oa.step(**kw)
        ob.step(**kw)
        errs.append(update_error(before, pa, pb))
    return errs, oa, ob
