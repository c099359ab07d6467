"""Progress reported outward, in the style of transformers' ``TrainerCallback``.

The engine knows nothing about UIs or databases: it calls these hooks, and the CLI, the
worker and the tests decide what to do with the events.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass
class StepEvent:
    stage: str  # "lora" or "reft"
    epoch: float  # fractional epoch within the stage
    step: int  # optimizer step counted over the whole run
    total_steps: int  # optimizer steps the whole run will take
    loss: float
    learning_rate: float
    tokens_per_second: float
    elapsed_seconds: float  # training time so far (evaluations excluded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalEvent:
    stage: str  # "lora", "reft", or "base" for the zero-shot evaluation
    epoch: int  # epoch within the stage
    cumulative_epoch: int  # epochs counted over all stages
    accuracy: float  # by ``scoring``, as are low and high
    low: float
    high: float
    n: int
    # Added for the paper's recipe; the defaults read evaluations stored before them.
    scoring: str = "logits"  # "logits" or "generation": what accuracy, low and high are
    generation_accuracy: float | None = None  # when generation ran (also with logits primary: scoring both)
    generation_low: float | None = None
    generation_high: float | None = None
    unparsed: int | None = None  # generations that named neither answer word (counted wrong)
    yes_share: float | None = None  # share of "yes" predictions (None in evaluations recorded before it)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.generation_accuracy is None:  # the generation fields only when generation ran
            for key in ("generation_accuracy", "generation_low", "generation_high", "unparsed"):
                data.pop(key)
        return data


# Phases a run reports through ``on_phase(name, done, total)``, in order. The first word of a
# name says what kind of work it is; training and evaluation names add the stage (and epoch).
PREPARING = "preparing data"  # checks, data, tokenising: 0 of 1
CONVERTING = "converting the embedded model (once)"  # the GGUF -> safetensors cache: 0 of 1
LOADING = "loading the model"  # weights into memory: 0 of 1
SAVING = "saving the run"  # writing the run directory: 0 of 1


def training_phase(stage: str) -> str:
    """Phase name of a training stage; done/total count its optimizer steps."""
    return f"training {stage}"


def evaluating_phase(stage: str, epoch: int) -> str:
    """Phase name of an evaluation; done/total count questions scored."""
    return f"evaluating {stage} epoch {epoch}"


def phase_kind(name: str) -> str:
    """"evaluating lora epoch 1" -> "evaluating": what a phase's time is counted as."""
    return name.split(" ", 1)[0]


@dataclass
class ResumeEvent:
    """A run continues from a checkpoint (or, when none is usable, starts over from step 0)."""

    from_step: int  # steps kept; the run continues with step from_step + 1 (0: from the start)
    stage: str | None  # the stage the checkpoint was in ("lora" or "reft"); None when starting over
    epoch: float  # fractional epoch reached within that stage
    cumulative_epoch: int  # epochs finished over all stages; evaluations after it are redone
    saved_seconds: float  # training time the checkpoint kept (not repeated)
    message: str  # one line for the log: what was loaded, or why nothing was

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainerCallback:
    """Override what you need; every hook is a no-op by default."""

    def on_train_begin(self, info: dict[str, Any]) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_evaluate(self, event: EvalEvent) -> None: ...

    def on_log(self, message: str) -> None: ...

    def on_phase(self, name: str, done: int, total: int) -> None:
        """The run entered phase ``name`` or moved on in it: ``done`` of ``total`` (steps, questions; else 0 of 1)."""

    def on_resume(self, event: ResumeEvent) -> None:
        """Called once, before the first step, when ``train(resume=True)`` continues an earlier attempt.

        Steps after ``event.from_step`` and evaluations after ``event.cumulative_epoch`` that an earlier
        attempt reported will be reported again: replace them.
        """

    def should_stop(self) -> bool:
        """Polled once per optimizer step; True ends the run at that step boundary."""
        return False


class CallbackList(TrainerCallback):
    def __init__(self, callbacks: Sequence[TrainerCallback] | None):
        self.callbacks = list(callbacks or [])

    def on_train_begin(self, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(info)

    def on_step(self, event: StepEvent) -> None:
        for cb in self.callbacks:
            cb.on_step(event)

    def on_evaluate(self, event: EvalEvent) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(event)

    def on_log(self, message: str) -> None:
        for cb in self.callbacks:
            cb.on_log(message)

    def on_phase(self, name: str, done: int, total: int) -> None:
        for cb in self.callbacks:
            cb.on_phase(name, done, total)

    def on_resume(self, event: ResumeEvent) -> None:
        for cb in self.callbacks:
            cb.on_resume(event)

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)
