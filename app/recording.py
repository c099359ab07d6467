"""Recording a training run in the database: streamed steps and evaluations, and the final results.

Used by the training child (``app.child``) and by anything else that trains through heft_core
and wants the app to show the run (a script of your own). No Gradio, no torch.

The progress snapshot (``Run.progress``) names the phase the run is in (``phase``, with
``phase_done`` of ``phase_total`` steps or questions), keeps the seconds spent per kind of phase
(``phase_seconds``: preparing, converting, loading, training, evaluating, saving) and the
questions evaluated so far (``eval_questions_done``), and an ETA over everything still to do:
the model load while it loads (from ``app.timing``'s estimate), the training steps left at the
measured step time, and the evaluations left at this run's measured seconds per question
(before its first evaluation: the estimate's).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from app import timing
from heft_core.callbacks import (
    CONVERTING,
    EvalEvent,
    ResumeEvent,
    StepEvent,
    TrainerCallback,
    phase_kind,
    training_phase,
)
from heft_core.config import RunConfig
from storage import queries

logger = logging.getLogger(__name__)


class DatabaseCallback(TrainerCallback):
    """Writes steps in batches (every second or 20 steps), evaluations at once, and polls cancel."""

    def __init__(self, engine: Any, run_id: int, flush_seconds: float = 1.0, flush_rows: int = 20,
                 cancel_poll_seconds: float = 0.5, echo: bool = True):
        self.engine = engine
        self.echo = echo  # log each step and evaluation (False: the lines were logged where the run trains)
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.cancel_poll_seconds = cancel_poll_seconds
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.last_cancel_check = 0.0
        self.cancelled = False
        self.progress: dict[str, Any] = {}
        self.phase: str | None = None
        self.phase_started = 0.0
        self.phase_seconds: dict[str, float] = {}
        self.eval_questions_done = 0
        self.stage_start_step = 0  # the run's step count when the current training stage began
        self.stage_total = 0  # optimizer steps of the current training stage
        self.trained = False  # on_train_begin seen: the model is loaded
        self._planned: tuple[RunConfig | None, timing.Estimate | None] | None = None

    def _say(self, message: str, *args: Any) -> None:
        if self.echo:
            logger.info(message, *args)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.trained = True
        self.progress.update({
            "stage": None, "step": 0, "total_steps": info["total_steps"], "train_examples": info["train_examples"],
            "eval_examples": info["eval_examples"], "data_label": info["data_label"], "device": info["device"],
            "precision": info.get("precision"),
        })
        self._planned = None  # estimate again with the real question counts
        self.progress.update(self._eta())
        queries.update_progress(self.engine, self.run_id, self.progress)
        self._say("run %d: %s", self.run_id, info)

    def on_phase(self, name: str, done: int, total: int) -> None:
        changed = name != self.phase
        if changed:
            self._enter(name)
            if phase_kind(name) == "training":
                self.stage_start_step, self.stage_total = (self.progress.get("step") or 0) - done, total
            self._say("phase: %s", name)
        self.progress.update(phase=name, phase_done=done, phase_total=total, **self._eta())
        if changed or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def _enter(self, name: str) -> None:
        """Close the current phase (its seconds, its evaluated questions) and start ``name``."""
        now = time.monotonic()
        if self.phase is not None:
            kind = phase_kind(self.phase)
            self.phase_seconds[kind] = self.phase_seconds.get(kind, 0.0) + now - self.phase_started
            if kind == "evaluating":
                self.eval_questions_done += int(self.progress.get("phase_done") or 0)
        self.phase, self.phase_started = name, now
        self.progress.update(phase_seconds={k: round(v, 3) for k, v in self.phase_seconds.items()},
                             eval_questions_done=self.eval_questions_done)

    def _plan(self) -> tuple[RunConfig | None, timing.Estimate | None]:
        """The run's config and the estimate of its phases (from app.timing), read once; (None, None) if unreadable."""
        if self._planned is None:
            config, estimate = None, None
            try:
                run = queries.get_run(self.engine, self.run_id)
                config = RunConfig.from_dict(run.config) if run is not None else None
                if config is not None:
                    n_train = self.progress.get("train_examples") or config.train_size
                    n_eval = self.progress.get("eval_examples") or config.eval_size
                    if n_eval and (n_train or config.method == "base"):
                        speed = timing.measured_speeds(self.engine, config.model).get(config.method)
                        estimate = timing.estimate_seconds(config, n_train or 0, n_eval, speed,
                                                           convert=self.phase == CONVERTING)
            except Exception:  # an ETA is a nicety: never let it stop a run
                logger.warning("run %d: no time estimate", self.run_id, exc_info=True)
            self._planned = (config, estimate)
        return self._planned

    def _eta(self) -> dict[str, Any]:
        """{"eta_seconds", "eta_basis"}: loading (while it lasts), training and evaluation still to do."""
        config, estimate = self._plan()
        progress = self.progress
        step, total = progress.get("step") or 0, progress.get("total_steps") or 0
        elapsed = progress.get("elapsed_seconds") or 0.0
        if step and total:
            train_left = elapsed / step * (total - step)
        elif estimate is not None:
            train_left = estimate.train
        else:
            return {"eta_seconds": None, "eta_basis": None}
        evaluating = self.phase is not None and phase_kind(self.phase) == "evaluating"
        current_done = int(progress.get("phase_done") or 0) if evaluating else 0
        current_seconds = time.monotonic() - self.phase_started if evaluating else 0.0
        n_eval = progress.get("eval_examples") or (config.eval_size if config else None) or 0
        planned = timing.planned_evaluations(config) if config else 0
        questions_left = max(0, planned * n_eval - self.eval_questions_done - current_done)
        measured = self.eval_questions_done + current_done
        if measured:
            per_question = (self.phase_seconds.get("evaluating", 0.0) + current_seconds) / measured
        elif estimate is not None and planned and n_eval:
            per_question = estimate.evaluation / (planned * n_eval)
        else:
            per_question = 0.0
        load_left = 0.0
        if not self.trained and estimate is not None:
            spent = sum(self.phase_seconds.get(kind, 0.0) for kind in ("converting", "loading"))
            if self.phase is not None and phase_kind(self.phase) in ("converting", "loading"):
                spent += time.monotonic() - self.phase_started
            load_left = max(0.0, estimate.load - spent)
        basis = "training and evaluation" if step else "estimate: loading, training and evaluation"
        return {"eta_seconds": round(train_left + questions_left * per_question + load_left, 1), "eta_basis": basis}

    def on_step(self, event: StepEvent) -> None:
        if self.phase is None or phase_kind(self.phase) != "training":  # back from an evaluation
            self._enter(training_phase(event.stage))
        self.pending.append({
            "stage": event.stage, "epoch": event.epoch, "step": event.step, "loss": event.loss,
            "learning_rate": event.learning_rate, "tokens_per_second": event.tokens_per_second,
            "elapsed_seconds": event.elapsed_seconds,
        })
        self.progress.update(stage=event.stage, epoch=event.epoch, step=event.step, total_steps=event.total_steps,
                             loss=event.loss, tokens_per_second=event.tokens_per_second,
                             elapsed_seconds=event.elapsed_seconds, phase=self.phase,
                             phase_done=event.step - self.stage_start_step, phase_total=self.stage_total)
        self.progress.update(self._eta())
        self._say("step %d/%d %s epoch %.2f loss %.4f lr %.2e %.0f tok/s", event.step, event.total_steps, event.stage,
                    event.epoch, event.loss, event.learning_rate, event.tokens_per_second)
        if len(self.pending) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def on_evaluate(self, event: EvalEvent) -> None:
        self.flush()
        queries.add_epoch_eval(self.engine, self.run_id, queries.eval_row(event.to_dict()))
        self._say("eval %s epoch %d: accuracy %.4f (%s) [%.4f, %.4f] n=%d", event.stage, event.epoch, event.accuracy,
                    event.scoring, event.low, event.high, event.n)
        if event.unparsed is not None:
            self._say("eval %s epoch %d: generation accuracy %.4f, %d unparsed", event.stage, event.epoch,
                      event.generation_accuracy, event.unparsed)

    def on_log(self, message: str) -> None:
        self._say(message)

    def on_resume(self, event: ResumeEvent) -> None:
        """Replace what the interrupted attempt recorded after the checkpoint, and note the resume."""
        self.flush()
        steps, evals = queries.delete_metrics_after(self.engine, self.run_id, event.from_step, event.cumulative_epoch)
        queries.record_resume(self.engine, self.run_id, {
            "from_step": event.from_step, "stage": event.stage, "from_epoch": event.epoch,
            "cumulative_epoch": event.cumulative_epoch, "saved_seconds": round(event.saved_seconds, 3),
            "replaced_steps": steps, "message": event.message,
        })
        self.progress.update(stage=event.stage, step=event.from_step, elapsed_seconds=event.saved_seconds)
        queries.update_progress(self.engine, self.run_id, self.progress)
        if steps or evals:
            self._say("run %d: replacing %d step metrics and %d evaluations recorded after step %d",
                        self.run_id, steps, evals, event.from_step)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self.last_cancel_check >= self.cancel_poll_seconds:
            self.last_cancel_check = now
            self.cancelled = queries.is_cancel_requested(self.engine, self.run_id)
        return self.cancelled

    def flush(self) -> None:
        if self.pending:
            queries.add_step_metrics(self.engine, self.run_id, self.pending)
            self.pending = []
        if self.phase is not None:  # the current phase counts up to now (the last one is never closed)
            seconds = dict(self.phase_seconds)
            kind = phase_kind(self.phase)
            seconds[kind] = seconds.get(kind, 0.0) + time.monotonic() - self.phase_started
            self.progress["phase_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        queries.update_progress(self.engine, self.run_id, self.progress)
        self.last_flush = time.monotonic()


def run_results(summary: dict[str, Any], run_dir: str | Path, eval_signature: str | None) -> dict[str, Any]:
    """storage's finish_run results from a heft_core RunResult summary (also run.json's "result")."""
    ci = summary.get("accuracy_ci") or [None, None]
    return {
        "accuracy": summary.get("accuracy"), "accuracy_low": ci[0], "accuracy_high": ci[1],
        "eval_n": summary.get("eval_n"), "train_seconds": summary.get("train_seconds"),
        "tokens_per_second": summary.get("tokens_per_second"), "trainable_params": summary.get("trainable_params"),
        "trainable_params_json": summary.get("trainable_params_by_stage"),
        "artifact_dir": str(run_dir), "eval_signature": eval_signature,
    }
