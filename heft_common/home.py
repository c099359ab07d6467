"""Where HEFT Studio keeps its model cache, database and run artifacts.

One environment variable, ``HEFT_HOME``, decides it. Without it: ``/data/heft-studio`` on a
Hugging Face Space with persistent storage (``/data`` exists and is writable), else
``~/.cache/heft-studio``. Imports only the standard library, so storage/, heft_core/ and app/ can all use it.
"""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "HEFT_HOME"


def data_home() -> Path:
    """The data home directory, created if missing."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        home = Path(configured).expanduser()
    elif os.path.isdir("/data") and os.access("/data", os.W_OK):
        home = Path("/data/heft-studio")
    else:
        home = Path("~/.cache/heft-studio").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    path = data_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = data_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path() -> Path:
    return data_home() / "heft.db"
