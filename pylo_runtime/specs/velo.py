"""VeLO = learned_optimization's ``HyperV2`` (research/general_lopt/hyper_v2.py @32186aa4): the family spec.

Also amoudgl/celo's copy (``celo/optimizers/velo.py`` @66d9761: VeLO-S, velo-4000, celo's ``velo``), whose
only numeric difference is ``ff_mult``: celo interpolates the MLP copies as ``mean(ff_p * c) * ff_mult``
where Google's class hard-codes ``100. * mean(ff_p * c)``. One architecture id for both; ``ff_mult``
defaults to 100.0 (Google's behaviour; celo's class default is 1.0, so celo checkpoints must bind it).

Theta (haiku params, flax state-dict form; runtime name, source keys, shape)::

    lstm_init.{hidden,cell}      lstm_init_state/{hidden,cell}      (1, H)
    rnn.mix_unused.{w,b}         rnn_params/linear/{w,b}            (F, H), (H,)   only with mix_layers; the
    rnn.mix.{w,b}, rnn.in.{w,b}  rnn_params/linear_1/.., linear_2/  (F, H), (H,)   reference computes linear
    rnn.lstm.{w,b}               rnn_params/rnn/linear/{w,b}        (H + H, 4H), (4H,)  and overwrites it
    rnn.to_controls.{w,b}        rnn_params/rnn_to_controls/{w,b}   (H, P), (P,)
    rnn.step_size.{w,b}          rnn_params/step_size/{w,b}         (H, 1), (1,)
    ff.w0.i                      ff_mod_stack/~/w0__i               (P, width_i, ff_hidden)
    ff.w1..wL, ff.b0..bL         ff_mod_stack/~/w1.., b0..          (P, ff_hidden, ff_hidden | 3), ...

with H = lstm_hidden_size, P = param_inits, F = ``lstm_input_size`` (LSTM input is F without mix_layers).
The LSTM helpers here are shared with Celo / Celo-Adam (``specs/celo.py``), whose schedulers are HyperV2's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .common import (
    DECAY_KEYS,
    MAX_LAYERS,
    MAX_WIDTH,
    Config,
    SpecError,
    TensorSpec,
    check_options,
    finite_float,
    kinds_for,
    normalise,
    optional_number,
    sized,
)
from .common import check_theta as _check_theta

ARCH = "velo"
#: The reference class (its constructor arguments are the config's keys).
REFERENCE = "HyperV2"
#: The runtime class ("module:Class", imported only when used).
RUNTIME_CLASS = "lopt_bridge.pylo_runtime.velo:VeLO"

#: HyperV2's per-element feature switches and their defaults, which Celo and Celo-Adam inherit unchanged.
FEATURE_SWITCHES: dict[str, bool] = {
    "with_g": True,
    "with_m": True,
    "with_m_feat": True,
    "with_rms": True,
    "with_rms_feat": True,
    "with_rms_norm_g": True,
    "with_rsqrt_rms": True,
    "with_p": True,
    "with_fac_norm_g": True,
    "with_fac_rms": True,
    "with_fac_rsqrt": True,
    "with_grad_clip_feat": True,
    "with_fac_mom_mult": True,
    "with_rms_only_norm_g": True,
    "adafactor_accumulator": True,
}

#: Every HyperV2 constructor argument with its default (hyper_v2.HyperV2.__init__, + celo's ``ff_mult``).
DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 128,
    "ff_hidden_size": 4,
    "ff_hidden_layers": 2,
    "initial_momentum_decays": [0.9, 0.99, 0.999],
    "initial_rms_decays": [0.999],
    "initial_adafactor_decays": [0.9, 0.99, 0.999],
    "param_inits": 64,
    "mix_layers": True,
    "exp_mult": 0.001,
    "step_mult": 0.001,
    #: celo's HyperV2 only (placed as there); 100.0 = learned_optimization's hard-coded constant.
    "ff_mult": 100.0,
    "validation_mode": False,
    "with_validation_feature_dim": False,
    **FEATURE_SWITCHES,
    "param_scale_mult": True,
    "use_bugged_next_lstm_state": False,
    "use_bugged_loss_features": True,
    "precondition_output": False,
    "reparam_decay": 10.0,
    "rnn_state_decay": 0.0,
    "summarize_each_layer": False,
    "summarize_all_control": False,
    "constant_loss": False,
    "clip_param_scale_amount": None,
}

_KINDS = kinds_for(
    DEFAULTS,
    {
        "lstm_hidden_size": sized(MAX_WIDTH),
        "ff_hidden_size": sized(MAX_WIDTH),
        "ff_hidden_layers": sized(MAX_LAYERS),
        "param_inits": sized(MAX_WIDTH),
        "exp_mult": finite_float,
        "step_mult": finite_float,
        "ff_mult": finite_float,
        "reparam_decay": finite_float,
        "rnn_state_decay": finite_float,
        "clip_param_scale_amount": optional_number,
    },
)


# ----------------------------------------------------------------------------------------------------
def check_feature_combinations(who: str, c: Mapping[str, Any], *, lstm_features: bool) -> None:
    """Refuse option combinations the reference cannot run (so there is nothing to reproduce).

    ``lstm_features``: the per-tensor LSTM features exist (VeLO; Celo's LSTM reads global features only).
    """
    # The reference binds `rsqrt` only if with_rms_norm_g or (with_rsqrt_rms and with_rms_only_norm_g);
    # using it otherwise raises UnboundLocalError there.
    has_rsqrt = c["with_rms_norm_g"] or (c["with_rsqrt_rms"] and c["with_rms_only_norm_g"])
    if not has_rsqrt and (c["with_rsqrt_rms"] or c["with_rms_only_norm_g"]):
        bad = "with_rsqrt_rms" if c["with_rsqrt_rms"] else "with_rms_only_norm_g"
        raise SpecError(
            f"{who}: option with_rms_norm_g=False with {bad}=True and the other of with_rsqrt_rms / "
            "with_rms_only_norm_g False crashes in the reference (UnboundLocalError): refused",
            bad,
        )
    n_m, n_r, n_f = (len(c[k]) for k in DECAY_KEYS)

    def _bcast(a: int, b: int, what: str, opt: str) -> None:
        if a != b and a != 1 and b != 1:
            raise SpecError(
                f"{who}: option {opt}: {what} ({a} vs {b} decays) do not broadcast; the reference fails", opt
            )

    if lstm_features:
        _bcast(n_r, n_m, "var_rms feature (rms - mean of momentum)", "initial_rms_decays")
    if c["with_rms_norm_g"]:
        _bcast(n_m, n_r, "momentum * rsqrt(rms)", "initial_rms_decays")
    if c["adafactor_accumulator"] and c["with_fac_mom_mult"]:
        _bcast(n_m, n_f, "momentum * adafactor factors", "initial_adafactor_decays")


def validate(config: Any, who: str = ARCH) -> Config:
    """Defaults filled, every option checked (type, finiteness, bounds, combinations); SpecError names it."""
    merged = check_options(who, config, DEFAULTS, REFERENCE)
    values = normalise(who, merged, _KINDS)
    check_feature_combinations(who, values, lstm_features=True)
    return Config(ARCH, values)


# ----------------------------------------------------------------------------------------------------
def lstm_input_size(config: Mapping[str, Any]) -> int:
    """Per-tensor LSTM inputs: time (9), loss (9), mean_rms, rank (5), var_m, var_rms (+ validation dim)."""
    n_m, n_r = len(config["initial_momentum_decays"]), len(config["initial_rms_decays"])
    return 9 + 9 + n_r + 5 + n_m + max(n_m, n_r) + int(bool(config["with_validation_feature_dim"]))


def ff_input_widths(config: Mapping[str, Any]) -> list[int]:
    """Width of each per-element MLP input (``w0__i``) in the reference's ``_ff_mod`` order."""
    n_m, n_r, n_f = (len(config[k]) for k in DECAY_KEYS)
    w: list[int] = []
    if config["with_g"]:
        w.append(1)
    if config["with_grad_clip_feat"]:
        w.append(1)
    if config["with_p"]:
        w.append(1)
    if config["with_m"] and config["with_m_feat"]:
        w.append(n_m)
    if config["with_rms"] and config["with_rms_feat"]:
        w.append(n_r)
    if config["with_rms_norm_g"]:
        w.append(max(n_m, n_r))
    if config["with_rsqrt_rms"]:
        w.append(n_r)
    if config["with_fac_norm_g"]:
        w.append(n_f)
    if config["with_rms_only_norm_g"]:
        w.append(n_r)
    if config["adafactor_accumulator"]:  # factored and diagonal branches have the same widths
        if config["with_fac_rms"]:
            w += [n_f, n_f]
        if config["with_fac_rsqrt"]:
            w += [n_f, n_f]
        if config["with_fac_mom_mult"]:
            w.append(max(n_m, n_f))
    return w


FF = ("ff_mod_stack", "~")  # haiku: parameters created outside any module


def lstm_table(h: int, n_in: int, mix_layers: bool, controls: int | None) -> dict[str, TensorSpec]:
    """The LSTM scheduler's tensors (hidden size ``h``, ``n_in`` inputs); ``controls``: P or no head."""
    t: dict[str, TensorSpec] = {
        "lstm_init.hidden": TensorSpec(("lstm_init_state", "hidden"), (1, h)),
        "lstm_init.cell": TensorSpec(("lstm_init_state", "cell"), (1, h)),
    }
    if mix_layers:
        # ``linear`` is the first mix layer: the reference computes it and overwrites the result.
        for name, layer in (("rnn.mix_unused", "linear"), ("rnn.mix", "linear_1"), ("rnn.in", "linear_2")):
            t[f"{name}.w"] = TensorSpec(("rnn_params", layer, "w"), (n_in, h), f"{n_in} LSTM inputs")
            t[f"{name}.b"] = TensorSpec(("rnn_params", layer, "b"), (h,))
    lstm_in = h if mix_layers else n_in
    t["rnn.lstm.w"] = TensorSpec(("rnn_params", "rnn/linear", "w"), (lstm_in + h, 4 * h))
    t["rnn.lstm.b"] = TensorSpec(("rnn_params", "rnn/linear", "b"), (4 * h,))
    if controls is not None:
        t["rnn.to_controls.w"] = TensorSpec(("rnn_params", "rnn_to_controls", "w"), (h, controls))
        t["rnn.to_controls.b"] = TensorSpec(("rnn_params", "rnn_to_controls", "b"), (controls,))
    t["rnn.step_size.w"] = TensorSpec(("rnn_params", "step_size", "w"), (h, 1))
    t["rnn.step_size.b"] = TensorSpec(("rnn_params", "step_size", "b"), (1,))
    return t


def ff_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """The ``param_inits`` MLP copies: ``ff.w0.i`` (numeric order), then ``ff.w1..``, then ``ff.b..``."""
    p, hid, n_layers = config["param_inits"], config["ff_hidden_size"], config["ff_hidden_layers"]
    t: dict[str, TensorSpec] = {}
    for i, width in enumerate(ff_input_widths(config)):  # as strings they would sort w0__10 < w0__2
        t[f"ff.w0.{i}"] = TensorSpec((*FF, f"w0__{i}"), (p, width, hid))
    for i in range(1, n_layers + 1):
        t[f"ff.w{i}"] = TensorSpec((*FF, f"w{i}"), (p, hid, 3 if i == n_layers else hid))
    for i in range(n_layers + 1):
        t[f"ff.b{i}"] = TensorSpec((*FF, f"b{i}"), (p, 3 if i == n_layers else hid))
    return t


def tensor_table(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Runtime tensor name -> (source keys, shape) for a validated config, in the runtime's order."""
    lstm = lstm_table(
        config["lstm_hidden_size"], lstm_input_size(config), config["mix_layers"], config["param_inits"]
    )
    return {**lstm, **ff_table(config)}


def check_theta(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
    who: str = ARCH,
) -> None:
    """Theta names / shapes / dtypes against the table of ``config``; SpecError naming the tensor."""
    _check_theta(who, tensor_table(config), shapes, dtypes)


# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VeLOConfig:
    """The HyperV2 options the update reads, validated (the runtime's typed view of a ``Config``)."""

    lstm_hidden_size: int
    ff_hidden_size: int
    ff_hidden_layers: int
    mom_decays: tuple[float, ...]
    rms_decays: tuple[float, ...]
    fac_decays: tuple[float, ...]
    param_inits: int
    mix_layers: bool
    exp_mult: float
    step_mult: float
    ff_mult: float
    validation_mode: bool
    with_validation_feature_dim: bool
    with_g: bool
    with_m: bool
    with_m_feat: bool
    with_rms: bool
    with_rms_feat: bool
    with_rms_norm_g: bool
    with_rsqrt_rms: bool
    with_p: bool
    with_fac_norm_g: bool
    with_fac_rms: bool
    with_fac_rsqrt: bool
    with_grad_clip_feat: bool
    with_fac_mom_mult: bool
    with_rms_only_norm_g: bool
    adafactor_accumulator: bool
    param_scale_mult: bool
    use_bugged_next_lstm_state: bool
    use_bugged_loss_features: bool
    precondition_output: bool
    rnn_state_decay: float
    constant_loss: bool
    clip_param_scale_amount: float | None
    #: The full validated config (every HyperV2 argument under its own name).
    reference: Config = field(compare=False, repr=False, default=None)  # type: ignore[assignment]

    @classmethod
    def from_mapping(cls, config: Any, who: str = "VeLO") -> VeLOConfig:
        """Validate ``config`` (defaults filled; SpecError naming the option) and take the typed view."""
        return cls.from_config(validate(config, who))

    @classmethod
    def from_config(cls, cfg: Config) -> VeLOConfig:
        """The typed view of an already validated config."""
        renamed = {"initial_momentum_decays": "mom_decays", "initial_rms_decays": "rms_decays"}
        renamed["initial_adafactor_decays"] = "fac_decays"
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            name = renamed.get(key, key)
            if name in cls.__dataclass_fields__:
                out[name] = tuple(value) if isinstance(value, list) else value
        return cls(**out, reference=cfg)

    @property
    def lstm_input_size(self) -> int:
        """9 time + 9 loss features, mean_rms, rank one-hot (5), var_m, var_rms (+ validation dim)."""
        return lstm_input_size(self.reference)

    def ff_input_widths(self) -> list[int]:
        """Width of each per-element MLP input, in the order of ``w0__0, w0__1, ...``."""
        return ff_input_widths(self.reference)


def _ref(cfg: VeLOConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    return cfg.reference if isinstance(cfg, VeLOConfig) else cfg


def ff_layer_names(cfg: VeLOConfig | Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Names of the per-element MLP weights ``[ff.w0.0, ..., ff.w1, ...]`` and biases ``[ff.b0, ...]``."""
    c = _ref(cfg)
    n_in = len(ff_input_widths(c))
    n_layers = c["ff_hidden_layers"]
    weights = [f"ff.w0.{i}" for i in range(n_in)] + [f"ff.w{i}" for i in range(1, n_layers + 1)]
    biases = [f"ff.b{i}" for i in range(n_layers + 1)]
    return weights, biases


def expected_theta_shapes(cfg: VeLOConfig | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every theta tensor the runtime reads, with its shape (haiku layout: Linear ``w`` is ``(in, out)``)."""
    return {k: ts.shape for k, ts in tensor_table(_ref(cfg)).items()}
