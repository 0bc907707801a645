"""Errors the converter raises: each names the offending file and says what is wrong in one line."""

from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """Bad input: the CLI prints ``str(err)`` on one line and exits with code 2."""

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = str(source) if source is not None else None
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)
