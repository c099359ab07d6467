"""How long a run will take: from this machine's measured speed, saying what each figure assumes.

The Train tab's estimate and a running run's ETA (``app.recording``) both come from here. A
run's speed is measured by the last finished run of the same model and method: its training
tokens/s, and, where its progress snapshot holds them, the seconds its evaluations took per
question and the seconds its model took to load. Without such a run, the documented defaults
below are used and the estimate says so ("assumes 120 tokens/s: no finished run of this model yet").

No Gradio, no torch: ``storage`` rows in, numbers and short sentences out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from heft_common.errors import HeftError
from heft_common.vocabulary import METHOD_TITLES, RunStatus
from heft_core.config import RunConfig

logger = logging.getLogger(__name__)

# The defaults an estimate falls back on, each named in the estimate when it is used.
DEFAULT_TOKENS_PER_SECOND = 120.0  # the embedded model, forward + backward, on 2 CPU cores
EVAL_SPEEDUP = 3.0  # scoring is a forward pass only: about 3x the tokens/s of a training step (forward + backward)
DEFAULT_LOAD_SECONDS = 15.0  # reading the embedded model's weights from its safetensors cache
CONVERSION_SECONDS = 110.0  # the embedded model's one-time GGUF conversion, measured on 2 CPU cores
RUNS_SCANNED = 200  # finished runs looked at for a model's speeds, newest first


@dataclass(frozen=True)
class Speed:
    """What one finished run measured (or, with ``run_id`` None, what is assumed)."""

    tokens_per_second: float
    eval_seconds_per_question: float | None = None
    load_seconds: float | None = None
    tokens_per_question: float | None = None  # real (unpadded) training tokens per question
    run_id: int | None = None


@dataclass(frozen=True)
class Estimate:
    """Seconds to load the model, train and evaluate, and the sentence that says what it rests on."""

    load: float
    train: float
    evaluation: float
    basis: str

    @property
    def total(self) -> float:
        return self.load + self.train + self.evaluation


def model_key(model_ref: str) -> str:
    """One spelling per model, so "embedded" and the embedded model's other names match."""
    from heft_core.models import is_embedded  # no torch at import

    return "embedded" if is_embedded(model_ref or "") else (model_ref or "").strip()


def planned_evaluations(config: RunConfig) -> int:
    """Evaluations a run makes: after every epoch, or after each stage's last epoch; a base run makes one."""
    if config.method == "base":
        return 1
    if config.eval_every_epoch:
        return config.total_epochs
    return len(config.stages())


def speed_of(run: Any) -> Speed | None:
    """The speed a finished run measured, or None when it recorded no training speed."""
    if not run.tokens_per_second:
        return None
    progress = run.progress or {}
    phase_seconds = progress.get("phase_seconds") or {}
    questions = progress.get("eval_questions_done") or 0
    evaluating = phase_seconds.get("evaluating")
    per_question = evaluating / questions if evaluating and questions else None
    tokens_per_question = None
    try:
        epochs = RunConfig.from_dict(run.config or {}).total_epochs
    except (HeftError, TypeError):  # a config written by another version: no token count then
        epochs = 0
    examples = progress.get("train_examples") or 0
    if run.train_seconds and examples and epochs:
        tokens_per_question = run.tokens_per_second * run.train_seconds / (examples * epochs)
    return Speed(float(run.tokens_per_second), per_question, phase_seconds.get("loading"), tokens_per_question, run.id)


def measured_speeds(engine: Any, model_ref: str) -> dict[str, Speed]:
    """{method: Speed} from the newest completed run of each method on ``model_ref``."""
    from storage import queries

    wanted = model_key(model_ref)
    speeds: dict[str, Speed] = {}
    for run in queries.list_runs(engine, status=RunStatus.COMPLETED, limit=RUNS_SCANNED):
        if run.method in speeds or model_key(run.base_model) != wanted:
            continue
        speed = speed_of(run)
        if speed is not None:
            speeds[run.method] = speed
    return speeds


def _needs_conversion(model_ref: str) -> bool:
    from heft_core.models import needs_conversion  # no torch at import

    return needs_conversion(model_ref)


def estimate_seconds(config: RunConfig, n_train: int, n_eval: int, speed: Speed | None,
                     convert: bool | None = None, any_measured: bool = False) -> Estimate:
    """Loading, training and evaluation seconds of ``config`` on ``n_train``/``n_eval`` questions.

    ``convert`` (default: whether the embedded model's cache is missing) adds its one-time
    conversion; ``any_measured`` says whether the model has finished runs of other methods,
    only for the wording of the assumption.
    """
    tokens_per_second = speed.tokens_per_second if speed else DEFAULT_TOKENS_PER_SECOND
    per_question_tokens = float(config.max_length)
    if speed and speed.tokens_per_question:
        per_question_tokens = min(per_question_tokens, speed.tokens_per_question)
    epochs = config.total_epochs if config.method != "base" else 0
    train = n_train * epochs * per_question_tokens / tokens_per_second
    per_question_eval = per_question_tokens / (tokens_per_second * EVAL_SPEEDUP)
    if speed and speed.eval_seconds_per_question:
        per_question_eval = speed.eval_seconds_per_question
    evaluation = planned_evaluations(config) * n_eval * per_question_eval
    load = speed.load_seconds if speed and speed.load_seconds else DEFAULT_LOAD_SECONDS
    if convert if convert is not None else _needs_conversion(config.model):
        load += CONVERSION_SECONDS
    return Estimate(load, train, evaluation, _basis(config, speed, any_measured))


def _basis(config: RunConfig, speed: Speed | None, any_measured: bool) -> str:
    if speed is None or speed.run_id is None:
        title = METHOD_TITLES.get(config.method, config.method)
        whose = f"no finished {title} run" if any_measured else "no finished run"
        return (f"assumes {DEFAULT_TOKENS_PER_SECOND:.0f} tokens/s: {whose} of this model yet; evaluation at "
                f"{EVAL_SPEEDUP:.0f}× that speed (forward only) and ~{DEFAULT_LOAD_SECONDS:.0f} s to load the model")
    parts = [f"based on run #{speed.run_id}'s {speed.tokens_per_second:.0f} tokens/s"]
    if speed.eval_seconds_per_question:
        parts.append(f"{speed.eval_seconds_per_question:.2f} s per evaluated question")
    else:
        parts.append(f"evaluation assumed at {EVAL_SPEEDUP:.0f}× that speed (forward only)")
    if speed.load_seconds:
        parts.append(f"{speed.load_seconds:.0f} s to load the model")
    else:
        parts.append(f"~{DEFAULT_LOAD_SECONDS:.0f} s assumed to load the model")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def speed_for(speeds: Mapping[str, Speed] | None, method: str) -> Speed | None:
    return (speeds or {}).get(method)
