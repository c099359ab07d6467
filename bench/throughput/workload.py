"""Batches built once from real or synthetic rows: the same rows, in the same order, for every side."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bench.throughput.common import IGNORE_INDEX


def make_reference_batch(prompts: Sequence[Sequence[int]], answers: Sequence[int], pad_id: int, intervention_positions: Sequence[Sequence[int]] | None = None, num_interventions: int = 0) -> dict[str, torch.Tensor]:
    """The batch the reference recipes see: prompt + answer token, RIGHT-padded.

    Equivalent to ``transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest",
    label_pad_token_id=-100)`` over rows ``{"input_ids": prompt + [answer], "labels": [-100] *
    len(prompt) + [answer]}`` (right padding, as pyreft's examples set it), wrapped by
    ``pyreft.ReftDataCollator`` when ``intervention_positions`` is given: then
    ``intervention_locations`` has shape (batch, num_interventions, positions), as
    ``make_last_position_supervised_data_module`` builds it (its default: the last prompt token).
    tests/test_bench.py checks the equivalence against the real collators.
    """
    width = max(len(p) for p in prompts) + 1
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        n = len(prompt)
        ids[row, :n] = torch.tensor(list(prompt), dtype=torch.long)
        ids[row, n] = answer
        mask[row, : n + 1] = 1
        labels[row, n] = answer
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if intervention_positions is not None:
        batch["intervention_locations"] = torch.tensor([[list(pos)] * num_interventions for pos in intervention_positions], dtype=torch.long)
    return batch


def pyreft_positions(prompt_length: int, first: int, last: int) -> list[int]:
    """Intervention positions as pyreft computes them (``get_intervention_locations``, shared weights)."""
    import pyreft

    locations = pyreft.get_intervention_locations(
        last_position=prompt_length, first_n=first, last_n=last, num_interventions=1, share_weights=True, pad_mode="last",
    )
    return list(locations[0])


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class Workload:
    """Batches built once: the same rows, in the same order, for every side."""

    chunks: list[list[Any]]  # lists of EncodedExample (uid, input_ids, label)
    yes_id: int
    no_id: int
    pad_id: int
    label: str  # data description for the report

    def ours(self, device: torch.device) -> list[Any]:
        from heft_core.batching import collate

        return [collate(chunk, self.pad_id).to(device) for chunk in self.chunks]

    def answers(self, chunk: Sequence[Any]) -> list[int]:
        return [self.yes_id if e.label == 1 else self.no_id for e in chunk]

    def reference(self, device: torch.device, positions: str | None = None, num_interventions: int = 0) -> list[dict[str, torch.Tensor]]:
        from heft_core.config import parse_positions

        out = []
        for chunk in self.chunks:
            prompts = [e.input_ids for e in chunk]
            locs = None
            if positions is not None:
                first, last = parse_positions(positions)
                locs = [pyreft_positions(len(p), first, last) for p in prompts]
            out.append(batch_to(make_reference_batch(prompts, self.answers(chunk), self.pad_id, locs, num_interventions), device))
        return out

    @property
    def real_tokens(self) -> list[int]:
        return [sum(len(e.input_ids) for e in chunk) for chunk in self.chunks]


def encode_rows(examples: Sequence[Any], tokenizer: Any, passage_tokens: int, max_length: int | None) -> tuple[list[Any], int, int]:
    """Prompts with passages cut to ``passage_tokens`` tokens (question and cue kept whole).

    Returns (encoded examples, yes_id, no_id). ``max_length`` caps the whole prompt as well.
    """
    from heft_core.prompt import EncodedExample, PromptEncoder, PromptTemplate

    encoder = PromptEncoder(tokenizer, PromptTemplate(), max_length=32768)
    encoded = []
    for example in examples:
        full = encoder.encode(example.passage, example.question)
        passage_len = len(tokenizer(example.passage, add_special_tokens=False)["input_ids"])
        limit = len(full) - max(0, passage_len - passage_tokens)
        if max_length is not None:
            limit = min(limit, max_length)
        encoder.max_length = limit
        ids = encoder.encode(example.passage, example.question)
        encoder.max_length = 32768
        encoded.append(EncodedExample(example.uid, ids, 1 if example.answer else 0))
    return encoded, encoder.yes_id, encoder.no_id


def build_workload(data_source: str, tokenizer: Any, *, batch_size: int, num_batches: int, passage_tokens: int, max_length: int | None, seed: int, split: str = "train") -> Workload:
    """``num_batches`` length-grouped batches (heft_core's batching) of real or synthetic rows."""
    from heft_core.batching import length_grouped_batches
    from heft_core.data import load_data, subset

    splits = load_data(data_source)
    rows = splits.train if split == "train" else splits.validation
    rows = subset(rows, min(len(rows), batch_size * num_batches), seed)
    encoded, yes_id, no_id = encode_rows(rows, tokenizer, passage_tokens, max_length)
    chunks = [c for c in length_grouped_batches(encoded, batch_size, random.Random(seed)) if len(c) == batch_size]
    if not chunks:
        raise SystemExit(f"{data_source}: fewer than {batch_size} rows")
    while len(chunks) < num_batches:  # small data: cycle the same batches
        chunks = chunks + chunks
    return Workload(chunks[:num_batches], yes_id, no_id, tokenizer.pad_token_id, splits.label)
