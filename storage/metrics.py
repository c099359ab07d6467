"""Per-step metrics and per-epoch evaluations of runs, returned as plain dicts."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from sqlalchemy import Engine, delete, insert, select

from storage.common import _EVAL, _STEP, _check_keys, validate_run_id
from storage.models import utcnow

STEP_FIELDS: frozenset[str] = frozenset(
    {"stage", "epoch", "step", "loss", "learning_rate", "tokens_per_second",
     "elapsed_seconds", "created_at"}
)
STEP_REQUIRED: frozenset[str] = frozenset({"stage", "step"})
EVAL_FIELDS: frozenset[str] = frozenset(
    {"stage", "epoch", "cumulative_epoch", "accuracy", "accuracy_low", "accuracy_high",
     "n", "scoring", "generation_accuracy", "generation_low", "generation_high", "unparsed", "yes_share",
     "created_at"}
)
# An evaluation as the engine writes it (heft_core.callbacks.EvalEvent.to_dict, a run's evals.json) -> its row.
_EVENT_TO_ROW = {"low": "accuracy_low", "high": "accuracy_high"}
EVAL_REQUIRED: frozenset[str] = frozenset({"stage", "epoch"})


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


def eval_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """The ``epoch_eval`` row of one evaluation in the engine's form (``EvalEvent.to_dict``, ``evals.json``):
    its accuracy, interval, which scoring produced them and, when generation also ran, its numbers."""
    row = {_EVENT_TO_ROW.get(key, key): value for key, value in event.items()}
    return {key: row.get(key) for key in EVAL_FIELDS if key != "created_at"}


def add_epoch_eval(engine: Engine, run_id: int, row: Mapping[str, Any]) -> int:
    """Insert one per-epoch evaluation; returns its id.

    Needs ``stage`` and ``epoch``; optional: the other :data:`EVAL_FIELDS` (:func:`eval_row` makes them
    from an engine's evaluation).
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
