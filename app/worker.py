"""The background worker: runs queued runs in child processes, one at a time per GPU slot.

Starts with the web app by default (a thread in the app process that only supervises) or
on its own with ``python -m app.worker``. Training happens in ``app.child`` processes whose
output goes to ``train.log`` in the run directory, so nothing depends on a browser being
connected. The worker heartbeats each running run; when a worker starts it marks runs left
``running`` by a dead worker as interrupted.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.logs import ERROR_FILE, LOG_FILE, log_tail
from app.recording import run_results
from heft_common.home import data_home, database_path, runs_dir
from heft_common.vocabulary import RunStatus
from heft_core.artifacts import read_run_record
from storage import queries
from storage.db import open_db
from storage.models import Run

logger = logging.getLogger("app.worker")

ROOT = Path(__file__).resolve().parent.parent


def gpu_slots() -> list[str | None]:
    """One slot per visible GPU (``HEFT_GPUS`` or nvidia-smi), else one CPU slot."""
    configured = os.environ.get("HEFT_GPUS")
    if configured is not None:
        ids = [g.strip() for g in configured.split(",") if g.strip()]
        return ids or [None]
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
            if count:
                return [str(i) for i in range(count)]
        except (OSError, subprocess.SubprocessError):
            pass
    return [None]


@dataclass
class _Running:
    run_id: int
    process: subprocess.Popen
    slot: str | None
    log_path: Path
    run_dir: Path
    cancel_seen_at: float | None = None
    log_handle: Any = field(default=None, repr=False)


class Worker:
    """Claims queued runs and supervises their child processes."""

    def __init__(self, db_path: str | Path | None = None, *, slots: list[str | None] | None = None,
                 poll_seconds: float = 1.0, heartbeat_seconds: float = 5.0, cancel_grace_seconds: float = 30.0,
                 stale_after_seconds: float = 60.0):
        self.db_path = str(db_path or database_path())
        self.engine = open_db(self.db_path)
        self.slots = slots if slots is not None else gpu_slots()
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.stale_after_seconds = stale_after_seconds
        self.running: dict[int, _Running] = {}
        self.lock: WorkerLock | None = None  # held by the app's worker for its lifetime
        self._last_heartbeat = 0.0
        self._stop = threading.Event()

    # --- the loop ------------------------------------------------------------------------
    def run_forever(self) -> None:
        marked = queries.mark_orphans_interrupted(self.engine, stale_after_s=self.stale_after_seconds)
        if marked:
            logger.warning("marked runs left running by a dead worker as interrupted: %s", marked)
        logger.info("worker %d ready with slots %s on %s", os.getpid(), self.slots, self.db_path)
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(self.poll_seconds)
        finally:
            self.shutdown()

    def tick(self) -> None:
        """One pass: reap finished children, enforce cancels, heartbeat, start new runs."""
        for run_id in list(self.running):
            self._check_child(self.running[run_id])
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_seconds:
            for run_id in self.running:
                queries.heartbeat(self.engine, run_id)
            self._last_heartbeat = now
        for slot in self._free_slots():
            claimed = queries.claim_next_run(self.engine, os.getpid())
            if claimed is None:
                break
            self._start(claimed, slot)

    def stop(self) -> None:
        self._stop.set()

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="heft-worker", daemon=True)
        thread.start()
        return thread

    def _free_slots(self) -> list[str | None]:
        busy = [r.slot for r in self.running.values()]
        free = list(self.slots)
        for slot in busy:
            free.remove(slot)
        return free

    # --- children --------------------------------------------------------------------------
    def _start(self, run: Run, slot: str | None) -> None:
        run_dir = runs_dir() / f"{run.id:06d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        queries.set_artifact_dir(self.engine, run.id, run_dir)
        log_path = run_dir / LOG_FILE
        log_handle = open(log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HEFT_HOME=str(data_home()))
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        command = [sys.executable, "-m", "app.child", str(run.id), "--db", self.db_path,
                   "--parent-pid", str(os.getpid())]
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=str(ROOT), env=env)
        queries.set_child_pid(self.engine, run.id, process.pid)
        self.running[run.id] = _Running(run.id, process, slot, log_path, run_dir, log_handle=log_handle)
        logger.info("run %d started in process %d (slot %s)", run.id, process.pid, slot)

    def _check_child(self, child: _Running) -> None:
        code = child.process.poll()
        if code is None:
            self._enforce_cancel(child)
            return
        child.log_handle.close()
        del self.running[child.run_id]
        self._finish(child, code)

    def _enforce_cancel(self, child: _Running) -> None:
        if not queries.is_cancel_requested(self.engine, child.run_id):
            return
        if child.cancel_seen_at is None:
            child.cancel_seen_at = time.monotonic()  # the child stops itself at its next step
        elif time.monotonic() - child.cancel_seen_at > self.cancel_grace_seconds:
            logger.warning("run %d did not stop within %.0f s of cancel; killing it", child.run_id,
                           self.cancel_grace_seconds)
            child.process.kill()

    def _finish(self, child: _Running, code: int) -> None:
        cancel_requested = queries.is_cancel_requested(self.engine, child.run_id)
        record = read_run_record(child.run_dir) if code == 0 else None
        if record is not None:
            result = record.get("result", {})
            status = RunStatus.CANCELLED if result.get("status") == RunStatus.CANCELLED else RunStatus.COMPLETED
            results = run_results(result, child.run_dir, record.get("eval_signature"))
            queries.finish_run(self.engine, child.run_id, status, results=results)
            return
        if cancel_requested:
            queries.finish_run(self.engine, child.run_id, RunStatus.CANCELLED,
                               error="cancelled; the process was stopped before it finished")
            return
        error_file = child.run_dir / ERROR_FILE
        if error_file.exists():
            reason = error_file.read_text().strip()
        elif code < 0:
            reason = f"training process was killed by signal {-code} ({signal.Signals(-code).name})"
            reason += " — out of memory?" if -code == signal.SIGKILL else ""
        else:
            reason = f"training process exited with status {code}"
        tail = log_tail(child.log_path)
        error = f"{reason}\n\nLast log lines:\n{tail}" if tail else reason
        queries.finish_run(self.engine, child.run_id, RunStatus.FAILED, error=error)

    def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Stop children (they end at the next step) and mark their runs interrupted."""
        for child in list(self.running.values()):
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + grace_seconds
        for child in list(self.running.values()):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
            child.log_handle.close()
            queries.finish_run(self.engine, child.run_id, RunStatus.INTERRUPTED,
                               error="the worker shut down while this run was training; re-queue it to run again")
        self.running.clear()


class WorkerLock:
    """At most one worker per data home: an exclusive, non-blocking file lock."""

    def __init__(self, path: Path | None = None):
        self.path = path or data_home() / "worker.lock"
        self.handle: Any = None

    def acquire(self) -> bool:
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            return False
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return True


def start_background_worker() -> Worker | None:
    """The app's worker thread, unless another worker already serves this data home."""
    lock = WorkerLock()
    if not lock.acquire():
        logger.info("another worker holds %s; this app only queues runs", lock.path)
        return None
    worker = Worker()
    worker.lock = lock
    worker.start_in_thread()
    return worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HEFT Studio worker: trains queued runs from the database in the data home (HEFT_HOME).")
    parser.add_argument("--db", help="database file (default: HEFT_HOME/heft.db)")
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--cancel-grace-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = WorkerLock()
    if not lock.acquire():
        logger.error("another worker is already running for %s (lock %s)", data_home(), lock.path)
        return 1
    worker = Worker(args.db, poll_seconds=args.poll_seconds, cancel_grace_seconds=args.cancel_grace_seconds)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
