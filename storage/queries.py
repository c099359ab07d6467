"""Every read and write HEFT Studio does on its database, as plain functions.

All functions take the engine first (see :func:`storage.db.get_engine`). Objects returned
are detached from any session and fully loaded, so callers may keep them across threads;
metric and evaluation rows are returned as plain dicts.

State changes that can race between processes (claim, cancel, finish, orphan marking,
delete) are single conditional ``UPDATE``/``DELETE`` statements whose ``rowcount`` says
whether this caller won.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlmodel import Session, col

from storage.models import (
    METHODS,
    REQUEUEABLE,
    TERMINAL,
    EpochEval,
    Run,
    RunStatus,
    StepMetric,
    utcnow,
)

log = logging.getLogger(__name__)

REQUEUE_SUFFIX = " (re-queued)"

# Results finish_run accepts, so a typo in the worker fails loudly instead of vanishing.
RESULT_FIELDS: frozenset[str] = frozenset(
    {
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "eval_n",
        "train_seconds",
        "tokens_per_second",
        "trainable_params",
        "trainable_params_json",
        "artifact_dir",
        # Known only once the child has built its eval set, so it may arrive with results.
        "eval_signature",
    }
)
STEP_FIELDS: frozenset[str] = frozenset(
    {"stage", "epoch", "step", "loss", "learning_rate", "tokens_per_second",
     "elapsed_seconds", "created_at"}
)
STEP_REQUIRED: frozenset[str] = frozenset({"stage", "step"})
EVAL_FIELDS: frozenset[str] = frozenset(
    {"stage", "epoch", "cumulative_epoch", "accuracy", "accuracy_low", "accuracy_high",
     "n", "created_at"}
)
EVAL_REQUIRED: frozenset[str] = frozenset({"stage", "epoch"})

_RUN = Run.__table__
_STEP = StepMetric.__table__
_EVAL = EpochEval.__table__


# --------------------------------------------------------------------------- helpers


def validate_run_id(value: Any) -> int:
    """Return ``value`` as a positive int run id.

    Accepts an int, a string of digits (surrounding spaces allowed) or an integral float
    (Gradio number inputs deliver floats). Raises ValueError otherwise.
    """
    result: Optional[int] = None
    if isinstance(value, bool):
        result = None  # bool is an int subclass; True is not run 1
    elif isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        result = int(value.strip())
    if result is None or result <= 0:
        raise ValueError(f"run id must be a positive integer, got {value!r}")
    return result


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


# --------------------------------------------------------------------------- runs


def create_run(
    engine: Engine,
    *,
    name: str,
    method: str,
    config: dict[str, Any],
    base_model: str,
    data_source: str,
    eval_signature: Optional[str] = None,
    batch_id: Optional[str] = None,
    total_epochs: Optional[float] = None,
) -> Run:
    """Insert a new queued run and return it (detached)."""
    run = _insert_run(engine, RunStatus.QUEUED, name=name, method=method, config=config, base_model=base_model,
                      data_source=data_source, eval_signature=eval_signature, batch_id=batch_id, total_epochs=total_epochs)
    log.info("Queued run %d (%s, %s)", run.id, run.name, run.method)
    return run


def start_external_run(engine: Engine, *, worker_pid: int, **fields: Any) -> Run:
    """Record a run that the calling process trains itself (e.g. bench/reproduce.py).

    Takes ``create_run``'s fields. The row starts ``running`` with ``worker_pid`` as its
    worker, so no worker ever claims it; the caller heartbeats and finishes it with the
    usual functions.
    """
    run = _insert_run(engine, RunStatus.RUNNING, worker_pid=worker_pid, **fields)
    log.info("Recording externally trained run %d (%s, %s)", run.id, run.name, run.method)
    return run


def _insert_run(engine: Engine, status: RunStatus, *, name: str, method: str, config: dict[str, Any], worker_pid: Optional[int] = None, **fields: Any) -> Run:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not name or not name.strip():
        raise ValueError("run name must not be empty")
    now = utcnow()
    running = status == RunStatus.RUNNING
    run = Run(
        name=name.strip(), method=method, status=status.value, config_json=_dump_json(config, "config"), created_at=now,
        started_at=now if running else None, heartbeat_at=now if running else None, worker_pid=worker_pid, **fields,
    )
    with _detached_session(engine) as sess:
        sess.add(run)
        sess.commit()
        sess.expunge(run)
    return run


def get_run(engine: Engine, run_id: int) -> Optional[Run]:
    """The run with this id, detached and fully loaded, or None."""
    run_id = validate_run_id(run_id)
    with _detached_session(engine) as sess:
        run = sess.get(Run, run_id)
        if run is not None:
            sess.expunge(run)
        return run


def run_with_artifact_dir(engine: Engine, path: str | Path) -> Optional[Run]:
    """The newest run whose artifacts are in ``path``, detached, or None."""
    stmt = select(Run).where(col(Run.artifact_dir) == os.path.abspath(os.fspath(path))).order_by(col(Run.id).desc()).limit(1)
    with _detached_session(engine) as sess:
        run = sess.scalars(stmt).first()
        if run is not None:
            sess.expunge(run)
        return run


def list_runs(
    engine: Engine,
    *,
    status: Optional[str] = None,
    method: Optional[str] = None,
    text: Optional[str] = None,
    limit: Optional[int] = 200,
) -> list[Run]:
    """Runs newest first, optionally filtered.

    ``text`` is a case-insensitive substring match on name, base_model or data_source.
    ``limit=None`` returns all.
    """
    stmt = select(Run)
    if status is not None:
        stmt = stmt.where(col(Run.status) == _status_value(status))
    if method is not None:
        stmt = stmt.where(col(Run.method) == method)
    if text:
        # Escape LIKE wildcards so "%" or "_" in the search box match literally.
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        stmt = stmt.where(
            or_(
                col(Run.name).ilike(pattern, escape="\\"),
                col(Run.base_model).ilike(pattern, escape="\\"),
                col(Run.data_source).ilike(pattern, escape="\\"),
            )
        )
    stmt = stmt.order_by(col(Run.id).desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with _detached_session(engine) as sess:
        runs = list(sess.scalars(stmt))
        sess.expunge_all()
    return runs


def comparable_runs(engine: Engine, run_id: int) -> list[Run]:
    """Completed runs with the same eval_signature as ``run_id`` (itself excluded), newest first.

    Empty if the run does not exist or has no eval_signature.
    """
    run = get_run(engine, run_id)
    if run is None or not run.eval_signature:
        return []
    stmt = (
        select(Run)
        .where(
            col(Run.eval_signature) == run.eval_signature,
            col(Run.status) == RunStatus.COMPLETED.value,
            col(Run.id) != run.id,
        )
        .order_by(col(Run.id).desc())
    )
    with _detached_session(engine) as sess:
        runs = list(sess.scalars(stmt))
        sess.expunge_all()
    return runs


def claim_next_run(engine: Engine, worker_pid: int) -> Optional[Run]:
    """Atomically take the oldest queued run for this worker; None if the queue is empty.

    The claim is one ``UPDATE ... WHERE id=? AND status='queued'``; if another worker got
    there first (rowcount 0) the next candidate is tried, so a run is never taken twice.
    """
    while True:
        with engine.connect() as conn:
            candidate = conn.execute(
                select(_RUN.c.id)
                .where(_RUN.c.status == RunStatus.QUEUED.value)
                .order_by(_RUN.c.id)
                .limit(1)
            ).scalar()
            if candidate is None:
                return None
            now = utcnow()
            result = conn.execute(
                update(_RUN)
                .where(_RUN.c.id == candidate, _RUN.c.status == RunStatus.QUEUED.value)
                .values(
                    status=RunStatus.RUNNING.value,
                    started_at=now,
                    heartbeat_at=now,
                    worker_pid=worker_pid,
                )
            )
            conn.commit()
        if result.rowcount == 1:
            log.info("Worker %d claimed run %d", worker_pid, candidate)
            return get_run(engine, candidate)
        log.debug("Run %d was claimed by another worker; trying the next one", candidate)


def _update_run(engine: Engine, run_id: int, *conditions: Any, **values: Any) -> bool:
    """UPDATE run SET values WHERE id=run_id AND conditions; True if a row changed."""
    with engine.begin() as conn:
        result = conn.execute(
            update(_RUN).where(_RUN.c.id == run_id, *conditions).values(**values)
        )
    return result.rowcount == 1


def set_child_pid(engine: Engine, run_id: int, pid: Optional[int]) -> bool:
    """Record the training child process of a run (None clears it)."""
    return _update_run(engine, validate_run_id(run_id), child_pid=pid)


def heartbeat(engine: Engine, run_id: int) -> bool:
    """Refresh heartbeat_at of a running run.

    Returns False if the run is no longer running (e.g. it was marked interrupted), which
    tells the worker to stop.
    """
    return _update_run(
        engine, validate_run_id(run_id),
        _RUN.c.status == RunStatus.RUNNING.value,
        heartbeat_at=utcnow(),
    )


def update_progress(engine: Engine, run_id: int, progress: dict[str, Any]) -> bool:
    """Store the latest progress snapshot (stage/epoch/step/total_steps/eta ...).

    Also refreshes heartbeat_at, since progress proves the run is alive. Returns False if
    the run does not exist.
    """
    return _update_run(
        engine, validate_run_id(run_id),
        progress_json=_dump_json(progress, "progress"),
        heartbeat_at=utcnow(),
    )


def set_artifact_dir(engine: Engine, run_id: int, path: str | Path) -> bool:
    """Record where a run's artifacts live (stored as an absolute path)."""
    return _update_run(
        engine, validate_run_id(run_id), artifact_dir=os.path.abspath(os.fspath(path))
    )


def finish_run(
    engine: Engine,
    run_id: int,
    status: str,
    *,
    error: Optional[str] = None,
    results: Optional[dict[str, Any]] = None,
) -> bool:
    """Move a running run to a terminal status, storing results; True if it happened.

    Only a run that is currently ``running`` can be finished (conditional update), so a
    run that was already finished, cancelled while queued or marked interrupted keeps its
    state and this returns False. ``results`` keys must be in :data:`RESULT_FIELDS`.
    """
    run_id = validate_run_id(run_id)
    status = _status_value(status)
    if status not in TERMINAL:
        raise ValueError(f"finish_run needs a terminal status ({', '.join(sorted(TERMINAL))}),"
                         f" got {status!r}")
    values: dict[str, Any] = dict(results or {})
    unknown = set(values) - RESULT_FIELDS
    if unknown:
        raise ValueError(f"unknown result field(s): {', '.join(sorted(unknown))}")
    if "trainable_params_json" in values and not isinstance(
        values["trainable_params_json"], (str, type(None))
    ):
        values["trainable_params_json"] = _dump_json(
            values["trainable_params_json"], "trainable_params_json"
        )
    if values.get("artifact_dir") is not None:
        values["artifact_dir"] = os.path.abspath(os.fspath(values["artifact_dir"]))
    now = utcnow()
    changed = _update_run(
        engine, run_id,
        _RUN.c.status == RunStatus.RUNNING.value,
        status=status, error=error, finished_at=now, heartbeat_at=now, **values,
    )
    if changed:
        log.info("Run %d finished: %s", run_id, status)
    else:
        log.warning("Run %d was not running; not marking it %s", run_id, status)
    return changed


def request_cancel(engine: Engine, run_id: int) -> str:
    """Cancel a run. Returns the resulting state:

    - ``"cancelled"``: the run was queued (or already cancelled) and is now cancelled;
    - ``"cancel_requested"``: the run is running; the worker sees
      :func:`is_cancel_requested` and stops it;
    - otherwise the run's unchanged terminal status (e.g. ``"completed"``).

    Raises ValueError if the run does not exist.
    """
    run_id = validate_run_id(run_id)
    if _update_run(
        engine, run_id,
        _RUN.c.status == RunStatus.QUEUED.value,
        status=RunStatus.CANCELLED.value, cancel_requested=True, finished_at=utcnow(),
        error="cancelled before it started",
    ):
        log.info("Cancelled queued run %d", run_id)
        return RunStatus.CANCELLED.value
    if _update_run(
        engine, run_id, _RUN.c.status == RunStatus.RUNNING.value, cancel_requested=True
    ):
        log.info("Requested cancellation of running run %d", run_id)
        return "cancel_requested"
    run = get_run(engine, run_id)
    if run is None:
        raise ValueError(f"run {run_id} does not exist")
    # A run never returns to queued, so reaching here means it is terminal.
    return run.status


def is_cancel_requested(engine: Engine, run_id: int) -> bool:
    """True if cancellation was requested, the run is cancelled, or it no longer exists."""
    with engine.connect() as conn:
        row = conn.execute(
            select(_RUN.c.cancel_requested, _RUN.c.status).where(
                _RUN.c.id == validate_run_id(run_id)
            )
        ).first()
    if row is None:
        return True  # nothing left to train for; stop rather than write into the void
    return bool(row.cancel_requested) or row.status == RunStatus.CANCELLED.value


def requeue(engine: Engine, run_id: int) -> Run:
    """Queue a copy of a failed / interrupted / cancelled run as a NEW run.

    The old row (with its metrics and error) is kept as history. The copy has the same
    config, method, model, data source, eval_signature, batch_id and total_epochs, and
    its name gets the suffix " (re-queued)" (not repeated if already there).
    Raises ValueError for a missing run or any other status.
    """
    old = get_run(engine, run_id)
    if old is None:
        raise ValueError(f"run {run_id} does not exist")
    if old.status not in REQUEUEABLE:
        raise ValueError(
            f"run {old.id} is {old.status}; only {', '.join(sorted(REQUEUEABLE))} runs "
            "can be re-queued"
        )
    name = old.name if old.name.endswith(REQUEUE_SUFFIX) else old.name + REQUEUE_SUFFIX
    new = Run(
        name=name,
        method=old.method,
        status=RunStatus.QUEUED.value,
        config_json=old.config_json,
        base_model=old.base_model,
        data_source=old.data_source,
        eval_signature=old.eval_signature,
        batch_id=old.batch_id,
        total_epochs=old.total_epochs,
        created_at=utcnow(),
    )
    with _detached_session(engine) as sess:
        sess.add(new)
        sess.commit()
        sess.expunge(new)
    log.info("Re-queued run %d as run %d", old.id, new.id)
    return new


def _pid_alive(pid: int) -> bool:
    """Default liveness check: signal 0 probes a pid without touching the process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def mark_orphans_interrupted(
    engine: Engine,
    is_alive: Optional[Callable[[int], bool]] = None,
    stale_after_s: float = 60,
) -> list[int]:
    """Mark running runs whose worker died (or went silent) as interrupted.

    A running run is orphaned if its worker_pid is not alive (``is_alive``, default
    ``os.kill(pid, 0)``) or its heartbeat_at (else started_at) is older than
    ``stale_after_s`` seconds. Call it when a worker starts, and periodically from the
    UI. A live worker must therefore heartbeat more often than ``stale_after_s``.
    Returns the ids marked.
    """
    alive = is_alive or _pid_alive
    now = utcnow()
    with engine.connect() as conn:
        rows = conn.execute(
            select(_RUN.c.id, _RUN.c.worker_pid, _RUN.c.heartbeat_at, _RUN.c.started_at)
            .where(_RUN.c.status == RunStatus.RUNNING.value)
            .order_by(_RUN.c.id)
        ).all()
    marked: list[int] = []
    for row in rows:
        reason: Optional[str] = None
        if row.worker_pid is not None and row.worker_pid > 0 and not alive(row.worker_pid):
            reason = f"worker process {row.worker_pid} is no longer running"
        else:
            last_seen: Optional[datetime] = row.heartbeat_at or row.started_at
            if last_seen is None or now - last_seen > timedelta(seconds=stale_after_s):
                age = "never" if last_seen is None else f"{(now - last_seen).total_seconds():.0f} s ago"
                reason = (f"no heartbeat from worker {row.worker_pid} for more than "
                          f"{stale_after_s:g} s (last: {age})")
        if reason is None:
            continue
        # Only if still running with the heartbeat we judged: a fresh heartbeat wins.
        hb_cond = (
            _RUN.c.heartbeat_at.is_(None) if row.heartbeat_at is None
            else _RUN.c.heartbeat_at == row.heartbeat_at
        )
        if _update_run(
            engine, row.id,
            and_(_RUN.c.status == RunStatus.RUNNING.value, hb_cond),
            status=RunStatus.INTERRUPTED.value,
            error=f"Interrupted: {reason}. Re-queue it to run again.",
            finished_at=now,
        ):
            log.warning("Run %d marked interrupted: %s", row.id, reason)
            marked.append(row.id)
    return marked


def delete_run(engine: Engine, run_id: int, data_home: Path) -> bool:
    """Delete a run, its metrics and evaluations, and its artifact directory.

    Refuses (ValueError) a running run. The artifact directory is removed only if its
    resolved real path lies strictly inside ``data_home/runs`` and the stored path is
    absolute, has no ``..`` and is not itself a symlink; otherwise only the database row
    goes and a warning is logged. Returns False if the run did not exist.
    """
    run_id = validate_run_id(run_id)
    with engine.connect() as conn:
        row = conn.execute(
            select(_RUN.c.status, _RUN.c.artifact_dir).where(_RUN.c.id == run_id)
        ).first()
        if row is None:
            return False
        if row.status == RunStatus.RUNNING.value:
            raise ValueError(f"run {run_id} is running; cancel it before deleting it")
        # Conditional so a worker claiming the run meanwhile makes us refuse, not delete.
        result = conn.execute(
            delete(_RUN).where(_RUN.c.id == run_id, _RUN.c.status != RunStatus.RUNNING.value)
        )
        conn.commit()
    if result.rowcount != 1:
        raise ValueError(f"run {run_id} started running; cancel it before deleting it")
    log.info("Deleted run %d", run_id)
    if row.artifact_dir:
        _remove_artifact_dir(row.artifact_dir, Path(data_home), run_id)
    return True


def _safe_artifact_path(artifact_dir: str, data_home: Path) -> tuple[Optional[Path], str]:
    """The real path to delete, or (None, reason) if deleting it could escape runs/."""
    raw = Path(artifact_dir)
    if not raw.is_absolute():
        return None, "path is not absolute"
    if ".." in raw.parts:
        return None, "path contains '..'"
    if raw.is_symlink():
        return None, "path is a symlink"
    runs_root = (data_home / "runs").resolve()
    real = raw.resolve()
    if runs_root not in real.parents:
        return None, f"real path {real} is not inside {runs_root}"
    return real, ""


def _remove_artifact_dir(artifact_dir: str, data_home: Path, run_id: int) -> None:
    real, reason = _safe_artifact_path(artifact_dir, data_home)
    if real is None:
        log.warning("Run %d: kept artifact dir %s (%s)", run_id, artifact_dir, reason)
        return
    if not real.exists():
        return
    if not real.is_dir():
        log.warning("Run %d: kept artifact path %s (not a directory)", run_id, real)
        return
    try:
        # rmtree unlinks symlinks found inside instead of following them.
        shutil.rmtree(real)
        log.info("Run %d: removed artifact dir %s", run_id, real)
    except OSError as error:
        log.warning("Run %d: could not remove artifact dir %s: %s", run_id, real, error)


# --------------------------------------------------------------------------- metrics


def add_step_metrics(engine: Engine, run_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert step metric rows in one transaction; returns how many were inserted.

    Each row needs ``stage`` and ``step``; optional: epoch, loss, learning_rate,
    tokens_per_second, elapsed_seconds, created_at. Unknown keys raise ValueError.
    """
    run_id = validate_run_id(run_id)
    now = utcnow()
    values: list[dict[str, Any]] = []
    for row in rows:
        _check_keys(row, STEP_FIELDS, STEP_REQUIRED, "step metric")
        # executemany needs every row to carry the same keys.
        item = {field: row.get(field) for field in STEP_FIELDS}
        item["created_at"] = row.get("created_at") or now
        item["run_id"] = run_id
        values.append(item)
    if not values:
        return 0
    with engine.begin() as conn:
        conn.execute(insert(_STEP), values)
    return len(values)


def add_epoch_eval(engine: Engine, run_id: int, row: Mapping[str, Any]) -> int:
    """Insert one per-epoch evaluation; returns its id.

    Needs ``stage`` and ``epoch``; optional: cumulative_epoch, accuracy, accuracy_low,
    accuracy_high, n, created_at.
    """
    run_id = validate_run_id(run_id)
    _check_keys(row, EVAL_FIELDS, EVAL_REQUIRED, "epoch eval")
    item = dict(row)
    item["created_at"] = row.get("created_at") or utcnow()
    item["run_id"] = run_id
    with engine.begin() as conn:
        result = conn.execute(insert(_EVAL).values(**item))
    return int(result.inserted_primary_key[0])


def metrics_since(
    engine: Engine, run_id: int, after_id: int = 0, limit: Optional[int] = None
) -> list[dict[str, Any]]:
    """Step metrics of a run with ``id > after_id``, ordered by id, as dicts.

    Each dict has id, run_id, stage, epoch, step, loss, learning_rate, tokens_per_second,
    elapsed_seconds, created_at. Pass the last ``id`` seen as ``after_id`` next time: ids
    only grow and a batch commits atomically, so polling sees every step exactly once, in
    order.
    """
    stmt = (
        select(_STEP)
        .where(_STEP.c.run_id == validate_run_id(run_id), _STEP.c.id > after_id)
        .order_by(_STEP.c.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]


def evaluations(engine: Engine, run_id: int) -> list[dict[str, Any]]:
    """All per-epoch evaluations of a run, in insertion order, as dicts (column names)."""
    stmt = (
        select(_EVAL)
        .where(_EVAL.c.run_id == validate_run_id(run_id))
        .order_by(_EVAL.c.id)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt)]
