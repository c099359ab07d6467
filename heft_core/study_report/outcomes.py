"""A study's runs as recorded: :class:`RunOutcome`, from a run directory or a database row."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from heft_common.errors import RunLoadError
from heft_core.artifacts import load_run
from heft_core.study import grid_key

SHARED_STAGE1_FILE = "shared_stage1.json"  # in a HEFT run's directory: whose stage 1 it trained on (and its seconds)
RUNS_SUBDIR = "runs"  # a study directory's run directories: runs/<NNN-arm-sSEED>/


def portable_run_dir(value: Any) -> Any:
    """``/any/where/runs/<name>`` as ``runs/<name>`` (relative to its study directory or data home: a report names
    no path of the machine that wrote it); anything else as it is."""
    if not isinstance(value, str) or not value:
        return value
    path = PurePosixPath(value)
    return f"{RUNS_SUBDIR}/{path.name}" if path.is_absolute() and path.parent.name == RUNS_SUBDIR else value


@dataclass
class RunOutcome:
    """One run of a study as recorded: its cell, its status and, when finished, what it answered.

    ``predictions``: dicts with ``uid``, ``label`` (1 yes / 0 no), ``predicted``, ``correct``
    (and ``p_yes``), as in a run directory's ``predictions.jsonl``: ``predicted``/``correct`` are the
    run's primary scoring (``config["scoring"]``: logits for "logits" and "both", else generation);
    ``logits_correct`` and ``generation_predicted`` (1, 0, or None = unparsed) / ``generation_correct``
    are there when that scoring ran (older runs have neither: logits only). ``steps``: the per-step
    metrics (``stage``, ``tokens_per_second``, ``elapsed_seconds``), ``evals``: the per-epoch
    evaluations (``cumulative_epoch``, ``accuracy``).
    """

    arm: str
    seed: int
    grid_point: dict[str, Any]
    method: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: dict[str, int] = field(default_factory=dict)
    train_seconds: float | None = None
    wall_seconds: float | None = None
    train_examples: int | None = None
    eval_signature: str | None = None
    run_dir: str | None = None
    run_id: int | None = None
    error: str | None = None
    data_label: str | None = None  # run.json's data label (a name and a content hash for local data)
    # a HEFT run whose stage 1 is another run's finished LoRA: that run (its directory) and its training seconds
    shared_stage1_from: str | None = None
    shared_stage1_seconds: float | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return self.arm, self.seed, grid_key(self.grid_point)

    @property
    def finished(self) -> bool:
        return self.status == "completed" and bool(self.predictions)

    @classmethod
    def from_run_dir(
        cls,
        path: str | Path,
        *,
        arm: str,
        seed: int,
        grid_point: Mapping[str, Any] | None = None,
        method: str | None = None,
        status: str | None = None,
        run_id: int | None = None,
        wall_seconds: float | None = None,
        train_examples: int | None = None,
        error: str | None = None,
        shared_stage1_from: str | None = None,
        shared_stage1_seconds: float | None = None,
    ) -> "RunOutcome":
        """Read a run directory (``heft_core.artifacts``); an unreadable one gives an outcome without results."""
        try:
            run = load_run(path)
        except (RunLoadError, OSError, ValueError) as exc:
            return cls(
                arm,
                seed,
                dict(grid_point or {}),
                method or "",
                status or "failed",
                run_dir=str(path),
                run_id=run_id,
                wall_seconds=wall_seconds,
                train_examples=train_examples,
                error=error or str(exc),
            )
        result = run.meta.get("result", {})
        config = run.meta.get("config", {})
        shared_file = Path(path, SHARED_STAGE1_FILE)
        if shared_stage1_from is None and shared_file.is_file():  # shared by the app's worker (app.child)
            shared = json.loads(shared_file.read_text())
            shared_stage1_from, shared_stage1_seconds = shared.get("from"), shared.get("stage1_seconds")
        return cls(
            arm,
            seed,
            dict(grid_point or {}),
            method or config.get("method", ""),
            status or result.get("status", "completed"),
            config=config,
            predictions=run.predictions(),
            evals=run.evals(),
            steps=run.steps(),
            trainable_params={k: int(v) for k, v in (result.get("trainable_params_by_stage") or {}).items()},
            train_seconds=result.get("train_seconds"),
            wall_seconds=wall_seconds,
            train_examples=train_examples,
            eval_signature=run.meta.get("eval_signature"),
            run_dir=str(path),
            run_id=run_id,
            error=error,
            data_label=(run.meta.get("data") or {}).get("label"),
            shared_stage1_from=shared_stage1_from,
            shared_stage1_seconds=shared_stage1_seconds,
        )

    @classmethod
    def from_record(cls, row: Any) -> "RunOutcome":
        """From a database row of a study run (``storage.models.Run``: arm, seed, grid_point, status,
        artifact_dir, ...); a completed run's answers are read from its run directory."""
        grid_point = json.loads(row.grid_point) if getattr(row, "grid_point", None) else {}
        wall = None
        if getattr(row, "started_at", None) and getattr(row, "finished_at", None):
            wall = (row.finished_at - row.started_at).total_seconds()
        if row.status == "completed" and row.artifact_dir:
            return cls.from_run_dir(
                row.artifact_dir,
                arm=row.arm,
                seed=row.seed,
                grid_point=grid_point,
                method=row.method,
                status=row.status,
                run_id=row.id,
                wall_seconds=wall,
                error=row.error,
            )
        return cls(
            row.arm,
            row.seed,
            grid_point,
            row.method,
            row.status,
            config=row.config,
            run_dir=row.artifact_dir,
            run_id=row.id,
            wall_seconds=wall,
            error=row.error,
        )
