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

from . import __version__, convert, files, pylo_format, registry, sources, writer
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


def _known_entry(src: str) -> registry.Entry | None:
    """The registry entry whose weights file is the remote source ``src`` (URIs compared normalised), if any:
    its sha256 is checked and, for a config-less hub file, its ``sets`` bound, as its subcommand would."""
    try:
        return registry.load().entry_for(src)
    except (OSError, ValueError):
        return None


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
    "  lopt-convert pylo --source hf://Pauljanson002/VeLO_RNN --source hf://Pauljanson002/VeLO_MLP\n"
    "  lopt-convert export-pylo checkpoints/velo.safetensors -o pylo_velo\n"
    "  lopt-convert inspect checkpoints/velo.safetensors",
)
@click.version_option(__version__, prog_name="lopt-convert")
def main() -> None:
    """Convert published learned-optimizer checkpoints (JAX/flax, PyLO) to safetensors for lopt-bridge."""


def _registry_command(entry: registry.Entry) -> click.Command:
    example = f"lopt-convert {entry.name}" if entry.source else f"lopt-convert {entry.name} --source PATH"
    if entry.format == "pickle":
        example += " --allow-pickle"
    default = " + ".join(entry.uris) if entry.format == "pylo" else entry.source
    help_text = f"{entry.title}.\n\nDefault source: {default or '(none published: give --source)'}"
    if not entry.supported:
        help_text = f"(not supported) {entry.title}.\n\n{entry.note}"

    @click.command(
        name=entry.name,
        help=help_text,
        short_help=("(not supported) " if not entry.supported else "") + entry.title,
        epilog=f"\b\nExample:\n  {example}",
    )
    @click.option(
        "--source",
        "source",
        multiple=True,
        metavar="SRC",
        help="Path, https://, gs:// or hf:// URI (default: the registry's); PyLO repos: one --source each.",
    )
    @_conversion_options
    @_errors_to_exit_codes
    def command(source: tuple[str, ...], output: str | None, force: bool, sets: tuple[str, ...],
                config_file: str | None, allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
                max_source_size: str | None) -> None:  # fmt: skip
        if not entry.supported:
            raise ConversionError(entry.name, f"not supported: {entry.note}")
        srcs = list(source) or (list(entry.uris) if entry.format == "pylo" else [entry.source or ""])
        if not srcs[0]:
            raise click.UsageError(f"{entry.name}: no published file; give --source PATH")
        limit = sources.max_source_bytes(max_source_size)
        if all(pylo_format.is_pylo_source(s) for s in srcs):
            out = _output_path(output, entry.name, force)
            _convert_pylo(srcs, out, entry.architecture or None, sets, config_file, force, allow_nonfinite,
                          refresh, limit)  # fmt: skip
            return
        if len(srcs) != 1:
            raise click.UsageError(
                f"{entry.name}: several --source are only for PyLO repos (hf://owner/repo)"
            )
        src = srcs[0]
        out = _output_path(output, entry.name, force)
        known = entry if src == entry.source else _known_entry(src)
        sha = known.sha256 if known is not None else None
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


def _convert_pylo(srcs: list[str], out: Path | None, architecture: str | None, sets: tuple[str, ...],
                  config_file: str | None, force: bool, allow_nonfinite: bool, refresh: bool,
                  limit: int) -> None:  # fmt: skip
    """PyLO repos -> our file (``out`` None: ``checkpoints/<architecture>-pylo.safetensors``)."""
    if config_file is not None:
        raise click.UsageError("--config is for gin-configured checkpoints; PyLO repos take --set KEY=VALUE")
    if out is None:  # the file name comes from the architecture found; its folder can be checked now
        files.check_folder(_default_output("x").parent)
    spec, provenance = pylo_format.load(
        srcs, architecture=architecture, sets=convert.parse_sets(list(sets)), max_bytes=limit, refresh=refresh
    )
    out = out if out is not None else _output_path(None, f"{spec.name}-pylo", force)
    path = writer.write(spec, out, provenance, force=force, allow_nonfinite=allow_nonfinite)
    _report(path, provenance.source_uri)


def _register_registry_commands() -> None:
    try:
        reg = registry.load()
    except (OSError, ValueError) as e:  # a broken registry must not take the other commands down
        click.echo(f"warning: registry not loaded: {e}", err=True)
        return
    for entry in reg.entries:
        main.add_command(_registry_command(entry))


@main.command(
    epilog="\b\nExamples:\n  lopt-convert auto --source ./my_run/params -o my_lopt.safetensors\n"
    "  lopt-convert auto --source hf://btherien/mulo -o mulo.safetensors",
)
@click.option(
    "--source",
    "source",
    required=True,
    multiple=True,
    metavar="SRC",
    help="Path, https://, gs:// or hf:// URI; PyLO repos (hf://owner/repo or a folder): one --source each.",
)
@_conversion_options
@_errors_to_exit_codes
def auto(source: tuple[str, ...], output: str | None, force: bool, sets: tuple[str, ...],
         config_file: str | None, allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
         max_source_size: str | None) -> None:  # fmt: skip
    """Convert any supported checkpoint, detecting its architecture (config.gin, --set, or the tree).

    PyLO's format (model.safetensors + config.json, a folder or hf://owner/repo) is recognised and its map
    found from the tensors. A source the registry knows is checked against the registry's sha256 and, being
    config-less, gets the registry's bindings (e.g. velo-s's ff_mult=1.0), as its subcommand would.
    """
    limit = sources.max_source_bytes(max_source_size)
    srcs = list(source)
    if all(pylo_format.is_pylo_source(s) for s in srcs):
        out = files.check_output(output, force=force) if output is not None else None
        _convert_pylo(srcs, out, None, sets, config_file, force, allow_nonfinite, refresh, limit)
        return
    if len(srcs) != 1:
        raise click.UsageError("several --source are only for PyLO repos (hf://owner/repo or a folder)")
    src = srcs[0]
    if output is not None:
        files.check_output(output, force=force)
    else:  # the file name comes from the architecture found; its folder can be checked now
        files.check_folder(_default_output("x").parent)
    known = _known_entry(src)
    spec, provenance = convert.load_source(
        src, sets=list(sets), config_file=config_file, allow_pickle=allow_pickle,
        expected_sha256=known.sha256 if known is not None else None, refresh=refresh, max_bytes=limit,
        fallback_sets=known.sets if known is not None else (),
    )  # fmt: skip
    out = _output_path(output, spec.name, force)
    path = writer.write(spec, out, provenance, force=force, allow_nonfinite=allow_nonfinite)
    _report(path, src)


@main.command(
    epilog="\b\nExamples:\n  lopt-convert pylo --source hf://Pauljanson002/VeLO_RNN "
    "--source hf://Pauljanson002/VeLO_MLP\n  lopt-convert pylo --source ./my_pylo_folder -o mine.safetensors",
)
@click.option(
    "--source",
    "source",
    required=True,
    multiple=True,
    metavar="REPO",
    help="A PyLO repo: hf://owner/repo[@revision] or a folder with model.safetensors + config.json. "
    "Repeat for optimizers stored in several repos (VeLO: VeLO_RNN and VeLO_MLP, in any order).",
)
@_conversion_options
@_errors_to_exit_codes
def pylo(source: tuple[str, ...], output: str | None, force: bool, sets: tuple[str, ...],
         config_file: str | None, allow_pickle: bool, allow_nonfinite: bool, refresh: bool,
         max_source_size: str | None) -> None:  # fmt: skip
    """Convert learned-optimizer weights in PyLO's Hugging Face format (model.safetensors + config.json).

    The architecture comes from the tensors (PyLO maps: docs/formats.md); --set KEY=VALUE changes an
    option that PyLO passes as an optimizer argument (e.g. step_mult), --set architecture=NAME picks a map.
    """
    limit = sources.max_source_bytes(max_source_size)
    out = files.check_output(output, force=force) if output is not None else None
    _convert_pylo(list(source), out, None, sets, config_file, force, allow_nonfinite, refresh, limit)


@main.command(
    "export-pylo",
    epilog="\b\nExample:\n  lopt-convert export-pylo checkpoints/velo.safetensors -o pylo_velo/\n"
    "  # then in PyLO:\n"
    "  #   VeLO_naive(params, hf_key_rnn='pylo_velo/VeLO_RNN', hf_key_mlp='pylo_velo/VeLO_MLP', lr=1.0)",
)
@click.argument("file")
@click.option(
    "-o", "--output", required=True, metavar="DIR", help="Folder to write one folder per PyLO repo into."
)
@click.option("--force", is_flag=True, help="Overwrite files already in the repo folders.")
@_errors_to_exit_codes
def export_pylo(file: str, output: str, force: bool) -> None:
    """Write a converted FILE in PyLO's format (model.safetensors + config.json per repo) for PyLO.

    Refused, with the reason, when PyLO has no port of the architecture (Celo, Celo-Adam) or cannot run this
    checkpoint exactly (an option PyLO does not implement). pylo_optimizer.json beside the files records the
    PyLO call with the arguments the checkpoint needs; `lopt-convert pylo` reads it back.
    """
    done = pylo_format.export(file, output, force=force)
    folders = ", ".join(f"{f} ({c})" for f, c in zip(done.folders, done.model_classes, strict=True))
    click.echo(f"wrote {folders} from {file} ({done.architecture})")
    click.echo(f"run it in PyLO with: {done.call}")


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
@click.option(
    "--source",
    "source",
    multiple=True,
    metavar="SRC",
    help="The original checkpoint (default: the recorded source_uri); PyLO repos: one --source each.",
)
@click.option(
    "--fetch-recorded-source",
    is_flag=True,
    help="Allow downloading the remote source_uri recorded in FILE (a file can name any URL).",
)
@click.option("--allow-pickle", is_flag=True, help="Allow reading a pickle source.")
@_source_options
@_errors_to_exit_codes
def verify(file: str, source: tuple[str, ...], fetch_recorded_source: bool, allow_pickle: bool, refresh: bool,
           max_source_size: str | None) -> None:  # fmt: skip
    """Re-read the source and check every tensor of FILE bit for bit (and the recorded transforms).

    Without --source the source_uri recorded in FILE is used; a remote one is fetched only with
    --fetch-recorded-source, because the metadata of a file you were sent can name any URL.
    """
    limit = sources.max_source_bytes(max_source_size)
    conv = writer.read(file)
    if conv.metadata.get("source_format") == pylo_format.SOURCE_FORMAT:
        srcs = list(source) or pylo_format.recorded_sources(conv)
        if not source:
            for recorded in srcs:
                _check_recorded(file, recorded, fetch_recorded_source)
        summary = pylo_format.verify(file, srcs, max_bytes=limit, refresh=refresh)
    else:
        if len(source) > 1:
            raise click.UsageError("several --source are only for files converted from PyLO repos")
        src = source[0] if source else None
        if src is None:
            recorded = conv.metadata.get("source_uri")
            if not recorded:
                raise click.UsageError("the file records no source_uri; give --source")
            _check_recorded(file, recorded, fetch_recorded_source)
            src = recorded
        summary = convert.verify(file, src, allow_pickle=allow_pickle, refresh=refresh, max_bytes=limit)
    click.echo(
        f"ok: {summary['file']} matches {summary['source']} bit for bit "
        f"({summary['architecture']}, {summary['tensors']} tensors, {summary['values']} values)"
    )


def _check_recorded(file: str, recorded: str, fetch_recorded_source: bool) -> None:
    """A remote source recorded in a file is fetched only with --fetch-recorded-source."""
    if sources.is_remote(recorded):
        if recorded.lower().startswith("hf://") and pylo_format.is_pylo_source(recorded):
            pylo_format.locate(recorded)  # a malformed recorded repo is refused before anything else
        else:
            sources.parse_remote(recorded)  # a malformed recorded URL is refused before anything else
        if not fetch_recorded_source:
            raise ConversionError(
                file,
                f"records the remote source {recorded}; verify downloads a URL taken from a file only "
                "with --fetch-recorded-source (or give --source PATH_OR_URL)",
            )


@main.command("list", epilog="\b\nExample:\n  lopt-convert list")
def list_checkpoints() -> None:
    """List the checkpoints in the registry."""
    reg = registry.load()
    width = max(len(e.name) for e in reg.entries)
    for e in reg.entries:
        flag = "" if e.supported else "  (not supported)"
        shown = " + ".join(e.uris) if e.format == "pylo" else e.source
        click.echo(f"{e.name:<{width}}  {e.architecture:<13} {e.format:<14} {shown or '-'}{flag}")
    click.echo(f"... and {len(reg.lo_names)} learned_optimization runs: lopt-convert lo-pretrained NAME")


_register_registry_commands()
