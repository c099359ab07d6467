"""Recording a training run in the database: streamed steps and evaluations, and the final results.

Used by the training child (``app.child``) and by anything else that trains through heft_core
and wants the app to show the run (``bench/reproduce.py``). No Gradio, no torch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from heft_core.callbacks import EvalEvent, StepEvent, TrainerCallback
from storage import queries

logger = logging.getLogger(__name__)


class DatabaseCallback(TrainerCallback):
    """Writes steps in batches (every second or 20 steps), evaluations at once, and polls cancel."""

    def __init__(self, engine: Any, run_id: int, flush_seconds: float = 1.0, flush_rows: int = 20,
                 cancel_poll_seconds: float = 0.5):
        self.engine = engine
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.cancel_poll_seconds = cancel_poll_seconds
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.last_cancel_check = 0.0
        self.cancelled = False
        self.progress: dict[str, Any] = {}

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.progress = {
            "stage": None, "step": 0, "total_steps": info["total_steps"], "train_examples": info["train_examples"],
            "eval_examples": info["eval_examples"], "data_label": info["data_label"], "device": info["device"],
        }
        queries.update_progress(self.engine, self.run_id, self.progress)
        logger.info("run %d: %s", self.run_id, info)

    def on_step(self, event: StepEvent) -> None:
        self.pending.append({
            "stage": event.stage, "epoch": event.epoch, "step": event.step, "loss": event.loss,
            "learning_rate": event.learning_rate, "tokens_per_second": event.tokens_per_second,
            "elapsed_seconds": event.elapsed_seconds,
        })
        remaining = event.total_steps - event.step
        self.progress.update(stage=event.stage, epoch=event.epoch, step=event.step, total_steps=event.total_steps,
                             loss=event.loss, tokens_per_second=event.tokens_per_second,
                             elapsed_seconds=event.elapsed_seconds,
                             eta_seconds=event.elapsed_seconds / event.step * remaining if event.step else None)
        logger.info("step %d/%d %s epoch %.2f loss %.4f lr %.2e %.0f tok/s", event.step, event.total_steps, event.stage,
                    event.epoch, event.loss, event.learning_rate, event.tokens_per_second)
        if len(self.pending) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def on_evaluate(self, event: EvalEvent) -> None:
        self.flush()
        queries.add_epoch_eval(self.engine, self.run_id, {
            "stage": event.stage, "epoch": event.epoch, "cumulative_epoch": event.cumulative_epoch,
            "accuracy": event.accuracy, "accuracy_low": event.low, "accuracy_high": event.high, "n": event.n,
        })
        logger.info("eval %s epoch %d: accuracy %.4f [%.4f, %.4f] n=%d", event.stage, event.epoch, event.accuracy,
                    event.low, event.high, event.n)

    def on_log(self, message: str) -> None:
        logger.info(message)

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
