"""Studies: a plan of runs queued in one transaction, their runs, status counts, cancel and report directory."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Engine, select, update
from sqlmodel import col

from heft_common.vocabulary import METHODS, RunStatus
from storage.common import _check_keys, _detached_session, _dump_json, _resolved, validate_run_id
from storage.models import Run, Study, utcnow
from storage.runs import request_cancel

log = logging.getLogger(__name__)

# Fields of one run in create_study's ``runs`` (those of create_run plus the study cell).
STUDY_RUN_FIELDS: frozenset[str] = frozenset(
    {"name", "method", "config", "base_model", "data_source", "eval_signature", "total_epochs",
     "arm", "seed", "grid_point"}
)
STUDY_RUN_REQUIRED: frozenset[str] = frozenset(
    {"name", "method", "config", "base_model", "data_source", "arm", "seed"}
)


def validate_study_id(value: Any) -> int:
    """``value`` as a positive int study id (same forms as :func:`validate_run_id`)."""
    try:
        return validate_run_id(value)
    except ValueError:
        raise ValueError(f"study id must be a positive integer, got {value!r}") from None


def create_study(engine: Engine, *, name: str, spec: dict[str, Any], runs: Iterable[Mapping[str, Any]]) -> Study:
    """Insert a study and its runs, all queued, in one transaction: every run or none.

    ``spec`` is stored whole (JSON). Each item of ``runs`` has the fields of
    :data:`STUDY_RUN_FIELDS` (``grid_point`` a dict of dotted option -> value, default {});
    every item is checked before anything is written. The runs share the batch id
    ``study-<id>``. Returns the study, detached. A run a process trains itself can join a
    study through :func:`start_external_run` with ``study_id``, ``arm``, ``seed`` and
    ``grid_point`` (JSON text) among its fields.
    """
    if not name or not name.strip():
        raise ValueError("study name must not be empty")
    spec_json = _dump_json(spec, "study spec")
    rows = [dict(row) for row in runs]
    if not rows:
        raise ValueError("a study needs at least one run")
    for index, row in enumerate(rows):
        _check_keys(row, STUDY_RUN_FIELDS, STUDY_RUN_REQUIRED, f"study run {index}")
        if row["method"] not in METHODS:
            raise ValueError(f"study run {index}: method must be one of {', '.join(METHODS)}, got {row['method']!r}")
        if not str(row["name"]).strip():
            raise ValueError(f"study run {index}: name must not be empty")
    now = utcnow()
    with _detached_session(engine) as sess:
        study = Study(name=name.strip(), spec_json=spec_json, created_at=now)
        sess.add(study)
        sess.flush()  # assigns study.id inside the transaction
        for row in rows:
            sess.add(Run(
                name=str(row["name"]).strip(), method=row["method"], status=RunStatus.QUEUED.value,
                config_json=_dump_json(row["config"], "config"), base_model=row["base_model"],
                data_source=row["data_source"], eval_signature=row.get("eval_signature"),
                batch_id=f"study-{study.id}", total_epochs=row.get("total_epochs"), created_at=now,
                study_id=study.id, arm=str(row["arm"]), seed=int(row["seed"]),
                grid_point=_dump_json(row.get("grid_point") or {}, "grid_point"),
            ))
        sess.commit()
        sess.expunge(study)
    log.info("Created study %d (%s) with %d queued runs", study.id, study.name, len(rows))
    return study


def get_study(engine: Engine, study_id: int) -> Optional[Study]:
    """The study with this id, detached, or None."""
    study_id = validate_study_id(study_id)
    with _detached_session(engine) as sess:
        study = sess.get(Study, study_id)
        if study is not None:
            sess.expunge(study)
        return study


def list_studies(engine: Engine, *, limit: Optional[int] = 100) -> list[Study]:
    """Studies newest first (``limit=None``: all)."""
    stmt = select(Study).order_by(col(Study.id).desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with _detached_session(engine) as sess:
        studies = list(sess.scalars(stmt))
        sess.expunge_all()
    return studies


def study_runs(engine: Engine, study_id: int) -> list[Run]:
    """Every run of a study, oldest first (a re-queued run comes after the one it replaces)."""
    stmt = select(Run).where(col(Run.study_id) == validate_study_id(study_id)).order_by(col(Run.id))
    with _detached_session(engine) as sess:
        runs = list(sess.scalars(stmt))
        sess.expunge_all()
    return _resolved(runs)


def study_status_counts(engine: Engine, study_id: int) -> dict[str, int]:
    """How many runs of a study are in each status, e.g. {"completed": 4, "queued": 2}."""
    counts: dict[str, int] = {}
    for run in study_runs(engine, study_id):
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def cancel_study(engine: Engine, study_id: int) -> dict[int, str]:
    """Cancel a study: its queued runs become cancelled, its running runs are asked to stop.

    Returns run id -> the outcome of :func:`request_cancel` for every run of the study
    (finished runs keep, and report, their status). Records ``cancelled_at`` on the study.
    Raises ValueError if the study does not exist.
    """
    study_id = validate_study_id(study_id)
    with engine.begin() as conn:
        found = conn.execute(
            update(Study.__table__).where(Study.__table__.c.id == study_id).values(cancelled_at=utcnow())
        ).rowcount
    if not found:
        raise ValueError(f"study {study_id} does not exist")
    outcome = {run.id: request_cancel(engine, run.id) for run in study_runs(engine, study_id)}
    log.info("Cancelled study %d: %s", study_id, outcome)
    return outcome


def set_study_report_dir(engine: Engine, study_id: int, path: str | Path) -> bool:
    """Record where a study's report directory was written (absolute path)."""
    with engine.begin() as conn:
        result = conn.execute(
            update(Study.__table__).where(Study.__table__.c.id == validate_study_id(study_id))
            .values(report_dir=os.path.abspath(os.fspath(path)))
        )
    return result.rowcount == 1
