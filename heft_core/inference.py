"""Inference: answer BoolQ questions with the base model or trained runs.

``SideBySide`` serves the base model and any number of LoRA, ReFT and HEFT runs of the same
base model from one copy of the base weights: every LoRA adapter is loaded into one peft
wrapper and switched per call, and ReFT interventions are attached per call by pyvene.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from heft_core.adapters import AnswerModel, PlainAnswerModel, ReftAnswerModel
from heft_core.artifacts import RunArtifacts, load_run
from heft_core.data import Example
from heft_core.evaluate import Prediction, predict
from heft_core.models import is_embedded, load_model, load_tokenizer, model_info
from heft_core.prompt import PromptEncoder, PromptTemplate
from heft_core.train import EVAL_SUBSET_SEED, resolve_precision

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass
class Answer:
    answer: str  # "yes" or "no"
    p_yes: float
    latency_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "p_yes": round(self.p_yes, 4), "latency_seconds": round(self.latency_seconds, 4)}


def same_model(a: str, b: str) -> bool:
    return a.strip() == b.strip() or (is_embedded(a) and is_embedded(b))


def _reft_state(artifacts: RunArtifacts) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(artifacts.path / "reft.safetensors"))


def answer_model_for_run(artifacts: RunArtifacts, model: torch.nn.Module) -> AnswerModel:
    """Rebuild a run's model exactly as it was at the end of training (wraps ``model``)."""
    from peft import PeftModel

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

    def __init__(self, model_ref: str, *, template: PromptTemplate | None = None, max_length: int = 512, precision: str = "auto", device: str | None = None):
        self.model_ref = model_ref
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision
        _, dtype = resolve_precision(precision)
        self.info = model_info(model_ref)
        self.tokenizer = load_tokenizer(model_ref)
        self.model = load_model(model_ref, dtype=dtype, device=self.device)
        self.peft: Any = None
        self._lock = threading.Lock()  # one forward at a time: adapters are switched per call
        self.variants: dict[str, _Variant] = {
            BASE: _Variant(PlainAnswerModel(self.model), PromptEncoder(self.tokenizer, template or PromptTemplate(), max_length), None)
        }

    def add_run(self, name: str, run_dir: str | Path) -> None:
        """Load a finished run as variant ``name``; it must share this base model."""
        from peft import PeftModel

        artifacts = load_run(run_dir)
        config = artifacts.config
        if config.method == "base":
            raise ValueError(f"run {name!r} is a zero-shot baseline; it has no adapter to serve")
        if not same_model(config.model, self.model_ref):
            raise ValueError(f"run {name!r} was trained on {config.model!r}, not on {self.model_ref!r}; side-by-side answers need one base model")
        adapter = None
        if config.uses_lora:
            adapter = f"run_{name}"
            lora_dir = str(artifacts.path / "lora")
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, lora_dir, adapter_name=adapter)
            else:
                self.peft.load_adapter(lora_dir, adapter_name=adapter)
            self.peft.eval()
        # Every variant calls the raw model; LoRA layers injected into it are switched per call.
        if config.uses_reft:
            answer_model: AnswerModel = ReftAnswerModel(self.model, config.reft, self.info.num_layers, self.info.hidden_size, state=_reft_state(artifacts))
        else:
            answer_model = PlainAnswerModel(self.model)
        self.variants[name] = _Variant(answer_model, PromptEncoder(self.tokenizer, config.template, config.max_length), adapter)

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
        return {name: self.answer(name, passage, question) for name in (names or list(self.variants))}

    def predict(self, name: str, examples: Sequence[Any], batch_size: int = 16) -> list[Prediction]:
        variant = self.variants[name]
        with self._lock, self._adapter_context(variant.adapter):
            return predict(
                variant.answer_model, variant.encoder.encode_examples(examples), yes_id=variant.encoder.yes_id,
                no_id=variant.encoder.no_id, pad_id=self.tokenizer.pad_token_id, batch_size=batch_size,
                device=self.device, autocast=lambda: _autocast(self.device, self.precision),
            )


def evaluate_run(run_dir: str | Path, data_source: str | None = None, eval_size: int | None = None, batch_size: int = 16, precision: str = "auto") -> tuple[Any, list[Prediction], str]:
    """Evaluate a finished run (or, with its own data, reproduce its predictions)."""
    from heft_core import data as data_lib
    from heft_core.evaluate import accuracy_of

    artifacts = load_run(run_dir)
    config = artifacts.config
    source = data_source or config.data
    data = data_lib.load_data(source)
    examples = data_lib.subset(data.validation, eval_size if eval_size is not None else config.eval_size, EVAL_SUBSET_SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(precision)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=dtype, device=device)
    answer_model = answer_model_for_run(artifacts, model) if config.method != "base" else PlainAnswerModel(model)
    encoder = PromptEncoder(tokenizer, config.template, config.max_length)
    predictions = predict(answer_model, encoder.encode_examples(examples), yes_id=encoder.yes_id, no_id=encoder.no_id, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device, autocast=lambda: _autocast(device, precision))
    return accuracy_of(predictions), predictions, data_lib.eval_signature(examples)

