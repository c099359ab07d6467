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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlmodel import Session, col

from heft_common.errors import RunNotFound, RunStateError
from heft_common.home import data_home as current_data_home
from heft_common.process import pid_alive, worker_alive, worker_identity
from heft_common.vocabulary import METHODS, REQUEUEABLE_STATUSES, TERMINAL_STATUSES, RunStatus
from storage.models import EpochEval, Run, StepMetric, Study, utcnow

log = logging.getLogger(__name__)

REQUEUE_SUFFIX = " (re-queued)"
FAILURE_KINDS: frozenset[str] = frozenset({"bad_input", "crash"})
RESUME_FIELDS: frozenset[str] = frozenset(
    {"from_step", "stage", "from_epoch", "cumulative_epoch", "saved_seconds", "replaced_steps", "message"}
)

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

STALE_AFTER_S = 60.0  # a running run silent this long, whose worker cannot be seen, has none
MAX_RUN_ID = 2**63 - 1  # SQLite's largest integer: a larger "id" names no run and must not reach the driver


# --------------------------------------------------------------------------- helpers


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
    run = _insert_run(
        engine, RunStatus.QUEUED, name=name, method=method, config=config, base_model=base_model,
        data_source=data_source, eval_signature=eval_signature, batch_id=batch_id, total_epochs=total_epochs,
    )
    log.info("Queued run %d (%s, %s)", run.id, run.name, run.method)
    return run


def start_external_run(engine: Engine, *, worker_pid: int, **fields: Any) -> Run:
    """Record a run that the calling process trains itself (a script training through heft_core).

    Takes ``create_run``'s fields. The row starts ``running`` with ``worker_pid`` as its
    worker, so no worker ever claims it; the caller heartbeats and finishes it with the
    usual functions.
    """
    if worker_pid == os.getpid():
        fields.setdefault("worker_id", str(worker_identity()))  # so a restart in a container is not mistaken for it
    run = _insert_run(engine, RunStatus.RUNNING, worker_pid=worker_pid, **fields)
    log.info("Recording externally trained run %d (%s, %s)", run.id, run.name, run.method)
    return run


def _insert_run(
    engine: Engine, status: RunStatus, *, name: str, method: str, config: dict[str, Any],
    worker_pid: Optional[int] = None, **fields: Any,
) -> Run:
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
            _resolved([run])
        return run


def run_with_artifact_dir(engine: Engine, path: str | Path) -> Optional[Run]:
    """The newest run whose artifacts are in ``path``, detached, or None."""
    absolute = os.path.abspath(os.fspath(path))
    stored_forms = {absolute, _stored_artifact_dir(absolute)}
    stmt = select(Run).where(col(Run.artifact_dir).in_(stored_forms)).order_by(col(Run.id).desc()).limit(1)
    with _detached_session(engine) as sess:
        run = sess.scalars(stmt).first()
        if run is not None:
            sess.expunge(run)
            _resolved([run])
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
    return _resolved(runs)


def claim_next_run(engine: Engine, worker_pid: int, worker_id: Optional[str] = None) -> Optional[Run]:
    """Atomically take the oldest queued run for this worker; None if the queue is empty.

    ``worker_id`` (heft_common.process.worker_identity) is what the orphan check goes by; the
    bare ``worker_pid`` is kept for display and for rows written without an id.

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
                    worker_id=worker_id,
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
    """Record where a run's artifacts live (relative to the data home when inside it, see
    :func:`resolve_artifact_dir`)."""
    return _update_run(engine, validate_run_id(run_id), artifact_dir=_stored_artifact_dir(path))


def set_run_placement(engine: Engine, run_id: int, *, executor: str, node: Optional[str] = None,
                      devices: Optional[str] = None) -> bool:
    """Record where a run trains: its executor ("local" or "ray"), the host or Ray node, and its devices.

    ``node`` and ``devices`` left None keep what is stored (a Ray run learns its node once it starts).
    """
    values: dict[str, Any] = {"executor": executor}
    if node is not None:
        values["node"] = node
    if devices is not None:
        values["devices"] = devices
    return _update_run(engine, validate_run_id(run_id), **values)


def next_queued_run(engine: Engine) -> Optional[Run]:
    """The run :func:`claim_next_run` would take now (the oldest queued one), without claiming it."""
    stmt = select(Run).where(col(Run.status) == RunStatus.QUEUED.value).order_by(col(Run.id)).limit(1)
    with _detached_session(engine) as sess:
        run = sess.scalars(stmt).first()
        if run is not None:
            sess.expunge(run)
    return run


def finish_run(
    engine: Engine,
    run_id: int,
    status: str,
    *,
    error: Optional[str] = None,
    results: Optional[dict[str, Any]] = None,
    failure_kind: Optional[str] = None,
) -> bool:
    """Move a running run to a terminal status, storing results; True if it happened.

    ``failure_kind`` (failed runs): "bad_input" when the run's own config, data or model is at fault
    (resuming it would fail the same way), "crash" otherwise.

    Only a run that is currently ``running`` can be finished (conditional update), so a
    run that was already finished, cancelled while queued or marked interrupted keeps its
    state and this returns False. ``results`` keys must be in :data:`RESULT_FIELDS`.
    """
    run_id = validate_run_id(run_id)
    status = _status_value(status)
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"finish_run needs a terminal status ({', '.join(sorted(TERMINAL_STATUSES))}),"
                         f" got {status!r}")
    if failure_kind is not None and failure_kind not in FAILURE_KINDS:
        raise ValueError(f"failure_kind must be one of {', '.join(sorted(FAILURE_KINDS))}, got {failure_kind!r}")
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
        values["artifact_dir"] = _stored_artifact_dir(values["artifact_dir"])
    now = utcnow()
    changed = _update_run(
        engine, run_id,
        _RUN.c.status == RunStatus.RUNNING.value,
        status=status, error=error, finished_at=now, heartbeat_at=now, failure_kind=failure_kind, **values,
    )
    if changed:
        log.info("Run %d finished: %s", run_id, status)
    else:
        log.warning("Run %d was not running; not marking it %s", run_id, status)
    return changed


def request_cancel(engine: Engine, run_id: int, stale_after_s: float = STALE_AFTER_S) -> str:
    """Cancel a run. Returns the resulting state:

    - ``"cancelled"``: the run was queued (or already cancelled) and is now cancelled, or it
      was running but its worker is gone or silent for ``stale_after_s`` (nobody would act on
      the request: a stuck run is always cancellable);
    - ``"cancel_requested"``: the run is running; the worker sees
      :func:`is_cancel_requested` and stops it;
    - otherwise the run's unchanged terminal status (e.g. ``"completed"``).

    Raises :class:`RunNotFound` if the run does not exist.
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
        with engine.connect() as conn:
            row = conn.execute(select(*_ORPHAN_COLUMNS).where(_RUN.c.id == run_id)).first()
        if row is not None and _finish_if_orphaned(engine, row, utcnow(), stale_after_s, pid_alive, stuck=True):
            return RunStatus.CANCELLED.value
        log.info("Requested cancellation of running run %d", run_id)
        return "cancel_requested"
    run = get_run(engine, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} does not exist")
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
    Raises RunNotFound for a missing run and RunStateError for any other status.
    """
    old = get_run(engine, run_id)
    if old is None:
        raise RunNotFound(f"run {run_id} does not exist")
    if old.status not in REQUEUEABLE_STATUSES:
        raise RunStateError(
            f"run {old.id} is {old.status}; only {', '.join(sorted(REQUEUEABLE_STATUSES))} runs "
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
        # a re-queued study run stays in its study, in the same cell of the plan
        study_id=old.study_id,
        arm=old.arm,
        seed=old.seed,
        grid_point=old.grid_point,
        created_at=utcnow(),
    )
    with _detached_session(engine) as sess:
        sess.add(new)
        sess.commit()
        sess.expunge(new)
    log.info("Re-queued run %d as run %d", old.id, new.id)
    return new


def resume_blocker(run: Run) -> Optional[str]:
    """Why ``run`` cannot be resumed, or None when it can (interrupted, cancelled, or failed by a crash)."""
    if run.status not in REQUEUEABLE_STATUSES:
        return (f"run {run.id} is {run.status}; only {', '.join(sorted(REQUEUEABLE_STATUSES))} runs "
                "can be resumed")
    if run.status == RunStatus.FAILED.value and run.failure_kind == "bad_input":
        return (f"run {run.id} failed on its own configuration, data or model; resuming would fail the same "
                "way: fix the option and start a new run")
    return None


def resume_run(engine: Engine, run_id: int, *, by: str = "user") -> Run:
    """Put an interrupted, cancelled or crashed run back in the queue as the SAME run (same id, same history).

    The training child then continues from the run's latest checkpoint (``heft_core.checkpoint``) and
    replaces the step metrics recorded after it (:func:`delete_metrics_after`). An entry
    ``{"at", "by"}`` is appended to ``resume_json``; the child completes it (:func:`record_resume`).
    Raises :class:`RunNotFound` for a missing run and ValueError when it cannot be resumed
    (:func:`resume_blocker`) or changed status meanwhile.
    """
    run = get_run(engine, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} does not exist")
    blocker = resume_blocker(run)
    if blocker:
        raise RunStateError(blocker)
    history = run.resumes + [{"at": utcnow().isoformat(timespec="seconds"), "by": by}]
    # Conditional on the status and history we read, so two clicks (or a click and the worker) resume once.
    same_history = _RUN.c.resume_json.is_(None) if run.resume_json is None else _RUN.c.resume_json == run.resume_json
    if not _update_run(
        engine, run.id, _RUN.c.status == run.status, same_history,
        status=RunStatus.QUEUED.value, resume_json=_dump_json(history, "resume_json"), cancel_requested=False,
        error=None, failure_kind=None, finished_at=None, heartbeat_at=None,
        worker_pid=None, worker_id=None, child_pid=None,
    ):
        raise RunStateError(f"run {run.id} changed while it was being resumed; look at it again")
    log.info("Run %d resumed by %s: queued again", run.id, by)
    return get_run(engine, run.id)


def record_resume(engine: Engine, run_id: int, details: Mapping[str, Any]) -> bool:
    """Complete the newest ``resume_json`` entry with where training continued (keys in :data:`RESUME_FIELDS`)."""
    _check_keys(details, RESUME_FIELDS, frozenset({"from_step"}), "resume record")
    run = get_run(engine, run_id)
    if run is None:
        return False
    history = run.resumes
    if not history or "from_step" in history[-1]:
        history.append({"at": utcnow().isoformat(timespec="seconds"), "by": "train"})
    history[-1].update(details)
    return _update_run(engine, run.id, resume_json=_dump_json(history, "resume_json"))


_pid_alive = pid_alive  # the default liveness check of a bare PID (signal 0)

# What the orphan check reads of a running run.
_ORPHAN_COLUMNS = (_RUN.c.id, _RUN.c.worker_pid, _RUN.c.worker_id, _RUN.c.heartbeat_at, _RUN.c.started_at,
                   _RUN.c.cancel_requested)


def _orphan_reason(row: Any, now: datetime, stale_after_s: float, is_alive: Callable[[int], bool],
                   stuck: bool) -> Optional[str]:
    """Why a running run has no live worker (None: it has one).

    A run with a ``worker_id`` goes by it (heft_common.process.worker_alive): a worker that is
    known to be gone orphans its run at once; one this process cannot see (another container)
    orphans it when its heartbeat is older than ``stale_after_s``. A run with only a
    ``worker_pid`` goes by that PID and the heartbeat. ``stuck`` (a cancel): a live worker that
    stopped heartbeating counts too, and a bare PID does not (it may name another process).
    """
    last_seen: Optional[datetime] = row.heartbeat_at or row.started_at
    stale = last_seen is None or now - last_seen > timedelta(seconds=stale_after_s)
    if row.worker_id:
        alive = worker_alive(row.worker_id)
        if alive is False:
            reused = row.worker_pid is not None and row.worker_pid > 0 and is_alive(row.worker_pid)
            return (f"worker process {row.worker_pid} is no longer running"
                    + (" (that PID now belongs to another process, e.g. after a restart)" if reused else ""))
        if alive is True and not stuck:
            return None
    elif not stuck and row.worker_pid is not None and row.worker_pid > 0 and not is_alive(row.worker_pid):
        # (A cancel does not go by a bare PID: without a worker id only a silent heartbeat ends the run here.)
        return f"worker process {row.worker_pid} is no longer running"
    if not stale:
        return None
    age = "never" if last_seen is None else f"{(now - last_seen).total_seconds():.0f} s ago"
    return f"no heartbeat from worker {row.worker_pid} for more than {stale_after_s:g} s (last: {age})"


def _finish_if_orphaned(engine: Engine, row: Any, now: datetime, stale_after_s: float,
                        is_alive: Callable[[int], bool], stuck: bool = False) -> bool:
    """Interrupt (or, if a cancel was asked for, cancel) a running run whose worker is gone; True if done."""
    reason = _orphan_reason(row, now, stale_after_s, is_alive, stuck)
    if reason is None:
        return False
    if row.cancel_requested or stuck:
        status, error = RunStatus.CANCELLED, f"Cancelled: {reason}, so it was stopped here."
    else:
        status = RunStatus.INTERRUPTED
        error = f"Interrupted: {reason}. Resume it to continue from its last checkpoint, or re-queue it to start over."
    # Only if still running with the heartbeat we judged: a fresh heartbeat wins.
    hb_cond = _RUN.c.heartbeat_at.is_(None) if row.heartbeat_at is None else _RUN.c.heartbeat_at == row.heartbeat_at
    if not _update_run(engine, row.id, and_(_RUN.c.status == RunStatus.RUNNING.value, hb_cond),
                       status=status.value, error=error, finished_at=now):
        return False
    log.warning("Run %d marked %s: %s", row.id, status.value, reason)
    return True


def mark_orphans_interrupted(
    engine: Engine,
    is_alive: Optional[Callable[[int], bool]] = None,
    stale_after_s: float = STALE_AFTER_S,
) -> list[int]:
    """Mark running runs whose worker died (or went silent) as interrupted.

    A run claimed with a worker id is orphaned when that worker is known to be gone (another
    process now has its PID, the machine rebooted), or when this process cannot tell and the
    run's heartbeat_at (else started_at) is older than ``stale_after_s`` seconds; a run with
    only a worker_pid when that PID is not alive (``is_alive``, default ``os.kill(pid, 0)``)
    or its heartbeat is that old. A run whose cancel was requested ends cancelled instead.
    Workers call this when they start and on every heartbeat, so a live worker must heartbeat
    more often than ``stale_after_s``. Returns the ids marked.
    """
    alive = is_alive or _pid_alive
    now = utcnow()
    with engine.connect() as conn:
        rows = conn.execute(
            select(*_ORPHAN_COLUMNS).where(_RUN.c.status == RunStatus.RUNNING.value).order_by(_RUN.c.id)
        ).all()
    return [row.id for row in rows if _finish_if_orphaned(engine, row, now, stale_after_s, alive)]


@dataclass(frozen=True)
class DeletedRun:
    """What deleting a run did to its files (the database row is always gone).

    ``files``: "deleted" (its run directory was removed), "kept" (left in place, ``reason`` says
    why), "missing" (the directory was already gone) or "none" (the run never had one).
    ``path`` is the run directory as resolved, or None.
    """

    run_id: int
    files: str
    path: Optional[str] = None
    reason: str = ""


def delete_run(engine: Engine, run_id: int, data_home: Path) -> bool:
    """Delete a run, its metrics and evaluations, and its artifact directory (see :func:`delete_run_report`).

    Returns False if the run did not exist.
    """
    return delete_run_report(engine, run_id, data_home) is not None


def delete_run_report(engine: Engine, run_id: int, data_home: Path) -> Optional[DeletedRun]:
    """Delete a run, its metrics and evaluations, and its artifact directory; say what happened to the files.

    Refuses (ValueError) a running run. The artifact directory (a relative one lies in
    ``data_home``) is removed only if its resolved real path lies strictly inside
    ``data_home/runs`` and the path has no ``..`` and is not itself a symlink; otherwise only
    the database row goes, a warning is logged and the report says why the files were kept.
    Returns None if the run did not exist.
    """
    run_id = validate_run_id(run_id)
    with engine.connect() as conn:
        row = conn.execute(
            select(_RUN.c.status, _RUN.c.artifact_dir).where(_RUN.c.id == run_id)
        ).first()
        if row is None:
            return None
        if row.status == RunStatus.RUNNING.value:
            raise RunStateError(f"run {run_id} is running; cancel it before deleting it")
        # Conditional so a worker claiming the run meanwhile makes us refuse, not delete.
        result = conn.execute(
            delete(_RUN).where(_RUN.c.id == run_id, _RUN.c.status != RunStatus.RUNNING.value)
        )
        conn.commit()
    if result.rowcount != 1:
        raise RunStateError(f"run {run_id} started running; cancel it before deleting it")
    log.info("Deleted run %d", run_id)
    if not row.artifact_dir:
        return DeletedRun(run_id, "none")
    return _remove_artifact_dir(row.artifact_dir, Path(data_home), run_id)


def _safe_artifact_path(artifact_dir: str, data_home: Path) -> tuple[Optional[Path], str]:
    """The real path to delete, or (None, reason) if deleting it could escape runs/."""
    raw = Path(artifact_dir)
    if not raw.is_absolute():
        raw = data_home / raw  # stored relative to the data home
    if ".." in raw.parts:
        return None, "its path contains '..'"
    if raw.is_symlink():
        return None, "its path is a symlink"
    runs_root = (data_home / "runs").resolve()
    real = raw.resolve()
    if runs_root not in real.parents:
        return None, f"its real path {real} is not inside {runs_root}"
    return real, ""


def _remove_artifact_dir(artifact_dir: str, data_home: Path, run_id: int) -> DeletedRun:
    shown = str(data_home / artifact_dir) if not Path(artifact_dir).is_absolute() else artifact_dir
    real, reason = _safe_artifact_path(artifact_dir, data_home)
    if real is None:
        log.warning("Run %d: kept artifact dir %s (%s)", run_id, artifact_dir, reason)
        return DeletedRun(run_id, "kept", shown, reason)
    if not real.exists():
        return DeletedRun(run_id, "missing", str(real))
    if not real.is_dir():
        log.warning("Run %d: kept artifact path %s (not a directory)", run_id, real)
        return DeletedRun(run_id, "kept", str(real), "it is not a directory")
    try:
        # rmtree unlinks symlinks found inside instead of following them.
        shutil.rmtree(real)
    except OSError as error:
        log.warning("Run %d: could not remove artifact dir %s: %s", run_id, real, error)
        return DeletedRun(run_id, "kept", str(real), f"removing it failed ({error.strerror or error})")
    log.info("Run %d: removed artifact dir %s", run_id, real)
    return DeletedRun(run_id, "deleted", str(real))


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


def delete_metrics_after(
    engine: Engine, run_id: int, step: int, cumulative_epoch: Optional[float] = None
) -> tuple[int, int]:
    """Delete a run's step metrics after ``step`` (and evaluations after ``cumulative_epoch``), in one transaction.

    A resumed run reports those steps again from its checkpoint, so each step is stored once.
    Returns (step rows deleted, evaluation rows deleted).
    """
    run_id = validate_run_id(run_id)
    with engine.begin() as conn:
        steps = conn.execute(delete(_STEP).where(_STEP.c.run_id == run_id, _STEP.c.step > step)).rowcount
        evals = 0
        if cumulative_epoch is not None:
            evals = conn.execute(
                delete(_EVAL).where(_EVAL.c.run_id == run_id, _EVAL.c.cumulative_epoch > cumulative_epoch)
            ).rowcount
    return steps, evals


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
    engine: Engine, run_id: int, after_id: int = 0, limit: Optional[int] = None, after_step: Optional[int] = None
) -> list[dict[str, Any]]:
    """Step metrics of a run with ``id > after_id`` (and ``step > after_step`` if given), ordered by id, as dicts.

    Each dict has id, run_id, stage, epoch, step, loss, learning_rate, tokens_per_second,
    elapsed_seconds, created_at. Pass the last ``id`` seen as ``after_id`` next time: ids
    only grow and a batch commits atomically, so polling sees every step exactly once, in
    order. ``after_step`` serves clients that know steps, not ids (the run_detail API).
    """
    stmt = (
        select(_STEP)
        .where(_STEP.c.run_id == validate_run_id(run_id), _STEP.c.id > after_id)
        .order_by(_STEP.c.id)
    )
    if after_step is not None:
        stmt = stmt.where(_STEP.c.step > after_step)
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


# --------------------------------------------------------------------------- studies

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
