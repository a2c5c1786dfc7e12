"""Errors that the CLI turns into one line and exit code 2.

Every error names the file it is about, so a user with twenty files in a zoo
knows which one is broken without a traceback.
"""
from __future__ import annotations

import os


class SmolqError(Exception):
    """Base class: a problem with the user's input or request, not a bug."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class FormatError(SmolqError):
    """A file's bytes do not follow the format it claims (or any we know)."""


class InputError(SmolqError):
    """A request smolq cannot honour: unknown architecture, missing shard, bad option."""
