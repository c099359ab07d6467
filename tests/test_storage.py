"""Tests for storage/: run lifecycle, exclusive claims, concurrent metrics, orphans,
cancel / requeue, safe deletion and schema versioning. Fast, no torch."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from storage import queries
from storage.db import SchemaError, get_engine, init_db, open_db
from storage.models import SCHEMA_VERSION, Run, RunStatus, utcnow

# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "heft.db"


@pytest.fixture()
def engine(db_path: Path) -> Engine:
    return open_db(db_path)


def _new_run(engine: Engine, name: str = "r", **kwargs) -> Run:
    params = dict(
        name=name, method="lora", config={"lr": 1e-4, "epochs": 1},
        base_model="tiny-llm", data_source="boolq",
    )
    params.update(kwargs)
    return queries.create_run(engine, **params)


def _running_run(engine: Engine, worker_pid: int | None = None, **kwargs) -> Run:
    run = _new_run(engine, **kwargs)
    claimed = queries.claim_next_run(engine, worker_pid or os.getpid())
    assert claimed is not None and claimed.id == run.id
    return claimed


def _count(db_path: Path, sql: str, *args) -> int:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql, args).fetchone()[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_and_invalid_transitions(engine: Engine) -> None:
    run = _new_run(engine, total_epochs=2, eval_signature="sig", batch_id="b1")
    assert run.status == RunStatus.QUEUED and run.id is not None
    assert run.config == {"lr": 1e-4, "epochs": 1}
    assert run.created_at.tzinfo is not None

    # Not running yet: cannot be finished.
    assert queries.finish_run(engine, run.id, "completed") is False
    assert queries.heartbeat(engine, run.id) is False

    claimed = queries.claim_next_run(engine, 4242)
    assert claimed is not None and claimed.id == run.id
    assert claimed.status == "running" and claimed.worker_pid == 4242
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert queries.claim_next_run(engine, 4242) is None  # queue now empty

    assert queries.set_child_pid(engine, run.id, 777)
    assert queries.heartbeat(engine, run.id)
    assert queries.update_progress(engine, run.id, {"stage": "lora", "step": 3, "total_steps": 10})
    assert queries.get_run(engine, run.id).progress == {"stage": "lora", "step": 3, "total_steps": 10}

    with pytest.raises(ValueError):
        queries.finish_run(engine, run.id, "running")
    with pytest.raises(ValueError):
        queries.finish_run(engine, run.id, "bogus")
    with pytest.raises(ValueError):
        queries.finish_run(engine, run.id, "completed", results={"acuracy": 0.5})

    results = {
        "accuracy": 0.71, "accuracy_low": 0.65, "accuracy_high": 0.77, "eval_n": 200,
        "train_seconds": 12.5, "tokens_per_second": 900.0, "trainable_params": 1234,
        "trainable_params_json": {"lora": 1234}, "artifact_dir": "/tmp/x",
        "eval_signature": "sig2",
    }
    assert queries.finish_run(engine, run.id, RunStatus.COMPLETED, results=results)
    # Terminal states never change again.
    assert queries.finish_run(engine, run.id, "failed", error="late") is False
    assert queries.heartbeat(engine, run.id) is False

    done = queries.get_run(engine, run.id)
    assert done.status == "completed" and done.error is None
    assert done.accuracy == pytest.approx(0.71) and done.eval_n == 200
    assert done.trainable_params_by_stage == {"lora": 1234}
    assert done.eval_signature == "sig2" and done.artifact_dir == "/tmp/x"
    assert done.finished_at >= done.started_at
    assert done.child_pid == 777

    with pytest.raises(ValueError):
        _new_run(engine, method="qlora")
    assert queries.get_run(engine, 9999) is None


def test_list_runs_comparable_and_metrics(engine: Engine) -> None:
    a = _running_run(engine, name="alpha", eval_signature="S")
    queries.finish_run(engine, a.id, "completed")
    b = _running_run(engine, name="beta_1%", method="reft", eval_signature="S")
    queries.finish_run(engine, b.id, "completed")
    d = _running_run(engine, name="delta", eval_signature="T")
    queries.finish_run(engine, d.id, "completed")
    c = _new_run(engine, name="gamma", eval_signature="S", data_source="other-data")

    assert [r.id for r in queries.list_runs(engine)] == [c.id, d.id, b.id, a.id]
    assert [r.id for r in queries.list_runs(engine, status="queued")] == [c.id]
    assert [r.id for r in queries.list_runs(engine, method="reft")] == [b.id]
    assert [r.id for r in queries.list_runs(engine, text="OTHER")] == [c.id]
    assert [r.id for r in queries.list_runs(engine, text="1%")] == [b.id]
    assert [r.id for r in queries.list_runs(engine, text="%")] == [b.id]  # literal %
    assert len(queries.list_runs(engine, limit=2)) == 2

    queries.add_step_metrics(engine, a.id, [{"stage": "lora", "step": 1, "loss": 0.5}])
    queries.add_epoch_eval(engine, a.id, {"stage": "lora", "epoch": 1, "cumulative_epoch": 1.0,
                                          "accuracy": 0.6, "n": 50})
    evals = queries.evaluations(engine, a.id)
    assert len(evals) == 1 and evals[0]["accuracy"] == 0.6 and evals[0]["id"] > 0
    with pytest.raises(ValueError):
        queries.add_step_metrics(engine, a.id, [{"stage": "lora", "step": 2, "los": 1.0}])
    with pytest.raises(ValueError):
        queries.add_step_metrics(engine, a.id, [{"stage": "lora"}])
    assert queries.add_step_metrics(engine, a.id, []) == 0


def test_validate_run_id() -> None:
    assert queries.validate_run_id(5) == 5
    assert queries.validate_run_id(" 12 ") == 12
    assert queries.validate_run_id(3.0) == 3
    for bad in (0, -1, "0", "abc", "1.5", "", None, True, 2.5, "-3", "١٢"):
        with pytest.raises(ValueError, match="run id must be a positive integer"):
            queries.validate_run_id(bad)


# --------------------------------------------------------------------------- claim exclusivity


def _claim_worker(db_path: str, start, out) -> None:
    """Spawned child: claim runs until the queue is empty, report which ones."""
    from storage import queries as q
    from storage.db import get_engine as ge

    eng = ge(db_path)
    start.wait(60)
    claimed = []
    while (run := q.claim_next_run(eng, os.getpid())) is not None:
        claimed.append(run.id)
    out.put((os.getpid(), claimed))


def test_claim_is_exclusive_across_processes(engine: Engine, db_path: Path) -> None:
    ids = [_new_run(engine, name=f"run{i}").id for i in range(20)]
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(str(db_path), start, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    all_claimed = [rid for _, claimed in results for rid in claimed]
    assert sorted(all_claimed) == ids  # every run exactly once
    for pid, claimed in results:
        assert claimed == sorted(claimed)  # each worker takes oldest first
        for rid in claimed:
            run = queries.get_run(engine, rid)
            assert run.status == "running" and run.worker_pid == pid


def _fork_child(db_path: str, inherited: Engine, out) -> None:
    """Forked child: use both the inherited engine and get_engine()."""
    from storage import queries as q

    try:
        n_inherited = len(q.list_runs(inherited))
        n_fresh = len(q.list_runs(get_engine(db_path)))
        out.put((n_inherited, n_fresh))
    except Exception as error:  # report instead of dying silently
        out.put(repr(error))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_engine_usable_after_fork(engine: Engine, db_path: Path) -> None:
    _new_run(engine)
    queries.list_runs(engine)  # make sure the pool holds a connection before forking
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_fork_child, args=(str(db_path), engine, out))
    proc.start()
    assert out.get(timeout=30) == (1, 1)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert len(queries.list_runs(engine)) == 1  # parent's pool still fine


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writer_and_incremental_readers(engine: Engine) -> None:
    run = _running_run(engine)
    total, batch = 300, 5
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]
    writer_done = threading.Event()

    def writer() -> None:
        try:
            for start in range(0, total, batch):
                rows = [{"stage": "lora", "step": s, "epoch": s / total, "loss": 1.0 / (s + 1),
                         "learning_rate": 1e-4, "tokens_per_second": 100.0,
                         "elapsed_seconds": s * 0.01} for s in range(start, start + batch)]
                queries.add_step_metrics(engine, run.id, rows)
                queries.heartbeat(engine, run.id)
        except BaseException as error:
            errors.append(error)
        finally:
            writer_done.set()

    def reader(index: int) -> None:
        last_id = 0
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                done = writer_done.is_set()
                rows = queries.metrics_since(engine, run.id, after_id=last_id)
                for row in rows:
                    assert row["id"] > last_id
                    last_id = row["id"]
                    seen[index].append(row["step"])
                if done and not rows:
                    return
                time.sleep(0.002)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for steps in seen:
        assert steps == list(range(total))
    limited = queries.metrics_since(engine, run.id, after_id=0, limit=7)
    assert [r["step"] for r in limited] == list(range(7))


# --------------------------------------------------------------------------- orphans


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphans_marked_interrupted(engine: Engine) -> None:
    alive_fresh = _running_run(engine, name="alive")
    dead = _running_run(engine, worker_pid=_dead_pid(), name="dead-default-check")
    fake = _running_run(engine, worker_pid=123456, name="dead-fake")
    stale = _running_run(engine, name="stale")
    queued = _new_run(engine, name="queued")
    with engine.begin() as conn:
        conn.execute(update(Run.__table__).where(Run.__table__.c.id == stale.id)
                     .values(heartbeat_at=utcnow() - timedelta(seconds=600)))

    # Default liveness check (os.kill) for everything but the fake pid.
    def is_alive(pid: int) -> bool:
        return pid != 123456 and queries._pid_alive(pid)

    marked = queries.mark_orphans_interrupted(engine, is_alive=is_alive, stale_after_s=60)
    assert sorted(marked) == sorted([dead.id, fake.id, stale.id])
    for rid in marked:
        run = queries.get_run(engine, rid)
        assert run.status == "interrupted" and run.finished_at is not None
        assert "Interrupted" in run.error
    assert "no longer running" in queries.get_run(engine, dead.id).error
    assert "no heartbeat" in queries.get_run(engine, stale.id).error
    assert queries.get_run(engine, alive_fresh.id).status == "running"
    assert queries.get_run(engine, queued.id).status == "queued"
    # The worker of an interrupted run learns it lost the run.
    assert queries.heartbeat(engine, fake.id) is False
    assert queries.finish_run(engine, fake.id, "completed") is False
    # Idempotent, and the default is_alive keeps our own live process.
    assert queries.mark_orphans_interrupted(engine) == []


# --------------------------------------------------------------------------- cancel / requeue


def test_cancel_queued_vs_running(engine: Engine) -> None:
    queued = _new_run(engine, name="q")
    assert queries.is_cancel_requested(engine, queued.id) is False
    assert queries.request_cancel(engine, queued.id) == "cancelled"
    assert queries.get_run(engine, queued.id).status == "cancelled"
    assert queries.is_cancel_requested(engine, queued.id) is True
    assert queries.claim_next_run(engine, os.getpid()) is None  # never picked up

    running = _running_run(engine, name="r")
    assert queries.request_cancel(engine, running.id) == "cancel_requested"
    assert queries.get_run(engine, running.id).status == "running"
    assert queries.is_cancel_requested(engine, running.id) is True
    assert queries.finish_run(engine, running.id, "cancelled", error="cancelled by user")
    assert queries.request_cancel(engine, running.id) == "cancelled"

    completed = _running_run(engine, name="c")
    queries.finish_run(engine, completed.id, "completed")
    assert queries.request_cancel(engine, completed.id) == "completed"
    assert queries.get_run(engine, completed.id).status == "completed"

    with pytest.raises(ValueError):
        queries.request_cancel(engine, 9999)
    assert queries.is_cancel_requested(engine, 9999) is True


def test_requeue(engine: Engine) -> None:
    failed = _running_run(engine, name="exp", eval_signature="S", batch_id="B", total_epochs=3)
    queries.add_step_metrics(engine, failed.id, [{"stage": "lora", "step": 1}])
    queries.finish_run(engine, failed.id, "failed", error="CUDA OOM")

    new = queries.requeue(engine, failed.id)
    assert new.id != failed.id and new.status == "queued"
    assert new.name == "exp (re-queued)"
    assert new.config_json == failed.config_json and new.method == failed.method
    assert (new.eval_signature, new.batch_id, new.total_epochs) == ("S", "B", 3)
    old = queries.get_run(engine, failed.id)
    assert old.status == "failed" and old.error == "CUDA OOM"  # history survives
    assert len(queries.metrics_since(engine, failed.id)) == 1
    assert queries.metrics_since(engine, new.id) == []

    # Requeue of a requeued run does not stack suffixes.
    queries.request_cancel(engine, new.id)
    again = queries.requeue(engine, new.id)
    assert again.name == "exp (re-queued)"

    with pytest.raises(ValueError):
        queries.requeue(engine, again.id)  # queued
    claimed = queries.claim_next_run(engine, os.getpid())
    with pytest.raises(ValueError):
        queries.requeue(engine, claimed.id)  # running
    queries.finish_run(engine, claimed.id, "completed")
    with pytest.raises(ValueError):
        queries.requeue(engine, claimed.id)  # completed
    with pytest.raises(ValueError):
        queries.requeue(engine, 9999)


# --------------------------------------------------------------------------- delete


def test_delete_run_safety(engine: Engine, db_path: Path, tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "data"
    runs = home / "runs"
    runs.mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("do not delete")

    def finished_run_with(artifact: str | Path) -> int:
        run = _running_run(engine)
        queries.set_artifact_dir(engine, run.id, artifact)
        queries.finish_run(engine, run.id, "completed")
        return run.id

    # Running runs are refused.
    running = _running_run(engine)
    with pytest.raises(ValueError, match="running"):
        queries.delete_run(engine, running.id, home)
    assert queries.get_run(engine, running.id) is not None
    queries.finish_run(engine, running.id, "failed")

    # A real directory inside data_home/runs is removed, metrics cascade.
    real_dir = runs / "run-1"
    (real_dir / "adapter").mkdir(parents=True)
    (real_dir / "adapter" / "weights.bin").write_bytes(b"x" * 10)
    os.symlink(outside, real_dir / "link-to-outside")  # must be unlinked, not followed
    rid = finished_run_with(real_dir)
    queries.add_step_metrics(engine, rid, [{"stage": "lora", "step": i} for i in range(3)])
    queries.add_epoch_eval(engine, rid, {"stage": "lora", "epoch": 1})
    assert queries.delete_run(engine, rid, home) is True
    assert not real_dir.exists()
    assert queries.get_run(engine, rid) is None
    assert _count(db_path, "SELECT count(*) FROM step_metric WHERE run_id=?", rid) == 0
    assert _count(db_path, "SELECT count(*) FROM epoch_eval WHERE run_id=?", rid) == 0
    assert (outside / "keep.txt").exists()

    # Tricks that must never delete anything outside data_home/runs.
    link_dir = runs / "evil-link"
    os.symlink(outside, link_dir)
    parent_link = runs / "evil-parent"
    os.symlink(tmp_path, parent_link)
    tricks = [
        link_dir,                               # symlink to outside
        parent_link / "precious",               # symlinked parent component
        runs / ".." / ".." / "precious",        # ../ escape
        str(runs) + "/../runs/../../precious",  # ../ hidden in a string
        home,                                   # data_home itself
        runs,                                   # runs root itself
        outside,                                # plainly outside
    ]
    caplog.set_level(logging.WARNING, logger="storage.queries")
    for trick in tricks:
        caplog.clear()
        rid = finished_run_with(trick)
        # set_artifact_dir normalises via abspath; store the raw trick path too.
        with engine.begin() as conn:
            conn.execute(update(Run.__table__).where(Run.__table__.c.id == rid)
                         .values(artifact_dir=str(trick)))
        assert queries.delete_run(engine, rid, home) is True
        assert queries.get_run(engine, rid) is None  # the row still goes
        assert (outside / "keep.txt").exists(), trick
        assert runs.is_dir() and home.is_dir()
        assert any("kept artifact" in rec.message for rec in caplog.records), trick

    # Relative paths are refused too.
    rid = _running_run(engine).id
    queries.finish_run(engine, rid, "completed")
    with engine.begin() as conn:
        conn.execute(update(Run.__table__).where(Run.__table__.c.id == rid)
                     .values(artifact_dir="runs/x"))
    assert queries.delete_run(engine, rid, home) is True

    assert queries.delete_run(engine, 9999, home) is False


# --------------------------------------------------------------------------- schema


def test_wal_and_foreign_keys_on(engine: Engine, db_path: Path) -> None:
    results: list[tuple] = []

    def check() -> None:
        with engine.connect() as conn:
            results.append((
                conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                conn.exec_driver_sql("PRAGMA foreign_keys").scalar(),
                conn.exec_driver_sql("PRAGMA busy_timeout").scalar(),
                conn.exec_driver_sql("PRAGMA synchronous").scalar(),
            ))

    check()
    thread = threading.Thread(target=check)  # connections are usable from other threads
    thread.start()
    thread.join()
    assert results == [("wal", 1, 30000, 1)] * 2
    assert get_engine(db_path) is engine  # cached per path
    assert _count(db_path, "SELECT version FROM schema_info") == SCHEMA_VERSION
    init_db(engine)  # idempotent
    assert _count(db_path, "SELECT count(*) FROM schema_info") == 1


def test_old_schema_version_is_upgraded(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_info VALUES (1, 0)")
    engine = open_db(db_path)
    assert _count(db_path, "SELECT version FROM schema_info") == SCHEMA_VERSION
    run = _new_run(engine)  # tables were created by the upgrade
    assert queries.get_run(engine, run.id).status == "queued"

    # Existing data survives an upgrade.
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_info SET version = 0")
    init_db(engine)
    assert _count(db_path, "SELECT version FROM schema_info") == SCHEMA_VERSION
    assert queries.get_run(engine, run.id) is not None


@pytest.mark.parametrize("version", [99, -1])
def test_newer_or_unknown_schema_is_refused(db_path: Path, version: int) -> None:
    engine = open_db(db_path)
    _new_run(engine)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_info SET version = ?", (version,))
    with pytest.raises(SchemaError) as info:
        init_db(engine)
    message = str(info.value)
    assert str(db_path) in message and str(version) in message
    assert f"supports version {SCHEMA_VERSION}" in message
    # Untouched.
    assert _count(db_path, "SELECT version FROM schema_info") == version
    assert _count(db_path, "SELECT count(*) FROM run") == 1


def test_foreign_sqlite_file_is_refused_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers VALUES (1, 'Ada')")
    conn.close()
    before = _sha(db_path)
    with pytest.raises(SchemaError, match="not a HEFT Studio database"):
        open_db(db_path)
    assert _sha(db_path) == before
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")] == ["customers"]
    conn.close()


def test_non_sqlite_file_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is a text file, not a database\n" * 200)
    before = _sha(db_path)
    with pytest.raises(SchemaError, match="not a SQLite database"):
        open_db(db_path)
    assert _sha(db_path) == before


def test_external_run_is_running_and_never_claimed(tmp_path):
    from storage import queries
    from storage.db import open_db

    engine = open_db(tmp_path / "ext.db")
    run = queries.start_external_run(
        engine, name="bench", method="base", config={}, base_model="m", data_source="d", worker_pid=os.getpid()
    )
    assert run.status == "running" and run.worker_pid == os.getpid()
    assert queries.claim_next_run(engine, 1) is None
    assert queries.finish_run(engine, run.id, "completed", results={"accuracy": 0.5})


# --------------------------------------------------------------------------- issue 13: worker identity, stuck runs


def _identity_of_exited_process() -> str:
    """The worker id a process had; the process has exited since."""
    code = "from heft_common.process import worker_identity; print(worker_identity())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _with_worker(engine: Engine, run_id: int, worker_id: str, worker_pid: int, age_s: float = 0) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run.__table__).where(Run.__table__.c.id == run_id).values(
            worker_id=worker_id, worker_pid=worker_pid, heartbeat_at=utcnow() - timedelta(seconds=age_s)))


def test_orphan_check_uses_worker_identity_not_bare_pid(engine: Engine) -> None:
    from heft_common.process import parse_worker_id, worker_identity

    mine = str(worker_identity())
    gone = parse_worker_id(_identity_of_exited_process())
    # A previous PID 1 of this very namespace (a restarted container's old worker): PID 1 is alive, but
    # it is another process now (another start time).
    old_pid1 = ":".join([gone.boot_id, gone.host, gone.pid_namespace, "1", "1", gone.instance])
    rebooted = ":".join(["another-boot", gone.host, gone.pid_namespace, str(os.getpid()), gone.start_ticks, "x"])
    elsewhere = ":".join([gone.boot_id, "another-host", "1", "1", "1", "x"])
    runs = {name: _running_run(engine, name=name) for name in ("old-pid1", "rebooted", "mine", "elsewhere",
                                                                  "elsewhere-stale", "mine-stale")}
    _with_worker(engine, runs["old-pid1"].id, old_pid1, 1)
    _with_worker(engine, runs["rebooted"].id, rebooted, os.getpid())
    _with_worker(engine, runs["mine"].id, mine, os.getpid())
    _with_worker(engine, runs["elsewhere"].id, elsewhere, 1)
    _with_worker(engine, runs["elsewhere-stale"].id, elsewhere, 1, age_s=600)
    _with_worker(engine, runs["mine-stale"].id, mine, os.getpid(), age_s=600)  # alive, only slow to heartbeat

    marked = queries.mark_orphans_interrupted(engine, stale_after_s=60)
    assert sorted(marked) == sorted(runs[n].id for n in ("old-pid1", "rebooted", "elsewhere-stale"))
    assert "is no longer running" in queries.get_run(engine, runs["old-pid1"].id).error
    assert "no heartbeat" in queries.get_run(engine, runs["elsewhere-stale"].id).error
    for name in ("mine", "elsewhere", "mine-stale"):
        assert queries.get_run(engine, runs[name].id).status == "running", name


def test_claim_records_the_worker_id(engine: Engine) -> None:
    from heft_common.process import worker_alive, worker_identity

    _new_run(engine)
    worker_id = str(worker_identity())
    claimed = queries.claim_next_run(engine, os.getpid(), worker_id=worker_id)
    assert claimed.worker_id == worker_id and worker_alive(claimed.worker_id) is True
    external = queries.start_external_run(engine, worker_pid=os.getpid(), name="bench", method="lora", config={},
                                          base_model="m", data_source="d")
    assert worker_alive(external.worker_id) is True  # a process training its own run gets an id too


def test_stuck_run_is_cancelled_at_once(engine: Engine) -> None:
    from heft_common.process import parse_worker_id, worker_identity

    gone = parse_worker_id(_identity_of_exited_process())
    stuck = _running_run(engine, name="stuck")
    _with_worker(engine, stuck.id, str(gone), 1)
    silent = _running_run(engine, name="silent")
    _with_worker(engine, silent.id, ":".join([gone.boot_id, "another-host", "1", "1", "1", "x"]), 1, age_s=600)
    alive = _running_run(engine, name="alive")
    _with_worker(engine, alive.id, str(worker_identity()), os.getpid())

    for run in (stuck, silent):
        assert queries.request_cancel(engine, run.id) == "cancelled"
        done = queries.get_run(engine, run.id)
        assert done.status == "cancelled" and done.finished_at is not None
        assert "worker" in done.error
    assert queries.request_cancel(engine, alive.id) == "cancel_requested"  # its worker stops it
    assert queries.get_run(engine, alive.id).status == "running"
    # A cancel asked of a run whose worker then dies ends cancelled, not interrupted.
    _with_worker(engine, alive.id, str(gone), 1)
    assert queries.mark_orphans_interrupted(engine) == [alive.id]
    assert queries.get_run(engine, alive.id).status == "cancelled"


# --------------------------------------------------------------------------- issue 13: damaged files


def _damaged_db(db_path: Path, keep_wal: bool) -> None:
    """A real database, half of whose main file is then lost (its WAL kept or not)."""
    engine = open_db(db_path)
    for i in range(20):
        run = _new_run(engine, name=f"run {i}", config={"pad": "x" * 4000})
        queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 0.5} for s in range(100)])
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    _new_run(engine, name="after the checkpoint")
    if not keep_wal:
        engine.dispose()
        assert not db_path.with_name(db_path.name + "-wal").exists()
    else:
        assert db_path.with_name(db_path.name + "-wal").stat().st_size > 0
    with open(db_path, "r+b") as fh:
        fh.truncate(db_path.stat().st_size // 2)


@pytest.mark.parametrize("keep_wal", [True, False], ids=["with-wal", "without-wal"])
def test_damaged_database_is_refused_untouched(tmp_path: Path, keep_wal: bool) -> None:
    import shutil

    from heft_common.errors import StoreError
    from storage.db import DamagedStoreError

    original = tmp_path / "original" / "heft.db"
    _damaged_db(original, keep_wal)
    db_path = tmp_path / "home" / "heft.db"  # opened by a fresh process would see exactly these files
    shutil.copytree(original.parent, db_path.parent)
    # The database and its WAL hold the data (-shm is SQLite's shared-memory index, rebuilt by any reader).
    before = {p.name: _sha(p) for p in db_path.parent.iterdir() if not p.name.endswith("-shm")}
    with pytest.raises(DamagedStoreError) as caught:
        open_db(db_path)
    assert isinstance(caught.value, StoreError)
    message = str(caught.value)
    assert str(db_path) in message and "damaged" in message and "python -m storage.rebuild --move-aside" in message
    assert "run directories" in message
    after = {p.name: _sha(p) for p in db_path.parent.iterdir() if p.name in before}
    assert after == before  # nothing written into the database or its WAL


def test_rebuild_restores_runs_and_reports_what_it_skipped(tmp_path: Path) -> None:
    import json

    from storage.rebuild import REGISTRY_FILE, rebuild

    home = tmp_path / "home"
    runs = home / "runs"
    config = {"method": "lora", "model": "m", "data": "d", "name": ""}
    finished = runs / "000007-aaaaaaaa"
    finished.mkdir(parents=True)
    (finished / "run.json").write_text(json.dumps({
        "format": 1, "config": config, "eval_signature": "SIG",
        "result": {"status": "completed", "accuracy": 0.75, "accuracy_ci": [0.6, 0.85], "eval_n": 40,
                   "train_seconds": 3.5, "tokens_per_second": 100.0, "trainable_params": 12,
                   "trainable_params_by_stage": {"lora": 12}}}))
    (finished / "metrics.jsonl").write_text("".join(json.dumps(
        {"stage": "lora", "epoch": s / 4, "step": s, "total_steps": 4, "loss": 1 / s, "learning_rate": 0.1,
         "tokens_per_second": 5.0, "elapsed_seconds": s}) + "\n" for s in range(1, 5)))
    (finished / "evals.json").write_text(json.dumps(
        [{"stage": "lora", "epoch": 1, "cumulative_epoch": 1, "accuracy": 0.75, "low": 0.6, "high": 0.85, "n": 40,
          "scoring": "generation", "generation_accuracy": 0.75, "generation_low": 0.6, "generation_high": 0.85,
          "unparsed": 3}]))
    (finished / REGISTRY_FILE).write_text(json.dumps({"id": 7, "name": "my lora", "batch_id": "B", "config": config}))
    failed = runs / "000007-bbbbbbbb"  # a second database also had a run 7: it gets a new id
    failed.mkdir()
    (failed / REGISTRY_FILE).write_text(json.dumps({"id": 7, "name": "broke", "method": "lora", "config": config}))
    (failed / "error.txt").write_text("data: no such file")
    unfinished = runs / "000009"
    unfinished.mkdir()
    (unfinished / REGISTRY_FILE).write_text(json.dumps({"id": 9, "name": "cut off", "config": config}))
    (runs / "000010").mkdir()
    (runs / "000010" / "run.json").write_text("{ not json")
    (runs / "stray").mkdir()

    report = rebuild(home)
    engine = open_db(home / "heft.db")
    restored = {run.name: run for run in queries.list_runs(engine)}
    assert set(restored) == {"my lora", "broke", "cut off"}
    lora = restored["my lora"]
    assert (lora.id, lora.status, lora.accuracy) == (7, "completed", 0.75)
    assert (lora.eval_signature, lora.batch_id) == ("SIG", "B")
    assert lora.trainable_params_by_stage == {"lora": 12}
    assert [m["step"] for m in queries.metrics_since(engine, 7)] == [1, 2, 3, 4]
    assert [(e["accuracy"], e["accuracy_low"], e["scoring"], e["unparsed"])
            for e in queries.evaluations(engine, 7)] == [(0.75, 0.6, "generation", 3)]
    assert restored["broke"].id not in (7, 9) and restored["broke"].status == "failed"
    assert restored["broke"].error == "data: no such file"
    assert restored["cut off"].id == 9 and restored["cut off"].status == "interrupted"
    assert set(report.skipped) == {"000010", "stray"} and "JSON" in report.skipped["000010"]
    from heft_common.errors import StoreError

    with pytest.raises(StoreError, match="move-aside"):
        rebuild(home)


# --------------------------------------------------------------------------- issue 13: run directories


def test_artifact_dirs_are_stored_relative_and_found_in_a_moved_home(tmp_path: Path, monkeypatch) -> None:
    old_home, new_home = tmp_path / "old-home", tmp_path / "new-home"
    monkeypatch.setenv("HEFT_HOME", str(old_home))
    engine = open_db(old_home / "heft.db")
    current = _running_run(engine, name="relative")
    current_dir = old_home / "runs" / "000001-abcdef12"
    current_dir.mkdir(parents=True)
    queries.set_artifact_dir(engine, current.id, current_dir)
    legacy = _running_run(engine, name="legacy absolute")
    legacy_dir = old_home / "runs" / "000002"
    legacy_dir.mkdir()
    with engine.begin() as conn:  # as an older release stored it
        conn.execute(update(Run.__table__).where(Run.__table__.c.id == legacy.id).values(artifact_dir=str(legacy_dir)))
    outside = tmp_path / "elsewhere" / "run"
    outside.mkdir(parents=True)
    kept = _running_run(engine, name="outside the home")
    queries.set_artifact_dir(engine, kept.id, outside)
    assert _count(old_home / "heft.db", "SELECT count(*) FROM run WHERE artifact_dir=?", "runs/000001-abcdef12") == 1
    assert queries.get_run(engine, current.id).artifact_dir == str(current_dir)
    assert queries.run_with_artifact_dir(engine, current_dir).id == current.id
    engine.dispose()

    os.rename(old_home, new_home)
    monkeypatch.setenv("HEFT_HOME", str(new_home))
    engine = open_db(new_home / "heft.db")
    assert queries.get_run(engine, current.id).artifact_dir == str(new_home / "runs" / "000001-abcdef12")
    assert queries.get_run(engine, legacy.id).artifact_dir == str(new_home / "runs" / "000002")
    assert queries.get_run(engine, kept.id).artifact_dir == str(outside)
    assert {r.artifact_dir for r in queries.list_runs(engine)} >= {str(new_home / "runs" / "000002")}
    assert queries.run_with_artifact_dir(engine, new_home / "runs" / "000001-abcdef12").id == current.id


def test_delete_reports_what_happened_to_the_files(engine: Engine, tmp_path: Path) -> None:
    home = tmp_path / "data"
    (home / "runs" / "inside").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()

    def finished(artifact: Path | None) -> int:
        run = _running_run(engine)
        if artifact is not None:
            queries.set_artifact_dir(engine, run.id, artifact)
        queries.finish_run(engine, run.id, "failed")
        return run.id

    deleted = queries.delete_run_report(engine, finished(home / "runs" / "inside"), home)
    assert deleted.files == "deleted" and not (home / "runs" / "inside").exists()
    kept = queries.delete_run_report(engine, finished(outside), home)
    assert kept.files == "kept" and "not inside" in kept.reason and outside.is_dir()
    gone = queries.delete_run_report(engine, finished(home / "runs" / "never-made"), home)
    assert gone.files == "missing"
    nothing = queries.delete_run_report(engine, finished(None), home)
    assert nothing.files == "none" and nothing.path is None
    assert queries.delete_run_report(engine, 9999, home) is None


def test_an_epoch_evaluation_is_stored_with_the_scoring_that_produced_it(tmp_path: Path) -> None:
    """Every accuracy says which scoring produced it: the per-epoch rows too, with generation's numbers when both
    scorings ran on the same questions."""
    from app.recording import DatabaseCallback
    from heft_core.callbacks import EvalEvent

    engine = open_db(tmp_path / "heft.db")
    run = queries.create_run(engine, name="r", method="lora", config={}, base_model="m", data_source="d")
    recorder = DatabaseCallback(engine, run.id, echo=False)
    recorder.on_evaluate(EvalEvent("lora", 1, 1, 0.7, 0.6, 0.8, 40, scoring="logits", generation_accuracy=0.65,
                                   generation_low=0.5, generation_high=0.75, unparsed=2, yes_share=0.5))
    recorder.on_evaluate(EvalEvent("lora", 2, 2, 0.72, 0.6, 0.8, 40))  # logits only
    first, second = queries.evaluations(engine, run.id)
    assert (first["scoring"], first["generation_accuracy"], first["unparsed"], first["yes_share"]) == \
        ("logits", 0.65, 2, 0.5)
    assert (second["scoring"], second["generation_accuracy"], second["unparsed"]) == ("logits", None, None)
