"""A consistent copy of the registry while HEFT Studio runs: ``python -m storage.backup DEST``.

Uses SQLite's online backup API, so the copy holds every committed run (the WAL's content too) even
while the app and the worker write, and it is one self-contained file (journal mode DELETE: no
``-wal`` or ``-shm`` beside it). Written under a temporary name next to DEST and renamed last, so DEST is
never a half-written database. DEST may be a directory (the copy is named ``heft-<UTC time>.db`` there).
"""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from heft_common.errors import StoreError
from heft_common.home import database_path
from storage.db import BUSY_TIMEOUT_MS, check_integrity

log = logging.getLogger(__name__)


def backup(destination: str | Path, db_path: str | Path | None = None) -> Path:
    """Copy the database (default: the data home's ``heft.db``) to ``destination``; returns the file written.

    Raises StoreError when the database is missing or damaged, or when ``destination`` exists as a file.
    """
    source = Path(db_path) if db_path is not None else database_path()
    if not source.is_file():
        raise StoreError(f"{source} does not exist: there is no database to back up")
    check_integrity(source)
    target = Path(destination)
    if target.is_dir():
        target = target / f"heft-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.db"
    if target.exists():
        raise StoreError(f"{target} exists; a backup never overwrites a file (choose another name)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    reader = sqlite3.connect(str(source), timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        copy = sqlite3.connect(str(partial))
        try:
            reader.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            copy.commit()
        finally:
            copy.close()
    finally:
        reader.close()
    os.replace(partial, target)
    log.info("Backed up %s to %s", source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.backup",
        description="Write a consistent copy of HEFT Studio's database (SQLite's backup API).")
    parser.add_argument("destination", help="file to write, or a directory to write heft-<time>.db into")
    parser.add_argument("--db", help="database to copy (default: HEFT_HOME/heft.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = backup(args.destination, args.db)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Backed up to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
