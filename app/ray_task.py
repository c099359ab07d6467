"""What runs on a Ray node: one training run as a Ray task, reporting to its worker through an actor.

The worker (``app.ray_executor``) owns a :class:`RunChannel` actor on its own node. A run's task
trains in a temporary directory on whatever node Ray chose, sends its step and evaluation events and
log lines to the channel in small batches (the node never opens the app's SQLite file), learns of a
cancel request in the channel's answer at least every half second, sends each checkpoint as it is
written (so an interrupted run can resume on another node), and returns its run directory packed as a
tar archive, which the worker unpacks under its data home. A run of several processes
trains through ``accelerate launch`` in a subprocess whose main process reports to the channel
itself (``python -m app.ray_task``, :func:`main`).

Module level imports only the standard library and the engine's callback types: Ray and torch load
inside the task, so the worker and the UI import this module cheaply.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from app.launch import exit_with_owner, process_rank, training_command
from app.logs import ERROR_FILE, LOG_FILE
from heft_core.callbacks import EvalEvent, ResumeEvent, StepEvent, TrainerCallback

logger = logging.getLogger("app.ray_task")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_BAD_INPUT = 3

# Events a task sends: ("placement", {...}), ("begin", info), ("phase", [name, done, total]),
# ("step", StepEvent dict), ("eval", EvalEvent dict), ("resume", ResumeEvent dict), ("log", line), and
# ("checkpoint", tar bytes) for each new checkpoint, so a run outlives its node. Steps carry their step
# number, so a replay drops repeats.
Event = tuple[str, Any]


class RunChannel:
    """The worker's mailbox on the cluster (a Ray actor on the worker's node): events in, cancel flags out."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}
        self.cancelled: set[int] = set()

    def push(self, run_id: int, events: list[Event]) -> bool:
        """Take a batch of a run's events, in order; True when the run should stop."""
        if events:
            self.events.setdefault(run_id, []).extend(events)
        return run_id in self.cancelled

    def cancel(self, run_id: int) -> None:
        self.cancelled.add(run_id)

    def forget(self, run_id: int) -> None:
        self.cancelled.discard(run_id)
        self.events.pop(run_id, None)

    def drain(self) -> dict[int, list[Event]]:
        """Every event received since the last drain, per run."""
        events, self.events = self.events, {}
        return events


class ChannelCallback(TrainerCallback):
    """Sends a run's events to the channel: steps every ``flush_seconds``, evaluations at once.

    ``should_stop`` sends what is pending at least every ``poll_seconds``, and the channel's answer
    says whether a cancel was requested. Losing the channel (the worker is gone) stops the run. With
    ``run_dir``, every checkpoint the run writes there goes along with the next batch.
    """

    def __init__(self, channel: Any, run_id: int, flush_seconds: float = 1.0, poll_seconds: float = 0.5,
                 run_dir: Path | None = None):
        self.channel = channel
        self.run_id = run_id
        self.run_dir = run_dir  # where the run writes its checkpoints: each new one travels to the worker
        self.shipped_checkpoint = ""
        self.shipped_config = False
        self.flush_seconds = flush_seconds
        self.poll_seconds = poll_seconds
        self.pending: list[Event] = []
        self.lock = threading.Lock()  # log lines arrive from other threads too
        self.last_send = 0.0
        self.stop = False
        self.phase: str | None = None

    def add(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.pending.append((kind, payload))

    def add_log(self, line: str) -> None:
        self.add("log", line)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.add("begin", dict(info))
        logger.info("run %d: %s", self.run_id, info)
        self.send()

    def on_phase(self, name: str, done: int, total: int) -> None:
        changed = name != self.phase
        self.phase = name
        with self.lock:
            if not changed and self.pending and self.pending[-1][0] == "phase":
                self.pending[-1] = ("phase", [name, done, total])  # only the latest count matters
            else:
                self.pending.append(("phase", [name, done, total]))
        if changed:
            logger.info("phase: %s", name)
        if changed or time.monotonic() - self.last_send >= self.flush_seconds:
            self.send()

    def on_resume(self, event: ResumeEvent) -> None:
        self.add("resume", event.to_dict())
        self.send()

    def on_step(self, event: StepEvent) -> None:
        self.add("step", event.to_dict())
        logger.info("step %d/%d %s epoch %.2f loss %.4f lr %.2e %.0f tok/s", event.step, event.total_steps, event.stage,
                    event.epoch, event.loss, event.learning_rate, event.tokens_per_second)
        if time.monotonic() - self.last_send >= self.flush_seconds:
            self.send()

    def on_evaluate(self, event: EvalEvent) -> None:
        self.add("eval", event.to_dict())
        logger.info("eval %s epoch %d: accuracy %.4f [%.4f, %.4f] n=%d", event.stage, event.epoch, event.accuracy,
                    event.low, event.high, event.n)
        self.send()

    def on_log(self, message: str) -> None:
        logger.info(message)

    def should_stop(self) -> bool:
        if not self.stop and time.monotonic() - self.last_send >= self.poll_seconds:
            self.send()
        return self.stop

    def send(self) -> bool:
        """Deliver pending events; returns (and remembers) whether the run should stop."""
        import ray

        self.queue_new_checkpoint()
        with self.lock:
            batch, self.pending = self.pending, []
        try:
            self.stop = bool(ray.get(self.channel.push.remote(self.run_id, batch))) or self.stop
        except ray.exceptions.RayError as error:  # the worker (and its channel) is gone
            if not self.stop:
                logger.error("lost the worker's channel (%s); stopping", type(error).__name__)
            self.stop = True
        self.last_send = time.monotonic()
        return self.stop

    def queue_new_checkpoint(self) -> None:
        """Queue the run's newest checkpoint (and its run_config.json, once) if it has not travelled yet."""
        if self.run_dir is None:
            return
        from heft_core import checkpoint as ckpt

        root = self.run_dir / ckpt.CHECKPOINTS_DIR
        try:
            latest = (root / ckpt.LATEST_FILE).read_text().strip()
        except OSError:
            return
        if not latest or latest == self.shipped_checkpoint:
            return
        buffer = io.BytesIO()
        try:
            with tarfile.open(fileobj=buffer, mode="w") as archive:  # tensors: compression would gain little
                if not self.shipped_config and (self.run_dir / ckpt.RUN_CONFIG_FILE).exists():
                    archive.add(self.run_dir / ckpt.RUN_CONFIG_FILE, arcname=ckpt.RUN_CONFIG_FILE)
                archive.add(root / latest, arcname=f"{ckpt.CHECKPOINTS_DIR}/{latest}")
                archive.add(root / ckpt.LATEST_FILE, arcname=f"{ckpt.CHECKPOINTS_DIR}/{ckpt.LATEST_FILE}")
        except OSError:  # replaced by a newer one meanwhile: that one travels at the next send
            return
        self.shipped_checkpoint, self.shipped_config = latest, True
        self.add("checkpoint", buffer.getvalue())


class _LineHandler(logging.Handler):
    """Formats log records into a run's event stream (its train.log on the worker's side)."""

    def __init__(self, callback: ChannelCallback):
        super().__init__(logging.INFO)
        self.callback = callback
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.callback.add_log(self.format(record))
        except Exception:  # logging must never break training
            self.handleError(record)


def placement_here() -> dict[str, Any]:
    """Where this task runs: Ray node id, IP, host name and the GPUs Ray gave it."""
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
        "gpus": [str(gpu) for gpu in ray.get_gpu_ids()], "pid": os.getpid(),
    }


def pack_run_dir(path: Path) -> bytes:
    """The run directory as a gzip'd tar (train.log excluded: its lines were streamed already)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for item in sorted(path.iterdir()):
            if item.name != LOG_FILE and not item.name.startswith((".staging-", ".unpack-")):
                archive.add(item, arcname=item.name)
    return buffer.getvalue()


def unpack_checkpoint(data: bytes, run_dir: Path) -> None:
    """Store a checkpoint that travelled from a node (:meth:`ChannelCallback.queue_new_checkpoint`) in ``run_dir``.

    Its step directory goes in place before ``LATEST`` names it, as heft_core.checkpoint writes them, so
    a crash in between leaves the previous checkpoint the latest; older step directories are removed.
    """
    from heft_core import checkpoint as ckpt

    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=run_dir))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            archive.extractall(staging, filter="data")
        if (staging / ckpt.RUN_CONFIG_FILE).exists():
            os.replace(staging / ckpt.RUN_CONFIG_FILE, run_dir / ckpt.RUN_CONFIG_FILE)
        incoming, root = staging / ckpt.CHECKPOINTS_DIR, run_dir / ckpt.CHECKPOINTS_DIR
        root.mkdir(exist_ok=True)
        latest = (incoming / ckpt.LATEST_FILE).read_text().strip()
        if (root / latest).exists():
            shutil.rmtree(root / latest)
        os.replace(incoming / latest, root / latest)
        os.replace(incoming / ckpt.LATEST_FILE, root / ckpt.LATEST_FILE)
        for older in root.iterdir():
            if older.is_dir() and older.name != latest:
                shutil.rmtree(older, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def unpack_run_dir(data: bytes, target: Path) -> list[str]:
    """Unpack :func:`pack_run_dir`'s archive into ``target``, each top-level entry replacing the one there.

    Members cannot escape ``target`` (tarfile's data filter); entries the archive lacks (train.log) stay.
    Returns the names of the top-level entries unpacked.
    """
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            archive.extractall(staging, filter="data")
        names = []
        for item in staging.iterdir():
            existing = target / item.name
            if existing.is_dir() and not existing.is_symlink():
                shutil.rmtree(existing)
            os.replace(item, existing)
            names.append(item.name)
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_run(run_id: int, config: dict[str, Any], channel: Any, processes: int, channel_name: str,
              namespace: str, resume: bool = False, resume_archive: bytes | None = None) -> dict[str, Any]:
    """The Ray task: train one run here and return {"status", "error", "archive", "placement"}.

    ``status`` is "finished" (completed or cancelled: see run.json in the archive), "failed" (with
    ``error``) or "not_started" (cancelled before it began). A resumed run brings its run directory
    (``resume_archive``: checkpoints) and continues from its latest checkpoint.
    """
    import ray

    placement = placement_here()
    work = Path(tempfile.mkdtemp(prefix=f"heft-run-{run_id}-"))
    out = work / "run"
    out.mkdir()
    reporter = ChannelCallback(channel, run_id, run_dir=out)
    reporter.add("placement", placement)
    if reporter.send():
        shutil.rmtree(work, ignore_errors=True)
        return {"status": "not_started", "error": None, "archive": None, "placement": placement}
    try:
        if resume_archive:
            unpack_run_dir(resume_archive, out)
            reporter.shipped_checkpoint = _latest_name(out)  # the worker has that one already
        if processes > 1:
            gcs_address = ray.get_runtime_context().gcs_address
            outcome = _train_in_processes(run_id, config, out, reporter, processes, placement, channel_name,
                                          namespace, gcs_address, resume)
        else:
            outcome = _train_here(run_id, config, out, reporter, resume)
        outcome["archive"] = pack_run_dir(out)
        outcome["placement"] = placement
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _latest_name(run_dir: Path) -> str:
    from heft_core import checkpoint as ckpt

    try:
        return (run_dir / ckpt.CHECKPOINTS_DIR / ckpt.LATEST_FILE).read_text().strip()
    except OSError:
        return ""


def _train_here(run_id: int, config: dict[str, Any], out: Path, reporter: ChannelCallback,
                resume: bool) -> dict[str, Any]:
    from heft_common.errors import HeftError

    handler = _LineHandler(reporter)
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        # The engine loads here, in the task (heavy: torch, transformers).
        from heft_core.config import RunConfig
        from heft_core.train import train

        train(RunConfig.from_dict(config), out, callbacks=[reporter], resume=resume)
        return {"status": "finished", "error": None}
    except HeftError as error:  # bad option, data or model: the message says what
        logger.error("%s", error)
        return {"status": "failed", "error": str(error), "kind": "bad_input"}
    except Exception as error:  # keep the traceback in the run's log
        logger.exception("run %d failed", run_id)
        return {"status": "failed", "error": f"{type(error).__name__}: {error}".strip(), "kind": "crash"}
    finally:
        reporter.send()
        root.removeHandler(handler)
        root.setLevel(previous_level)


def _train_in_processes(run_id: int, config: dict[str, Any], out: Path, reporter: ChannelCallback, processes: int,
                        placement: dict[str, Any], channel_name: str, namespace: str, gcs_address: str,
                        resume: bool) -> dict[str, Any]:
    """``accelerate launch`` on this node; its output becomes the run's log, its main process reports itself."""
    reporter.run_dir = None  # the main process sends the checkpoints
    config_path = out.parent / "config.json"
    config_path.write_text(json.dumps(config))
    arguments = [str(run_id), str(config_path), str(out), "--channel", channel_name, "--namespace", namespace,
                 "--address", gcs_address, "--owner-pid", str(os.getpid())] + (["--resume"] if resume else [])
    command, env = training_command("app.ray_task", arguments, processes, on_gpus=bool(placement["gpus"]))
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, errors="replace", env=env, cwd=os.getcwd())

    def forward_output() -> None:
        for line in process.stdout:
            reporter.add_log(line.rstrip("\n"))

    reader = threading.Thread(target=forward_output, daemon=True, name=f"run-{run_id}-output")
    reader.start()
    while process.poll() is None:
        time.sleep(0.5)
        reporter.send()  # the output so far; the main process polls for a cancel itself
    reader.join(timeout=10)
    reporter.send()
    if process.returncode == 0:
        return {"status": "finished", "error": None}
    error_file = out / ERROR_FILE
    reason = error_file.read_text().strip() if error_file.exists() else ""
    return {"status": "failed", "error": reason or f"training processes exited with status {process.returncode}",
            "kind": "bad_input" if process.returncode == EXIT_BAD_INPUT else "crash"}


def main(argv: list[str] | None = None) -> int:
    """One process of a multi-process run on a Ray node (started by :func:`_train_in_processes`)."""
    parser = argparse.ArgumentParser(description="One process of a HEFT Studio run on a Ray node.")
    parser.add_argument("run_id", type=int)
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--channel", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--owner-pid", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True, format=LOG_FORMAT)
    if args.owner_pid:
        exit_with_owner(args.owner_pid)
    from heft_common.errors import HeftError
    from heft_core.config import RunConfig
    from heft_core.train import train

    out = Path(args.out)
    callbacks: list[TrainerCallback] = []
    if process_rank() == 0:  # the main process reports; the others only train
        import ray

        ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
        callbacks.append(ChannelCallback(ray.get_actor(args.channel), args.run_id, run_dir=out))
        callbacks[0].shipped_checkpoint = _latest_name(out) if args.resume else ""
    try:
        train(RunConfig.from_dict(json.loads(Path(args.config).read_text())), out, callbacks=callbacks,
              resume=args.resume)
        return 0
    except HeftError as error:
        (out / ERROR_FILE).write_text(str(error))
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except Exception as error:
        traceback.print_exc()
        (out / ERROR_FILE).write_text(f"{type(error).__name__}: {error}".strip())
        return 1
    finally:
        for callback in callbacks:
            callback.send()


if __name__ == "__main__":
    sys.exit(main())
