"""Find the learned optimizer and its constructor bindings in an operative ``config.gin``.

Parses with gin-config's own parser (``gin.config_parser.ConfigParser``) so every construct gin accepts is
read the way gin reads it, without importing or registering any configurable. The learned optimizer is
the value of ``run_train.lopt`` (``@Name()``, possibly scoped, possibly through a macro); its bindings are
gin's for that class in the active scope: unscoped ones, overridden by each enclosing scope in turn,
exactly as ``gin.get_bindings`` resolves them when ``run_train`` builds the optimizer.
"""

from __future__ import annotations

import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gin import config_parser

from . import files
from .errors import ConversionError

#: Limits: a config.gin is a few kB of flat bindings.
MAX_GIN_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_RESOLVED = 100_000


@dataclass(frozen=True)
class GinReference:
    """A ``@name`` / ``@name()`` value; kept symbolic because nothing is registered."""

    name: str
    evaluate: bool

    def __str__(self) -> str:
        return f"@{self.name}{'()' if self.evaluate else ''}"


@dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> GinReference:
        return GinReference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> _Macro:
        return _Macro(macro_name)


@dataclass(frozen=True)
class GinOptimizer:
    """The learned optimizer a config.gin describes."""

    class_name: str  # the configurable's own name, e.g. "HyperV2" (module prefix dropped)
    selector: str  # as written in the reference, e.g. "HyperV2" or "hyper_v2.HyperV2"
    scope: str  # scope the optimizer is built in ("" when unscoped)
    bindings: dict[str, Any]  # constructor argument -> value, macros resolved


@dataclass(frozen=True)
class _Binding:
    scope: str
    selector: str
    arg: str
    value: Any
    line: int


def _parse(text: str, source: str) -> tuple[list[_Binding], dict[str, Any]]:
    # opt_from_checkpoint removes backslash-newline before parsing ("gin writes out multi line sometimes").
    text = text.replace("\\\n", "")
    bindings: list[_Binding] = []
    macros: dict[str, Any] = {}
    try:
        for statement in config_parser.ConfigParser(text, _Delegate()):
            if isinstance(statement, config_parser.BindingStatement):
                if statement.arg_name:
                    bindings.append(
                        _Binding(
                            statement.scope,
                            statement.selector,
                            statement.arg_name,
                            statement.value,
                            statement.location.line_num,
                        )
                    )
                else:  # ``NAME = value`` defines a macro (gin binds it as ``NAME/gin.macro.value``)
                    name = (
                        f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
                    )
                    macros[name] = statement.value
            elif isinstance(statement, config_parser.IncludeStatement):
                raise ConversionError(
                    source,
                    f"line {statement.location.line_num}: 'include {statement.filename}' is not supported; "
                    "pass the included bindings with --config",
                )
            # ImportStatement and BlockDeclaration need no action: nothing is imported or registered.
    except SyntaxError as e:
        line = f"line {e.lineno}: " if e.lineno else ""
        msg = " ".join(str(e.msg).split())
        msg = msg if len(msg) <= 200 else msg[:200] + "..."
        raise ConversionError(source, f"{line}gin syntax error: {msg}") from None
    except tokenize.TokenError as e:
        raise ConversionError(source, f"gin syntax error: {e.args[0]}") from None
    except RecursionError:
        raise ConversionError(source, "gin values nest too deeply") from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        # gin's parser evaluates literals with ast.literal_eval, which raises these on odd literals
        # (an int of over 4300 digits, an unhashable dict key, ...)
        msg = " ".join(str(e).split())[:200]
        raise ConversionError(source, f"gin value not understood ({type(e).__name__}: {msg})") from None
    return bindings, macros


def _resolve(value: Any, macros: dict[str, Any], source: str, seen: tuple[str, ...] = (),
             budget: list[int] | None = None, depth: int = 0) -> Any:  # fmt: skip
    """``value`` with macros replaced; refuses self-reference, nesting deeper than ``MAX_DEPTH`` and
    expansions past ``MAX_RESOLVED`` values (macros that repeat macros grow exponentially)."""
    budget = [0] if budget is None else budget
    budget[0] += 1
    if budget[0] > MAX_RESOLVED:
        raise ConversionError(source, f"gin values expand to more than {MAX_RESOLVED} items (nested macros)")
    if depth > MAX_DEPTH:
        raise ConversionError(source, f"gin values nest deeper than {MAX_DEPTH} levels")
    if isinstance(value, _Macro):
        if value.name in seen:
            raise ConversionError(source, f"macro %{value.name} refers to itself")
        if value.name not in macros:
            raise ConversionError(source, f"macro %{value.name} is used but never defined")
        return _resolve(macros[value.name], macros, source, (*seen, value.name), budget, depth + 1)
    if isinstance(value, list):
        return [_resolve(v, macros, source, seen, budget, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, macros, source, seen, budget, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, macros, source, seen, budget, depth + 1) for k, v in value.items()}
    return value


def _same_configurable(a: str, b: str) -> bool:
    """gin matches selectors by dotted suffix: ``HyperV2`` and ``hyper_v2.HyperV2`` are the same."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return pa[-n:] == pb[-n:]


def _find_lopt_binding(bindings: list[_Binding], source: str) -> _Binding:
    candidates = [b for b in bindings if b.arg == "lopt" and _same_configurable(b.selector, "run_train")]
    if not candidates:
        raise ConversionError(
            source, "no 'run_train.lopt = @Name()' binding: cannot tell which learned optimizer this is"
        )
    unscoped = [b for b in candidates if not b.scope]
    if unscoped:
        return unscoped[-1]  # gin keeps the last binding of a parameter
    if len({(b.scope, repr(b.value)) for b in candidates}) == 1:
        return candidates[-1]
    found = ", ".join(f"{b.scope}/run_train.lopt (line {b.line})" for b in candidates)
    raise ConversionError(source, f"several scoped run_train.lopt bindings and no unscoped one: {found}")


def parse_optimizer(text: str, *, source: str, known_classes: Iterable[str] | None = None) -> GinOptimizer:
    """The learned optimizer of an operative config (text), with its bindings; see the module docstring.

    ``known_classes``: gin names we can convert; another class in ``run_train.lopt`` is an error.
    """
    bindings, macros = _parse(text, source)
    lopt = _find_lopt_binding(bindings, source)
    ref = _resolve(lopt.value, macros, source)
    if not isinstance(ref, GinReference):
        raise ConversionError(
            source, f"line {lopt.line}: run_train.lopt is {ref!r}, expected a configurable reference @Name()"
        )
    ref_scope, _, selector = ref.name.rpartition("/")
    class_name = selector.rsplit(".", 1)[-1]
    if known_classes is not None:
        known = sorted(set(known_classes))
        if not any(_same_configurable(selector, k) for k in known):
            raise ConversionError(
                source,
                f"line {lopt.line}: unknown learned optimizer class {class_name!r} in run_train.lopt "
                f"(known: {', '.join(known)})",
            )
    scope = "/".join(s for s in (lopt.scope, ref_scope) if s)
    parts = scope.split("/") if scope else []
    applicable = {"/".join(parts[:i]) for i in range(len(parts) + 1)}
    chosen: dict[str, tuple[int, int, Any]] = {}  # arg -> (scope depth, order, value)
    for order, b in enumerate(bindings):
        if b.scope in applicable and _same_configurable(b.selector, selector):
            depth = len(b.scope.split("/")) if b.scope else 0
            if b.arg not in chosen or depth >= chosen[b.arg][0]:
                chosen[b.arg] = (depth, order, b.value)
    resolved = {arg: _resolve(v, macros, source) for arg, (_, _, v) in sorted(chosen.items())}
    return GinOptimizer(class_name, selector, scope, resolved)


def load_optimizer_config(path: str | Path, *, known_classes: Iterable[str] | None = None) -> GinOptimizer:
    """Read ``config.gin`` at ``path`` and return its learned optimizer (see ``parse_optimizer``)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(path, "no such file (the gin config that names the learned optimizer)")
    data = files.read_regular_file(path, max_bytes=MAX_GIN_BYTES, what="gin config", hint="")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(path, "not a gin config (not UTF-8 text)") from None
    return parse_optimizer(text, source=str(path), known_classes=known_classes)


def parse_bindings(text: str, *, source: str) -> dict[str, dict[str, Any]]:
    """Every unscoped-or-scoped binding of a small user ``--config`` file: ``{selector: {arg: value}}``.

    The selector keeps its scope (``scope/Name``); macros are resolved. Used for ``--config file.gin``.
    """
    bindings, macros = _parse(text, source)
    out: dict[str, dict[str, Any]] = {}
    for b in bindings:
        key = f"{b.scope}/{b.selector}" if b.scope else b.selector
        out.setdefault(key, {})[b.arg] = _resolve(b.value, macros, source)
    return out
