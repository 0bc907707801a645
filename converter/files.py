"""Careful file I/O shared by the converter and the parity tools: atomic writes that respect the umask,
output targets checked before any work, and bounded reads of local sources.

Why: ``tempfile.mkstemp`` creates 0600 files, so an atomic rename used to leave converted files and reports
unreadable by teammates on a shared machine; a ``--force`` rename over a device node replaced the node; an
unwritable output folder was only noticed after the whole conversion; and ``read_bytes`` on ``/dev/zero``
or a FIFO never returns.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionError


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only the fallback
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed over ``path`` with the umask's mode.

    On any exception the temp file is removed and ``path`` is left as it was. The caller writes the temp
    path (by name, e.g. ``safetensors.save_file``), never ``path`` itself.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # after the caller wrote it: some writers (safetensors' save_file) recreate the file as 0600
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), with the umask's mode."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_output(output: str | Path | None, *, force: bool) -> Path:
    """Refuse an output path before any download or decoding; return it as a Path.

    Refused: an empty name; an existing file without ``force``; anything but a regular file as target
    (folder, device, FIFO, socket: ``--force`` must never replace a device node); a parent that is not a
    folder; a folder where a probe file cannot be created (read-only, ``/proc``, no permission).
    """
    if output is None or str(output).strip() == "":
        raise ConversionError("-o/--output", "empty output path; give a .safetensors file name")
    out = Path(output)
    if os.path.lexists(out):
        try:
            st = os.stat(out)
        except OSError as e:
            raise ConversionError(out, f"cannot use as output ({e.strerror})") from None
        if stat.S_ISDIR(st.st_mode):
            raise ConversionError(out, "is a directory; give a .safetensors file name")
        if not stat.S_ISREG(st.st_mode):
            raise ConversionError(
                out, "exists and is not a regular file (device, FIFO or socket); refusing it"
            )
        if not force:
            raise ConversionError(out, "already exists; pass --force to overwrite")
    check_folder(out.parent, name=out)
    return out


def check_folder(folder: str | Path, *, name: str | Path | None = None) -> None:
    """Refuse an output folder (created later if missing) that cannot hold a new file: an existing part
    of it is not a folder, or a probe file cannot be created in its nearest existing ancestor."""
    folder = Path(folder) if str(folder) else Path(".")
    shown = name if name is not None else folder
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConversionError(shown, f"cannot create it: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lopt-convert.", suffix=".probe", dir=existing)
    except OSError as e:
        raise ConversionError(shown, f"cannot write into {existing} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


SOURCE_LIMIT_HINT = " (raise it with --max-source-size or LOPT_BRIDGE_MAX_SOURCE_SIZE)"


def read_regular_file(
    path: Path, *, max_bytes: int, what: str = "file", hint: str = SOURCE_LIMIT_HINT
) -> bytes:
    """The bytes of a regular file no larger than ``max_bytes``; ConversionError for anything else.

    Devices, FIFOs and sockets are refused before reading (``/dev/zero`` would never end).
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise ConversionError(path, f"is a directory, expected a {what}")
            if not stat.S_ISREG(st.st_mode):
                raise ConversionError(
                    path, f"is not a regular file (device, FIFO or socket), expected a {what}"
                )
            if st.st_size > max_bytes:
                raise ConversionError(path, f"is {st.st_size} bytes, over the {max_bytes}-byte limit{hint}")
            # st_size + 1, not max_bytes + 1: read(n) allocates n bytes before reading
            data = f.read(min(st.st_size, max_bytes) + 1)
    except ConversionError:
        raise
    except FileNotFoundError:
        raise ConversionError(path, "no such file") from None
    except IsADirectoryError:
        raise ConversionError(path, f"is a directory, expected a {what}") from None
    except OSError as e:
        raise ConversionError(path, f"cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:  # grew while being read
        raise ConversionError(path, f"is over the {max_bytes}-byte limit{hint}")
    return data
