"""The Ray executor: the worker places each claimed run on a Ray cluster as one Ray task.

``python -m app.worker --ray ADDRESS`` (or ``HEFT_RAY_ADDRESS``; ``auto`` is the cluster this
process runs in) connects once, at start: an address nobody answers at is reported then, and no
run is claimed. Each run becomes a task asking for what it needs (``processes`` GPUs on one node,
or CPUs on a cluster without GPUs), so Ray places it on any node with room; the worker keeps at
most ``pending_limit`` tasks waiting for room, so the queue stays in the database.

The database stays the one record. Tasks report through a :class:`app.ray_task.RunChannel` actor
on the worker's node; every tick the worker drains it and writes steps, evaluations, progress and
log lines (``runs/<id>/train.log``) as for a local run, dropping repeated steps. When a task ends,
its packed run directory is unpacked under the data home's ``runs/<id>``. Cancel: the channel
answers the task's next report with "stop" (it ends at the step boundary); ``ray.cancel(force=True)``
after the grace period. A node that dies takes its tasks with it: their runs become interrupted,
with a message naming the node, and resume from the last checkpoint that travelled back (a resumed
run takes its directory along to its new node). Ray itself provides scheduling, transport and (here
disabled, ``max_retries=0``: nothing trains twice) retries. ``ray`` is imported only when an executor
is made, so the local worker works without it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.launch import device_label
from app.logs import LOG_FILE, log_tail
from app.ray_task import RunChannel, pack_run_dir, train_run, unpack_checkpoint, unpack_run_dir
from app.recording import DatabaseCallback, run_results
from app.shared_stages import start_from_shared_stage1
from heft_common.errors import HeftError
from heft_common.home import data_home
from heft_common.vocabulary import RunStatus
from heft_core.artifacts import read_run_record
from heft_core.callbacks import EvalEvent, ResumeEvent, StepEvent
from heft_core.checkpoint import CHECKPOINTS_DIR
from storage import queries
from storage.models import Run

logger = logging.getLogger("app.ray_executor")

ADDRESS_ENV = "HEFT_RAY_ADDRESS"
NAMESPACE = "heft-studio"
HEALTH_FILE = "executor.json"
STALE_HEALTH_SECONDS = 120.0  # a running worker rewrites it every 15 s (app.worker.HEALTH_SECONDS)
# Checkpoints travel to the worker as they are written, so an interrupted run can continue on another node.
AGAIN = "Resume it to continue from its last checkpoint, or re-queue it to start over."
ROOT = Path(__file__).resolve().parent.parent
# What `ship_code` leaves behind when it sends the project to the nodes (runtime_env working_dir).
SHIPPED_EXCLUDES = [".git", ".venv", ".heft_home", "runs", "out", "bench/results", "**/__pycache__", "*.safetensors"]


class ClusterUnavailable(HeftError, ConnectionError):
    """The Ray cluster cannot be used (wrong address, not running, ray not installed)."""


@dataclass
class ClusterSummary:
    """What the app shows about the cluster: reachable or why not, and what it offers."""

    address: str
    reachable: bool
    nodes: int = 0
    gpus: float = 0.0
    cpus: float = 0.0
    error: str | None = None
    checked_at: float = field(default_factory=time.time)

    def describe(self) -> str:
        if not self.reachable:
            return f"Ray cluster at {self.address} is not reachable: {self.error}"
        return (f"Ray cluster at {self.address}: {self.nodes} node{'s' * (self.nodes != 1)}, "
                f"{self.gpus:g} GPU{'s' * (self.gpus != 1)}, {self.cpus:g} CPU{'s' * (self.cpus != 1)}")


def ray_address_from_env() -> str | None:
    """``HEFT_RAY_ADDRESS``, or None for the local executor."""
    value = os.environ.get(ADDRESS_ENV, "").strip()
    return value or None


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at ``address`` (ray.init would retry for minutes)."""
    if address.startswith("ray://"):
        raise ClusterUnavailable(f"{address}: Ray Client addresses need ray[client], which is not installed; run "
                                 "the worker on a node of the cluster with its head's HOST:PORT, or auto")
    if address == "auto":
        try:  # where `auto` leads: RAY_ADDRESS or the cluster `ray start` recorded on this machine
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address("auto")
        except Exception:
            resolved = None
        if resolved is None:
            raise ClusterUnavailable("no Ray cluster runs on this machine for address 'auto'; "
                                     "start one with `ray start --head`")
        address = resolved
    target = _host_port(address)
    if target is None:
        raise ClusterUnavailable(f"{address!r} is not a Ray address; write HOST:PORT of the cluster's head "
                                 "(e.g. 127.0.0.1:6379) or auto")
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as error:
        raise ClusterUnavailable(f"nothing answers at {address} ({error.strerror or error}); is the cluster "
                                 f"running (`ray start --head`) and is {ADDRESS_ENV} / --ray right?") from None


@dataclass
class _RemoteRun:
    run_id: int
    ref: Any  # the task's ObjectRef
    run_dir: Path
    processes: int
    recorder: "RunRecorder"
    placement: dict[str, Any] | None = None
    cancel_sent_at: float | None = None
    force_cancelled: bool = False


class RunRecorder:
    """Writes one remote run's events into the database once each, in order, and its log lines to train.log."""

    def __init__(self, engine: Any, run_id: int, log_path: Path):
        self.engine = engine
        self.run_id = run_id
        self.database = DatabaseCallback(engine, run_id, echo=False)  # the node logged these lines already
        self.log_path = log_path
        self.last_step = 0
        self.evaluated: set[tuple[str, int]] = set()

    def replay(self, events: list[tuple[str, Any]]) -> dict[str, Any] | None:
        """Apply a batch; returns the task's placement if the batch reported it."""
        placement = None
        lines: list[str] = []
        for kind, payload in events:
            if kind == "placement":
                placement = payload
            elif kind == "begin":
                self.database.on_train_begin(payload)
            elif kind == "phase":
                self.database.on_phase(*payload)
            elif kind == "resume":  # what the interrupted attempt recorded after the checkpoint is replaced
                event = ResumeEvent(**payload)
                self.database.on_resume(event)
                self.last_step = event.from_step
                self.evaluated = {(e["stage"], e["epoch"]) for e in queries.evaluations(self.engine, self.run_id)}
            elif kind == "step" and payload["step"] > self.last_step:
                self.last_step = payload["step"]
                self.database.on_step(StepEvent(**payload))
            elif kind == "eval" and (payload["stage"], payload["epoch"]) not in self.evaluated:
                self.evaluated.add((payload["stage"], payload["epoch"]))
                self.database.on_evaluate(EvalEvent(**payload))
            elif kind == "log":
                lines.append(payload)
            elif kind == "checkpoint":  # kept here, so the run can resume when its node is gone
                unpack_checkpoint(payload, self.log_path.parent)
        self.database.flush()
        if lines:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write("\n".join(lines) + "\n")
        return placement


def _brief(error: BaseException, limit: int = 300) -> str:
    """The first line of a Ray error (they run to pages), cut to ``limit`` characters."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def describe_node(placement: dict[str, Any] | None) -> str:
    """A node as the Runs view and error messages name it: host, IP and Ray node id."""
    if not placement:
        return "an unknown Ray node"
    return f"{placement['hostname']} ({placement['ip']}, Ray node {placement['node_id'][:12]})"


def describe_devices(placement: dict[str, Any] | None, processes: int) -> str:
    """The devices of a run as the Run row stores them: "cuda:0,1" (Ray's GPU ids on that node) or "cpu"."""
    return device_label(list(placement.get("gpus") or []) if placement else [], processes)


class RayExecutor:
    """Runs the worker's claimed runs as Ray tasks: the worker calls :meth:`submit`, :meth:`tick`, :meth:`shutdown`."""

    kind = "ray"

    def __init__(self, address: str, *, cpus_per_process: float = 1.0, memory_mb: int | None = None,
                 pending_limit: int = 2, cancel_grace_seconds: float = 30.0, ship_code: bool = False):
        self.address = address
        self.cpus_per_process = cpus_per_process
        self.memory_mb = memory_mb
        self.pending_limit = pending_limit
        self.cancel_grace_seconds = cancel_grace_seconds
        self.remote: dict[int, _RemoteRun] = {}
        self._ray = self._connect(ship_code)
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # The channel lives on this process's node and needs no CPU; it dies with this process,
        # and tasks that lose it stop.
        self.channel_name = f"heft-channel-{os.getpid()}-{int(time.time() * 1000)}"
        here = ray.get_runtime_context().get_node_id()
        self.channel = ray.remote(RunChannel).options(
            name=self.channel_name, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote()
        ray.get(self.channel.drain.remote(), timeout=120)  # it is up
        # max_retries=0: a run on a node that died is marked interrupted, never trained twice.
        # GPU tasks get a fresh process each (Ray's max_calls=1 for GPU functions) so GPU memory is freed.
        self._cpu_task = ray.remote(max_retries=0)(train_run)
        self._gpu_task = ray.remote(num_gpus=1, max_retries=0)(train_run)
        logger.info("%s", self.cluster_summary().describe())

    def _connect(self, ship_code: bool) -> Any:
        try:
            import ray
        except ImportError:
            raise ClusterUnavailable("ray is not installed; `pip install -r requirements.txt` installs it") from None
        check_reachable(self.address)
        if ray.is_initialized():  # another executor in this process connected already (tests)
            return ray
        runtime_env: dict[str, Any] = {}
        if ship_code:
            runtime_env = {"working_dir": str(ROOT), "excludes": SHIPPED_EXCLUDES}
        try:
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                     runtime_env=runtime_env or None, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterUnavailable(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
        return ray

    # --- health ------------------------------------------------------------------------------
    def cluster_summary(self) -> ClusterSummary:
        ray = self._ray
        try:
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            resources = ray.cluster_resources()
        except Exception as error:  # the cluster went away after we connected
            return ClusterSummary(self.address, False, error=f"{type(error).__name__}: {_brief(error)}")
        return ClusterSummary(self.address, True, len(nodes), float(resources.get("GPU", 0)),
                              float(resources.get("CPU", 0)))

    def _largest_node(self) -> tuple[float, float]:
        """(GPUs, CPUs) of the alive node with the most GPUs (then CPUs)."""
        sizes = [(node["Resources"].get("GPU", 0.0), node["Resources"].get("CPU", 0.0))
                 for node in self._ray.nodes() if node.get("Alive")]
        return max(sizes, default=(0.0, 0.0))

    # --- runs --------------------------------------------------------------------------------
    @property
    def run_ids(self) -> list[int]:
        return list(self.remote)

    def has_room(self) -> bool:
        """True while fewer than ``pending_limit`` submitted tasks wait for a node with room."""
        waiting = sum(1 for remote in self.remote.values() if remote.placement is None)
        return waiting < self.pending_limit

    def submit(self, engine: Any, run: Run, run_dir: Path) -> None:
        """Place a claimed run on the cluster (or fail it at once when no node could ever hold it)."""
        processes = int(run.config.get("processes", 1) or 1)
        gpus, cpus = self._largest_node()
        options: dict[str, Any] = {"name": f"heft-run-{run.id}", "num_cpus": self.cpus_per_process * processes}
        if self.memory_mb:
            options["memory"] = int(self.memory_mb) * 2**20
        if gpus > 0:
            options["num_gpus"] = processes
            need, have, what = processes, gpus, "GPUs"
        else:
            need, have, what = options["num_cpus"], cpus, "CPUs"
        queries.set_run_placement(engine, run.id, executor=self.kind)
        if need > have:
            queries.finish_run(engine, run.id, RunStatus.FAILED, failure_kind="bad_input",
                               error=f"processes={processes} needs {need:g} {what} on one node; the largest node of "
                                     f"the Ray cluster at {self.address} has {have:g}")
            return
        task = self._gpu_task if gpus > 0 else self._cpu_task
        resume = bool(run.resumes)
        shared = None if resume else start_from_shared_stage1(engine, run, run_dir)
        if shared is not None:  # a study's HEFT run: stage 1 is a finished LoRA run's; ship its checkpoint
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(shared + "\n")
            resume = True
        # A resumed run takes its directory (its checkpoints) along to whichever node gets it.
        archive = pack_run_dir(run_dir) if resume and any(run_dir.iterdir()) else None
        ref = task.options(**options).remote(run.id, run.config, self.channel, processes, self.channel_name, NAMESPACE,
                                             resume, archive)
        recorder = RunRecorder(engine, run.id, run_dir / LOG_FILE)
        self.remote[run.id] = _RemoteRun(run.id, ref, run_dir, processes, recorder)
        logger.info("run %d submitted to the Ray cluster (%s)", run.id, options)

    def tick(self, engine: Any) -> None:
        """Record what the tasks reported, finish the runs whose tasks ended, enforce cancels."""
        if not self.remote:
            return
        ray = self._ray
        refs = [remote.ref for remote in self.remote.values()]
        try:
            ended, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            self._record(engine)  # after the wait: holds every event of the tasks that ended
        except ray.exceptions.RayActorError:
            raise  # the channel is gone: this worker cannot follow its runs any more (they become interrupted)
        except ray.exceptions.RayError as error:  # a slow or briefly unreachable head: try again next tick
            logger.warning("could not read the runs' reports from the Ray cluster: %s", _brief(error))
            return
        ended_refs = set(ended)
        for remote in list(self.remote.values()):
            if remote.ref in ended_refs:
                del self.remote[remote.run_id]
                self._finish(engine, remote)
                self.channel.forget.remote(remote.run_id)
            else:
                self._enforce_cancel(engine, remote)

    def _record(self, engine: Any) -> None:
        for run_id, events in self._ray.get(self.channel.drain.remote(), timeout=60).items():
            remote = self.remote.get(run_id)
            if remote is None:
                continue
            placement = remote.recorder.replay(events)
            if placement is not None:
                remote.placement = placement
                queries.set_run_placement(engine, run_id, executor=self.kind, node=describe_node(placement),
                                          devices=describe_devices(placement, remote.processes))

    def _enforce_cancel(self, engine: Any, remote: _RemoteRun) -> None:
        if not queries.is_cancel_requested(engine, remote.run_id):
            return
        now = time.monotonic()
        if remote.cancel_sent_at is None:
            remote.cancel_sent_at = now
            self.channel.cancel.remote(remote.run_id)  # the task stops at its next step
            if remote.placement is None:
                self._ray.cancel(remote.ref)  # still waiting for room: Ray drops it
        elif not remote.force_cancelled and now - remote.cancel_sent_at > self.cancel_grace_seconds:
            logger.warning("run %d did not stop within %.0f s of cancel; cancelling its Ray task by force",
                           remote.run_id, self.cancel_grace_seconds)
            remote.force_cancelled = True
            self._ray.cancel(remote.ref, force=True)

    def _finish(self, engine: Any, remote: _RemoteRun) -> None:
        ray = self._ray
        run_id = remote.run_id
        cancel_requested = queries.is_cancel_requested(engine, run_id)
        try:
            outcome = ray.get(remote.ref, timeout=300)
        except ray.exceptions.TaskCancelledError:
            queries.finish_run(engine, run_id, RunStatus.CANCELLED, error="cancelled; its Ray task was stopped")
            return
        except ray.exceptions.RayTaskError as error:  # the task itself raised (e.g. the node lacks the code)
            self._fail(engine, remote, f"the Ray task failed on {describe_node(remote.placement)}: {error}")
            return
        except ray.exceptions.RayError as error:  # the node, its worker process or the result was lost
            if cancel_requested:
                queries.finish_run(engine, run_id, RunStatus.CANCELLED,
                                   error="cancelled; its Ray task was stopped before it finished")
            elif remote.placement is None:
                queries.finish_run(engine, run_id, RunStatus.INTERRUPTED, error=(
                    f"Interrupted: the Ray node it was sent to was lost before the run started "
                    f"({type(error).__name__}: {_brief(error)}). {AGAIN}"))
            elif self._node_died(remote.placement):
                queries.finish_run(engine, run_id, RunStatus.INTERRUPTED, error=(
                    f"Interrupted: the Ray node {describe_node(remote.placement)} died while it trained this run "
                    f"({type(error).__name__}). {AGAIN}"))
            else:
                self._fail(engine, remote, f"the Ray task on {describe_node(remote.placement)} was lost: "
                                           f"{type(error).__name__}: {_brief(error)}")
            return
        if outcome["status"] == "not_started":
            queries.finish_run(engine, run_id, RunStatus.CANCELLED, error="cancelled before it started")
            return
        if outcome.get("archive"):
            unpacked = unpack_run_dir(outcome["archive"], remote.run_dir)
            if CHECKPOINTS_DIR not in unpacked:  # the run ended without one (completed): drop those that travelled
                shutil.rmtree(remote.run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        if outcome["status"] == "failed":
            self._fail(engine, remote, outcome["error"] or "training failed", outcome.get("kind", "crash"))
            return
        record = read_run_record(remote.run_dir)
        if record is None:
            self._fail(engine, remote, f"the run directory from {describe_node(remote.placement)} has no run.json")
            return
        result = record.get("result", {})
        status = RunStatus.CANCELLED if result.get("status") == RunStatus.CANCELLED else RunStatus.COMPLETED
        queries.finish_run(engine, run_id, status,
                           results=run_results(result, remote.run_dir, record.get("eval_signature")))

    def _fail(self, engine: Any, remote: _RemoteRun, reason: str, kind: str = "crash") -> None:
        tail = log_tail(remote.run_dir / LOG_FILE)
        queries.finish_run(engine, remote.run_id, RunStatus.FAILED, failure_kind=kind,
                           error=f"{reason}\n\nLast log lines:\n{tail}" if tail else reason)

    def _node_died(self, placement: dict[str, Any]) -> bool:
        try:
            return not any(node["NodeID"] == placement["node_id"] and node.get("Alive") for node in self._ray.nodes())
        except Exception:
            return True

    def shutdown(self, engine: Any) -> None:
        """Stop every task (the worker is going away) and mark its runs interrupted."""
        for remote in self.remote.values():
            try:
                self._ray.cancel(remote.ref, force=True)
            except Exception as error:  # the cluster may be gone already
                logger.warning("could not cancel run %d's Ray task: %s", remote.run_id, error)
            queries.finish_run(engine, remote.run_id, RunStatus.INTERRUPTED,
                               error=f"the worker shut down while this run was training on the Ray cluster. {AGAIN}")
        self.remote.clear()
        try:
            self._ray.kill(self.channel)
        except Exception:
            pass


# --- health shown by the app (written by whichever process runs the worker) ------------------------

def write_health(state: dict[str, Any]) -> None:
    """Record the worker's executor and, for Ray, the cluster's state in the data home (atomically)."""
    path = data_home() / HEALTH_FILE
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(dict(state, pid=os.getpid(), written_at=time.time())))
    os.replace(temporary, path)


def ray_health(summary: ClusterSummary) -> dict[str, Any]:
    return dict(asdict(summary), executor="ray", line=summary.describe())


def read_health() -> dict[str, Any] | None:
    try:
        return json.loads((data_home() / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return None


def executor_line(now: float | None = None) -> str:
    """One line for the Runs view: where runs train (the Ray cluster and what it offers, or why it is unusable)."""
    state = read_health()
    if not state or state.get("executor") != "ray":
        return ""
    line = str(state.get("line") or "")
    age = (time.time() if now is None else now) - float(state.get("written_at") or 0)
    if state.get("reachable") and age > STALE_HEALTH_SECONDS:  # the worker stopped refreshing it
        line += f" (as of {age / 60:.0f} min ago: is the worker running?)"
    return line
