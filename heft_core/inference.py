"""Inference: answer BoolQ questions with the base model or trained runs.

``SideBySide`` serves the base model and any number of LoRA, ReFT and HEFT runs of the same
base model from one copy of the base weights: every LoRA adapter is loaded into one peft
wrapper (once, however many runs carry the same adapter) and switched per call, and ReFT
interventions are attached per call by pyvene.

One question answered by several variants shares prompt passes (``SideBySide.answers``):
variants on the same host (no LoRA, or one LoRA adapter) read the same prompt's keys and
values. The base model and a ReFT run with positions ``lN`` share the frozen base's states up
to the first intervened token; a LoRA run and a HEFT run whose stage 1 is that LoRA adapter
(a comparison batch) share the LoRA model's. So two prompt passes and two short tails serve
four answers, equal to one pass per variant up to float summation order (tested).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from heft_common.errors import AskError
from heft_core import data as data_lib
from heft_core.adapters import AnswerModel, PlainAnswerModel, ReftAnswerModel
from heft_core.artifacts import RunArtifacts, load_run
from heft_core.batching import Batch, collate
from heft_core.data import EVAL_SUBSET_SEED, Example
from heft_core.evaluate import Prediction, accuracy_of, predict, score
from heft_core.hardware import resolve_precision
from heft_core.models import is_embedded, load_model, load_tokenizer, model_info
from heft_core.prompt import EncodedExample, PromptEncoder, PromptTemplate
from heft_core.stats import AccuracyResult

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass
class Answer:
    answer: str  # "yes" or "no"
    p_yes: float
    latency_seconds: float  # from the start of the question until this answer was ready

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "p_yes": round(self.p_yes, 4), "latency_seconds": round(self.latency_seconds, 4)}


def same_model(a: str, b: str) -> bool:
    return a.strip() == b.strip() or (is_embedded(a) and is_embedded(b))


def _reft_state(artifacts: RunArtifacts) -> dict[str, torch.Tensor]:
    return load_file(str(artifacts.path / "reft.safetensors"))


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_fingerprint(lora_dir: str | Path) -> str:
    """A digest of a saved peft adapter's config and weights: equal digests, one adapter to load."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(lora_dir) / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def answer_model_for_run(artifacts: RunArtifacts, model: torch.nn.Module) -> AnswerModel:
    """Rebuild a run's model exactly as it was at the end of training (wraps ``model``)."""
    from peft import PeftModel  # heavy: deferred (a base or ReFT-only run never needs peft)

    config = artifacts.config
    info = artifacts.meta["model_info"]
    host: torch.nn.Module = model
    if config.uses_lora:
        host = PeftModel.from_pretrained(model, str(artifacts.path / "lora"))
        host.eval()
        if config.uses_reft and config.heft_stage2_mode == "merged":
            host.merge_adapter()
    if config.uses_reft:
        return ReftAnswerModel(host, config.reft, info["num_layers"], info["hidden_size"], state=_reft_state(artifacts))
    return PlainAnswerModel(host)


def _autocast(device: torch.device, precision: str):
    mode, _ = resolve_precision(precision)
    if mode == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


class _Variant:
    def __init__(self, answer_model: AnswerModel, encoder: PromptEncoder, adapter: str | None):
        self.answer_model = answer_model
        self.encoder = encoder
        self.adapter = adapter  # peft adapter name, or None for "no LoRA"


class SideBySide:
    """Base model plus trained runs, one copy of the base weights."""

    def __init__(
        self, model_ref: str, *, template: PromptTemplate | None = None, max_length: int = 512,
        precision: str = "auto", device: str | None = None,
    ):
        self.model_ref = model_ref
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision
        _, dtype = resolve_precision(precision)
        self.info = model_info(model_ref)
        self.tokenizer = load_tokenizer(model_ref)
        self.model = load_model(model_ref, dtype=dtype, device=self.device)
        self.peft: Any = None
        self._adapters: dict[str, str] = {}  # adapter fingerprint -> peft adapter name
        self._lock = threading.Lock()  # one forward at a time: adapters are switched per call
        base_encoder = PromptEncoder(self.tokenizer, template or PromptTemplate(), max_length)
        self.variants: dict[str, _Variant] = {BASE: _Variant(PlainAnswerModel(self.model), base_encoder, None)}

    def add_run(self, name: str, run_dir: str | Path) -> None:
        """Load a finished run as variant ``name``; it must share this base model."""
        from peft import PeftModel  # heavy: deferred

        artifacts = load_run(run_dir)
        config = artifacts.config
        if config.method == "base":
            raise AskError(f"run {name!r} is a zero-shot baseline; it has no adapter to serve")
        if not same_model(config.model, self.model_ref):
            raise AskError(
                f"run {name!r} was trained on {config.model!r}, not on {self.model_ref!r}; "
                "side-by-side answers need one base model"
            )
        adapter = None
        if config.uses_lora:
            lora_dir = str(artifacts.path / "lora")
            fingerprint = adapter_fingerprint(lora_dir)
            adapter = self._adapters.get(fingerprint)
            if adapter is None:  # a HEFT run of a comparison batch carries the LoRA run's adapter: load it once
                adapter = f"run_{name}"
                with self._lock:
                    if self.peft is None:
                        self.peft = PeftModel.from_pretrained(self.model, lora_dir, adapter_name=adapter)
                    else:
                        self.peft.load_adapter(lora_dir, adapter_name=adapter)
                    self.peft.eval()
                self._adapters[fingerprint] = adapter
        # Every variant calls the raw model; LoRA layers injected into it are switched per call.
        if config.uses_reft:
            answer_model: AnswerModel = ReftAnswerModel(
                self.model, config.reft, self.info.num_layers, self.info.hidden_size, state=_reft_state(artifacts)
            )
        else:
            answer_model = PlainAnswerModel(self.model)
        encoder = PromptEncoder(self.tokenizer, config.template, config.max_length)
        self.variants[name] = _Variant(answer_model, encoder, adapter)

    def _adapter_context(self, adapter: str | None):
        if self.peft is None:
            return nullcontext()
        if adapter is None:
            return self.peft.disable_adapter()
        self.peft.set_adapter(adapter)
        return nullcontext()

    def answer(self, name: str, passage: str, question: str) -> Answer:
        """One question, scored exactly as evaluation scores it (``predict``)."""
        start = time.perf_counter()
        [prediction] = self.predict(name, [Example("ask", question, passage, False)], batch_size=1)
        return Answer("yes" if prediction.predicted else "no", prediction.p_yes, time.perf_counter() - start)

    def answer_all(self, passage: str, question: str, names: Sequence[str] | None = None) -> dict[str, Answer]:
        return dict(self.answers(passage, question, names))

    def answers(
        self, passage: str, question: str, names: Sequence[str] | None = None, *, share_prefix: bool = True,
    ) -> Iterator[tuple[str, Answer]]:
        """(name, answer) of each variant as soon as it is answered.

        ``share_prefix`` (default) runs one prompt pass per group of :meth:`sharing_groups`; off,
        every variant runs its own pass (``answer``), which gives the same answers more slowly.
        """
        start = time.perf_counter()
        wanted = list(names or self.variants)
        if not share_prefix:
            for name in wanted:
                yield name, self._answer(self._alone(name, passage, question), start)
            return
        for adapter, ids, members in self._plan(passage, question, wanted):
            if members[0][1] < 0:  # no prefix to share: the variant's own pass
                yield members[0][0], self._answer(self._alone(members[0][0], passage, question), start)
                continue
            for name, p_yes in self._answer_group(adapter, ids, members):
                yield name, self._answer(p_yes, start)

    def sharing_groups(self, passage: str, question: str, names: Sequence[str] | None = None) -> list[list[str]]:
        """The variants each prompt pass serves, in the order :meth:`answers` answers them.

        Variants share a pass when they run on the same host (no LoRA, or one LoRA adapter) over
        the same prompt tokens, and each either reads the host's own logits (base, LoRA) or
        intervenes only after a prefix (ReFT positions ``lN``). A ReFT run with first positions
        (``fN``) intervenes from the first tokens on: it gets a pass of its own.
        """
        return [[name for name, _ in members] for _, _, members in self._plan(passage, question, names)]

    def _plan(
        self, passage: str, question: str, names: Sequence[str] | None,
    ) -> list[tuple[str | None, list[int], list[tuple[str, int]]]]:
        """[(adapter, prompt ids, [(name, prefix end)])]: 0 reads the host's logits, -1 runs alone."""
        groups: dict[tuple[str | None, tuple[int, ...]], list[tuple[str, int]]] = {}
        alone: list[tuple[str | None, list[int], list[tuple[str, int]]]] = []
        for name in names or list(self.variants):
            variant = self.variants[name]
            ids = variant.encoder.encode(passage, question)
            cut = 0
            if isinstance(variant.answer_model, ReftAnswerModel):
                cut = variant.answer_model.prefix_end(self._batch(ids))
                if not cut:
                    alone.append((variant.adapter, ids, [(name, -1)]))
                    continue
            groups.setdefault((variant.adapter, tuple(ids)), []).append((name, cut))
        # In a group, the variants that read the host's logits come first (stable order otherwise).
        shared = [(adapter, list(ids), sorted(members, key=lambda member: member[1] != 0))
                  for (adapter, ids), members in groups.items()]
        return shared + alone

    def _batch(self, ids: list[int]) -> Batch:
        return collate([EncodedExample("ask", list(ids), 0)], self.tokenizer.pad_token_id).to(self.device)

    def _host_pass(self, batch: Batch, adapter: str | None, start: int, end: int, states: list | None) -> tuple:
        """The host (no LoRA, or ``adapter``) over columns ``[start:end]`` after ``states`` of ``[:start]``:
        (answer-position logits, the keys and values of ``[:end]``)."""
        from transformers import DynamicCache  # heavy: deferred

        # inference_mode, not no_grad: no version counters or view tracking on the prompt's tensors
        with self._lock, self._adapter_context(adapter), torch.inference_mode(), \
                _autocast(self.device, self.precision):
            output = self.model(
                input_ids=batch.input_ids[:, start:end], attention_mask=batch.attention_mask[:, :end],
                position_ids=batch.position_ids[:, start:end], use_cache=True, logits_to_keep=1,
                cache=DynamicCache(ddp_cache_data=states) if states else None,
            )
        return output.logits[:, -1, :], [(layer.keys, layer.values) for layer in output.cache.layers]

    def _answer_group(
        self, adapter: str | None, ids: list[int], members: list[tuple[str, int]],
    ) -> Iterator[tuple[str, float]]:
        """P(yes) of each member of one sharing group: one prompt pass, then a short tail per ReFT run.

        With a member that reads the host's logits, the pass covers the whole prompt and each ReFT
        run continues from its first columns (keys and values of earlier columns do not depend on
        later ones); otherwise the pass stops where the first intervention starts.
        """
        from transformers import DynamicCache  # heavy: deferred

        batch = self._batch(ids)
        cuts = sorted({cut for _, cut in members if cut > 0})
        reads_host = any(cut == 0 for _, cut in members)
        end = len(ids) if reads_host else cuts[0]
        host_logits, states = self._host_pass(batch, adapter, 0, end, None)
        for name, cut in members:
            variant = self.variants[name]
            if cut == 0:  # base or LoRA: the host's own logits at the answer position
                logits = host_logits
            else:
                if cut <= end:
                    prefix = [(keys[:, :, :cut], values[:, :, :cut]) for keys, values in states]
                else:  # a later cut than the pass reached: extend it (pass ended at the first cut)
                    _, prefix = self._host_pass(batch, adapter, end, cut, states)
                with self._lock, self._adapter_context(adapter), torch.inference_mode(), \
                        _autocast(self.device, self.precision):
                    logits = variant.answer_model.logits_after_prefix(batch, DynamicCache(ddp_cache_data=prefix), cut)
            pair = torch.stack([logits[:, variant.encoder.yes_id], logits[:, variant.encoder.no_id]], dim=-1).float()
            yield name, float(pair.softmax(-1)[0, 0])

    def _alone(self, name: str, passage: str, question: str) -> float:
        [prediction] = self.predict(name, [Example("ask", question, passage, False)], batch_size=1)
        return prediction.p_yes

    @staticmethod
    def _answer(p_yes: float, start: float) -> Answer:
        return Answer("yes" if p_yes >= 0.5 else "no", p_yes, time.perf_counter() - start)

    def predict(self, name: str, examples: Sequence[Any], batch_size: int = 16) -> list[Prediction]:
        variant = self.variants[name]
        with self._lock, self._adapter_context(variant.adapter):
            return predict(
                variant.answer_model, variant.encoder.encode_examples(examples), yes_id=variant.encoder.yes_id,
                no_id=variant.encoder.no_id, pad_id=self.tokenizer.pad_token_id, batch_size=batch_size,
                device=self.device, autocast=lambda: _autocast(self.device, self.precision),
            )


def evaluate_run(
    run_dir: str | Path, data_source: str | None = None, eval_size: int | None = None, batch_size: int = 16,
    precision: str = "auto",
) -> tuple[AccuracyResult, list[Prediction], str]:
    """Evaluate a finished run (or, with its own data, reproduce its predictions)."""
    artifacts = load_run(run_dir)
    config = artifacts.config
    source = data_source or config.data
    data = data_lib.load_data(source)
    size = eval_size if eval_size is not None else config.eval_size
    examples = data_lib.subset(data.validation, size, EVAL_SUBSET_SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(precision)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=dtype, device=device)
    answer_model = answer_model_for_run(artifacts, model) if config.method != "base" else PlainAnswerModel(model)
    encoder = PromptEncoder(tokenizer, config.template, config.max_length)
    predictions = score(  # by the run's own scoring ("both": the primary accuracy is the logits')
        answer_model, encoder.encode_examples(examples), scoring=config.scoring, yes_id=encoder.yes_id,
        no_id=encoder.no_id, yes_word=config.template.yes, no_word=config.template.no, tokenizer=tokenizer,
        max_new_tokens=config.generation_max_new_tokens, pad_id=tokenizer.pad_token_id, batch_size=batch_size,
        device=device, autocast=lambda: _autocast(device, precision),
    )
    return accuracy_of(predictions), predictions, data_lib.eval_signature(examples)

