"""Running runs whose worker is gone: the orphan check that workers run at start-up and on every heartbeat,
and that a cancel of a stuck run uses."""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import Engine, and_, select

from heft_common.process import pid_alive, worker_alive
from heft_common.vocabulary import RunStatus
from storage.common import _RUN, _update_run
from storage.models import utcnow

log = logging.getLogger(__name__)

STALE_AFTER_S = 60.0  # a running run silent this long, whose worker cannot be seen, has none


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
