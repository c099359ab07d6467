"""Scoring: the two answer tokens' logits at the answer position, and/or the paper's generation rule.

- ``logits``: P(yes) = softmax over the yes and no tokens' logits; predicted yes when P(yes) >= 0.5.
- ``generation``: greedy generation of at most N new tokens (the intervention on the prompt for ReFT);
  "yes" when the decoded text contains the yes word stripped (" Yes" -> "Yes", case-sensitive), else
  "no" when it contains the no word stripped, else unparsed, which counts as wrong
  (arXiv 2509.09801's appendix: "Yes" / "No" / "Unknown").
- ``both``: both on the same questions; the run's primary accuracy is then the logits'.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from heft_core.adapters import AnswerModel
from heft_core.batching import Batch, collate, sorted_batches
from heft_core.config import primary_scoring
from heft_core.prompt import EncodedExample
from heft_core.stats import AccuracyResult, accuracy_result


def parse_generated(text: str, yes: str, no: str) -> int | None:
    """The paper's rule: 1 if the yes word (stripped) is in ``text``, else 0 if the no word is, else None."""
    if yes.strip() in text:
        return 1
    if no.strip() in text:
        return 0
    return None


@dataclass
class Prediction:
    uid: str
    label: int  # gold: 1 yes, 0 no
    p_yes: float | None = None  # logits scoring: softmax over the two answer logits
    generated: str | None = None  # generation scoring: the decoded new tokens
    generation_predicted: int | None = None  # 1, 0, or None when the text names neither word
    scoring: str = "logits"  # which of the two ``predicted`` and ``correct`` are

    @property
    def has_logits(self) -> bool:
        return self.p_yes is not None

    @property
    def has_generation(self) -> bool:
        return self.generated is not None

    @property
    def logits_predicted(self) -> int | None:
        return None if self.p_yes is None else (1 if self.p_yes >= 0.5 else 0)

    @property
    def logits_correct(self) -> bool:
        return self.logits_predicted == self.label

    @property
    def generation_correct(self) -> bool:
        return self.generation_predicted == self.label  # unparsed is wrong

    @property
    def predicted(self) -> int | None:
        return self.generation_predicted if self.scoring == "generation" else self.logits_predicted

    @property
    def correct(self) -> bool:
        return self.generation_correct if self.scoring == "generation" else self.logits_correct

    def to_dict(self) -> dict[str, Any]:
        """A predictions.jsonl row: ``predicted``/``correct`` by the primary scoring, then each scoring's own."""
        row: dict[str, Any] = {"uid": self.uid, "label": self.label, "predicted": self.predicted,
                               "correct": self.correct, "scoring": self.scoring}
        if self.has_logits:
            row.update(p_yes=self.p_yes, logits_correct=self.logits_correct)
        if self.has_generation:
            row.update(generated=self.generated, generation_predicted=self.generation_predicted,
                       generation_correct=self.generation_correct)
        return row

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (``Prediction(**state)`` rebuilds it; older checkpoints hold the first three)."""
        return {"uid": self.uid, "label": self.label, "p_yes": self.p_yes, "generated": self.generated,
                "generation_predicted": self.generation_predicted, "scoring": self.scoring}


def _per_example(
    model: AnswerModel,
    examples: Sequence[EncodedExample],
    step: Callable[[Batch], list[Any]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager] | None,
    on_batch: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """uid -> ``step(batch)``'s value for each row, over length-sorted batches; the one batch loop
    that logit scoring and generation share (eval mode, autocast per batch, progress)."""
    model.eval()
    values: dict[str, Any] = {}
    done = 0
    for chunk in sorted_batches(examples, batch_size):
        batch = collate(chunk, pad_id).to(device)
        with autocast() if autocast else nullcontext():
            values.update(zip(batch.uids, step(batch)))
        done += len(chunk)
        if on_batch is not None:
            on_batch(done, len(examples))
    return values


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

    def p_yes(batch: Batch) -> list[float]:
        logits = model.answer_logits(batch)
        pair = torch.stack([logits[:, yes_id], logits[:, no_id]], dim=-1).float()
        return pair.softmax(-1)[:, 0].tolist()

    by_uid = _per_example(model, examples, p_yes, pad_id=pad_id, batch_size=batch_size, device=device,
                          autocast=autocast, on_batch=on_batch)
    return [Prediction(e.uid, e.label, by_uid[e.uid]) for e in examples]


@torch.no_grad()
def generate_texts(
    model: AnswerModel,
    examples: Sequence[EncodedExample],
    *,
    tokenizer: Any,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """uid -> the greedy continuation (at most ``max_new_tokens``, stopping at eos), decoded without
    special tokens. Batches are left-padded; generate() takes each row's positions from the mask."""

    def continuations(batch: Batch) -> list[str]:
        new_tokens = model.generate(
            batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        )
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    return _per_example(model, examples, continuations, pad_id=pad_id, batch_size=batch_size, device=device,
                        autocast=autocast, on_batch=on_batch)


def score(
    model: AnswerModel,
    examples: Sequence[EncodedExample],
    *,
    scoring: str,
    yes_id: int,
    no_id: int,
    yes_word: str,
    no_word: str,
    tokenizer: Any,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """Predictions by ``scoring`` ("logits", "generation" or "both"), in the order given. With "both",
    ``on_batch`` counts each question twice (``total`` is twice the questions)."""
    passes = 2 if scoring == "both" else 1
    total = passes * len(examples)

    def progress(offset: int) -> Callable[[int, int], None] | None:
        return None if on_batch is None else (lambda done, _n: on_batch(offset + done, total))

    common = dict(pad_id=pad_id, batch_size=batch_size, device=device, autocast=autocast)
    primary = primary_scoring(scoring)
    if scoring != "generation":
        predictions = predict(model, examples, yes_id=yes_id, no_id=no_id, on_batch=progress(0), **common)
    else:
        predictions = [Prediction(e.uid, e.label) for e in examples]
    for prediction in predictions:
        prediction.scoring = primary
    if scoring != "logits":
        texts = generate_texts(
            model, examples, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
            on_batch=progress(total - len(examples)), **common,
        )
        for prediction in predictions:
            prediction.generated = texts[prediction.uid]
            prediction.generation_predicted = parse_generated(prediction.generated, yes_word, no_word)
    return predictions


def accuracy_of(predictions: Sequence[Prediction]) -> AccuracyResult:
    """The primary scoring's accuracy."""
    return accuracy_result(sum(p.correct for p in predictions), len(predictions))


def accuracies_of(predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """{"logits": {accuracy, low, high, n}, "generation": {..., "unparsed": k}} for the scorings computed."""
    out: dict[str, dict[str, Any]] = {}
    if predictions and all(p.has_logits for p in predictions):
        acc = accuracy_result(sum(p.logits_correct for p in predictions), len(predictions))
        out["logits"] = {"accuracy": acc.accuracy, "low": acc.low, "high": acc.high, "n": acc.n}
    if predictions and all(p.has_generation for p in predictions):
        acc = accuracy_result(sum(p.generation_correct for p in predictions), len(predictions))
        unparsed = sum(p.generation_predicted is None for p in predictions)
        out["generation"] = {"accuracy": acc.accuracy, "low": acc.low, "high": acc.high, "n": acc.n,
                             "unparsed": unparsed}
    return out
