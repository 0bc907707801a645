"""The test-suite conventions of tests/conftest.py and pyproject.toml: `gpu` tests skip with a reason where
there is no CUDA device (and run where there is one); markers are strict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = """
import pytest

@pytest.mark.gpu
def test_needs_cuda():
    assert False, "ran"

def test_plain():
    pass
"""


def _run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    gpu: needs CUDA\n    slow: long\n")
    pytester.makepyfile(source)
    return pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")


def test_gpu_tests_skip_with_the_reason_without_cuda(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _run(pytester, TESTS)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA device (torch.cuda.is_available() is False)*"])


def test_gpu_tests_run_where_there_is_cuda(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _run(pytester, TESTS).assert_outcomes(passed=1, failed=1)  # it ran (and failed on purpose)


def test_an_unregistered_marker_is_an_error(pytester):
    result = _run(pytester, "import pytest\n\n@pytest.mark.slwo\ndef test_typo():\n    pass\n")
    result.assert_outcomes(errors=1)


def test_pyproject_registers_the_markers_strictly(pytestconfig):
    names = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"slow", "gpu"} <= names
    assert "--strict-markers" in pytestconfig.getini("addopts")
