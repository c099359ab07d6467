"""Importing a verified study directory into the registry: all of it in one transaction, or nothing.

The app checks the directory first (``heft_core.study_manifest.verify_study_dir``: whole, unaltered,
this version) and hands over the spec and the index entries; this module copies the run
directories into ``<home>/runs/`` under hidden temporary names (``.import-…``, which the worker,
rebuilds and listings skip), inserts the study, its runs (with their step metrics and per-epoch
evaluations) and only then renames the copies to ``<id>-<random>`` and commits. Any failure before
the commit rolls the transaction back and removes the copies, so the registry and the data home
are as they were. Imported runs keep their results, arm, seed and grid point, and say where they
came from: their name ends in "imported from <study> (<dir name>)", and ``node`` holds that origin
(``executor`` is "import"). Each copied directory gets ``registry.json``, so a rebuild finds it.
No torch: reads JSON and copies files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

from sqlmodel import select

from heft_common.errors import StudyDirError
from heft_common.vocabulary import RunStatus
from storage.common import _detached_session, _stored_artifact_dir
from storage.models import EpochEval, Run, StepMetric, Study, utcnow
from storage.rebuild import ERROR_FILE, RUN_FILE, _evals, _run_fields, _steps, write_registry_record

log = logging.getLogger(__name__)

IMPORT_EXECUTOR = "import"
TEMP_PREFIX = ".import-"


@dataclass
class ImportedStudy:
    """What an import wrote: the study's id and its runs' ids, in the index's order."""

    study_id: int
    run_ids: list[int] = field(default_factory=list)
    origin: str = ""


def origin_label(study_name: str, directory: str | Path) -> str:
    """How an imported run says where it came from."""
    return f"imported from {study_name} ({Path(directory).name})"


def already_imported(engine: Any, origin: str) -> int | None:
    """The study id of an earlier import with this origin, or None."""
    with _detached_session(engine) as sess:
        run = sess.exec(select(Run).where(Run.executor == IMPORT_EXECUTOR, Run.node == origin).limit(1)).first()
        return run.study_id if run is not None else None


def _entry_fields(source: Path, entry: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The Run columns of one index entry whose run directory is ``source``."""
    record = json.loads((source / RUN_FILE).read_text()) if (source / RUN_FILE).is_file() else None
    registry = {"arm": entry["arm"], "seed": entry["seed"], "grid_point": entry.get("grid_point") or None,
                "method": entry["method"]}
    if record is None:  # a failed run: no results, its error from the index
        registry["config"] = {"method": entry["method"]}
    fields = _run_fields(source, registry, record)
    config = json.loads(fields["config_json"])
    base = str(config.get("name") or f"{entry['arm']} s{entry['seed']}")
    fields["name"] = f"{base} · {origin}"
    if entry["status"] == RunStatus.FAILED.value:
        error = entry.get("error") or ((source / ERROR_FILE).read_text().strip() if (source / ERROR_FILE).is_file()
                                       else "failed in the imported study")
        fields.update(status=RunStatus.FAILED.value, error=error, failure_kind="crash")
    wall = entry.get("wall_seconds")
    if isinstance(wall, (int, float)) and wall >= 0:  # the report's wall time: finished - started
        fields["started_at"] = fields["finished_at"] - timedelta(seconds=float(wall))
    fields["created_at"] = fields["started_at"]
    fields.update(executor=IMPORT_EXECUTOR, node=origin, worker_id=None)
    return fields


def import_study_dir(engine: Any, home: str | Path, directory: str | Path, *, name: str, spec: Mapping[str, Any],
                     entries: Sequence[Mapping[str, Any]]) -> ImportedStudy:
    """Import the study in ``directory`` (already verified) into ``engine``'s registry and ``home``'s runs/.

    ``entries`` are the directory's ``study.json`` runs (arm, seed, grid_point, method, run_dir, status, error,
    wall_seconds). Raises StudyDirError when this study was imported before or a run directory cannot be
    read; then nothing is written."""
    directory = Path(directory)
    origin = origin_label(name, directory)
    earlier = already_imported(engine, origin)
    if earlier is not None:
        raise StudyDirError(f"{directory.name} was imported before, as study #{earlier}; delete its runs to "
                            "import it again")
    runs_root = Path(home) / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    copies: list[Path | None] = []  # per entry: its copy under a temporary name, or None (no run directory)
    renamed: list[tuple[Path, Path]] = []
    try:
        for index, entry in enumerate(entries):
            source = directory / entry["run_dir"]
            if not source.is_dir():
                copies.append(None)
                continue
            target = runs_root / f"{TEMP_PREFIX}{token}-{index:03d}"
            shutil.copytree(source, target)
            copies.append(target)
        imported = _insert(engine, runs_root, name, spec, entries, copies, origin, renamed)
    except BaseException:
        for final, temporary in reversed(renamed):  # renamed before a commit that did not happen
            if final.exists():
                os.replace(final, temporary)
        for copy in copies:
            if copy is not None:
                shutil.rmtree(copy, ignore_errors=True)
        raise
    log.info("Imported study %s from %s as study %d with %d runs", name, directory, imported.study_id,
             len(imported.run_ids))
    return imported


def _insert(engine: Any, runs_root: Path, name: str, spec: Mapping[str, Any], entries: Sequence[Mapping[str, Any]],
            copies: Sequence[Path | None], origin: str, renamed: list[tuple[Path, Path]]) -> ImportedStudy:
    """One transaction: the study, its runs, their metrics and evaluations; the copies renamed before the commit."""
    try:
        rows = []
        for entry, copy in zip(entries, copies):
            source = copy if copy is not None else runs_root / f"{TEMP_PREFIX}missing"
            if copy is None and entry["status"] != RunStatus.FAILED.value:
                raise StudyDirError(f"{entry['run_dir']} is missing")
            fields = _entry_fields(copy, entry, origin) if copy is not None else None
            rows.append((fields, _steps(copy) if copy else [], _evals(copy) if copy else [], source))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, StudyDirError):
            raise
        raise StudyDirError(f"a run directory of the study cannot be read ({type(exc).__name__}: {exc})") from None
    with _detached_session(engine) as sess:
        study = Study(name=name, spec_json=json.dumps(dict(spec), sort_keys=True), created_at=utcnow())
        sess.add(study)
        sess.flush()
        imported = ImportedStudy(study_id=int(study.id), origin=origin)
        for entry, (fields, steps, evals, _), copy in zip(entries, rows, copies):
            if fields is None:  # a failed run that left no directory
                fields = {"name": f"{entry['arm']} s{entry['seed']} · {origin}", "method": entry["method"],
                          "config_json": "{}", "base_model": "", "data_source": "", "status": RunStatus.FAILED.value,
                          "error": entry.get("error") or "failed in the imported study", "failure_kind": "crash",
                          "arm": entry["arm"], "seed": entry["seed"], "executor": IMPORT_EXECUTOR, "node": origin,
                          "grid_point": json.dumps(entry.get("grid_point") or {}, sort_keys=True),
                          "created_at": utcnow(), "artifact_dir": None}
            fields = {**fields, "batch_id": f"study-{study.id}", "study_id": study.id}
            fields["grid_point"] = fields.get("grid_point") or "{}"  # as create_study stores "no grid"
            run = Run(**fields)
            sess.add(run)
            sess.flush()
            imported.run_ids.append(int(run.id))
            sess.add_all(StepMetric(run_id=run.id, **step) for step in steps)
            sess.add_all(EpochEval(run_id=run.id, **row) for row in evals)
            if copy is not None:
                final = runs_root / f"{run.id:06d}-{uuid.uuid4().hex[:8]}"
                run.artifact_dir = _stored_artifact_dir(final)
                write_registry_record(copy, run)
                os.replace(copy, final)
                renamed.append((final, copy))
        sess.commit()
    return imported
