"""Runs that survive today's Spaces (issue 25): re-index at start-up, WAL checkpoints, backups, the archive.

Real SQLite files and real processes: the worker runs as ``python -m app.worker`` and is stopped with real
signals; runs train the tiny Llama in real child processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from app import service
from heft_common.vocabulary import TERMINAL_STATUSES
from storage import archive, queries
from storage.db import checkpoint_wal, open_db
from storage.lifecycle import prepare_registry, startup_notice
from tests.test_restarts import child_env, config, status_of
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def run_count(db_file: Path) -> int:
    """Runs in ``db_file`` read by plain sqlite3, from a copy of the main file alone (no -wal, no -shm)."""
    alone = db_file.with_name("alone-" + db_file.name)
    shutil.copyfile(db_file, alone)
    try:
        with sqlite3.connect(alone) as conn:
            return conn.execute("SELECT count(*) FROM run").fetchone()[0]
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(alone) + suffix).unlink(missing_ok=True)


def fake_finished_run_dirs(home: Path, count: int) -> None:
    """Run directories as a finished run leaves them (registry.json, run.json with results)."""
    for index in range(1, count + 1):
        run_dir = home / "runs" / f"{index:06d}-abcdef{index:02d}"
        run_dir.mkdir(parents=True)
        cfg = {"method": "lora", "model": "tiny", "data": "synthetic", "name": f"run {index}"}
        (run_dir / "registry.json").write_text(json.dumps({"id": index, "name": f"run {index}", "config": cfg}))
        (run_dir / "run.json").write_text(json.dumps({"config": cfg, "result": {
            "accuracy": 0.5 + index / 100, "accuracy_ci": [0.4, 0.6], "eval_n": 32}}))


def test_a_new_or_header_only_database_is_reindexed_from_the_run_directories(home):
    fake_finished_run_dirs(home, 10)
    db = home / "heft.db"
    report = prepare_registry(db)  # what the app and the worker do when they start
    assert len(report.reindexed.restored) == 10
    assert "10 run(s) were re-indexed" in startup_notice()
    engine = open_db(db)
    runs = {r.id: r for r in queries.list_runs(engine)}
    assert sorted(runs) == list(range(1, 11)) and runs[3].accuracy == 0.53 and runs[3].status == "completed"
    assert prepare_registry(db).reindexed is None  # a database with runs is left alone

    # heft.db present but holding only a header page (its WAL lost): re-indexed as well.
    engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    assert db.stat().st_size <= 4096
    assert len(prepare_registry(db).reindexed.restored) == 10
    assert len(queries.list_runs(open_db(db))) == 10


def test_a_checkpointed_database_file_alone_holds_every_run(home):
    db = home / "heft.db"
    engine = open_db(db)
    for index in range(30):
        run = queries.create_run(engine, name=f"run {index}", method="lora", config={"pad": "x" * 2000},
                                 base_model="m", data_source="s")
        queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 0.5} for s in range(50)])
    assert Path(str(db) + "-wal").stat().st_size > 0  # the runs sit in the WAL so far
    assert checkpoint_wal(db, "TRUNCATE")
    assert Path(str(db) + "-wal").stat().st_size == 0
    assert run_count(db) == 30


def test_backup_writes_one_consistent_file_while_the_database_is_open(home, tmp_path):
    db = home / "heft.db"
    engine = open_db(db)
    for index in range(5):
        queries.create_run(engine, name=f"run {index}", method="lora", config={}, base_model="m", data_source="s")
    assert Path(str(db) + "-wal").stat().st_size > 0
    destination = tmp_path / "backups" / "copy.db"
    result = subprocess.run([sys.executable, "-m", "storage.backup", str(destination)], cwd=ROOT,
                            env=child_env(home), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not Path(str(destination) + "-wal").exists()
    with sqlite3.connect(destination) as conn:
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 5
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    again = subprocess.run([sys.executable, "-m", "storage.backup", str(destination)], cwd=ROOT,
                           env=child_env(home), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_half_copied_archive_directories_are_ignored_and_reported(tmp_path, caplog):
    source = tmp_path / "home" / "runs" / "000001-aaaa0001"
    (source / "checkpoints" / "step-4").mkdir(parents=True)
    (source / "run.json").write_text("{}")
    (source / "checkpoints" / "step-4" / "lora.safetensors").write_bytes(b"x" * 1000)
    (source / "checkpoints" / "step-6.tmp").mkdir()  # a checkpoint being written is not copied
    root = tmp_path / "archive"
    root.mkdir()
    archived = archive.archive_run(source, root)
    assert archived == root / source.name and archive.check_copy(archived) is None
    assert not (archived / "checkpoints" / "step-6.tmp").exists()
    shutil.copytree(source, root / ".partial-000002-bbbb0002-1234abcd")  # never renamed: cut off half-way
    truncated = root / "000003-cccc0003"
    shutil.copytree(archived, truncated)
    (truncated / "checkpoints" / "step-4" / "lora.safetensors").write_bytes(b"x" * 10)  # shorter than its manifest
    no_manifest = root / "000004-dddd0004"
    shutil.copytree(source, no_manifest, ignore=shutil.ignore_patterns(archive.MANIFEST_FILE))

    home = tmp_path / "fresh"
    report = archive.restore(home, root)
    assert report.restored == [source.name]
    assert set(report.ignored) == {".partial-000002-bbbb0002-1234abcd", truncated.name, no_manifest.name}
    assert "lora.safetensors has 10 bytes" in report.ignored[truncated.name]
    assert sorted(p.name for p in (home / "runs").iterdir()) == [source.name]
    assert any("ignored 000003-cccc0003" in record.message for record in caplog.records)


def _start_worker(home: Path, log: Path, archive_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.worker", "--poll-seconds", "0.1"], cwd=ROOT,
                            env=child_env(home, HEFT_ARCHIVE=str(archive_dir), HEFT_AUTO_RESUME="1"),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_runs_come_back_from_the_archive_after_a_sigkill_and_a_wiped_home(home, tiny_model, data_dir, tmp_path):
    archive_dir = tmp_path / "bucket"
    db = home / "heft.db"
    engine = open_db(db)
    done, long = service.submit_runs(engine, [config(tiny_model, data_dir),
                                              config(tiny_model, data_dir, epochs=40, checkpoint_minutes=0)])
    log = tmp_path / "worker.log"
    worker = _start_worker(home, log, archive_dir)
    try:
        wait_for(lambda: status_of(engine, done.id) in TERMINAL_STATUSES, timeout=300)
        finished = queries.get_run(engine, done.id)
        assert finished.status == "completed", finished.error

        def archived_long() -> list[Path]:
            return [p for p in archive_dir.glob(f"{long.id:06d}-*")
                    if (p / "checkpoints" / "LATEST").exists() and archive.check_copy(p) is None]

        wait_for(lambda: archived_long() and (archive_dir / Path(finished.artifact_dir).name).is_dir(), timeout=300)
        child = queries.get_run(engine, long.id).child_pid
        worker.send_signal(signal.SIGKILL)  # the Space's container goes: no shutdown code runs
        worker.wait(timeout=30)
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        if worker.poll() is None:
            worker.kill()
    metrics = [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, done.id)]
    engine.dispose()
    shutil.rmtree(home)  # an ephemeral disk after the restart: nothing local is left
    home.mkdir()
    # A copy cut off half-way when the container went: ignored and reported, never taken for a run.
    (archive_dir / ".partial-000009-deadbeef-00000000").mkdir()
    (archive_dir / ".partial-000009-deadbeef-00000000" / "run.json").write_text("{")

    worker = _start_worker(home, log, archive_dir)
    try:
        wait_for(lambda: db.exists() and len(queries.list_runs(open_db(db))) == 2, timeout=120)
        engine = open_db(db)
        back = queries.get_run(engine, done.id)
        assert back.status == "completed" and back.accuracy == finished.accuracy
        assert back.accuracy_low == finished.accuracy_low and back.eval_n == finished.eval_n
        assert [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, done.id)] == metrics
        # The interrupted run is resumed from its archived checkpoint (auto-resume), not started over.
        wait_for(lambda: any("from_step" in entry for entry in queries.get_run(engine, long.id).resumes), timeout=300)
        resumed = queries.get_run(engine, long.id).resumes[-1]
        assert resumed["by"] == "worker" and resumed["from_step"] > 0, resumed
    finally:
        worker.send_signal(signal.SIGTERM)  # a clean stop this time
        worker.wait(timeout=90)
    output = log.read_text()
    assert "ignored .partial-000009-deadbeef-00000000" in output, output[-3000:]
    assert "re-indexed 2 run(s)" in output, output[-3000:]
    assert worker.returncode == 0, output[-3000:]
    # After the clean shutdown the main file alone (copied without -wal/-shm) opens with every run in it.
    assert run_count(db) == 2
    # The interrupted run's last state is in the archive again, for the next restart.
    assert status_of(engine, long.id) == "interrupted"
