"""What every family spec is made of: option validators, the tensor table type and the theta check.

Torch-free on purpose (numpy is not needed either): the converter imports these modules and never torch.
Every refusal is a :class:`SpecError` (a ValueError) whose one-line message names the option or tensor, what
was found and what is expected; callers prefix the file it came from.

Bounds: every size a config can set is bounded so that a tiny hostile config (``hidden_layers = 100000000``,
``ff_hidden_layers: 1e9``) is refused before any table, list or tensor is built from it. The bounds sit far
above every published learned optimizer (the largest, VeLO, has ``lstm_hidden_size=512``,
``param_inits=256``, ``ff_hidden_size=4``, 2 hidden layers and 3 decays per accumulator; MLPLOpt uses 6
fixed decays) while keeping what a config can describe small: at ``MAX_WIDTH`` the LSTM weight alone would
be ``8 * 65536**2`` floats (128 GiB), so no real theta is near it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Largest hidden width / LSTM size / number of MLP copies a config may set (published maximum: 512).
MAX_WIDTH = 1 << 16
#: Largest number of hidden layers of a per-element MLP (published: 2; each layer is one matmul per element
#: per step, so even 64 would be unusable).
MAX_LAYERS = 1024
#: Largest number of decays per accumulator (published: 3; MLPLOpt's fixed set has 6).
MAX_DECAYS = 64
#: Largest number of theta tensors a config may describe (published: 33 for VeLO, 143 for the scalar-weight
#: small_fc_lopt test checkpoint; make_separate_weights stores one 0-d tensor per MLP weight).
MAX_TENSORS = 1 << 16
#: Theta dtypes the runtime accepts (it computes in float32; integer or boolean theta would be silently
#: cast, giving NaN or frozen parameters).
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class SpecError(ValueError):
    """A config or theta that does not fit a family spec; ``key`` is the option or tensor it names."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TensorSpec:
    """One theta tensor: where it sits in the source tree (``keys``) and its shape for the config.

    ``note`` is an optional hint for error messages (e.g. what the first layer's input width counts).
    """

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    note: str = ""

    @property
    def path(self) -> str:
        """``keys`` joined with "/" (the ``path`` a converted file records in ``source_paths``)."""
        return "/".join(self.keys)


class Config(Mapping[str, Any]):
    """A validated config: every constructor argument of the reference class, defaults filled in.

    Read-only; values are plain JSON types (lists for sequences, float for real numbers), so ``dict(cfg)``
    is what the converter records and the runtime reads. Options are also attributes (``cfg.hidden_size``).
    """

    __slots__ = ("_values", "arch")

    def __init__(self, arch: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "_values", dict(values))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # dunder lookups (copy, pickle) and a half-built instance's own slots
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self.arch} config has no option {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a validated Config is read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config, (self.arch, self._values))

    def __hash__(self) -> int:
        return hash((self.arch, tuple((k, _frozen(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return f"Config({self.arch!r}, {self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        """A fresh plain dict (lists copied), safe to mutate or serialise."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._values.items()}


def _frozen(v: Any) -> Any:
    return tuple(_frozen(x) for x in v) if isinstance(v, list) else v


# ----------------------------------------------------------------------------------------------------
# Small validators: each returns the normalised value or raises SpecError naming ``who: option key``.
def few(items: Iterable[str], limit: int = 6) -> str:
    """Join at most ``limit`` items, so an error stays one readable line."""
    items = list(items)
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _show(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def bounded_int(who: str, key: str, v: Any, low: int, high: int) -> int:
    """An int (not a bool, float or string) in ``[low, high]``."""
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise SpecError(f"{who}: option {key} must be an int in [{low}, {high}], got {_show(v)}", key)
    return int(v)


def positive_int(who: str, key: str, v: Any, high: int) -> int:
    """An int in ``[1, high]``."""
    return bounded_int(who, key, v, 1, high)


def finite_float(who: str, key: str, v: Any) -> float:
    """A finite int or float (not a bool), returned as float."""
    if not _is_number(v) or not math.isfinite(v):
        raise SpecError(f"{who}: option {key} must be a finite number, got {_show(v)}", key)
    return float(v)


def optional_number(who: str, key: str, v: Any) -> float | None:
    """None, or a finite number (returned as float)."""
    if v is None:
        return None
    if not _is_number(v) or not math.isfinite(v):
        raise SpecError(f"{who}: option {key} must be a finite number or None, got {_show(v)}", key)
    return float(v)


def boolean(who: str, key: str, v: Any) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(v, bool):
        raise SpecError(f"{who}: option {key} must be True or False, got {_show(v)}", key)
    return v


def decays(who: str, key: str, v: Any) -> list[float]:
    """A non-empty list of at most ``MAX_DECAYS`` EMA decays in [0, 1] (a single number means ``[v]``)."""
    if _is_number(v):
        v = [v]
    if (
        not isinstance(v, list | tuple)
        or not 1 <= len(v) <= MAX_DECAYS
        or not all(_is_number(x) and math.isfinite(x) and 0.0 <= x <= 1.0 for x in v)
    ):
        raise SpecError(
            f"{who}: option {key} must be a list of 1 to {MAX_DECAYS} decays in [0, 1], got {_show(v)}", key
        )
    return [float(x) for x in v]


def check_options(who: str, config: Any, defaults: Mapping[str, Any], reference: str) -> dict[str, Any]:
    """``config`` must be a mapping whose keys are constructor arguments of ``reference``; defaults filled."""
    if not isinstance(config, Mapping):
        what = "null" if config is None else f"a {type(config).__name__}"
        raise SpecError(f"{who}: config must be a mapping of option names to values, got {what}")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise SpecError(f"{who}: config keys must be strings, got {_show(bad_keys[0])}")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise SpecError(
            f"{who}: unknown constructor argument(s) {few(unknown)} (not an option of {reference})",
            unknown[0],
        )
    return {**defaults, **config}


#: A validator: ``(who, key, value) -> normalised value`` or SpecError.
Validator = Callable[[str, str, Any], Any]
#: The reference's names of the three decay lists (every family with accumulators uses them).
DECAY_KEYS = ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays")


def sized(high: int, low: int = 1) -> Validator:
    """A validator for an int option in ``[low, high]``."""
    return lambda who, key, v: bounded_int(who, key, v, low, high)


def kinds_for(defaults: Mapping[str, Any], special: Mapping[str, Validator]) -> dict[str, Validator]:
    """Validator per option: ``special``, else decays for ``DECAY_KEYS``, booleans for bool defaults."""
    out: dict[str, Validator] = {}
    for key, default in defaults.items():
        if key in special:
            out[key] = special[key]
        elif key in DECAY_KEYS:
            out[key] = decays
        elif isinstance(default, bool):
            out[key] = boolean
        else:
            raise AssertionError(f"no validator for option {key}")  # a spec module is incomplete
    return out


def normalise(who: str, merged: Mapping[str, Any], kinds: Mapping[str, Validator]) -> dict[str, Any]:
    """Each option through its validator, in the order of ``kinds`` (the defaults' order)."""
    return {key: kinds[key](who, key, merged[key]) for key in kinds}


# ----------------------------------------------------------------------------------------------------
def check_theta(
    who: str,
    table: Mapping[str, TensorSpec],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Theta names, shapes and dtypes (``float32``-style names) against ``table``; one SpecError for all.

    A 0-d tensor may be stored with shape ``(1,)``. The message lists missing, unexpected and wrong-shape
    tensors (each with the found and the expected value), then non-float dtypes.
    """
    missing = [k for k in table if k not in shapes]
    extra = sorted(k for k in shapes if k not in table)
    wrong = []
    for k, ts in table.items():
        if k in shapes:
            found = tuple(int(s) for s in shapes[k])
            if found != ts.shape and not (ts.shape == () and found == (1,)):
                note = f" ({ts.note})" if ts.note else ""
                wrong.append(f"{k} has shape {found}, config expects {ts.shape}{note}")
    parts = []
    if missing:
        parts.append(f"theta lacks {few(missing)} (config expects {len(table)} tensors)")
    if extra:
        parts.append(f"theta has unexpected tensor(s) {few(extra)} (not in the config's table)")
    if wrong:
        parts.append("theta tensor " + few(wrong, 4))
    if not parts and dtypes is not None:
        bad = [k for k in table if dtypes.get(k) not in FLOAT_DTYPES]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            parts.append(
                f"theta tensor {bad[0]} has dtype {dtypes.get(bad[0])}{more}, expected a float dtype "
                f"({', '.join(sorted(FLOAT_DTYPES))})"
            )
            missing = bad  # the key the error names
    if parts:
        key = (missing or extra or [w.split(" ", 1)[0] for w in wrong] or [None])[0]
        raise SpecError(f"{who}: " + "; ".join(parts), key)


def check_tensor_count(who: str, n: int, what: str) -> None:
    """Refuse a config that describes more than ``MAX_TENSORS`` theta tensors (before building its table)."""
    if n > MAX_TENSORS:
        raise SpecError(
            f"{who}: the config describes {n} theta tensors ({what}); at most {MAX_TENSORS} are accepted"
        )
