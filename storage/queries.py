"""Every read and write HEFT Studio does on its database, as plain functions: one import for all of them.

The functions live by concern in ``storage.runs`` (queue, claim, finish, cancel, resume, delete),
``storage.metrics`` (step metrics, per-epoch evaluations), ``storage.studies``, ``storage.orphans``
(running runs whose worker is gone) and ``storage.common`` (run ids, artifact paths, sessions); this
module re-exports them, so ``from storage import queries`` then ``queries.get_run`` keeps working.

All functions take the engine first (see :func:`storage.db.get_engine`). Objects returned
are detached from any session and fully loaded, so callers may keep them across threads;
metric and evaluation rows are returned as plain dicts.

State changes that can race between processes (claim, cancel, finish, orphan marking,
delete) are single conditional ``UPDATE``/``DELETE`` statements whose ``rowcount`` says
whether this caller won.
"""
from __future__ import annotations

from storage.common import MAX_RUN_ID, _detached_session, resolve_artifact_dir, validate_run_id
from storage.metrics import (
    EVAL_FIELDS,
    EVAL_REQUIRED,
    STEP_FIELDS,
    STEP_REQUIRED,
    add_epoch_eval,
    add_step_metrics,
    delete_metrics_after,
    eval_row,
    evaluations,
    metrics_since,
)
from storage.orphans import STALE_AFTER_S, _pid_alive, mark_orphans_interrupted
from storage.runs import (
    FAILURE_KINDS,
    REQUEUE_SUFFIX,
    RESULT_FIELDS,
    RESUME_FIELDS,
    DeletedRun,
    claim_next_run,
    create_run,
    delete_run,
    delete_run_report,
    finish_run,
    get_run,
    heartbeat,
    is_cancel_requested,
    list_runs,
    next_queued_run,
    record_resume,
    request_cancel,
    requeue,
    resume_blocker,
    resume_run,
    run_with_artifact_dir,
    set_artifact_dir,
    set_child_pid,
    set_run_placement,
    start_external_run,
    update_progress,
)
from storage.studies import (
    STUDY_RUN_FIELDS,
    STUDY_RUN_REQUIRED,
    cancel_study,
    create_study,
    get_study,
    list_studies,
    set_study_report_dir,
    study_runs,
    study_status_counts,
    validate_study_id,
)

__all__ = [
    # common
    "MAX_RUN_ID", "resolve_artifact_dir", "validate_run_id",
    "_detached_session",  # storage.rebuild inserts rows with their own ids through it
    # runs
    "FAILURE_KINDS", "REQUEUE_SUFFIX", "RESULT_FIELDS", "RESUME_FIELDS", "DeletedRun", "claim_next_run",
    "create_run", "delete_run", "delete_run_report", "finish_run", "get_run", "heartbeat", "is_cancel_requested",
    "list_runs", "next_queued_run", "record_resume", "request_cancel", "requeue", "resume_blocker", "resume_run",
    "run_with_artifact_dir", "set_artifact_dir", "set_child_pid", "set_run_placement", "start_external_run",
    "update_progress",
    # orphans
    "STALE_AFTER_S", "_pid_alive", "mark_orphans_interrupted",
    # metrics
    "EVAL_FIELDS", "EVAL_REQUIRED", "STEP_FIELDS", "STEP_REQUIRED", "add_epoch_eval", "add_step_metrics", "eval_row",
    "delete_metrics_after", "evaluations", "metrics_since",
    # studies
    "STUDY_RUN_FIELDS", "STUDY_RUN_REQUIRED", "cancel_study", "create_study", "get_study", "list_studies",
    "set_study_report_dir", "study_runs", "study_status_counts", "validate_study_id",
]
