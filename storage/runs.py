"""Runs: queue, claim, heartbeat, progress, finish, cancel, re-queue, resume and delete.

State changes that can race between processes (claim, cancel, finish, delete) are single conditional
``UPDATE``/``DELETE`` statements whose ``rowcount`` says whether this caller won.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Engine, delete, or_, select, update
from sqlmodel import col

from heft_common.errors import RunNotFound, RunStateError
from heft_common.process import pid_alive, worker_identity
from heft_common.vocabulary import METHODS, REQUEUEABLE_STATUSES, TERMINAL_STATUSES, RunStatus
from storage.common import (
    _RUN,
    _check_keys,
    _detached_session,
    _dump_json,
    _resolved,
    _status_value,
    _stored_artifact_dir,
    _update_run,
    validate_run_id,
)
from storage.models import Run, utcnow
from storage.orphans import _ORPHAN_COLUMNS, STALE_AFTER_S, _finish_if_orphaned

log = logging.getLogger(__name__)

WaitRule = Callable[[Run], bool]  # True: this queued run must wait (claim_next_run passes it over)

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


def claim_next_run(
    engine: Engine, worker_pid: int, worker_id: Optional[str] = None, *, waits: Optional[WaitRule] = None,
) -> Optional[Run]:
    """Atomically take the oldest queued run for this worker; None if the queue is empty.

    ``worker_id`` (heft_common.process.worker_identity) is what the orphan check goes by; the
    bare ``worker_pid`` is kept for display and for rows written without an id. ``waits`` says of a
    queued run that it must wait (a study's HEFT run whose stage 1 another run is still training,
    ``app.shared_stages``): such runs are passed over, the next one is taken.

    The claim is one ``UPDATE ... WHERE id=? AND status='queued'``; if another worker got
    there first (rowcount 0) the next candidate is tried, so a run is never taken twice.
    """
    for candidate in _claimable(engine, waits):
        now = utcnow()
        with engine.connect() as conn:
            result = conn.execute(
                update(_RUN)
                .where(_RUN.c.id == candidate.id, _RUN.c.status == RunStatus.QUEUED.value)
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
            log.info("Worker %d claimed run %d", worker_pid, candidate.id)
            return get_run(engine, candidate.id)
        log.debug("Run %d was claimed by another worker; trying the next one", candidate.id)
    return None


def _claimable(engine: Engine, waits: Optional[WaitRule]) -> Iterator[Run]:
    """The queued runs, oldest first, but those ``waits`` holds back (asked lazily: only up to the one taken)."""
    stmt = select(Run).where(col(Run.status) == RunStatus.QUEUED.value).order_by(col(Run.id))
    with _detached_session(engine) as sess:
        runs = list(sess.scalars(stmt))
        sess.expunge_all()
    return (run for run in runs if waits is None or not waits(run))


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


def next_queued_run(engine: Engine, *, waits: Optional[WaitRule] = None) -> Optional[Run]:
    """The run :func:`claim_next_run` would take now (the oldest queued one ``waits`` does not hold back),
    without claiming it."""
    return next(iter(_claimable(engine, waits)), None)


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
