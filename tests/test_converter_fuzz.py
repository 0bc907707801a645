"""Issue #12.4: hypothesis fuzzing of the msgpack decoder, the gin reader, the pickle reader and the whole
``convert_source`` entry point: any exception other than ``converter.errors.ConversionError`` is a failure.

Budget: ``LOPT_FUZZ_SECONDS`` in total (default 60, split evenly over the four targets); each target runs
fresh hypothesis searches until its share is spent, and the test prints how many cases it ran. A longer
local run: ``LOPT_FUZZ_SECONDS=1800 python -m pytest tests/test_converter_fuzz.py -s``. A failing input is
saved (the shortest per exception site) to ``$LOPT_FUZZ_CRASH_DIR`` (default: the test's temp folder) as
``<target>-<sha8>.<ext>``; copy it into tests/data/fuzz_corpus/, where ``test_fuzz_corpus_replays`` runs
every file through its target forever after. The input being run is also written to
``last-<target>.<ext>`` there first, so a segfault leaves it behind. Warnings count as findings (a
warning is a second stderr line). ``LOPT_FUZZ_KEEP_GOING=1`` keeps searching after a finding.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lopt_bridge.converter import architectures, convert, flax_msgpack, gin_config
from lopt_bridge.converter.errors import ConversionError

architectures.all_architectures()  # import every family module now, not under the fuzzer's warning filter

DATA = Path(__file__).parent / "data"
MULO_PICKLE = Path(__file__).parents[1] / "parity_tests" / "fixtures" / "mulo_pylo" / "checkpoint"
MULO_PICKLE = MULO_PICKLE / "global_step1.pickle"
CORPUS = DATA / "fuzz_corpus"
TOTAL_SECONDS = float(os.environ.get("LOPT_FUZZ_SECONDS", "60"))
#: LOPT_FUZZ_KEEP_GOING=1: after a finding, keep searching for others until the time is spent.
KEEP_GOING = os.environ.get("LOPT_FUZZ_KEEP_GOING") == "1"
SEEDS = {
    "msgpack": [
        (DATA / "lo" / "velo_small" / "params").read_bytes(),
        (DATA / "lo" / "velo_small_bf16.theta.state").read_bytes(),
        (DATA / "flax" / "chunked.msgpack").read_bytes(),
        (DATA / "adafac" / "celo_adafac_theta.state").read_bytes(),
    ],
    "gin": [
        (DATA / "lo" / "velo_small" / "config.gin").read_bytes(),
        (DATA / "gin" / "adafac_config.gin").read_bytes(),
    ],
    "pickle": [
        MULO_PICKLE.read_bytes(),
        pickle.dumps(
            {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.float32(1), (1, 2)]}, protocol=4
        ),
    ],
}
EXT = {"msgpack": "msgpack", "gin": "gin", "pickle": "pkl", "convert": "bin"}


# --------------------------------------------------------------------------------------- targets


def target_msgpack(data: bytes, tmp: Path) -> None:
    flax_msgpack.decode(data, source="fuzz")


def target_gin(data: bytes, tmp: Path) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        gin_config.parse_optimizer(text, source="fuzz.gin", known_classes=["HyperV2", "AdafacMLPLOpt"])
    except ConversionError:
        pass
    gin_config.parse_bindings(text, source="fuzz.gin")


def target_pickle(data: bytes, tmp: Path) -> None:
    convert._load_pickle(Path("fuzz.pkl"), data)


def target_convert(data: bytes, tmp: Path) -> None:
    """The whole entry point on a file: format detection, decoding, architecture detection and build."""
    src = tmp / ("theta.pkl" if convert.is_pickle(data) else "theta.state")
    src.write_bytes(data)
    out = tmp / "out.safetensors"
    for sets in ([], ["architecture=velo", "use_bugged_loss_features=False"], ["architecture=small_fc_lopt"]):
        try:
            convert.convert_source(str(src), out, sets=sets, force=True, allow_pickle=True)
        except ConversionError:
            pass


TARGETS: dict[str, Callable[[bytes, Path], None]] = {
    "msgpack": target_msgpack,
    "gin": target_gin,
    "pickle": target_pickle,
    "convert": target_convert,
}


# --------------------------------------------------------------------------------------- strategies


def _seed(kind: str) -> st.SearchStrategy[bytes]:
    """One of the seed files (by index, so a failure report does not print every seed's bytes)."""
    seeds = SEEDS[kind] if kind != "convert" else SEEDS["msgpack"] + SEEDS["pickle"]
    return st.integers(0, len(seeds) - 1).map(seeds.__getitem__)


def _mutate(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: overwrite, insert, delete or truncate."""
    data = bytearray(seed)
    for kind, pos, value in edits:
        if not data:
            break
        pos %= len(data)
        if kind == 0:
            data[pos] = value
        elif kind == 1:
            data.insert(pos, value)
        elif kind == 2:
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


_edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=16),
    st.builds(
        lambda shape, dt, n: msgpack.ExtType(1, msgpack.packb((shape, dt, b"\0" * n), use_bin_type=True)),
        st.lists(st.integers(0, 2**63), max_size=4),
        st.sampled_from(["float32", "bfloat16", "int8", "x"]),
        st.integers(0, 64),
    ),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
)
_tree = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(), st.binary(max_size=4)), children, max_size=4
        ),
    ),
    max_leaves=30,
)


def _packed(tree: object) -> bytes:
    try:
        return msgpack.packb(tree, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return b""


def _pickled(tree: object) -> bytes:
    try:
        return pickle.dumps(tree, protocol=4)
    except (pickle.PicklingError, TypeError, ValueError, RecursionError):
        return b""


_gin_atoms = st.sampled_from(
    [
        "run_train.lopt = @HyperV2()\n",
        "HyperV2.lstm_hidden_size = ",
        "AdafacMLPLOpt.hidden_layers = ",
        "M = ",
        "%M",
        "@HyperV2()",
        "scope/",
        "include 'x.gin'\n",
        "import a.b\n",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "'s'",
        '"',
        "1e999",
        "-1",
        "0x10",
        "True",
        "None",
        "\\\n",
        "\n",
        " ",
        "#",
        "=",
        ".",
        "9" * 30,
    ]
)

STRATEGIES = {
    "msgpack": st.one_of(
        st.binary(max_size=256),
        st.builds(_packed, _tree),
        st.builds(_mutate, _seed("msgpack"), _edits),
    ),
    "gin": st.one_of(
        st.builds("".join, st.lists(_gin_atoms, max_size=40)).map(str.encode),
        st.builds(_mutate, _seed("gin"), _edits),
        st.text(max_size=200).map(str.encode),
    ),
    "pickle": st.one_of(
        st.builds(_mutate, _seed("pickle"), _edits),
        st.binary(max_size=128).map(lambda b: b"\x80\x04" + b),
        st.builds(_pickled, _tree),
    ),
    "convert": st.one_of(
        st.builds(_mutate, _seed("convert"), _edits),
        st.builds(_packed, _tree),
    ),
}


# --------------------------------------------------------------------------------------- runner


def _site(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{type(exc).__name__}@{Path(last.filename).name}:{last.lineno}" if last else type(exc).__name__


def fuzz(name: str, seconds: float, tmp: Path, crash_dir: Path) -> int:
    """Run hypothesis searches on target ``name`` for ``seconds``; return the number of cases tried."""
    target, strategy = TARGETS[name], STRATEGIES[name]
    crashes: dict[str, bytes] = {}
    count = 0
    crash_dir.mkdir(parents=True, exist_ok=True)
    last = crash_dir / f"last-{name}.{EXT[name]}"

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(data: bytes) -> None:
        nonlocal count
        count += 1
        last.write_bytes(data)  # survives a segfault, which no except clause catches
        try:
            target(data, tmp)
        except ConversionError:
            pass
        except Exception as e:  # anything else is a finding: keep the shortest input per site
            site = _site(e)
            if site not in crashes or len(data) < len(crashes[site]):
                crashes[site] = data
            raise

    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # a warning is a second stderr line: a finding too
                    one()
            except Exception:
                if not KEEP_GOING:
                    raise
        if crashes:
            pytest.fail(f"fuzz {name}: {len(crashes)} finding(s): {', '.join(sorted(crashes))}")
    finally:
        for site, data in crashes.items():
            crash_dir.mkdir(parents=True, exist_ok=True)
            path = crash_dir / f"{name}-{hashlib.sha256(data).hexdigest()[:8]}.{EXT[name]}"
            path.write_bytes(data)
            print(f"fuzz {name}: {site}: saved {path}")
    return count


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(name, tmp_path, capsys):
    crash_dir = Path(os.environ.get("LOPT_FUZZ_CRASH_DIR", tmp_path / "crashes"))
    count = fuzz(name, TOTAL_SECONDS / len(TARGETS), tmp_path, crash_dir)
    with capsys.disabled():
        seconds = TOTAL_SECONDS / len(TARGETS)
        print(f"\nfuzz {name}: {count} cases in {seconds:.0f} s, no exception but ConversionError")
    assert count > 0


def _corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*") if p.suffix != ".md") if CORPUS.is_dir() else []


@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: p.name)
def test_fuzz_corpus_replays(path, tmp_path):
    """Every input the fuzzer ever broke the converter with: only ConversionError (or success) now."""
    name = path.name.split("-", 1)[0]
    assert name in TARGETS, f"{path.name}: the file name must start with a target ({', '.join(TARGETS)})"
    try:
        TARGETS[name](path.read_bytes(), tmp_path)
    except ConversionError:
        pass


def test_fuzz_corpus_is_not_empty():
    """The corpus holds the fuzzer's findings; an empty folder would make the replay test vacuous."""
    assert _corpus_files(), f"{CORPUS} is empty"
