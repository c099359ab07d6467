"""What the registry does at start-up so that it is never silently empty.

:func:`prepare_registry` runs when the app and the worker start, before they open the database:

1. With an archive configured (``HEFT_ARCHIVE``, :mod:`storage.archive`: a directory or a hub dataset repo)
   and no run directory in the local data home (an ephemeral disk after a restart), the archived run
   directories are copied back.
2. The data home's database (``<home>/heft.db``), when it is missing, new or holds no run (a file with
   only a header page, a lost ``-wal``) while run directories exist, is re-indexed from them
   (:func:`storage.rebuild.index_run_directories`),
   in place and under a file lock, so two processes starting together index once.

What happened is logged and returned (:class:`StartupReport`): its notice is what the Runs tab shows, and the
app hands the report to its worker, which then uses the same archive instead of opening it again.
"""
from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from heft_common.home import data_home
from storage import archive
from storage.db import open_db
from storage.models import Run
from storage.rebuild import RebuildReport, index_run_directories, run_directories

log = logging.getLogger(__name__)

LOCK_FILE = ".registry-start.lock"

@dataclass
class StartupReport:
    """What start-up did to the registry: archived directories restored, runs re-indexed, and a notice."""

    backend: archive.ArchiveBackend | None = None  # the configured archive, opened once (None: none or unusable)
    restored: archive.RestoreReport | None = None
    reindexed: RebuildReport | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def notice(self) -> str | None:
        return " ".join(self.notices) or None


def _run_count(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Run.__table__)).scalar() or 0)


def prepare_registry(db_path: str | Path | None = None, home: str | Path | None = None) -> StartupReport:
    """Restore from the archive and re-index as the module docstring says; returns what was done.

    Raises what :func:`storage.db.open_db` raises (a damaged or foreign database: nothing is done then).
    """
    home = Path(home) if home is not None else data_home()
    db_file = Path(db_path) if db_path is not None else home / "heft.db"
    report = StartupReport()
    with open(home / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        backend = report.backend = archive.archive_backend()
        if backend is not None and not run_directories(home):
            report.restored = backend.restore(home)
            restored = report.restored
            if restored.restored or restored.ignored or restored.error:
                log.warning("%s", restored.summary())
            if restored.error:
                report.notices.append(f"The data home was empty and the archive {backend.location} could not be "
                                      "read (see the log): no runs were restored from it.")
            if restored.restored:
                report.notices.append(f"The data home was empty: {len(restored.restored)} run(s) were restored "
                                      f"from the archive {backend.location}.")
            if restored.ignored:
                report.notices.append(f"{len(restored.ignored)} incomplete copy(ies) in the archive were ignored "
                                      "(see the log).")
        directories = run_directories(home)
        engine = open_db(db_file)
        # Only the data home's own database: a database elsewhere (--db) is not the index of this home's runs.
        own = db_file.resolve() == (home / "heft.db").resolve()
        if own and directories and _run_count(engine) == 0:
            report.reindexed = index_run_directories(engine, home, RebuildReport(database=db_file))
            found = len(report.reindexed.restored)
            log.warning("The database %s held no runs while %s has %d run directories: re-indexed %d run(s) from "
                        "them (%d skipped)", db_file, home / "runs", len(directories), found,
                        len(report.reindexed.skipped))
            for name, reason in sorted(report.reindexed.skipped.items()):
                log.warning("Re-index: skipped %s: %s", name, reason)
            report.notices.append(f"The run database was new or empty: {found} run(s) were re-indexed from their "
                                  "run directories (studies are not in the run directories, so these runs belong "
                                  "to no study).")
    return report
