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
    accuracy: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainerCallback:
    """Override what you need; every hook is a no-op by default."""

    def on_train_begin(self, info: dict[str, Any]) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_evaluate(self, event: EvalEvent) -> None: ...

    def on_log(self, message: str) -> None: ...

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

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)
