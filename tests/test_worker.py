"""The worker under failure: killed children, a killed worker, cancels, two workers, bad configs.

Each run trains the tiny Llama in a real child process, as in production.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app import service
from app.worker import LOG_FILE, Worker
from heft_core.config import ConfigError, LoraSettings, ReftSettings, RunConfig, StageSettings
from heft_core.prompt import PromptTemplate
from storage import queries
from storage.db import open_db
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def config(model: str, data: str, method: str = "lora", epochs: int = 1) -> RunConfig:
    return RunConfig(
        method=method, model=model, data=data, train_size=None, eval_size=32, max_length=64, seed=1,
        template=PromptTemplate(after_question=""),
        lora=LoraSettings(rank=2, target_modules=["q_proj", "v_proj"]),
        reft=ReftSettings(rank=2, layers=[1, 2], positions="l1"),
        lora_stage=StageSettings(epochs=epochs, learning_rate=1e-2, batch_size=4),
        reft_stage=StageSettings(epochs=epochs, learning_rate=1e-2, batch_size=4),
    )


def start_worker(engine_path, **kwargs) -> Worker:
    worker = Worker(engine_path, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5, **kwargs)
    worker.thread = worker.start_in_thread()
    return worker


def stop_worker(worker: Worker) -> None:
    worker.stop()
    worker.thread.join(timeout=30)


def status_of(engine, run_id):
    return queries.get_run(engine, run_id).status


def test_run_completes_with_metrics_evals_and_log(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, "heft")])
    worker = start_worker(db)
    try:
        wait_for(lambda: status_of(engine, run.id) in ("completed", "failed"))
    finally:
        stop_worker(worker)
    done = queries.get_run(engine, run.id)
    assert done.status == "completed", done.error
    metrics = queries.metrics_since(engine, run.id)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert len(metrics) == done.progress["total_steps"] == 2 * 40  # 160 examples / batch 4, two stages
    assert {e["stage"] for e in queries.evaluations(engine, run.id)} == {"lora", "reft"}
    assert done.accuracy is not None and done.accuracy_low <= done.accuracy <= done.accuracy_high
    assert done.trainable_params_by_stage.keys() == {"lora", "reft"}
    assert "step 80/80" in (Path(done.artifact_dir) / LOG_FILE).read_text()


def test_killed_child_fails_with_message_keeps_metrics_and_next_run_starts(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    long_run, next_run = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50),
                                                      config(tiny_model, data_dir)])
    worker = start_worker(db)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, long_run.id)) >= 5)
        os.kill(queries.get_run(engine, long_run.id).child_pid, signal.SIGKILL)
        seen_before_kill = len(queries.metrics_since(engine, long_run.id))
        wait_for(lambda: status_of(engine, next_run.id) == "completed")
    finally:
        stop_worker(worker)
    failed = queries.get_run(engine, long_run.id)
    assert failed.status == "failed"
    assert "killed by signal 9" in failed.error
    steps = [m["step"] for m in queries.metrics_since(engine, long_run.id)]
    assert len(steps) >= seen_before_kill and steps == list(range(1, len(steps) + 1))


def test_killed_worker_orphan_is_marked_interrupted_and_nothing_runs_twice(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    orphan, waiting = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50),
                                                   config(tiny_model, data_dir)])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "app.worker", "--db", str(db), "--poll-seconds", "0.1"]
    worker_process = subprocess.Popen(command, cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, orphan.id)) >= 3)
        child_pid = queries.get_run(engine, orphan.id).child_pid
        worker_process.kill()
        worker_process.wait()
        # The training child notices its worker is gone and ends itself.
        wait_for(lambda: not _alive(child_pid), timeout=20)
    finally:
        if worker_process.poll() is None:
            worker_process.kill()
    assert status_of(engine, orphan.id) == "running"  # nobody has looked yet
    worker = start_worker(db)
    try:
        wait_for(lambda: status_of(engine, waiting.id) == "completed")
    finally:
        stop_worker(worker)
    interrupted = queries.get_run(engine, orphan.id)
    assert interrupted.status == "interrupted"
    assert "no longer running" in interrupted.error
    assert len(queries.list_runs(engine)) == 2
    requeued = service.requeue_run(engine, orphan.id)
    assert requeued.status == "queued" and requeued.id != orphan.id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (finished, not yet reaped by its dead parent's reaper) counts as gone
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def test_cancel_queued_and_running(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    running, queued = service.submit_runs(engine, [config(tiny_model, data_dir, "heft", epochs=30),
                                                   config(tiny_model, data_dir)])
    worker = start_worker(db)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, running.id)) >= 3)
        assert service.cancel_run(engine, queued.id) == "cancelled"
        assert status_of(engine, queued.id) == "cancelled"
        assert service.cancel_run(engine, str(running.id)) == "cancel_requested"
        wait_for(lambda: status_of(engine, running.id) not in ("running",), timeout=60)
    finally:
        stop_worker(worker)
    cancelled = queries.get_run(engine, running.id)
    assert cancelled.status == "cancelled"
    steps = queries.metrics_since(engine, running.id)
    assert len(steps) < cancelled.progress["total_steps"]
    saved = json.loads((Path(cancelled.artifact_dir) / "run.json").read_text())
    assert saved["result"]["status"] == "cancelled"  # what was finished is kept
    assert queries.get_run(engine, queued.id).started_at is None  # never ran


def test_cancel_is_enforced_by_kill_after_grace(home, tiny_model, data_dir, monkeypatch):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50)])
    worker = start_worker(db, cancel_grace_seconds=0.5)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, run.id)) >= 2)
        os.kill(queries.get_run(engine, run.id).child_pid, signal.SIGSTOP)  # a child that cannot respond
        service.cancel_run(engine, run.id)
        wait_for(lambda: status_of(engine, run.id) != "running", timeout=30)
    finally:
        stop_worker(worker)
    assert status_of(engine, run.id) == "cancelled"


def test_two_workers_never_run_the_same_run(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    runs = service.submit_runs(engine, [config(tiny_model, data_dir) for _ in range(3)])
    workers = [start_worker(db), start_worker(db)]
    try:
        wait_for(lambda: all(status_of(engine, r.id) == "completed" for r in runs), timeout=180)
    finally:
        for worker in workers:
            stop_worker(worker)
    for r in runs:
        log = (Path(queries.get_run(engine, r.id).artifact_dir) / LOG_FILE).read_text()
        assert log.count("step 40/40") == 1  # trained exactly once
        steps = [m["step"] for m in queries.metrics_since(engine, r.id)]
        assert steps == list(range(1, 41))


def test_bad_config_is_rejected_when_queued(home, tiny_model, data_dir, tmp_path):
    engine = open_db(home / "heft.db")
    with pytest.raises(ConfigError, match="reft.layers"):
        too_deep = RunConfig(method="reft", model=tiny_model, data=data_dir, reft=ReftSettings(layers=[40]))
        service.submit_runs(engine, [config(tiny_model, data_dir), too_deep])
    from heft_core.data import DataError

    with pytest.raises(DataError):
        service.submit_runs(engine, [RunConfig(method="lora", model=tiny_model, data=str(tmp_path / "missing"))])
    assert queries.list_runs(engine) == []
    with pytest.raises(ValueError, match="run id"):
        service.cancel_run(engine, "1; DROP TABLE run")
