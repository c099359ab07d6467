"""The background worker: runs queued runs in child processes, one at a time per GPU slot.

Starts with the web app by default (a thread in the app process that only supervises) or
on its own with ``python -m app.worker``. Training happens in ``app.child`` processes whose
output goes to ``train.log`` in the run directory, so nothing depends on a browser being
connected. The worker heartbeats each running run, and when it starts and on every heartbeat it
marks runs left ``running`` by a dead or silent worker as interrupted (runs carry the claiming
worker's id, heft_common.process, not a bare PID: in a container every worker is PID 1). SIGTERM
stops it like Ctrl-C: its runs are marked interrupted and its children stopped. Given a Ray address
(``--ray`` / ``HEFT_RAY_ADDRESS``) it places the runs on that cluster instead (``app.ray_executor``); a run
of several ``processes`` takes as many GPU slots here (``app.launch``).
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.child import EXIT_BAD_INPUT, EXIT_STOPPED
from app.launch import device_label, training_command
from app.logs import ERROR_FILE, LOG_FILE, log_tail
from app.ray_executor import (
    ClusterSummary,
    ClusterUnavailable,
    RayExecutor,
    ray_address_from_env,
    ray_health,
    write_health,
)
from app.recording import run_results
from app.shared_stages import waits_for_shared_stage1
from heft_common.errors import StoreError
from heft_common.home import data_home, database_path, runs_dir
from heft_common.process import oom_kill_count, worker_identity
from heft_common.vocabulary import RunStatus
from heft_core.artifacts import read_run_record
from storage import queries
from storage.archive import Archiver, archive_setting
from storage.db import checkpoint_wal, open_db
from storage.lifecycle import StartupReport, prepare_registry
from storage.models import Run
from storage.rebuild import write_registry_record

logger = logging.getLogger("app.worker")

ROOT = Path(__file__).resolve().parent.parent
AUTO_RESUME_ENV = "HEFT_AUTO_RESUME"
MAX_AUTO_RESUMES = 3  # a run that keeps taking its worker down is left for a person to look at
HEALTH_SECONDS = 15.0  # how often a Ray worker records the cluster's state for the Runs view
WAL_CHECKPOINT_SECONDS = 300.0  # how often a running worker folds the WAL into heft.db (and after each run)


def auto_resume_default() -> bool:
    """Resume interrupted runs at start-up? ``HEFT_AUTO_RESUME`` (1/0) decides; without it, yes wherever a run
    archive is configured (``storage.archive.archive_setting``: ``HEFT_ARCHIVE``, or a Space's bucket at
    ``/data``), where restarts are routine and runs restored from it resume from their checkpoints."""
    setting = os.environ.get(AUTO_RESUME_ENV)
    if setting is not None and setting.strip():
        return setting.strip().lower() in ("1", "true", "yes", "on")
    return archive_setting() is not None


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
    slots: list[str | None]  # a run of N processes holds N GPU slots
    log_path: Path
    run_dir: Path
    cancel_seen_at: float | None = None
    log_handle: Any = field(default=None, repr=False)
    oom_kills_at_start: int | None = None  # the memory cgroup's OOM-kill count when the child started
    archived_checkpoint: str | None = None  # the checkpoint (LATEST) last copied to the archive


def kill_reason(code: int, oom_kills_before: int | None, oom_kills_after: int | None) -> str:
    """Why a child died of signal ``-code``: "out of memory" only if the cgroup's OOM-kill counter moved."""
    reason = f"training process was killed by signal {-code} ({signal.Signals(-code).name})"
    if -code == signal.SIGKILL and None not in (oom_kills_before, oom_kills_after) \
            and oom_kills_after > oom_kills_before:
        reason += " — out of memory: the kernel's OOM killer stopped it (use a smaller batch or model)"
    return reason


def new_run_dir(run: Run) -> Path:
    """A run directory no run has used: ``runs/<id>-<random>`` (a database recreated on this data home
    starts its ids at 1 again, and must not append to an old run's files)."""
    while True:
        run_dir = runs_dir() / f"{run.id:06d}-{uuid.uuid4().hex[:8]}"
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue


class Worker:
    """Claims queued runs and supervises their child processes."""

    def __init__(self, db_path: str | Path | None = None, *, slots: list[str | None] | None = None,
                 poll_seconds: float = 1.0, heartbeat_seconds: float = 5.0, cancel_grace_seconds: float = 30.0,
                 stale_after_seconds: float = 60.0, auto_resume: bool | None = None,
                 ray_address: str | None = None, ray_options: dict[str, Any] | None = None,
                 executor: RayExecutor | None = None, registry: StartupReport | None = None):
        """``ray_address`` (with RayExecutor's ``ray_options``), or a ready ``executor``, trains the runs on a
        Ray cluster instead of in local child processes; an address that does not answer raises
        ClusterUnavailable before any run is claimed."""
        self.db_path = str(db_path or database_path())
        # A new or empty database on a home with run directories is re-indexed from them; an empty home with an
        # archive configured gets the archived runs back first (storage.lifecycle).
        # The app passes the ``registry`` report of its own start-up (same database): it is not done twice.
        registry = registry if registry is not None else prepare_registry(self.db_path)
        self.engine = open_db(self.db_path)
        backend = registry.backend  # a directory or a hub dataset repo (HEFT_ARCHIVE), or None
        self.archiver = Archiver(backend) if backend is not None else None  # copies run directories
        self._last_wal_checkpoint = time.monotonic()
        self.slots = slots if slots is not None else gpu_slots()
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.stale_after_seconds = stale_after_seconds
        self.auto_resume = auto_resume_default() if auto_resume is None else auto_resume
        self.worker_id = str(worker_identity())  # recorded on every run this worker claims
        self.running: dict[int, _Running] = {}
        self.lock: WorkerLock | None = None  # held by the app's worker for its lifetime
        self._last_heartbeat = 0.0
        self._last_health = 0.0
        self._held: Run | None = None  # claimed, waiting for enough free GPU slots (see tick)
        self._stop = threading.Event()
        self.executor = executor
        if self.executor is None and ray_address:
            try:
                self.executor = RayExecutor(ray_address, **{"cancel_grace_seconds": cancel_grace_seconds,
                                                            **(ray_options or {})})
            except ClusterUnavailable as error:
                write_health(ray_health(ClusterSummary(ray_address, False, error=str(error))))
                raise
        self._write_health()

    # --- the loop ------------------------------------------------------------------------
    def run_forever(self) -> None:
        marked = queries.mark_orphans_interrupted(self.engine, stale_after_s=self.stale_after_seconds)
        if marked:
            logger.warning("marked runs left running by a dead worker as interrupted: %s", marked)
        if self.auto_resume:
            self.resume_interrupted()
        logger.info("worker %d ready with slots %s on %s", os.getpid(), self.slots, self.db_path)
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(self.poll_seconds)
        finally:
            self.shutdown()
            checkpoint_wal(self.db_path, "TRUNCATE")  # a clean stop: heft.db alone holds every run

    def tick(self) -> None:
        """One pass: reap finished children, enforce cancels, heartbeat, archive checkpoints, start new runs."""
        for run_id in list(self.running):
            self._check_child(self.running[run_id])
        for child in self.running.values():
            self._archive_new_checkpoint(child)
        if time.monotonic() - self._last_wal_checkpoint >= WAL_CHECKPOINT_SECONDS:
            self._last_wal_checkpoint = time.monotonic()
            checkpoint_wal(self.db_path, "PASSIVE")  # never waits for the app's readers or the children's writes
        if self.executor is not None:
            self.executor.tick(self.engine)  # records the remote runs' reports, finishes ended ones
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_seconds:
            held = [self._held.id] if self._held is not None else []
            for run_id in [*self.running, *held, *(self.executor.run_ids if self.executor else [])]:
                queries.heartbeat(self.engine, run_id)
            self._last_heartbeat = now
            # Not only at start-up: a worker in another container may die while this one runs.
            marked = queries.mark_orphans_interrupted(self.engine, stale_after_s=self.stale_after_seconds)
            if marked:
                logger.warning("marked runs whose worker is gone as interrupted: %s", marked)
        if self.executor is not None:
            if now - self._last_health >= HEALTH_SECONDS:
                self._write_health()
            while self.executor.has_room():
                claimed = queries.claim_next_run(self.engine, os.getpid(), worker_id=self.worker_id, waits=self._waits)
                if claimed is None:
                    break
                self.executor.submit(self.engine, claimed, self._prepare_run_dir(claimed))
            return
        free = self._free_slots()
        if self._held is not None:
            needed = self._slots_needed(self._held)
            if needed > len(free):
                return
            self._start(self._held, free[:needed])
            free, self._held = free[needed:], None
        while free:
            upcoming = queries.next_queued_run(self.engine, waits=self._waits)
            if upcoming is None:
                break
            if len(free) < self._slots_needed(upcoming) <= len(self.slots):
                break  # the oldest run waits for enough GPU slots; later runs wait behind it
            claimed = queries.claim_next_run(self.engine, os.getpid(), worker_id=self.worker_id, waits=self._waits)
            if claimed is None:
                break
            needed = self._slots_needed(claimed)  # another worker may have taken `upcoming` first
            if needed > len(self.slots):
                processes = claimed.config.get("processes", 1)
                queries.finish_run(self.engine, claimed.id, RunStatus.FAILED, failure_kind="bad_input", error=(
                    f"processes={processes} needs {needed} GPUs on one machine; this worker has {len(self.slots)} "
                    "(HEFT_GPUS or the visible GPUs)"))
                continue
            if needed > len(free):  # only when another worker raced us: start it once slots free up
                self._held = claimed
                break
            self._start(claimed, free[:needed])
            free = free[needed:]

    def _waits(self, run: Run) -> bool:
        """A queued run that must not start yet: a study's HEFT run whose LoRA twin still trains its stage 1."""
        return waits_for_shared_stage1(self.engine, run)

    def _slots_needed(self, run: Run) -> int:
        """GPU slots a run takes: one per process on a GPU machine; the one CPU slot otherwise."""
        processes = int(run.config.get("processes", 1) or 1)
        return processes if any(slot is not None for slot in self.slots) else 1

    def _write_health(self) -> None:
        """What the Runs view says about where runs train (the data home's executor.json)."""
        self._last_health = time.monotonic()
        try:
            if self.executor is not None:
                write_health(ray_health(self.executor.cluster_summary()))
            else:
                write_health({"executor": "local", "slots": self.slots})
        except OSError as error:  # a read-only data home must not stop the worker
            logger.warning("could not record the executor's health: %s", error)

    def resume_interrupted(self) -> list[int]:
        """Queue every interrupted run again as itself, to continue from its checkpoint (auto-resume)."""
        resumed = []
        for run in sorted(queries.list_runs(self.engine, status=RunStatus.INTERRUPTED, limit=None), key=lambda r: r.id):
            if sum(1 for entry in run.resumes if entry.get("by") == "worker") >= MAX_AUTO_RESUMES:
                logger.warning("run %d was resumed automatically %d times already; leaving it interrupted",
                               run.id, MAX_AUTO_RESUMES)
                continue
            try:
                queries.resume_run(self.engine, run.id, by="worker")
            except ValueError as error:  # resumed or deleted meanwhile (another tab, another worker)
                logger.info("run %d not resumed: %s", run.id, error)
                continue
            resumed.append(run.id)
        if resumed:
            logger.warning("auto-resume: interrupted runs queued again from their checkpoints: %s", resumed)
        return resumed

    def stop(self) -> None:
        self._stop.set()

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="heft-worker", daemon=True)
        thread.start()
        return thread

    def _free_slots(self) -> list[str | None]:
        busy = [slot for r in self.running.values() for slot in r.slots]
        free = list(self.slots)
        for slot in busy:
            free.remove(slot)
        return free

    # --- children --------------------------------------------------------------------------
    def _prepare_run_dir(self, run: Run) -> Path:
        # A resumed run continues in its own directory: its checkpoints and its log are there.
        own_dir = Path(run.artifact_dir) if run.resumes and run.artifact_dir else None
        run_dir = own_dir if own_dir is not None and own_dir.is_dir() else new_run_dir(run)
        queries.set_artifact_dir(self.engine, run.id, run_dir)
        write_registry_record(run_dir, run)  # what a rebuild of the database needs (storage.rebuild)
        return run_dir

    def _start(self, run: Run, slots: list[str | None]) -> None:
        run_dir = self._prepare_run_dir(run)
        log_path = run_dir / LOG_FILE
        log_handle = open(log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HEFT_HOME=str(data_home()))
        gpu_ids = [slot for slot in slots if slot is not None]
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        processes = int(run.config.get("processes", 1) or 1)
        # More than one process: accelerate launch, its processes on these GPUs (or the CPU, over gloo).
        command, env = training_command("app.child", [str(run.id), "--db", self.db_path, "--parent-pid",
                                                      str(os.getpid())], processes, on_gpus=bool(gpu_ids), environ=env)
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=str(ROOT), env=env)
        queries.set_child_pid(self.engine, run.id, process.pid)
        queries.set_run_placement(self.engine, run.id, executor="local", node=socket.gethostname(),
                                  devices=device_label(gpu_ids, processes))
        self.running[run.id] = _Running(run.id, process, list(slots), log_path, run_dir, log_handle=log_handle,
                                        oom_kills_at_start=oom_kill_count())
        logger.info("run %d started in process %d (slots %s)", run.id, process.pid, slots)

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

    def _archive_new_checkpoint(self, child: _Running) -> None:
        """Copy a running run's directory to the archive each time its trainer made a new checkpoint LATEST."""
        if self.archiver is None:
            return
        try:
            latest = (child.run_dir / "checkpoints" / "LATEST").read_text().strip()  # heft_core.checkpoint's file
        except OSError:
            return
        if latest and latest != child.archived_checkpoint:
            child.archived_checkpoint = latest
            self.archiver.submit(child.run_dir)

    def _finish(self, child: _Running, code: int) -> None:
        self._record_end(child, code)
        if self.archiver is not None:
            self.archiver.submit(child.run_dir)  # finished, failed or cancelled: its directory as it ends
        checkpoint_wal(self.db_path, "PASSIVE")

    def _record_end(self, child: _Running, code: int) -> None:
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
        if code == EXIT_STOPPED:
            queries.finish_run(self.engine, child.run_id, RunStatus.INTERRUPTED,
                               error="the training process was stopped (SIGTERM) at an optimizer step, after writing a "
                                     "checkpoint there; resume it to continue from that step")
            return
        error_file = child.run_dir / ERROR_FILE
        if error_file.exists():
            reason = error_file.read_text().strip()
        elif code < 0:
            reason = kill_reason(code, child.oom_kills_at_start, oom_kill_count())
        else:
            reason = f"training process exited with status {code}"
        tail = log_tail(child.log_path)
        error = f"{reason}\n\nLast log lines:\n{tail}" if tail else reason
        # The child exits with EXIT_BAD_INPUT when the run's own config, data or model is at fault.
        kind = "bad_input" if code == EXIT_BAD_INPUT else "crash"
        queries.finish_run(self.engine, child.run_id, RunStatus.FAILED, error=error, failure_kind=kind)

    def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Stop children and mark their runs interrupted: SIGTERM makes a child end at its next optimizer step
        with a checkpoint there (app.child); one still running after ``grace_seconds`` is killed and resumes
        from its last periodic checkpoint."""
        if self.executor is not None:
            self.executor.shutdown(self.engine)
        if self._held is not None:
            queries.finish_run(self.engine, self._held.id, RunStatus.INTERRUPTED,
                               error="the worker shut down before this run started; re-queue it")
            self._held = None
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
                               error="the worker shut down while this run was training; resume it to continue "
                                     "from its last checkpoint, or re-queue it to start over")
            if self.archiver is not None:
                self.archiver.submit(child.run_dir)  # interrupted: its last checkpoint, for a resume elsewhere
        self.running.clear()
        if self.archiver is not None and not self.archiver.drain(timeout=20):
            logger.warning("the archive copies did not finish within the shutdown's wait; the archive keeps the "
                           "previous copies")


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


def start_background_worker(ray_address: str | None = None, registry: StartupReport | None = None) -> Worker | None:
    """The app's worker thread, unless another worker already serves this data home.

    ``registry`` is the app's :func:`~storage.lifecycle.prepare_registry` report for the same data home.

    ``ray_address`` (default ``HEFT_RAY_ADDRESS``) trains on that Ray cluster; when it cannot be reached
    the error is logged and shown in the Runs view, and runs stay queued.
    """
    lock = WorkerLock()
    if not lock.acquire():
        logger.info("another worker holds %s; this app only queues runs", lock.path)
        return None
    try:
        worker = Worker(ray_address=ray_address or ray_address_from_env(), registry=registry)
    except ClusterUnavailable as error:
        logger.error("%s; runs stay queued", error)
        lock.handle.close()  # another worker may serve this data home instead
        return None
    worker.lock = lock
    worker.start_in_thread()
    return worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HEFT Studio worker: trains queued runs from the database in the data home (HEFT_HOME).")
    parser.add_argument("--db", help="database file (default: HEFT_HOME/heft.db)")
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--cancel-grace-seconds", type=float, default=30.0)
    parser.add_argument("--stale-after-seconds", type=float, default=queries.STALE_AFTER_S,
                        help="a running run whose worker cannot be seen from here and that has not heartbeated "
                             "for this long is marked interrupted")
    parser.add_argument("--auto-resume", action=argparse.BooleanOptionalAction, default=None,
                        help="at start-up, resume interrupted runs from their checkpoints (default: "
                             f"${AUTO_RESUME_ENV}, else on only on a Hugging Face Space with persistent storage)")
    ray = parser.add_argument_group("Ray cluster (README: Ray cluster)")
    ray.add_argument("--ray", metavar="ADDRESS", default=ray_address_from_env(),
                     help="train on this Ray cluster: HOST:PORT of its head, or auto for the cluster this machine "
                          "is in (default: $HEFT_RAY_ADDRESS; unset: local child processes)")
    ray.add_argument("--ray-cpus-per-process", type=float, default=1.0,
                     help="CPUs a run asks Ray for, per process (default 1)")
    ray.add_argument("--ray-memory-mb", type=int, default=None, help="memory a run asks Ray for (MiB)")
    ray.add_argument("--ray-ship-code", action="store_true",
                     help="send this checkout to the nodes (Ray runtime_env working_dir) instead of relying on "
                          "the project being installed on every node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = WorkerLock()
    if not lock.acquire():
        logger.error("another worker is already running for %s (lock %s)", data_home(), lock.path)
        return 1
    try:
        ray_options = {"cpus_per_process": args.ray_cpus_per_process, "memory_mb": args.ray_memory_mb,
                       "ship_code": args.ray_ship_code}
        worker = Worker(args.db, poll_seconds=args.poll_seconds, cancel_grace_seconds=args.cancel_grace_seconds,
                        stale_after_seconds=args.stale_after_seconds, auto_resume=args.auto_resume,
                        ray_address=args.ray, ray_options=ray_options)
    except (StoreError, ClusterUnavailable) as exc:  # a damaged database or an unreachable cluster: the message says
        logger.error("%s", exc)  # what to do
        return 2
    # docker stop, systemd and Space restarts send SIGTERM: stop like Ctrl-C (runs interrupted, children stopped).
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
