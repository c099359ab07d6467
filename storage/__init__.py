"""HEFT Studio storage: the SQLite record of every run, its metrics and evaluations.

``storage.models`` defines the tables, ``storage.db`` opens and versions the database,
``storage.queries`` holds every read and write. Imports no torch, transformers or gradio.

Typical use::

    from storage.db import open_db
    from storage import queries

    engine = open_db()  # heft_common.home.database_path(), schema checked/created
    run = queries.create_run(engine, name=..., method="lora", config={...}, ...)
"""
from storage.db import SchemaError, get_engine, init_db, open_db, session
from storage.models import SCHEMA_VERSION, TERMINAL, RunStatus

__all__ = [
    "SCHEMA_VERSION",
    "TERMINAL",
    "RunStatus",
    "SchemaError",
    "get_engine",
    "init_db",
    "open_db",
    "session",
]
