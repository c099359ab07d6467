"""Batches: length-grouped, dynamically (left-)padded, with ReFT intervention positions.

Left padding puts every example's answer position at index -1, so the model computes
vocabulary logits for that one position only (``logits_to_keep=1``). The LoRA stage's sequence
loss (``lora_loss: sequence``) instead takes prompt + answer + eos right-padded, with token labels
(``collate_sequences``), as the paper's ``DataCollatorForLanguageModeling(mlm=False)`` builds them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from heft_core.prompt import EncodedExample


@dataclass
class Batch:
    uids: list[str]
    input_ids: torch.Tensor  # (B, T), left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # counted from each example's first real token
    labels: torch.Tensor  # (B,), 1 = yes, 0 = no
    lengths: list[int]  # real (unpadded) lengths

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            self.uids, self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.labels.to(device), self.lengths,
        )


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, width - n:] = torch.tensor(example.input_ids, dtype=torch.long)
        mask[row, width - n:] = 1
    # RoPE positions start at 0 on the first real token whatever the padding, so a
    # question gets the same logits alone or in any batch.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return Batch([e.uid for e in examples], ids, mask, positions, labels, [len(e.input_ids) for e in examples])


@dataclass
class SequenceBatch:
    """Whole texts for the causal-LM loss: prompt + answer word + eos, right-padded."""

    uids: list[str]
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (B, T): the input ids, -100 where the token is padding
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    def to(self, device: torch.device) -> "SequenceBatch":
        return SequenceBatch(
            self.uids, self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.lengths,
        )


def collate_sequences(
    examples: Sequence[EncodedExample], *, yes_id: int, no_id: int, eos_id: int, pad_id: int,
) -> SequenceBatch:
    """Prompt + answer token + eos per example, right-padded; labels -100 on padding and, like
    ``DataCollatorForLanguageModeling``, on every token equal to the pad token (with pad = eos, the
    paper's setting, that is the eos too). The prompt is not masked: the loss covers the whole text.
    Right padding keeps positions counted from each text's first token, as a direct model call does."""
    texts = [list(e.input_ids) + [yes_id if e.label else no_id, eos_id] for e in examples]
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = torch.tensor(text, dtype=torch.long)
        mask[row, : len(text)] = 1
    labels = ids.masked_fill((mask == 0) | (ids == pad_id), -100)
    return SequenceBatch([e.uid for e in examples], ids, mask, labels, [len(t) for t in texts])


def length_grouped_batches(
    examples: Sequence[EncodedExample], batch_size: int, rng: random.Random, mega_factor: int = 16,
) -> list[list[EncodedExample]]:
    """Shuffle, sort by length inside mega-batches, cut into batches, shuffle batch order.

    Keeps padding small while every epoch still sees a different, seed-determined order.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = batch_size * mega_factor
    batches: list[list[EncodedExample]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: len(examples[i].input_ids), reverse=True)
        batches.extend([examples[i] for i in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(examples: Sequence[EncodedExample], batch_size: int) -> list[list[EncodedExample]]:
    """Deterministic evaluation batches, sorted by length to waste little padding."""
    ordered = sorted(examples, key=lambda e: (len(e.input_ids), e.uid))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def intervention_positions(batch: Batch, first: int, last: int, share_weights: bool) -> list[list[list[int]]]:
    """Token positions per intervention group, per example, as pyvene expects them.

    Shared weights: one group with the first ``first`` and last ``last`` real prompt tokens.
    Unshared (and both f and l given): two groups, first positions then last positions.
    Short prompts repeat their last valid position so every row has the same count; a
    repeated position receives the same intervened value, so the result is unchanged.
    """
    width = batch.input_ids.shape[1]
    firsts, lasts = [], []
    for length in batch.lengths:
        pad = width - length
        firsts.append([pad + min(i, length - 1) for i in range(first)])
        lasts.append([pad + max(length - last + i, 0) for i in range(last)])
    if first and last and not share_weights:
        return [firsts, lasts]
    return [[head + tail for head, tail in zip(firsts, lasts)]]
