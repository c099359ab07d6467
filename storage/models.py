"""SQLModel tables for HEFT Studio runs, their step metrics and per-epoch evaluations.

All datetimes are stored as naive UTC text (SQLite has no time zone type) and come back
as timezone-aware UTC ``datetime`` objects, via :class:`UTCDateTime`.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Optional

from sqlalchemy import DateTime, Index, Text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1
"""Version of the schema this code writes. Bump it and add a migration in db.MIGRATIONS."""


class RunStatus(StrEnum):
    """Run lifecycle: queued -> running -> completed | failed | cancelled | interrupted.

    A queued run may also go straight to cancelled. Terminal states never change again;
    re-queueing creates a new run.
    """

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


TERMINAL: frozenset[str] = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED}
)
ACTIVE: frozenset[str] = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
REQUEUEABLE: frozenset[str] = frozenset(
    {RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.CANCELLED}
)
METHODS: tuple[str, ...] = ("base", "lora", "reft", "heft")  # "base": a zero-shot evaluation run


def utcnow() -> datetime:
    """Current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores datetimes as naive UTC, returns them as aware UTC.

    SQLite drops tzinfo silently, so without this a local-time value and a UTC value
    would be indistinguishable once stored.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            # Naive values are taken to be UTC already (that is what we hand out).
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Run(SQLModel, table=True):
    """One training run (LoRA, ReFT or HEFT) and its summary results."""

    __tablename__ = "run"
    __table_args__ = (
        Index("ix_run_status_created_at", "status", "created_at"),
        Index("ix_run_method", "method"),
        Index("ix_run_eval_signature", "eval_signature"),
        # AUTOINCREMENT: never reuse the id of a deleted run (artifact dirs, UI links).
        {"sqlite_autoincrement": True},
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str
    method: str
    status: str = Field(default=RunStatus.QUEUED.value)
    config_json: str = Field(default="{}", sa_type=Text)
    base_model: str
    data_source: str
    # Hash of the exact eval question set: runs are comparable iff these are equal.
    eval_signature: Optional[str] = None
    # Runs launched together as one comparison batch share this id.
    batch_id: Optional[str] = Field(default=None, index=True)

    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: Optional[datetime] = Field(default=None, sa_type=UTCDateTime)
    finished_at: Optional[datetime] = Field(default=None, sa_type=UTCDateTime)
    heartbeat_at: Optional[datetime] = Field(default=None, sa_type=UTCDateTime)

    worker_pid: Optional[int] = None
    child_pid: Optional[int] = None
    cancel_requested: bool = False
    error: Optional[str] = Field(default=None, sa_type=Text)
    artifact_dir: Optional[str] = None

    trainable_params: Optional[int] = None
    # Per-stage counts, e.g. {"lora": 1234, "reft": 567}.
    trainable_params_json: Optional[str] = Field(default=None, sa_type=Text)

    accuracy: Optional[float] = None
    accuracy_low: Optional[float] = None
    accuracy_high: Optional[float] = None
    eval_n: Optional[int] = None
    train_seconds: Optional[float] = None
    tokens_per_second: Optional[float] = None

    # Latest progress snapshot: stage/epoch/step/total_steps/eta...
    progress_json: Optional[str] = Field(default=None, sa_type=Text)
    total_epochs: Optional[float] = None

    @property
    def config(self) -> dict[str, Any]:
        """The run configuration, parsed from ``config_json``."""
        return json.loads(self.config_json or "{}")

    @property
    def progress(self) -> dict[str, Any]:
        """The latest progress snapshot ({} if none yet)."""
        return json.loads(self.progress_json) if self.progress_json else {}

    @property
    def trainable_params_by_stage(self) -> dict[str, Any]:
        """Per-stage trainable parameter counts ({} if unknown)."""
        return json.loads(self.trainable_params_json) if self.trainable_params_json else {}

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


class StepMetric(SQLModel, table=True):
    """One logged optimizer step of a run."""

    __tablename__ = "step_metric"
    # (run_id, id) serves the incremental chart query "WHERE run_id=? AND id>? ORDER BY id".
    __table_args__ = (
        Index("ix_step_metric_run_id_id", "run_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", ondelete="CASCADE")
    stage: str
    epoch: Optional[float] = None
    step: int  # global optimizer step within the run (monotonic across stages)
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    elapsed_seconds: Optional[float] = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class EpochEval(SQLModel, table=True):
    """Evaluation accuracy measured at the end of an epoch."""

    __tablename__ = "epoch_eval"
    __table_args__ = (
        Index("ix_epoch_eval_run_id", "run_id"),
        {"sqlite_autoincrement": True},
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", ondelete="CASCADE")
    stage: str
    epoch: int
    # Epochs counted across stages (HEFT runs LoRA then ReFT), for a single x axis.
    cumulative_epoch: Optional[float] = None
    accuracy: Optional[float] = None
    accuracy_low: Optional[float] = None
    accuracy_high: Optional[float] = None
    n: Optional[int] = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SchemaInfo(SQLModel, table=True):
    """Single row holding the schema version of this database file."""

    __tablename__ = "schema_info"

    id: int = Field(default=1, primary_key=True)
    version: int
