"""What the registry's query modules share: run-id validation, JSON and field checks, detached sessions,
artifact-directory paths (stored relative to the data home), the table handles and the one conditional
run update."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Engine, update
from sqlmodel import Session

from heft_common.errors import RunNotFound
from heft_common.home import data_home as current_data_home
from heft_common.vocabulary import RunStatus
from storage.models import EpochEval, Run, StepMetric

_RUN = Run.__table__
_STEP = StepMetric.__table__
_EVAL = EpochEval.__table__

MAX_RUN_ID = 2**63 - 1  # SQLite's largest integer: a larger "id" names no run and must not reach the driver


def validate_run_id(value: Any) -> int:
    """Return ``value`` as a positive int run id.

    Accepts an int, a string of digits (surrounding spaces allowed) or an integral float
    (Gradio number inputs deliver floats). Raises :class:`RunNotFound` (a ValueError) otherwise.
    """
    result: Optional[int] = None
    if isinstance(value, bool):
        result = None  # bool is an int subclass; True is not run 1
    elif isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= MAX_RUN_ID:
        result = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii() and len(value.strip()) <= 19:
        result = int(value.strip())
    if result is None or not 0 < result <= MAX_RUN_ID:
        raise RunNotFound(f"run id must be a positive integer, got {_short_repr(value)}")
    return result


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() for a message: a huge value is not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__} of {len(text)} characters)"


def _status_value(status: Any) -> str:
    """Normalise a RunStatus or str to the plain string stored in the DB."""
    return RunStatus(status).value


def _dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable: {error}") from error


def _check_keys(row: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str],
                what: str) -> None:
    unknown = set(row) - allowed
    if unknown:
        raise ValueError(f"unknown {what} field(s): {', '.join(sorted(unknown))}")
    missing = required - set(row)
    if missing:
        raise ValueError(f"{what} is missing field(s): {', '.join(sorted(missing))}")


def _detached_session(engine: Engine) -> Session:
    # expire_on_commit=False keeps loaded attributes readable once the session is gone.
    return Session(engine, expire_on_commit=False)


def _stored_artifact_dir(path: str | Path) -> str:
    """How a run directory is stored: relative to the data home when it lies inside it (so a moved or
    copied home keeps its runs), else absolute."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    try:
        return absolute.relative_to(os.path.abspath(current_data_home())).as_posix()
    except ValueError:
        return str(absolute)


def resolve_artifact_dir(stored: Optional[str], home: Optional[Path] = None) -> Optional[str]:
    """The absolute run directory of a stored ``artifact_dir`` (runs read from here come resolved).

    A relative one lies in the data home (``home``, default the current one). An absolute one that no
    longer exists, as an older release stored them before its home was moved, is looked for as
    ``runs/<name>`` in this home.
    """
    if not stored:
        return stored
    home = Path(home) if home is not None else current_data_home()
    path = Path(stored)
    if not path.is_absolute():
        return str(home / path)
    if not path.exists() and path.parent.name == "runs" and (home / "runs" / path.name).is_dir():
        return str(home / "runs" / path.name)
    return stored


def _resolved(runs: list[Run]) -> list[Run]:
    """Detached runs with their artifact_dir resolved (nothing is written back)."""
    for run in runs:
        if run.artifact_dir:
            run.artifact_dir = resolve_artifact_dir(run.artifact_dir)
    return runs


def _update_run(engine: Engine, run_id: int, *conditions: Any, **values: Any) -> bool:
    """UPDATE run SET values WHERE id=run_id AND conditions; True if a row changed."""
    with engine.begin() as conn:
        result = conn.execute(
            update(_RUN).where(_RUN.c.id == run_id, *conditions).values(**values)
        )
    return result.rowcount == 1
