"""``lopt-convert``: convert published learned-optimizer checkpoints to safetensors, inspect and verify them.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the file); 1 any other failure
(network, a verify mismatch).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__, convert, files, registry, sources, writer
from .errors import ConversionError

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
DEBUG_ENV = "LOPT_BRIDGE_DEBUG"


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)  # always a single line
    sys.exit(code)


def _errors_to_exit_codes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """ConversionError -> exit 2; DownloadError / VerifyError -> exit 1; both as one line on stderr.

    Anything else is a bug: one line saying so, exit 1 (``LOPT_BRIDGE_DEBUG=1`` shows the traceback).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConversionError as e:
            _fail(str(e)[:2000], EXIT_BAD_INPUT)
        except (sources.DownloadError, convert.VerifyError) as e:
            _fail(str(e)[:2000], EXIT_FAILURE)
        except click.ClickException:
            raise
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(
                f"internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug in lopt-convert, "
                f"please report it (set {DEBUG_ENV}=1 for the traceback)",
                EXIT_FAILURE,
            )

    return wrapper


def _source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options for reading a source: cache refresh and the size cap."""
    fn = click.option(
        "--max-source-size",
        "max_source_size",
        metavar="SIZE",
        default=None,
        help="Refuse sources larger than SIZE (e.g. 2G; default $LOPT_BRIDGE_MAX_SOURCE_SIZE or 1G).",
    )(fn)
    fn = click.option(
        "--refresh", is_flag=True, help="Ask the server again instead of using a cached download."
    )(fn)
    return fn


def _output_path(output: str | None, default_name: str, force: bool) -> Path:
    """``-o`` checked before any download (``-o ''`` is refused, not the default)."""
    return files.check_output(_default_output(default_name) if output is None else output, force=force)


def _known_sha(src: str, fallback: str | None = None) -> str | None:
    """The registry's sha256 for a remote source it knows (any entry), else ``fallback``."""
    try:
        return registry.load().sha256_for(src) or fallback
    except (OSError, ValueError):
        return fallback


def _known_sets(src: str) -> tuple[str, ...]:
    """The registry's ``sets`` for a remote source it knows (a config-less hub file), else none."""
    try:
        entry = registry.load().entry_for(src)
    except (OSError, ValueError):
        return ()
    return entry.sets if entry is not None else ()


def _conversion_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every conversion subcommand takes."""
    options = [
        click.option("-o", "--output", metavar="FILE", help="Output .safetensors file."),
        click.option("--force", is_flag=True, help="Overwrite an existing output file."),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override one constructor argument (gin value syntax), or architecture=NAME. Repeatable.",
        ),
        click.option(
            "--config",
            "config_file",
            metavar="FILE.gin",
            help="A .gin file with bindings (or an operative config with run_train.lopt).",
        ),
        click.option(
            "--allow-pickle", is_flag=True, help="Allow reading a pickle (runs code from the file)."
        ),
        click.option(
            "--allow-nonfinite", is_flag=True, help="Keep NaN/Inf weights instead of refusing them."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return _source_options(fn)


def _default_output(name: str) -> Path:
    return Path.cwd() / "checkpoints" / f"{name}.safetensors"


def _report(path: Path, source: str) -> None:
    conv = writer.read(path)
    values = sum(int(a.size) for a in conv.tensors.values())
    click.echo(
        f"wrote {path} ({conv.architecture}, {len(conv.tensors)} tensors, {values} values) from {source}"
    )


class _OneLineGroup(click.Group):
    """Usage errors as one stderr line too (click prints a usage block), same exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare ``lopt-convert``: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.UsageError) and ctx else ""
            _fail(f"{where}{e.format_message()}{hint}", e.exit_code)
        except click.Abort:
            _fail("aborted", EXIT_FAILURE)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=_OneLineGroup,
    context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 110, "max_content_width": 110},
    epilog="\b\nExamples:\n  lopt-convert velo\n  lopt-convert celo -o celo.safetensors\n"
    "  lopt-convert auto --source hf://amoudgl/celo/theta.state -o celo.safetensors\n"
    "  lopt-convert inspect checkpoints/velo.safetensors",
)
@click.version_option(__version__, prog_name="lopt-convert")
def main() -> None:
    """Convert published learned-optimizer checkpoints (JAX/flax) to safetensors for lopt-bridge."""


def _registry_command(entry: registry.Entry) -> click.Command:
    example = f"lopt-convert {entry.name}" if entry.source else f"lopt-convert {entry.name} --source PATH"
    if entry.format == "pickle":
        example += " --allow-pickle"
    help_text = f"{entry.title}.\n\nDefault source: {entry.source or '(none published: give --source)'}"
    if not entry.supported:
        help_text = f"(not supported) {entry.title}.\n\n{entry.note}"

    @click.command(
        name=entry.name,
        help=help_text,
        short_help=("(not supported) " if not entry.supported else "") + entry.title,
        epilog=f"\b\nExample:\n  {example}",
    )
    @click.option(
        "--source", metavar="SRC", help="Path, https://, gs:// or hf:// URI (default: the registry's)."
    )
    @_conversion_options
    @_errors_to_exit_codes
    def command(source: str | None, output: str | None, force: bool, sets: tuple[str, ...],
                config_file: str | None, allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
                max_source_size: str | None) -> None:  # fmt: skip
        if not entry.supported:
            raise ConversionError(entry.name, f"not supported: {entry.note}")
        src = source or entry.source
        if src is None:
            raise click.UsageError(f"{entry.name}: no published file; give --source PATH")
        limit = sources.max_source_bytes(max_source_size)
        out = _output_path(output, entry.name, force)
        sha = entry.sha256 if src == entry.source else _known_sha(src)
        path = convert.convert_source(
            src,
            out,
            architecture=entry.architecture or None,
            sets=list(sets),
            config_file=config_file,
            force=force,
            allow_pickle=allow_pickle,
            allow_nonfinite=allow_nonfinite,
            expected_sha256=sha,
            fallback_sets=entry.sets,
            refresh=refresh,
            max_bytes=limit,
        )
        _report(path, src)

    return command


def _register_registry_commands() -> None:
    try:
        reg = registry.load()
    except (OSError, ValueError) as e:  # a broken registry must not take the other commands down
        click.echo(f"warning: registry not loaded: {e}", err=True)
        return
    for entry in reg.entries:
        main.add_command(_registry_command(entry))


@main.command(
    epilog="\b\nExample:\n  lopt-convert auto --source ./my_run/params -o my_lopt.safetensors",
)
@click.option("--source", required=True, metavar="SRC", help="Path, https://, gs:// or hf:// URI.")
@_conversion_options
@_errors_to_exit_codes
def auto(source: str, output: str | None, force: bool, sets: tuple[str, ...], config_file: str | None,
         allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
         max_source_size: str | None) -> None:  # fmt: skip
    """Convert any supported checkpoint, detecting its architecture (config.gin, --set, or the tree).

    A source the registry knows is checked against the registry's sha256 and, being config-less, gets the
    registry's bindings (e.g. velo-s's ff_mult=1.0), as its subcommand would.
    """
    limit = sources.max_source_bytes(max_source_size)
    if output is not None:
        files.check_output(output, force=force)
    else:  # the file name comes from the architecture found; its folder can be checked now
        files.check_folder(_default_output("x").parent)
    spec, provenance = convert.load_source(
        source, sets=list(sets), config_file=config_file, allow_pickle=allow_pickle,
        expected_sha256=_known_sha(source), refresh=refresh, max_bytes=limit,
        fallback_sets=_known_sets(source),
    )  # fmt: skip
    out = _output_path(output, spec.name, force)
    path = writer.write(spec, out, provenance, force=force, allow_nonfinite=allow_nonfinite)
    _report(path, source)


@main.command(
    "lo-pretrained",
    epilog="\b\nExample:\n  lopt-convert lo-pretrained \\\n"
    "    aug26_aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_1397",
)
@click.argument("name")
@_conversion_options
@_errors_to_exit_codes
def lo_pretrained(name: str, output: str | None, force: bool, sets: tuple[str, ...], config_file: str | None,
                  allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
                  max_source_size: str | None) -> None:  # fmt: skip
    """Convert one of learned_optimization's pretrained runs (pretrained_optimizers.opt_names) by NAME."""
    try:
        entry = registry.load().lo_pretrained(name)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="NAME") from None
    limit = sources.max_source_bytes(max_source_size)
    out = _output_path(output, name, force)
    path = convert.convert_source(
        entry.uris[0],
        out,
        sets=list(sets),
        config_file=config_file,
        force=force,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        refresh=refresh,
        max_bytes=limit,
    )
    _report(path, entry.uris[0])


@main.command(epilog="\b\nExample:\n  lopt-convert inspect checkpoints/celo.safetensors --json")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_errors_to_exit_codes
def inspect(file: str, as_json: bool) -> None:
    """Show a converted file's architecture, config, tensor table and provenance."""
    info = writer.describe(writer.read(file))
    click.echo(json.dumps(info, indent=1) if as_json else writer.format_description(info))


@main.command(
    epilog="\b\nExample:\n  lopt-convert verify checkpoints/celo.safetensors --source hf://amoudgl/celo/theta.state"
)
@click.argument("file")
@click.option("--source", metavar="SRC", help="The original checkpoint (default: the recorded source_uri).")
@click.option(
    "--fetch-recorded-source",
    is_flag=True,
    help="Allow downloading the remote source_uri recorded in FILE (a file can name any URL).",
)
@click.option("--allow-pickle", is_flag=True, help="Allow reading a pickle source.")
@_source_options
@_errors_to_exit_codes
def verify(file: str, source: str | None, fetch_recorded_source: bool, allow_pickle: bool, refresh: bool,
           max_source_size: str | None) -> None:  # fmt: skip
    """Re-read the source and check every tensor of FILE bit for bit (and the recorded transforms).

    Without --source the source_uri recorded in FILE is used; a remote one is fetched only with
    --fetch-recorded-source, because the metadata of a file you were sent can name any URL.
    """
    limit = sources.max_source_bytes(max_source_size)
    src = source
    if src is None:
        recorded = writer.read(file).metadata.get("source_uri")
        if not recorded:
            raise click.UsageError("the file records no source_uri; give --source")
        if sources.is_remote(recorded):
            sources.parse_remote(recorded)  # a malformed recorded URL is refused before anything else
            if not fetch_recorded_source:
                raise ConversionError(
                    file,
                    f"records the remote source {recorded}; verify downloads a URL taken from a file only "
                    "with --fetch-recorded-source (or give --source PATH_OR_URL)",
                )
        src = recorded
    summary = convert.verify(file, src, allow_pickle=allow_pickle, refresh=refresh, max_bytes=limit)
    click.echo(
        f"ok: {summary['file']} matches {summary['source']} bit for bit "
        f"({summary['architecture']}, {summary['tensors']} tensors, {summary['values']} values)"
    )


@main.command("list", epilog="\b\nExample:\n  lopt-convert list")
def list_checkpoints() -> None:
    """List the checkpoints in the registry."""
    reg = registry.load()
    width = max(len(e.name) for e in reg.entries)
    for e in reg.entries:
        flag = "" if e.supported else "  (not supported)"
        click.echo(f"{e.name:<{width}}  {e.architecture:<13} {e.format:<14} {e.source or '-'}{flag}")
    click.echo(f"... and {len(reg.lo_names)} learned_optimization runs: lopt-convert lo-pretrained NAME")


_register_registry_commands()
