"""One error hierarchy: every problem a user can fix is a :class:`HeftError`.

Edges (CLI, API, UI handlers, the training child) catch ``HeftError`` alone and show its
message; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class HeftError(Exception):
    """A problem the user can fix (bad option, missing file, unknown run). The message says what."""


class ConfigError(HeftError, ValueError):
    """A configuration value outside its allowed range. The message names the option."""

    def __init__(self, option: str, message: str):
        self.option = option
        self.detail = message
        super().__init__(f"{option}: {message}")


class DataError(HeftError, ValueError):
    """A data source that cannot be read; the message names the file, row and column."""


class ModelLoadError(HeftError, RuntimeError):
    """A base model that cannot be loaded (unknown id, unreachable hub, damaged cache)."""


class RunLoadError(HeftError, RuntimeError):
    """A run directory that cannot be read back."""


class RunNotFound(HeftError, ValueError):
    """A run id that is malformed or names no run."""


class RunStateError(HeftError, ValueError):
    """A run action its current status does not allow (re-queue or delete a running run, resume a finished one)."""


class StoreError(HeftError, RuntimeError):
    """The run database cannot be used (foreign file, newer schema, damaged)."""


class AskError(HeftError, ValueError):
    """A question the Ask service cannot answer as posed (empty text, wrong run kind)."""


class ExportError(HeftError, ValueError):
    """A run that cannot be exported or pushed as asked (format, output directory, repo id, token)."""


class StudyDirError(HeftError, ValueError):
    """A study directory that cannot be imported (incomplete, altered after it was written, another version)."""
