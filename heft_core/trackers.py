"""Reporting a run to the experiment trackers researchers use: Trackio, TensorBoard, W&B, MLflow.

:class:`TrackerReporter` is one ``TrainerCallback`` that ``heft_core.train.train`` adds for
``config.report.report_to``: what it logs comes from the same events the registry records. The full
config as hyperparameters; per step (at the registry's step number) ``train/loss``,
``train/learning_rate``, ``train/tokens_per_second``, ``train/epoch`` and ``train/stage`` (1 LoRA, 2 ReFT);
per evaluation ``eval/accuracy`` with ``eval/accuracy_low``/``_high`` (95% Wilson; the evaluation's scoring),
``eval/yes_share`` and ``eval/epoch`` (cumulative), plus ``eval/generation_accuracy`` (``_low``/``_high``) and
``eval/unparsed`` when it was also scored by generation; at the end ``final/accuracy`` (the primary scoring's, and
its interval), ``final/logits_accuracy``/``final/generation_accuracy`` for those computed, ``final/majority_accuracy``,
``final/trainable_params``, ``final/train_seconds`` and ``final/tokens_per_second``.

Each tracker runs in its own daemon thread behind a queue, so a tracker never slows a training step;
the first error (library missing, bad URI, no network, no credentials) turns that tracker off with ONE
warning, which reaches the run log through the other callbacks' ``on_log`` and ``trackers.json``.
``trackers.json`` in the run directory keeps each tracker's run id, so a resumed run continues the same
tracker run (W&B ``resume="allow"`` with its id, the MLflow run id, the Trackio run name, TensorBoard's
directory with ``purge_step``). Each library is imported in its thread, only when chosen.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from heft_core.callbacks import EvalEvent, ResumeEvent, StepEvent, TrainerCallback
from heft_core.config import RunConfig

logger = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"
STAGE_NUMBERS = {"base": 0, "lora": 1, "reft": 2}
CLOSE_SECONDS = 60.0  # the longest a finished run waits for its trackers to flush (they run in parallel)
# Pinned with the project (requirements.txt); named in the "not installed" warning.
PACKAGES = {"trackio": "trackio==0.43.0", "tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0",
            "mlflow": "mlflow-skinny==3.18.0"}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}``; lists and empty values as text (what trackers take)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def read_trackers_file(run_dir: str | Path) -> dict[str, Any]:
    """``trackers.json`` of a run directory ({tracker: {"id", "status", "warning", ...}}), {} if absent."""
    try:
        return json.loads((Path(run_dir) / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}


class _Run:
    """What every tracker needs to open (or continue) its run."""

    def __init__(self, config: RunConfig, run_dir: Path, info: dict[str, Any], saved: dict[str, Any],
                 from_step: int | None):
        self.config = config
        self.report = config.report
        self.run_dir = run_dir
        self.name = config.name or run_dir.name
        self.params = {**flat_params(config.to_dict()), **{f"data.{k}": v for k, v in info.items()}}
        self.saved = saved  # this tracker's entry of trackers.json from an earlier attempt ({} when fresh)
        self.from_step = from_step  # None: a fresh run; else the steps kept by the checkpoint resumed from


class _Tracker:
    """One tracker's calls, made in its own thread. ``open`` returns what trackers.json keeps."""

    name = ""

    def open(self, run: _Run) -> dict[str, Any]: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


class _Trackio(_Tracker):
    name = "trackio"

    def open(self, run: _Run) -> dict[str, Any]:
        import trackio

        name = run.saved.get("name") or run.name
        self.run = trackio.init(
            project=run.report.project, name=name, group=run.report.group or None,
            space_id=run.report.trackio_space_id or None, config={**run.params, **run.report.tags},
            resume="allow" if run.from_step is not None and run.saved else "never",
            embed=False, auto_log_cpu=False, auto_log_gpu=False,
        )
        return {"id": self.run.id, "name": self.run.name, "project": run.report.project}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish()


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def open(self, run: _Run) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        root = Path(run.report.tensorboard_dir).expanduser() if run.report.tensorboard_dir else None
        if root is None:
            log_dir = run.run_dir / "tensorboard"
        else:  # a shared directory: one sub-directory per run, grouped by study
            log_dir = root / run.report.group / run.run_dir.name if run.report.group else root / run.run_dir.name
        # purge_step: events an interrupted attempt wrote after the checkpoint (or all, starting over) are dropped.
        self.writer = SummaryWriter(str(log_dir), purge_step=(run.from_step or 0) + 1)
        values = {k: v for k, v in {**run.params, **run.report.tags}.items()}
        for summary in hparams(values, {"final/accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)
        return {"log_dir": str(log_dir)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _Wandb(_Tracker):
    name = "wandb"

    def open(self, run: _Run) -> dict[str, Any]:
        import wandb

        report = run.report
        # A bounded start: no network or a wrong server fails in seconds, not after wandb's 90 s default.
        settings = wandb.Settings(init_timeout=30, x_graphql_retry_max=1, console="off", x_disable_stats=True,
                                  save_code=False)
        self.run = wandb.init(
            project=report.project, name=run.name, group=report.group or None, job_type=report.tags.get("arm"),
            tags=[f"{k}:{v}"[:64] for k, v in report.tags.items()] or None, config=run.params,
            mode=report.wandb_mode, id=run.saved.get("id") if run.from_step is not None else None,
            resume="allow", dir=os.environ.get("WANDB_DIR") or str(run.run_dir), settings=settings, reinit="create_new",
        )
        # The registry's step is the x axis; a resumed run may log a step again (wandb's own _step never goes back).
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        return {"id": self.run.id, "project": report.project, "mode": report.wandb_mode}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class _Mlflow(_Tracker):
    name = "mlflow"

    def open(self, run: _Run) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from heft_common.home import data_home

        uri = run.report.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        uri = uri or (data_home() / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless opted in; a file: URI chosen for a run is that opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run.saved.get("id") if run.from_step is not None else None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(run.report.project)
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(run.report.project))
            tags = {**run.report.tags, "mlflow.runName": run.name}
            if run.report.group:
                tags["group"] = run.report.group
            self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        return {"id": self.run_id, "tracking_uri": uri}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED"))


_KINDS: dict[str, type[_Tracker]] = {"trackio": _Trackio, "tensorboard": _TensorBoard, "wandb": _Wandb,
                                     "mlflow": _Mlflow}


class _Worker:
    """A tracker behind a queue in a daemon thread; its first error turns it off with one warning."""

    def __init__(self, tracker: _Tracker, warn: Callable[[str, str], None], opened: Callable[[], None]):
        self.tracker = tracker
        self.warn = warn
        self.opened = opened
        self.queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self.state: dict[str, Any] = {"status": "starting"}
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"tracker-{tracker.name}")
        self.thread.start()

    def put(self, call: str, *args: Any) -> None:
        if self.state["status"] != "off":
            self.queue.put((call, args))

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            call, args = item
            if self.state["status"] == "off":
                continue
            try:
                result = getattr(self.tracker, call)(*args)
                if call == "open":
                    self.state.update(result or {}, status="on")
                    self.opened()  # its run id goes into trackers.json now: a killed run resumes the same run
            except BaseException as exc:  # any failure of a tracker stays out of the run
                self.state.update(status="off", warning=_reason(self.tracker.name, exc))
                self.warn(self.tracker.name, self.state["warning"])

    def finish(self, status: str, deadline: float) -> None:
        self.put("close", status)
        self.queue.put(None)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive() and self.state["status"] != "off":
            self.state.update(status="off", warning=f"tracker {self.tracker.name} did not finish within "
                                                    f"{CLOSE_SECONDS:.0f} s; its last values may be missing")
            self.warn(self.tracker.name, self.state["warning"])
        elif self.state["status"] == "on":
            self.state["status"] = "closed"


def _reason(name: str, exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        detail = f"the {name} library is not installed (pip install {PACKAGES[name]})"
    else:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return f"tracker {name} is off for this run ({detail}); the run trains on without it"


class TrackerReporter(TrainerCallback):
    """Reports a run to ``config.report.report_to``; ``say`` is where its warnings go (the run log)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, resume: bool = False,
                 say: Callable[[str], None] | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.say = say or (lambda message: logger.warning("%s", message))
        self.workers: dict[str, _Worker] = {}
        self.warnings: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.info: dict[str, Any] | None = None
        self.from_step: int | None = None
        self.step = 0
        self.lock = threading.Lock()  # trackers.json is written from the trackers' threads too

    # --- events (the training thread) --------------------------------------------------------
    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.info = {k: info[k] for k in ("train_examples", "eval_examples", "data_label") if k in info}

    def on_resume(self, event: ResumeEvent) -> None:
        self.from_step = event.from_step
        self.step = event.from_step

    def on_step(self, event: StepEvent) -> None:
        self.step = event.step
        self._emit({
            "train/loss": event.loss, "train/learning_rate": event.learning_rate,
            "train/tokens_per_second": event.tokens_per_second, "train/epoch": event.epoch,
            "train/stage": STAGE_NUMBERS.get(event.stage, 0),
        }, event.step)

    def on_evaluate(self, event: EvalEvent) -> None:
        metrics = {"eval/accuracy": event.accuracy, "eval/accuracy_low": event.low, "eval/accuracy_high": event.high,
                   "eval/epoch": event.cumulative_epoch}
        if getattr(event, "yes_share", None) is not None:
            metrics["eval/yes_share"] = event.yes_share
        if event.generation_accuracy is not None:  # scored by generation too: each scoring under its own name
            metrics.update({"eval/generation_accuracy": event.generation_accuracy,
                            "eval/generation_accuracy_low": event.generation_low,
                            "eval/generation_accuracy_high": event.generation_high,
                            "eval/unparsed": float(event.unparsed or 0)})
        self._emit(metrics, self.step)

    def finish(self, result: Any = None, status: str | None = None) -> None:
        """The run ended: its final numbers (``result``, a RunResult), then close every tracker (bounded wait)."""
        if not self.workers:
            return
        if result is not None and result.accuracy is not None:
            from heft_core.stats import majority_baseline

            acc = result.accuracy
            baseline = majority_baseline({p.uid: p.label for p in result.predictions})
            self._emit({
                "final/accuracy": acc.accuracy, "final/accuracy_low": acc.low, "final/accuracy_high": acc.high,
                "final/majority_accuracy": baseline.accuracy,
                "final/trainable_params": sum(result.trainable_params.values()),
                "final/train_seconds": result.train_seconds, "final/tokens_per_second": result.tokens_per_second,
                # final/accuracy is the run's primary scoring (the config's "scoring"); each computed one by name
                **{f"final/{name}_accuracy": values["accuracy"] for name, values in (result.accuracies or {}).items()},
            }, self.step)
        status = status or (result.status if result is not None else "failed")
        deadline = time.monotonic() + CLOSE_SECONDS
        for worker in self.workers.values():
            worker.finish(status, deadline)
        self._write_state()
        self._drain()

    # --- plumbing ----------------------------------------------------------------------------
    def _start(self) -> None:
        """Open the trackers at the first event, when it is known whether this attempt resumes."""
        saved = read_trackers_file(self.run_dir) if self.resume else {}
        for name in self.config.report.report_to:
            worker = _Worker(_KINDS[name](), self._warn, self._write_state)
            run = _Run(self.config, self.run_dir, self.info or {}, saved.get(name) or {}, self.from_step)
            worker.put("open", run)
            self.workers[name] = worker

    def _emit(self, metrics: dict[str, float], step: int) -> None:
        if not self.workers and self.info is not None:
            self._start()
        for worker in self.workers.values():
            worker.put("log", metrics, step)
        self._drain()

    def _warn(self, name: str, message: str) -> None:  # a tracker's thread
        self.warnings.put(message)

    def _drain(self) -> None:
        """Warnings from the trackers' threads, said from the training thread (callbacks are not thread-safe)."""
        while True:
            try:
                message = self.warnings.get_nowait()
            except queue.Empty:
                return
            self.say(message)
            self._write_state()

    def _write_state(self) -> None:
        with self.lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        state = {name: dict(worker.state) for name, worker in list(self.workers.items())}
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            temporary = self.run_dir / f".{TRACKERS_FILE}.tmp"
            temporary.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
            os.replace(temporary, self.run_dir / TRACKERS_FILE)
        except OSError:
            logger.warning("could not write %s", self.run_dir / TRACKERS_FILE, exc_info=True)
