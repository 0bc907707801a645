"""Which implementation runs a step: the one place that decides, and its coverage table.

``foreach`` / ``fused`` mean for every family what they mean for ``torch.optim.Adam``:

==================================  =====================================================================
``foreach=False``                   the single-tensor reference loop (the specification)
``foreach=True`` (or ``fused=False``) the multi-tensor torch-ops path; any device (CPU, CUDA, ...)
``fused=True``                      the fused kernels: the C passes on the CPU, Triton on CUDA (and on the
                                    CPU under ``TRITON_INTERPRET=1``); where they cannot run, construction
                                    raises :class:`FusedUnavailableError` naming the reason
``foreach=True`` + ``fused=True``   refused at construction, as torch does
``None`` / ``None`` (default)       the fastest correct path: fused where covered, else foreach
==================================  =====================================================================

A family without a covering multi-tensor path for some options (or for FSDP2 shards) runs its reference
there; the table says so and why. Before a fused path first runs a kernel variant in a process, one tensor
of that variant is stepped on copies by the kernels and by the reference (:func:`verified`): a kernel that
does not compile, launch or agree within ``SELF_CHECK_TOL`` gives one warning and the foreach path from
then on (default flags), or raises (``fused=True``).

The decision is a pure function of (family, config, device, flags, placement), so that
``python -m lopt_bridge.pylo_runtime.dispatch`` prints the same table the runtime follows, and
``tests/test_dispatch.py`` walks it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FusedUnavailableError",
    "Path",
    "Decision",
    "decide",
    "check_construction",
    "choose",
    "coverage_table",
    "format_table",
]

REFERENCE, FOREACH, FUSED = "reference", "foreach", "fused"
#: Widest hidden layer the C passes take (MAXH in kernels/cpu/lopt_cpu.c).
C_MAX_HIDDEN = 256


class FusedUnavailableError(RuntimeError):
    """``fused=True`` was asked for where no fused kernel can run (the message says why)."""


@dataclass(frozen=True)
class Path:
    """One implementation of a family's step: ``name`` is the key the family's ``_update`` runs."""

    name: str
    kind: str  # REFERENCE, FOREACH or FUSED
    where: str  # the function that runs it, for the table and the docs


@dataclass(frozen=True)
class Decision:
    """What runs for one request, or (``path is None``) the refusal; ``reasons``: why not a faster path."""

    path: Path | None
    reasons: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.path is None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _unique(*parts: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for p in parts if p))


# ------------------------------------------------------------------------------------------------------
# Coverage: what each fast implementation takes (None) or why not (the reason). Over the full config
# (the family's defaults merged in, reference option names).
def _count(v: Any) -> int:
    return 1 if isinstance(v, int | float) else len(v)


def _decay_counts(c: Mapping[str, Any]) -> tuple[int, int, int]:
    keys = ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays")
    return tuple(_count(c[k]) for k in keys)  # type: ignore[return-value]


_VELO_FLAGS = (
    "with_g with_m with_m_feat with_rms with_rms_feat with_rms_norm_g with_rsqrt_rms with_p "
    "with_fac_norm_g with_fac_rms with_fac_rsqrt with_grad_clip_feat with_fac_mom_mult "
    "with_rms_only_norm_g adafactor_accumulator"
).split()


def _velo_fast(c: Mapping[str, Any]) -> str | None:
    """The fast VeLO paths (torch ops, C, Triton) take the default feature set, decays 3/1/3, 2 layers."""
    off = [f for f in _VELO_FLAGS if not c[f]]
    if off:
        return f"feature flags {', '.join(off)} off (the fast paths take the default feature set)"
    if _decay_counts(c) != (3, 1, 3):
        return f"decay counts {_decay_counts(c)} (the fast paths take 3 / 1 / 3)"
    if c["ff_hidden_layers"] != 2:
        return f"ff_hidden_layers={c['ff_hidden_layers']} (the fast paths take 2)"
    return None


def _velo_c(c: Mapping[str, Any]) -> str | None:
    if (r := _velo_fast(c)) is not None:
        return r
    if c["ff_hidden_size"] > C_MAX_HIDDEN:
        return f"ff_hidden_size={c['ff_hidden_size']} (the C passes take up to {C_MAX_HIDDEN})"
    return None


def _velo_triton(c: Mapping[str, Any]) -> str | None:
    if (r := _velo_fast(c)) is not None:
        return r
    h = c["ff_hidden_size"]
    if h & (h - 1):
        return f"ff_hidden_size={h} is not a power of two (the Triton kernels need one)"
    return None


def _adafac_fast(c: Mapping[str, Any]) -> str | None:
    """small_fc_lopt / muLO's fast paths: the matrix MLP (concat_weights) and decays 3/1/3."""
    if not c["concat_weights"]:
        return "concat_weights=False (the scalar-math path runs one tensor at a time)"
    if _decay_counts(c) != (3, 1, 3):
        return f"decay counts {_decay_counts(c)} (the fast paths take 3 / 1 / 3)"
    return None


def _adafac_batched(c: Mapping[str, Any]) -> str | None:
    if not c["concat_weights"]:
        return "concat_weights=False (the scalar-math path runs one tensor at a time)"
    return None


def _adafac_c(c: Mapping[str, Any]) -> str | None:
    if (r := _adafac_fast(c)) is not None:
        return r
    if c["hidden_layers"] != 2:
        return f"hidden_layers={c['hidden_layers']} (the C passes take 2)"
    if c["hidden_size"] > C_MAX_HIDDEN:
        return f"hidden_size={c['hidden_size']} (the C passes take up to {C_MAX_HIDDEN})"
    return None


def _adafac_triton(c: Mapping[str, Any]) -> str | None:
    if (r := _adafac_fast(c)) is not None:
        return r
    h = c["hidden_size"]
    if h < 2 or h & (h - 1):
        return f"hidden_size={h} is not a power of two >= 2 (the Triton kernels need one)"
    if c["hidden_layers"] < 1:
        return "hidden_layers=0 (the Triton kernels need a hidden layer)"
    return None


@dataclass(frozen=True)
class Foreach:
    """A multi-tensor path: the options it covers (None: all) and whether it reduces over FSDP2 shards."""

    path: Path
    covers: Callable[[Mapping[str, Any]], str | None] | None = None
    shard_safe: bool = True


@dataclass(frozen=True)
class Family:
    """A family's implementations; ``defaults``: "module:NAME" of its reference constructor defaults (the
    torch-free family spec's)."""

    cls: str
    defaults: str
    reference: Path
    foreach: tuple[Foreach, ...]
    fused_cpu: Callable[[Mapping[str, Any]], str | None] | None = None
    fused_triton: Callable[[Mapping[str, Any]], str | None] | None = None
    cpu_where: str = ""
    triton_where: str = ""


def _ref(where: str) -> Path:
    return Path("reference", REFERENCE, where)


def _adafac_family(cls: str, spec: str) -> Family:
    """small_fc_lopt and muLO: the same implementations (adafac.py), their own class and defaults."""
    return Family(
        cls=cls,
        defaults=f"lopt_bridge.pylo_runtime.specs.{spec}:DEFAULTS",
        reference=_ref("adafac._adafac_reference"),
        foreach=(
            Foreach(Path("foreach", FOREACH, "adafac._multi_tensor_adafac"), _adafac_fast),
            Foreach(
                Path("foreach-batched", FOREACH, "adafac._adafac_reference(batched=True)"), _adafac_batched
            ),
        ),
        fused_cpu=_adafac_c,
        fused_triton=_adafac_triton,
        cpu_where="adafac._multi_tensor_adafac(c_passes=True) -> kernels.cpu.passes",
        triton_where="adafac._triton_adafac -> kernels.triton.adafac",
    )


FAMILIES: dict[str, Family] = {
    "velo": Family(
        cls="VeLO",
        defaults="lopt_bridge.pylo_runtime.specs.velo:DEFAULTS",
        reference=_ref("velo._single_tensor_velo"),
        foreach=(
            Foreach(Path("foreach", FOREACH, "velo._multi_tensor_velo"), _velo_fast),
            Foreach(
                Path("foreach-vmap", FOREACH, "velo._vmap_velo (vmap of the reference)"), shard_safe=False
            ),
        ),
        fused_cpu=_velo_c,
        fused_triton=_velo_triton,
        cpu_where="velo._multi_tensor_velo(c_passes=True) -> kernels.cpu.passes",
        triton_where="velo._triton_velo -> kernels.triton.velo",
    ),
    "small_fc_lopt": _adafac_family("SmallFCLOpt", "adafac"),
    "mulo": _adafac_family("MuLO", "mulo"),
    "mlp_lopt": Family(
        cls="MLPLOpt",
        defaults="lopt_bridge.pylo_runtime.specs.mlp_lopt:DEFAULTS",
        reference=_ref("mlp_lopt.MLPLOpt._update (per tensor)"),
        foreach=(Foreach(Path("foreach", FOREACH, "mlp_lopt.MLPLOpt._update (one MLP over all rows)")),),
    ),
    # Celo's per-element features, MLP and output head are HyperV2's: VeLO's fast paths and their coverage.
    "celo": Family(
        cls="Celo",
        defaults="lopt_bridge.pylo_runtime.specs.celo:DEFAULTS",
        reference=_ref("celo._single_tensor_celo"),
        foreach=(
            Foreach(Path("foreach", FOREACH, "celo._multi_tensor_celo"), _velo_fast),
            Foreach(Path("foreach-batched", FOREACH, "celo._batched_celo"), shard_safe=False),
        ),
        fused_cpu=_velo_c,
        fused_triton=_velo_triton,
        cpu_where="celo._multi_tensor_celo(c_passes=True) -> kernels.cpu.passes (VeLO's)",
        triton_where="celo._triton_celo -> kernels.triton.velo",
    ),
    # Element-wise Adam: every option on every path.
    "celo_adam": Family(
        cls="CeloAdam",
        defaults="lopt_bridge.pylo_runtime.specs.celo_adam:DEFAULTS",
        reference=_ref("celo_adam._single_tensor_celo_adam"),
        foreach=(Foreach(Path("foreach", FOREACH, "celo_adam._multi_tensor_celo_adam")),),
        fused_cpu=lambda c: None,
        fused_triton=lambda c: None,
        cpu_where="celo_adam._fused_cpu_celo_adam -> kernels.cpu.passes.celo_adam_step",
        triton_where="celo_adam._triton_celo_adam -> kernels.triton.celo_adam",
    ),
    "celo2": Family(
        cls="Celo2",
        defaults="lopt_bridge.pylo_runtime.specs.celo2:DEFAULTS",
        reference=_ref("celo2._single_tensor_celo2"),
        foreach=(Foreach(Path("foreach", FOREACH, "celo2._multi_tensor_celo2 (stacked per shape)")),),
    ),
    "rnn_mlp_lopt": Family(
        cls="RNNMLPLOpt",
        defaults="lopt_bridge.pylo_runtime.specs.rnn_mlp_lopt:DEFAULTS",
        reference=_ref("rnn_mlp_lopt._single_tensor_rnn_mlp_lopt"),
        foreach=(Foreach(Path("foreach", FOREACH, "rnn_mlp_lopt._multi_tensor_rnn_mlp_lopt")),),
    ),
    "nn_adam": Family(
        cls="NNAdam",
        defaults="lopt_bridge.pylo_runtime.specs.nn_adam:DEFAULTS",
        reference=_ref("nn_adam._single_tensor_nn_adam"),
        foreach=(Foreach(Path("foreach", FOREACH, "nn_adam._multi_tensor_nn_adam"), shard_safe=False),),
    ),
}


def declared(architecture: str) -> Family:
    """The declared implementations of ``architecture``; a new family must be declared in FAMILIES."""
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not declared in lopt_bridge.pylo_runtime.dispatch.FAMILIES "
            "(its reference and foreach paths, what its fast paths cover): add it (docs/architecture.md)"
        ) from None


def full_config(architecture: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` over the family's reference defaults (what the coverage rules read)."""
    module, name = declared(architecture).defaults.split(":")
    return {**getattr(importlib.import_module(module), name), **dict(config)}


# ------------------------------------------------------------------------------------------------------
def triton_available() -> bool:
    """Whether triton can be imported (an optional dependency: ``pip install 'lopt-bridge[triton]'``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Env:
    """What the machine offers, as far as the decision goes (tests and the table printer set it)."""

    triton: bool = True  # triton importable
    interpret: bool = False  # TRITON_INTERPRET=1
    native: str | None = None  # None: the C passes can be built; else why not
    compiling: bool = False  # inside torch.compile (neither ctypes nor Triton pointer tables trace)
    broken: tuple[tuple[str, str], ...] = ()  # (fused path, why): failed their self-check in this process

    @classmethod
    def current(cls, *, compiling: bool = False, broken: tuple[tuple[str, str], ...] = ()) -> Env:
        return cls(triton_available(), interpreting(), None, compiling, broken)


def _fused_backend(device: str, explicit: bool, env: Env) -> str | None:
    """ "triton", "cpu" or None (no fused kernels on this device)."""
    if device == "cuda":
        return "triton"
    if device == "cpu":
        return "triton" if explicit and env.interpret else "cpu"
    return None


def _fused(fam: Family, cfg: Mapping[str, Any], device: str, explicit: bool, shard: bool, env: Env):
    """(fused Path, None) or (None, the reason the fused kernels cannot run here)."""
    backend = _fused_backend(device, explicit, env)
    if backend is None:
        return None, f"no fused kernels for {device} tensors"
    covers = fam.fused_triton if backend == "triton" else fam.fused_cpu
    if covers is None:
        return None, f"{fam.cls} has no fused kernels"
    if (r := covers(cfg)) is not None:
        return None, r
    if shard:
        return None, "FSDP2 shards stepped rank-locally: the fused kernels do not all-reduce over shards"
    if env.compiling:
        return None, "inside torch.compile: the fused kernels' calls cannot be traced"
    if backend == "triton":
        if not env.triton:
            return None, "triton is not installed (pip install 'lopt-bridge[triton]')"
        path = Path("fused-triton", FUSED, fam.triton_where)
    elif env.native is not None:
        return None, env.native
    else:
        path = Path("fused-cpu", FUSED, fam.cpu_where)
    for name, why in env.broken:
        if name == path.name:
            return None, f"the {name} kernels failed their self-check in this process: {why}"
    return path, None


def _foreach(fam: Family, cfg: Mapping[str, Any], shard: bool) -> Decision:
    """The first multi-tensor path that covers ``cfg`` (and shards, if any), else the reference."""
    reasons = []
    for f in fam.foreach:
        r = None if f.covers is None else f.covers(cfg)
        if r is None and shard and not f.shard_safe:
            r = f"{f.path.where} cannot all-reduce over FSDP2 shards"
        if r is None:
            return Decision(f.path, _unique(*reasons))
        reasons.append(r)
    return Decision(fam.reference, _unique(*reasons))


def decide(
    family: str,
    config: Mapping[str, Any],
    device: str,
    *,
    foreach: bool | None,
    fused: bool | None,
    shard: bool = False,
    env: Env | None = None,
) -> Decision:
    """The implementation for one request (``config``: full, see :func:`full_config`), or the refusal."""
    fam = declared(family)
    env = env or Env()
    if foreach and fused:
        return Decision(None, ("fused=True and foreach=True cannot both be set (as in torch.optim)",))
    if fused:
        path, why = _fused(fam, config, device, True, shard, env)
        return Decision(path) if path else Decision(None, (why,))
    if fused is None and foreach is None:
        path, why = _fused(fam, config, device, False, shard, env)
        if path:
            return Decision(path)
        d = _foreach(fam, config, shard)
        return Decision(d.path, _unique(why, *d.reasons))
    if foreach is False:
        return Decision(fam.reference)
    return _foreach(fam, config, shard)


# ------------------------------------------------------------------------------------------------------
# The runtime side: what LearnedOptimizer calls.
def _flags(opt: Any) -> tuple[bool | None, bool | None]:
    """The optimizer-wide flags; every param group must agree (the LSTM / MLP steps all tensors at once)."""
    seen = {(g["foreach"], g["fused"]) for g in opt.param_groups}
    if len(seen) > 1:
        raise ValueError(
            f"{type(opt).__name__}: foreach / fused must be the same for every param group "
            f"(one step runs all tensors together), got {sorted(seen, key=str)}"
        )
    return seen.pop()


def _device_of(opt: Any) -> str:
    for g in opt.param_groups:
        for p in g["params"]:
            return p.device.type
    return "cpu"


def _has_shards(opt: Any) -> bool:
    """Whether some params are DTensors that the step will run rank-locally (FSDP2 ``Shard`` placement)."""
    if not getattr(opt, "shard_local", False):
        return False
    from .distributed import fsdp

    for g in opt.param_groups:
        for p in g["params"]:
            if fsdp.is_dtensor(p) and fsdp.shard_spec(p, p) is not None:
                return True
    return False


def _config(opt: Any) -> dict[str, Any]:
    cache = opt.__dict__.get("_dispatch_config")
    if cache is None:
        cache = opt.__dict__["_dispatch_config"] = full_config(opt.architecture, opt.config)
    return cache


def _native_reason() -> str | None:
    """None if the C passes are loaded (built now if needed), else why not."""
    from .kernels.cpu import build

    if not build.enabled():
        return "the C passes are turned off (LOPT_BRIDGE_NATIVE=0)"
    if build.library() is None:
        return f"the C passes could not be built ({build.last_error()})"
    return None


def check_construction(opt: Any) -> None:
    """At construction: raise now what a step would refuse (fused=True that cannot run, mixed flags)."""
    foreach, fused = _flags(opt)
    if not fused:
        return
    device = _device_of(opt)
    cfg = _config(opt)
    shard = _has_shards(opt)
    env = Env.current()
    d = decide(opt.architecture, cfg, device, foreach=foreach, fused=fused, shard=shard, env=env)
    if d.path is not None and d.path.name == "fused-cpu":  # build the C passes now, not in the first step
        native = _native_reason()
        if native is not None:
            d = Decision(None, (native,))
    if d.refused:
        raise FusedUnavailableError(f"{type(opt).__name__}: fused=True is not available: {d.reason}")


def choose(opt: Any, device: Any, *, shard: bool) -> str:
    """The path name for this step of ``opt`` on ``device`` (a torch.device); FSDP2 shards in it if ``shard``.

    Also kept as ``opt.last_path``. Inside ``torch.compile`` the decision is a constant of the graph.
    """
    name = _choose(opt, device.type, shard, torch.compiler.is_compiling())
    opt.last_path = name
    return name


@torch.compiler.assume_constant_result
def _choose(opt: Any, device: str, shard: bool, compiling: bool) -> str:
    """``choose`` without its side effect, so that torch.compile can take the result as a constant."""
    foreach, fused = _flags(opt)
    cfg = _config(opt)
    env = Env.current(compiling=compiling, broken=_broken(opt))
    d = decide(opt.architecture, cfg, device, foreach=foreach, fused=fused, shard=shard, env=env)
    if d.path is not None and d.path.name == "fused-cpu":
        native = _native_reason()
        if native is not None:  # fused=None: one warning (native.library) and the torch ops
            env = Env(env.triton, env.interpret, native, env.compiling, env.broken)
            d = decide(opt.architecture, cfg, device, foreach=foreach, fused=fused, shard=shard, env=env)
    if d.refused:
        raise FusedUnavailableError(f"{type(opt).__name__}: fused=True is not available: {d.reason}")
    return d.path.name


# ------------------------------------------------------------------------------------------------------
# The fused kernels' self-check: before a fused path first runs a kernel variant in this process, one tensor
# of that variant is stepped on copies by the kernels and by the reference, and the updates compared.
#: The documented bound: max |u_fused - u_ref| / max |u_ref| over the tensor, one ulp of the result forgiven
#: (the parity bar of the tests; the fused paths measure <= 2e-6 against the reference on the CPU).
SELF_CHECK_TOL = 1e-5
_check_lock = threading.Lock()
_VERIFIED: set[tuple] = set()  # (architecture, path, config fingerprint, kernel variant)
_BROKEN: dict[tuple, str] = {}  # (architecture, path, config fingerprint) -> why


def _fingerprint(opt: Any) -> str:
    fp = opt.__dict__.get("_dispatch_fingerprint")
    if fp is None:
        fp = opt.__dict__["_dispatch_fingerprint"] = repr(sorted(_config(opt).items()))
    return fp


def _broken(opt: Any) -> tuple[tuple[str, str], ...]:
    arch, fp = opt.architecture, _fingerprint(opt)
    return tuple((k[1], why) for k, why in _BROKEN.items() if k[0] == arch and k[2] == fp)


def update_error(before: torch.Tensor, want: torch.Tensor, got: torch.Tensor) -> float:
    """``max |u_got - u_want| / max |u_want|`` with ``u = after - before``, one ulp of the result forgiven.

    Non-finite results agree only where both are NaN or the same infinity (``nonfinite="propagate"`` with a
    NaN gradient in the checked step must not mark a correct kernel broken); any other mismatch is inf."""
    p0, a, b = before.detach().double(), want.detach().double(), got.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    same = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    if not bool((finite | same).all()):
        return float("inf")
    ua, ub = (a - p0)[finite], (b - p0)[finite]
    if ua.numel() == 0:
        return 0.0
    ulp = torch.finfo(before.dtype).eps * torch.maximum(a[finite].abs(), p0[finite].abs())
    excess = ((ua - ub).abs() - ulp).clamp(min=0).max()
    return float(excess / ua.abs().max().clamp(min=1e-30))


def _copy(x: Any) -> Any:
    """A private copy of one tensor's argument (its param / grad / state), so that a check writes nothing."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    return x


def _check_one(path: str, impl: Callable[[str], Callable], j: int, params: list, lists: tuple) -> str | None:
    """Step tensor ``j`` alone on copies with ``path`` and with the reference; None if they agree."""
    before = params[j].detach()
    after = {}
    for name in ("reference", path):
        p = before.clone()
        args = [[_copy(lst[j])] for lst in lists]
        try:
            impl(name)([p], *args)
        except Exception as exc:  # a kernel that does not compile or launch here
            if name == "reference":
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"failed to compile or run ({type(exc).__name__}: {first[:300]})"
        after[name] = p
    err = update_error(before, after["reference"], after[path])
    if not err <= SELF_CHECK_TOL:  # (NaN too)
        shape = "x".join(map(str, before.shape)) or "0-d"
        return (
            f"its update of a {shape} {str(before.dtype).removeprefix('torch.')} tensor differs from the "
            f"reference by {err:.2e} (bound {SELF_CHECK_TOL:g})"
        )
    return None


def verified(
    opt: Any, path: str, samples: Mapping[tuple, int], impl: Callable[[str], Callable], params: list, *lists
) -> str:
    """``path``, once its fused kernels have matched the reference (``SELF_CHECK_TOL``) on one tensor of each
    kernel variant in ``samples`` (variant -> index into ``params``), checked once per process.

    ``impl(name)`` runs path ``name`` as ``impl(name)(params, *lists)`` (``lists``: per-tensor arguments in
    the order of ``params``). On a failure (a kernel that does not compile or run, or disagrees): with
    ``fused=True`` raise FusedUnavailableError; with the default flags one warning naming the reason, and
    the next path in the table from now on (returned; nothing has been written yet).
    """
    if not path.startswith("fused") or not samples:
        return path
    fp = _fingerprint(opt)
    for variant, j in samples.items():
        key = (opt.architecture, path, fp, variant)
        if key in _VERIFIED:
            continue
        why = _check_one(path, impl, j, params, lists)
        with _check_lock:
            if why is None:
                _VERIFIED.add(key)
                continue
            _BROKEN[key[:3]] = why
        msg = f"{type(opt).__name__}: the {path} kernels: {why}"
        if _flags(opt)[1]:
            raise FusedUnavailableError(f"{msg}; fused=True cannot run")
        fallback = choose(opt, params[0].device, shard=False)
        warnings.warn(
            f"lopt-bridge: {msg}; using the {fallback} path from now on", RuntimeWarning, stacklevel=2
        )
        return fallback
    return path


# ------------------------------------------------------------------------------------------------------
# The coverage table: representative option sets per family x device x placement x request.
#: Option sets per family (over the defaults), named; each shows where a fast path stops.
OPTION_SETS: dict[str, dict[str, dict[str, Any]]] = {
    "velo": {
        "default": {},
        "with_p=False": {"with_p": False},
        "ff_hidden_size=3": {"ff_hidden_size": 3},
        "ff_hidden_size=512": {"ff_hidden_size": 512},
        "ff_mult=1 (VeLO-S)": {"ff_mult": 1.0},
    },
    "small_fc_lopt": {
        "default": {},
        "hidden_size=3": {"hidden_size": 3},
        "hidden_layers=3": {"hidden_layers": 3},
        "decays 2/1/2": {"initial_momentum_decays": [0.9, 0.99], "initial_adafactor_decays": [0.9, 0.99]},
        "concat_weights=False": {"concat_weights": False},
    },
    "mulo": {"default": {}, "clip_grad": {"clip_grad": True}},
    "mlp_lopt": {"default": {}},
    "celo": {
        "default": {},
        "train_phase=1": {"train_phase": 1, "precondition_output": True},
        "with_p=False": {"with_p": False},
        "ff_hidden_size=3": {"ff_hidden_size": 3},
        "ff_hidden_size=512": {"ff_hidden_size": 512},
    },
    "celo_adam": {
        "default": {},
        "param_scale_mult=True": {"param_scale_mult": True},
        "decays 2/2, mom_decay=False": {
            "initial_momentum_decays": [0.9, 0.99],
            "initial_rms_decays": [0.999, 0.99],
            "mom_decay": False,
        },
    },
    "celo2": {"default": {}, "celo2base": {"regex_1d": "", "orthogonalize": False}},
    "rnn_mlp_lopt": {"default": {}},
    "nn_adam": {"default": {}, "decay_strength=0.1": {"decay_strength": 0.1}},
}

#: Request -> (foreach, fused); the other flag combinations map onto these (fused=False = foreach=True).
REQUESTS: dict[str, tuple[bool | None, bool | None]] = {
    "default": (None, None),
    "foreach=False": (False, None),
    "foreach=True": (True, None),
    "fused=True": (None, True),
}
#: (device, placement label, Env, shard)
DEVICES: list[tuple[str, str, Env, bool]] = [
    ("cpu", "cpu", Env(triton=True, interpret=False), False),
    ("cpu", "cpu, TRITON_INTERPRET=1", Env(triton=True, interpret=True), False),
    ("cpu", "cpu, FSDP2 shards", Env(triton=True, interpret=False), True),
    ("cuda", "cuda", Env(triton=True), False),
    ("cuda", "cuda, FSDP2 shards", Env(triton=True), True),
    ("mps", "other (mps, xpu, ...)", Env(triton=True), False),
]


@dataclass(frozen=True)
class Entry:
    family: str
    options: str
    device: str
    where: str
    request: str
    decision: Decision


def coverage_table() -> list[Entry]:
    """Every (family, option set, device, request) and its decision (assuming a C compiler and triton)."""
    out = []
    for family, sets in OPTION_SETS.items():
        for name, opts in sets.items():
            cfg = full_config(family, opts)
            for device, where, env, shard in DEVICES:
                for request, (foreach, fused) in REQUESTS.items():
                    d = decide(family, cfg, device, foreach=foreach, fused=fused, shard=shard, env=env)
                    out.append(Entry(family, name, device, where, request, d))
    return out


def format_table(entries: list[Entry] | None = None) -> str:
    """The table as markdown: one row per (family, options, device), one column per request."""
    entries = coverage_table() if entries is None else entries
    rows: dict[tuple[str, str, str], dict[str, Decision]] = {}
    for e in entries:
        rows.setdefault((e.family, e.options, e.where), {})[e.request] = e.decision
    reasons: dict[str, int] = {}

    def cell(d: Decision) -> str:
        refs = ",".join(str(reasons.setdefault(r, len(reasons) + 1)) for r in d.reasons)
        name = "refused" if d.refused else d.path.name
        return f"{name} [{refs}]" if refs else name

    head = "| family | options | device | " + " | ".join(REQUESTS) + " |"
    lines = [head, "|" + "---|" * (3 + len(REQUESTS))]
    for (family, options, where), cells in rows.items():
        row = " | ".join(cell(cells[r]) for r in REQUESTS)
        lines.append(f"| {family} | {options} | {where} | {row} |")
    lines += ["", "Paths:", ""]
    seen = set()
    for fam_name, fam in FAMILIES.items():
        paths = [fam.reference, *(f.path for f in fam.foreach)]
        if fam.fused_cpu:
            paths.append(Path("fused-cpu", FUSED, fam.cpu_where))
        if fam.fused_triton:
            paths.append(Path("fused-triton", FUSED, fam.triton_where))
        for p in paths:
            if (fam_name, p.name) not in seen:
                seen.add((fam_name, p.name))
                lines.append(f"- {fam_name} `{p.name}` ({p.kind}): `{p.where}`")
    lines += ["", "Reasons ([n]: why the request is refused, or why not a faster path):", ""]
    lines += [f"{n}. {r}" for r, n in reasons.items()]
    lines += [
        "",
        "`foreach=True, fused=True` is refused for every family (as torch.optim); `fused=False` is "
        "`foreach=True`. Under `torch.compile` the fused kernels step aside (default) or are refused "
        "(`fused=True`): their calls cannot be traced. Without a C compiler (or with `LOPT_BRIDGE_NATIVE=0`) "
        "`fused=True` on the CPU is refused and the default runs foreach, after one warning.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lopt_bridge.pylo_runtime.dispatch
    print(format_table())
