"""SQLite engine and schema creation / versioning for HEFT Studio.

The UI, the background worker and the training child processes all open the same SQLite
file. WAL mode lets readers poll while a writer commits; ``busy_timeout`` makes writers
wait for each other instead of failing. Call :func:`init_db` (or use :func:`open_db`)
once per process before running queries.
"""
from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlmodel import SQLModel

from heft_common.errors import StoreError
from heft_common.home import database_path

# Importing storage.models registers every table on SQLModel.metadata.
from storage.models import SCHEMA_VERSION, SchemaInfo

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
SCHEMA_TABLE = SchemaInfo.__tablename__


class SchemaError(StoreError):
    """The database file has a schema this code cannot (or must not) use."""


class DamagedStoreError(StoreError):
    """The database file is damaged (SQLite's quick_check fails); nothing is read from or written into it."""


def damaged_message(db_file: str | Path, problems: list[str]) -> str:
    """What happened to a damaged database and what to do about it (the run directories are intact)."""
    detail = "; ".join(problem[:200] for problem in problems[:3]) + ("; ..." if len(problems) > 3 else "")
    command = "python -m storage.rebuild --move-aside"
    if Path(db_file).resolve() != database_path().resolve():
        command += f" --db {db_file}"
    return (
        f"{db_file} is damaged (SQLite's integrity check: {detail}). HEFT Studio does not use a damaged database, so "
        "nothing more is written into it; the run directories (runs/ in the data home) are separate files and keep "
        f"every run. To go on: stop HEFT Studio, run `{command}` (it renames the damaged file to "
        "heft.db.damaged-<time> and rebuilds the run list from the run directories), then start again; or restore "
        "heft.db from a backup."
    )


def check_integrity(db_file: str | Path) -> None:
    """Raise :class:`DamagedStoreError` if an existing database fails ``PRAGMA quick_check``.

    Runs on a read-only connection before anything else touches the file, so a damaged database
    is never written into (SQLite may create the -wal/-shm side files it needs to read). A file
    that is not SQLite at all is left to :func:`init_db`, which says so.
    """
    path = Path(db_file)
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error:
        return  # cannot be opened read-only here; the normal open reports what is wrong
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall() if row[0] != "ok"]
    except sqlite3.DatabaseError as error:
        if "not a database" in str(error) or "locked" in str(error):
            return
        problems = [str(error)]
    finally:
        conn.close()
    if problems:
        raise DamagedStoreError(damaged_message(path, problems))


def _add_study_columns(conn: Connection) -> None:
    """Version 2: runs know their study, arm, seed and grid point (the study table itself is
    new, so create_all adds it). A version-0 file without a run table gets the whole table
    from create_all instead."""
    if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type='table' AND name='run'").first() is None:
        return
    existing = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(run)")}
    # The same column types create_all writes for a new database (see storage.models.Run).
    columns = {
        "study_id": "INTEGER REFERENCES study (id) ON DELETE SET NULL",
        "arm": "VARCHAR",
        "seed": "INTEGER",
        "grid_point": "TEXT",
        # Operations (same version): which worker instance owns a running run, where it ran, its resumes.
        "worker_id": "VARCHAR",
        "executor": "VARCHAR",
        "node": "VARCHAR",
        "devices": "VARCHAR",
        "resume_json": "TEXT",
        "failure_kind": "VARCHAR",
    }
    for name, ddl in columns.items():
        if name not in existing:
            conn.exec_driver_sql(f"ALTER TABLE run ADD COLUMN {name} {ddl}")
    # create_all does not add indexes to a table that already exists.
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_run_study_id ON run (study_id)")


def _add_eval_scoring_columns(conn: Connection) -> None:
    """Version 3: an epoch evaluation says which scoring produced its accuracy, with the generation numbers."""
    if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type='table' AND name='epoch_eval'").first() is None:
        return
    existing = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(epoch_eval)")}
    columns = {"scoring": "VARCHAR", "generation_accuracy": "FLOAT", "generation_low": "FLOAT",
               "generation_high": "FLOAT", "unparsed": "INTEGER", "yes_share": "FLOAT"}
    for name, ddl in columns.items():
        if name not in existing:
            conn.exec_driver_sql(f"ALTER TABLE epoch_eval ADD COLUMN {name} {ddl}")


# Migration that upgrades a database *to* the given version from the one before it. It
# runs inside the init_db write transaction; tables new in that version need no entry
# (create_all adds them afterwards). Version 1 is the baseline.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _add_study_columns, 3: _add_eval_scoring_columns}

# The one piece of global mutable state: engines keyed by resolved DB path, with the pid
# that created them so a forked child can drop connections it inherited.
_ENGINES: dict[str, tuple[Engine, int]] = {}
_ENGINES_LOCK = threading.Lock()
# Databases this process opened successfully (init_db passed), checkpointed at exit; a damaged or foreign
# file is never among them, so nothing is ever written into one.
_CHECKPOINT_AT_EXIT: set[tuple[str, int]] = set()


def _is_ours_or_empty(cursor: sqlite3.Cursor) -> bool:
    """True for an empty database or one that has our schema_info table."""
    cursor.execute("SELECT name FROM sqlite_master WHERE type='table'")
    names = {row[0] for row in cursor.fetchall()}
    return not names or SCHEMA_TABLE in names


def _install_listeners(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, record: Any) -> None:
        record.info["pid"] = os.getpid()
        cursor = dbapi_conn.cursor()
        try:
            # busy_timeout first, so the journal_mode switch itself waits for locks.
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # Switching to WAL rewrites the file header; don't touch a foreign file,
            # init_db will refuse it.
            if _is_ours_or_empty(cursor):
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        # SQLAlchemy's multiprocessing recipe: a connection inherited through fork must
        # never be used by the child; dropping it makes the pool open a fresh one.
        pid = os.getpid()
        if record.info.get("pid") != pid:
            owner = record.info.get("pid")
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError(
                f"connection created in process {owner}, checked out in {pid}"
            )


def get_engine(path: str | Path | None = None) -> Engine:
    """Return the (cached) engine for the database at ``path``.

    Defaults to ``heft_common.home.database_path()``. The parent directory is created.
    Engines are shared between threads; in a forked child the inherited pooled
    connections are discarded (not closed) and new ones opened.
    """
    db_path = Path(path if path is not None else database_path()).expanduser().resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(db_path)
    pid = os.getpid()
    with _ENGINES_LOCK:
        cached = _ENGINES.get(key)
        if cached is not None:
            engine, owner_pid = cached
            if owner_pid != pid:
                # close=False: the parent still owns those sqlite handles.
                engine.dispose(close=False)
                _ENGINES[key] = (engine, pid)
            return engine
        engine = create_engine(
            f"sqlite:///{db_path}",
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        )
        _install_listeners(engine)
        _ENGINES[key] = (engine, pid)
        log.debug("Opened database engine for %s", db_path)
        return engine


def _db_file(engine: Engine) -> str:
    return str(engine.url.database)


def init_db(engine: Engine) -> None:
    """Create the schema in an empty database, upgrade an older one, refuse anything else.

    Raises :class:`SchemaError` (leaving the file untouched) for a database written by a
    newer HEFT Studio, an unknown version, a SQLite file that is not a HEFT Studio
    database, or a file that is not SQLite at all, and :class:`DamagedStoreError` for a
    damaged one (:func:`check_integrity` runs first, read-only). Safe to call concurrently from
    several processes: everything happens under one ``BEGIN IMMEDIATE`` write lock.
    """
    db_file = _db_file(engine)
    check_integrity(db_file)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                _init_locked(conn, db_file)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        _register_exit_checkpoint(db_file)
    except exc.DatabaseError as error:
        orig = getattr(error, "orig", None)
        if isinstance(orig, sqlite3.DatabaseError) and "not a database" in str(orig):
            raise SchemaError(
                f"{db_file} is not a SQLite database, so not a HEFT Studio database; "
                "refusing to use it. Move it away or point HEFT_HOME elsewhere."
            ) from error
        if isinstance(orig, sqlite3.DatabaseError) and "malformed" in str(orig):
            raise DamagedStoreError(damaged_message(db_file, [str(orig)])) from error
        raise


def _init_locked(conn: Connection, db_file: str) -> None:
    tables = {
        row[0]
        for row in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    if not tables:
        SQLModel.metadata.create_all(conn)
        conn.execute(SchemaInfo.__table__.insert().values(id=1, version=SCHEMA_VERSION))
        log.info("Created HEFT Studio database %s (schema version %d)", db_file, SCHEMA_VERSION)
        return
    if SCHEMA_TABLE not in tables:
        raise SchemaError(
            f"{db_file} is not a HEFT Studio database: it has tables "
            f"({', '.join(sorted(tables))}) but no {SCHEMA_TABLE} table; refusing to touch it."
        )
    rows = conn.exec_driver_sql(f"SELECT version FROM {SCHEMA_TABLE}").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        found = ", ".join(repr(r[0]) for r in rows) or "no row"
        raise SchemaError(
            f"{db_file} has an unreadable schema version ({found}); this HEFT Studio "
            f"supports version {SCHEMA_VERSION}. Refusing to touch it."
        )
    found_version = rows[0][0]
    if found_version == SCHEMA_VERSION:
        return
    if found_version > SCHEMA_VERSION or found_version < 0:
        raise SchemaError(
            f"{db_file} has schema version {found_version}, but this HEFT Studio supports "
            f"version {SCHEMA_VERSION} (written by a newer or unknown release?). "
            "Refusing to touch it; upgrade HEFT Studio or use another HEFT_HOME."
        )
    for target in range(found_version + 1, SCHEMA_VERSION + 1):
        migration = MIGRATIONS.get(target)
        if migration is not None:
            log.info("Migrating %s to schema version %d", db_file, target)
            migration(conn)
    SQLModel.metadata.create_all(conn)
    conn.execute(text(f"UPDATE {SCHEMA_TABLE} SET version = :v"), {"v": SCHEMA_VERSION})
    log.info(
        "Upgraded database %s from schema version %d to %d",
        db_file, found_version, SCHEMA_VERSION,
    )


def open_db(path: str | Path | None = None) -> Engine:
    """Convenience: :func:`get_engine` followed by :func:`init_db`."""
    engine = get_engine(path)
    init_db(engine)
    return engine



CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
EXIT_BUSY_TIMEOUT_S = 2.0  # at exit, wait this long for other processes' readers, not BUSY_TIMEOUT_MS


def checkpoint_wal(db_file: str | Path, mode: str = "PASSIVE", *, busy_timeout_s: float | None = None) -> bool:
    """Copy the write-ahead log into the main database file (``PRAGMA wal_checkpoint(mode)``); True if complete.

    PASSIVE never waits for other connections (what a running app or worker does now and then); TRUNCATE
    waits for readers and writers (up to ``busy_timeout_s``) and leaves an empty ``-wal``, so the main file
    alone holds every run (what a clean shutdown does). False (logged at debug level) when the database is
    busy, missing or not in WAL mode: the WAL is still there and SQLite still reads it.
    """
    mode = mode.upper()
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint mode must be one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
    path = Path(db_file)
    if not path.is_file():
        return False
    timeout = BUSY_TIMEOUT_MS / 1000 if busy_timeout_s is None else busy_timeout_s
    try:
        conn = sqlite3.connect(str(path), timeout=timeout)
    except sqlite3.Error as error:
        log.debug("checkpoint of %s not possible: %s", path, error)
        return False
    try:
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        busy, log_frames, checkpointed = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.Error as error:
        log.debug("checkpoint of %s not done: %s", path, error)
        return False
    finally:
        conn.close()
    complete = busy == 0 and log_frames == checkpointed
    log.debug("checkpoint(%s) of %s: busy=%s, %s of %s WAL frames", mode, path, busy, checkpointed, log_frames)
    return complete


def _register_exit_checkpoint(db_file: str) -> None:
    entry = (str(Path(db_file).resolve()), os.getpid())
    with _ENGINES_LOCK:
        if entry in _CHECKPOINT_AT_EXIT:
            return
        _CHECKPOINT_AT_EXIT.add(entry)
    atexit.register(_checkpoint_at_exit, *entry)


def _checkpoint_at_exit(key: str, pid: int) -> None:
    """atexit: close this process's connections and fold the WAL into the main file (a clean shutdown)."""
    if os.getpid() != pid:
        return  # a forked child does not own the parent's engine
    cached = _ENGINES.get(key)
    if cached is not None and cached[1] == pid:
        cached[0].dispose()
    if checkpoint_wal(key, "TRUNCATE", busy_timeout_s=EXIT_BUSY_TIMEOUT_S):
        log.debug("checkpointed %s at exit", key)
