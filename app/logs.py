"""A run's log files: their names in the run directory and the last lines of the training log.

The worker writes ``train.log`` (the child's stdout and stderr) and the child writes
``error.txt`` (the one-line reason it failed); the UI and the worker's failure report read
them. Kept apart so the UI reads logs without importing the worker.
"""
from __future__ import annotations

import os
from pathlib import Path

LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
TAIL_BYTES = 16384  # enough for the last lines of any log; never read a whole long log


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file; "" when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
