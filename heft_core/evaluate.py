"""Scoring: compare the two answer tokens' logits at the answer position (no generation)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from heft_core.adapters import AnswerModel
from heft_core.batching import collate, sorted_batches
from heft_core.prompt import EncodedExample
from heft_core.stats import AccuracyResult, accuracy_result


@dataclass
class Prediction:
    uid: str
    label: int  # gold: 1 yes, 0 no
    p_yes: float  # softmax over the two answer logits

    @property
    def predicted(self) -> int:
        return 1 if self.p_yes >= 0.5 else 0

    @property
    def correct(self) -> bool:
        return self.predicted == self.label

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "predicted": self.predicted, "correct": self.correct}


@torch.no_grad()
def predict(
    model: AnswerModel,
    examples: Sequence[EncodedExample],
    *,
    yes_id: int,
    no_id: int,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """P(yes) for each example, in the order given. ``autocast`` makes a fresh context per batch;
    ``on_batch(done, total)`` hears how many examples are scored after each batch."""
    model.eval()
    by_uid: dict[str, float] = {}
    done = 0
    for chunk in sorted_batches(examples, batch_size):
        batch = collate(chunk, pad_id).to(device)
        with autocast() if autocast else nullcontext():
            logits = model.answer_logits(batch)
        pair = torch.stack([logits[:, yes_id], logits[:, no_id]], dim=-1).float()
        for uid, p in zip(batch.uids, pair.softmax(-1)[:, 0].tolist()):
            by_uid[uid] = p
        done += len(chunk)
        if on_batch is not None:
            on_batch(done, len(examples))
    return [Prediction(e.uid, e.label, by_uid[e.uid]) for e in examples]


def accuracy_of(predictions: Sequence[Prediction]) -> AccuracyResult:
    return accuracy_result(sum(p.correct for p in predictions), len(predictions))
