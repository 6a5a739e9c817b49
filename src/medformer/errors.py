"""Errors a user can act on: each names the file (or key) and the problem in one sentence."""

from __future__ import annotations

from pathlib import Path


class MedformerError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2, without a traceback."""


class DataError(MedformerError):
    """A problem with one input file or study: `path` says where, `problem` says what."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(MedformerError):
    """An invalid configuration key or value."""
