"""Where HEFT Studio keeps its model cache, database and run artifacts.

One environment variable, ``HEFT_HOME``, decides it; without it ``~/.cache/heft-studio``. The live SQLite
database must sit on a local disk: on a Space, ``/data`` is an attached Storage Bucket (object storage),
which holds the run archive (``storage.archive``), never the data home. Imports only the standard library,
so storage/, heft_core/ and app/ can all use it.
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
