"""Rebuild the run registry (the database) from the run directories: ``python -m storage.rebuild``.

The database is an index; the run directories hold the runs. When ``heft.db`` is damaged (see
:class:`storage.db.DamagedStoreError`) or lost, this writes a fresh one from ``runs/*/``:

- ``run.json`` (written when a run finished or was cancelled): config, eval signature, results; with
  ``metrics.jsonl`` (one line per step) and ``evals.json`` (per-epoch accuracy) when present;
- ``registry.json`` (written by the worker when a run starts): its id, name, batch and study cell, so
  runs that failed or were interrupted come back too (failed with ``error.txt``'s reason, else
  interrupted), and finished runs keep their names and ids.

Run ids are kept where the directory names one (``runs/000012-…``) and no other directory took it
first. Studies themselves are not in the run directories: rebuilt runs keep their arm, seed and grid
point but belong to no study. The rebuilt file is written next to the old one and moved into place
last; an existing database is never overwritten (``--move-aside`` renames it, with its ``-wal`` and
``-shm`` files, to ``heft.db.damaged-<time>``). Imports no torch: reads JSON files only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from heft_common.errors import StoreError
from heft_common.home import HOME_ENV, data_home
from heft_common.vocabulary import METHODS, RunStatus
from storage import queries
from storage.db import get_engine, init_db
from storage.models import Run

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # heft_core.artifacts.RUN_FILE (storage does not import the engine)
REGISTRY_FILE = "registry.json"
ERROR_FILE = "error.txt"  # app.logs.ERROR_FILE
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.json"
SIDE_FILES = ("-wal", "-shm")

_ID_PREFIX = re.compile(r"^(\d+)(?:-|$)")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def write_registry_record(run_dir: str | Path, run: Run) -> Path:
    """Write what the registry knows of ``run`` into its directory (``registry.json``), for a later rebuild."""
    record = {
        "id": run.id, "name": run.name, "method": run.method, "config": run.config, "base_model": run.base_model,
        "data_source": run.data_source, "eval_signature": run.eval_signature, "batch_id": run.batch_id,
        "total_epochs": run.total_epochs, "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
        "arm": run.arm, "seed": run.seed, "grid_point": run.grid_values if run.grid_point else None,
        "worker_id": run.worker_id,
    }
    path = Path(run_dir) / REGISTRY_FILE
    tmp = path.with_name(f".{REGISTRY_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


@dataclass
class RebuildReport:
    """What a rebuild did: the database written, the runs restored, the directories skipped and why."""

    database: Path
    restored: dict[int, str] = field(default_factory=dict)  # run id -> directory name
    skipped: dict[str, str] = field(default_factory=dict)  # directory name -> reason
    moved_aside: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"Rebuilt {self.database} with {len(self.restored)} run(s) from their run directories."]
        lines += [f"Kept the damaged database as {path}" for path in self.moved_aside]
        lines += [f"Skipped {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _timestamp(value: Any, fallback: float) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    return datetime.fromtimestamp(fallback, timezone.utc)


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            step = json.loads(line)
            rows.append({key: step.get(key) for key in queries.STEP_FIELDS if key != "created_at"})
    return [row for row in rows if row.get("stage") is not None and row.get("step") is not None]


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / EVALS_FILE
    if not path.exists():
        return []
    return [queries.eval_row(e) for e in _read_json(path) if e.get("stage") is not None and e.get("epoch") is not None]


def _run_fields(run_dir: Path, registry: Mapping[str, Any], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Run columns of one run directory (raises KeyError/TypeError/ValueError for a damaged one)."""
    config = dict(record["config"] if record else registry["config"])
    method = str(config.get("method") or registry.get("method"))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    mtime = (run_dir / (RUN_FILE if record else REGISTRY_FILE)).stat().st_mtime
    fields: dict[str, Any] = {
        "name": str(registry.get("name") or config.get("name") or f"{method} run from {run_dir.name}"),
        "method": method, "config_json": json.dumps(config, sort_keys=True),
        "base_model": str(registry.get("base_model") or config.get("model") or ""),
        "data_source": str(registry.get("data_source") or config.get("data") or ""),
        "eval_signature": (record or {}).get("eval_signature") or registry.get("eval_signature"),
        "batch_id": registry.get("batch_id"), "total_epochs": registry.get("total_epochs"),
        "created_at": _timestamp(registry.get("created_at"), mtime),
        "started_at": _timestamp(registry.get("started_at"), mtime), "finished_at": _timestamp(None, mtime),
        "artifact_dir": f"runs/{run_dir.name}", "arm": registry.get("arm"), "seed": registry.get("seed"),
        "grid_point": json.dumps(registry["grid_point"], sort_keys=True) if registry.get("grid_point") else None,
        "worker_id": registry.get("worker_id"),
    }
    if record is not None:
        result = record.get("result") or {}
        ci = result.get("accuracy_ci") or [None, None]
        cancelled = result.get("status") == RunStatus.CANCELLED
        fields.update(
            status=(RunStatus.CANCELLED if cancelled else RunStatus.COMPLETED).value,
            error="cancelled (rebuilt from its run directory)" if cancelled else None,
            accuracy=result.get("accuracy"), accuracy_low=ci[0], accuracy_high=ci[1], eval_n=result.get("eval_n"),
            train_seconds=result.get("train_seconds"), tokens_per_second=result.get("tokens_per_second"),
            trainable_params=result.get("trainable_params"),
            trainable_params_json=json.dumps(result["trainable_params_by_stage"], sort_keys=True)
            if result.get("trainable_params_by_stage") is not None else None,
        )
    elif (run_dir / ERROR_FILE).exists():
        fields.update(status=RunStatus.FAILED.value, error=(run_dir / ERROR_FILE).read_text().strip())
    else:
        fields.update(status=RunStatus.INTERRUPTED.value,
                      error="Interrupted: rebuilt from its run directory, which holds no result (the run did not "
                            "finish). Re-queue it to run again.")
    return fields


def _wanted_id(run_dir: Path, registry: Mapping[str, Any]) -> int | None:
    value = registry.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _ID_PREFIX.match(run_dir.name)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def _insert(engine: Any, fields: Mapping[str, Any], wanted: int | None, steps: list, evals: list) -> int:
    with queries._detached_session(engine) as sess:
        taken = wanted is not None and sess.get(Run, wanted) is not None
        run = Run(id=None if taken else wanted, **fields)
        sess.add(run)
        sess.commit()
        run_id = int(run.id)
    if steps:
        queries.add_step_metrics(engine, run_id, steps)
    for row in evals:
        queries.add_epoch_eval(engine, run_id, row)
    return run_id


def run_directories(home: Path) -> list[Path]:
    """The directories under ``<home>/runs`` a rebuild reads (names starting with "." are partial copies)."""
    runs_root = Path(home) / "runs"
    if not runs_root.is_dir():
        return []
    return sorted(p for p in runs_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_run_directories(engine: Any, home: Path, report: RebuildReport) -> RebuildReport:
    """Insert one run per readable directory under ``<home>/runs`` into ``engine``'s database (see the module
    docstring), recording in ``report`` what was restored and what was skipped and why."""
    for run_dir in run_directories(home):
        try:
            record = _read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else None
            registry = _read_json(run_dir / REGISTRY_FILE) if (run_dir / REGISTRY_FILE).exists() else {}
            if record is None and not registry:
                report.skipped[run_dir.name] = (f"no {RUN_FILE} or {REGISTRY_FILE} "
                                                "(not a run directory, or it never started)")
                continue
            fields = _run_fields(run_dir, registry, record)
            steps, evals = _steps(run_dir), _evals(run_dir)
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:  # a damaged directory
            report.skipped[run_dir.name] = f"cannot be read ({type(error).__name__}: {error})"
            continue
        run_id = _insert(engine, fields, _wanted_id(run_dir, registry), steps, evals)
        report.restored[run_id] = run_dir.name
    return report


def move_aside(db_path: Path) -> list[Path]:
    """Rename a database and its -wal/-shm files to ``<name>.damaged-<UTC time>``; returns the new paths."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    moved = []
    for suffix in ("",) + SIDE_FILES:
        source = db_path.with_name(db_path.name + suffix)
        if source.exists():
            target = db_path.with_name(f"{db_path.name}.damaged-{stamp}{suffix}")
            os.replace(source, target)
            moved.append(target)
    return moved


def rebuild(home: str | Path | None = None, db_path: str | Path | None = None, *,
            move_existing: bool = False) -> RebuildReport:
    """Write a fresh database from ``<home>/runs/*/`` (see the module docstring) and return what happened.

    Raises StoreError when the database exists and ``move_existing`` is False (nothing is written then).
    """
    home = Path(home) if home is not None else data_home()
    target = Path(db_path) if db_path is not None else home / "heft.db"
    report = RebuildReport(database=target)
    if target.exists():
        if not move_existing:
            raise StoreError(f"{target} exists; rebuilding never overwrites a database. Move it aside first "
                             "(or pass --move-aside to keep it as heft.db.damaged-<time>), then rebuild.")
        report.moved_aside = move_aside(target)
    building = target.with_name(target.name + ".rebuilding")
    for suffix in ("",) + SIDE_FILES:
        building.with_name(building.name + suffix).unlink(missing_ok=True)
    engine = get_engine(building)
    init_db(engine)
    index_run_directories(engine, home, report)
    engine.dispose()
    # One plain file to move into place: fold the WAL back into it.
    with sqlite3.connect(building) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    os.replace(building, target)
    log.info("%s", report.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.rebuild",
        description="Rebuild HEFT Studio's run database from the run directories (runs/*/run.json, registry.json).")
    parser.add_argument("--home", help=f"data home (default: {HOME_ENV} or ~/.cache/heft-studio)")
    parser.add_argument("--db", help="database to write (default: <home>/heft.db)")
    parser.add_argument("--move-aside", action="store_true",
                        help="rename an existing database (and its -wal/-shm files) to heft.db.damaged-<time> first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = rebuild(args.home, args.db, move_existing=args.move_aside)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
