"""HEFT Studio storage: the SQLite record of every run, its metrics and evaluations.

``storage.models`` defines the tables, ``storage.db`` opens and versions the database,
``storage.queries`` holds every read and write (by concern in ``storage.runs``, ``storage.metrics``,
``storage.studies``, ``storage.orphans``, ``storage.common``; ``queries`` re-exports them all).
Imports no torch, transformers, gradio or heft_core; shared words and errors come from heft_common.

Typical use::

    from storage.db import open_db
    from storage import queries

    engine = open_db()  # heft_common.home.database_path(), schema checked/created
    run = queries.create_run(engine, name=..., method="lora", config={...}, ...)
"""
