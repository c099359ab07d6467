"""Evaluation speed: heft_core's scoring against greedy generation with a yes/no match."""
from __future__ import annotations

import re
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch

from bench.throughput.build import BenchOptions, load_base, model_shape, reft_settings
from bench.throughput.common import logger
from bench.throughput.peaks import synchronize

YES_NO_RE = re.compile(r"\b(yes|no)\b")


def generation_answer(text: str) -> int | None:
    """1 for yes, 0 for no, None if the generated text names neither (counted wrong)."""
    match = YES_NO_RE.search(text.lower())
    if match is None:
        return None
    return 1 if match.group(1) == "yes" else 0


class _ContextFactory:
    """Works both as a context manager and as a factory of fresh ones.

    ``heft_core.evaluate.predict`` takes ``autocast`` as a context manager in one version and as
    a zero-argument factory in another; this object satisfies both.
    """

    def __init__(self, make: Callable[[], Any]):
        self.make = make
        self._active: list[Any] = []

    def __call__(self) -> Any:
        return self.make()

    def __enter__(self) -> Any:
        context = self.make()
        self._active.append(context)
        return context.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._active.pop().__exit__(*exc)


def _generation_correct(texts: Sequence[str], chunk: Sequence[Any]) -> int:
    return sum(generation_answer(text) == example.label for text, example in zip(texts, chunk))


def _decode_new(tokenizer: Any, output: torch.Tensor, prompt_width: int, rows: int) -> list[str]:
    new_tokens = output[:, prompt_width:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True) if tokenizer is not None else [""] * rows


def _generation_args(tokenizer: Any, pad_id: int, max_new_tokens: int) -> dict[str, Any]:
    """pyreft's example evaluator for BoolQ (examples/loreft, task "commonsense", greedy)."""
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    return {
        "max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "eos_token_id": eos, "pad_token_id": pad_id,
        "use_cache": True, "temperature": None, "top_p": None, "top_k": None,
    }


def eval_sides(sides: dict[str, Callable[[Sequence[Any]], int]], examples: Sequence[Any], *, batch_size: int, device: torch.device, repeats: int, reference: str) -> dict[str, Any]:
    """Time each side on the same length-sorted batches, alternating batch by batch.

    The order rotates every batch, so a burst of load from other processes hits all sides
    alike. Ratios are per round: reference seconds ÷ side seconds (same questions).
    """
    from heft_core.batching import sorted_batches

    names = list(sides)
    batches = sorted_batches(examples, batch_size)
    for name, fn in sides.items():  # warmup on one batch
        logger.info("eval warmup: %s", name)
        fn(batches[0])
    seconds: dict[str, list[float]] = {name: [0.0] * repeats for name in sides}
    correct: dict[str, int] = {name: 0 for name in sides}
    for round_index in range(repeats):
        for index, chunk in enumerate(batches):
            shift = (index + round_index) % len(names)
            for name in names[shift:] + names[:shift]:
                synchronize(device)
                start = time.perf_counter()
                right = sides[name](chunk)
                synchronize(device)
                seconds[name][round_index] += time.perf_counter() - start
                if round_index == 0:
                    correct[name] += right
        logger.info("eval round %d: %s", round_index + 1, ", ".join(f"{name} {seconds[name][round_index]:.2f} s" for name in names))
    ratios = {name: [ref / own for own, ref in zip(seconds[name], seconds[reference])] for name in names if name != reference}
    return {"n": len(examples), "seconds": seconds, "accuracy": {name: correct[name] / len(examples) for name in names}, "ratios": ratios, "reference": reference}


def eval_pair(model: Any, tokenizer: Any, examples: Sequence[Any], *, yes_id: int, no_id: int, pad_id: int, batch_size: int, device: torch.device, repeats: int, max_new_tokens: int, autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Base model: heft_core ``predict`` vs greedy generation + string match."""
    from heft_core.adapters import PlainAnswerModel
    from heft_core.batching import collate
    from heft_core.evaluate import predict

    answer_model = PlainAnswerModel(model)
    context = autocast or nullcontext
    generation_args = _generation_args(tokenizer, pad_id, max_new_tokens)

    def ours(chunk: Sequence[Any]) -> int:
        factory = _ContextFactory(autocast) if autocast else None
        predictions = predict(answer_model, chunk, yes_id=yes_id, no_id=no_id, pad_id=pad_id, batch_size=batch_size, device=device, autocast=factory)
        return sum(p.correct for p in predictions)

    def generation(chunk: Sequence[Any]) -> int:
        model.eval()
        batch = collate(chunk, pad_id).to(device)
        with torch.no_grad(), context():
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **generation_args)
        return _generation_correct(_decode_new(tokenizer, out, batch.input_ids.shape[1], len(chunk)), chunk)

    result = eval_sides({"heft_core predict": ours, "generate + string match": generation}, examples, batch_size=batch_size, device=device, repeats=repeats, reference="generate + string match")
    return {**result, "title": "base model", "max_new_tokens": max_new_tokens}


def reft_eval_group(opts: BenchOptions, tokenizer: Any, examples: Sequence[Any], *, yes_id: int, no_id: int, pad_id: int, batch_size: int, device: torch.device, repeats: int, max_new_tokens: int) -> dict[str, Any]:
    """ReFT model: heft_core ``predict`` (first evaluation, and later epochs' evaluations with the
    prefix states kept) vs pyreft's evaluator (``IntervenableModel.generate`` with the
    interventions on the prompt, greedy, then string match), with the same intervention weights."""
    from heft_core.adapters import ReftAnswerModel
    from heft_core.batching import collate, intervention_positions
    from heft_core.evaluate import predict
    from heft_core.prefix_cache import PrefixStateCache

    base = load_base(opts, ours=True)
    layers, hidden = model_shape(base)
    settings = reft_settings(opts)
    torch.manual_seed(opts.seed)
    first_eval = ReftAnswerModel(base, settings, layers, hidden)
    state = first_eval.intervention_state()
    kept = ReftAnswerModel(base, settings, layers, hidden, state=state, prefix_cache=PrefixStateCache(2**40))
    predict(kept, examples, yes_id=yes_id, no_id=no_id, pad_id=pad_id, batch_size=batch_size, device=device)  # "epoch 1" keeps the prefixes
    generation_args = _generation_args(tokenizer, pad_id, max_new_tokens)

    def scorer(model: Any) -> Callable[[Sequence[Any]], int]:
        def score(chunk: Sequence[Any]) -> int:
            predictions = predict(model, chunk, yes_id=yes_id, no_id=no_id, pad_id=pad_id, batch_size=batch_size, device=device)
            return sum(p.correct for p in predictions)
        return score

    def generation(chunk: Sequence[Any]) -> int:
        batch = collate(chunk, pad_id).to(device)
        groups = intervention_positions(batch, first_eval.first, first_eval.last, settings.share_weights)
        locations = [groups[i // len(first_eval.layers)] for i in range(len(first_eval.interventions))]
        with torch.no_grad():
            _, out = first_eval.module.generate(
                {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                unit_locations={"sources->base": (None, locations)}, intervene_on_prompt=True, **generation_args,
            )
        return _generation_correct(_decode_new(tokenizer, out, batch.input_ids.shape[1], len(chunk)), chunk)

    sides = {
        "heft_core predict, first evaluation": scorer(first_eval),
        "heft_core predict, later epochs (prefix states kept)": scorer(kept),
        "pyreft generate + string match": generation,
    }
    result = eval_sides(sides, examples, batch_size=batch_size, device=device, repeats=repeats, reference="pyreft generate + string match")
    return {**result, "title": f"ReFT model (layers {opts.reft_layers}, positions {opts.reft_positions}, untrained interventions)", "max_new_tokens": max_new_tokens}
