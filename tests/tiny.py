"""A tiny random Llama and a word-level tokenizer, saved as a local model directory, and a run
config that trains it quickly.

Tests load it through the same ``load_model`` path that users' local directories take.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from heft_core.callbacks import TrainerCallback
from heft_core.config import LoraSettings, ReftSettings, RunConfig, StageSettings
from heft_core.prompt import PromptTemplate

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def words_of(texts: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text):
            seen.setdefault(word, None)
    return list(seen)


def make_tiny_model_dir(path: Path, texts: Iterable[str], layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = words_of(list(texts) + ["yes no Passage: Question: ? Answer (yes or no):"])
    vocab = {token: i for i, token in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern=Regex(r"\w+|[^\w\s]"), behavior="isolated"),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A random head at the default init gives logits of ~0.1: nothing could become
        # confident. Real models have logits of order 10; scale the head to match.
        model.lm_head.weight.mul_(10.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_config(model: str, method: str, **overrides) -> RunConfig:
    """A config for the tiny model and the easy set (conftest) that learns in a few dozen steps."""
    settings = dict(
        method=method, model=model, data="test:easy", train_size=None, eval_size=None, max_length=64, seed=7,
        lora=LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"]),
        reft=ReftSettings(rank=4, layers="all", positions="f2+l2", dropout=0.0),
        lora_stage=StageSettings(epochs=2, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0),
        reft_stage=StageSettings(epochs=2, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0),
        # The prompt ends on the deciding word, so a 4-layer random model can learn it quickly.
        template=PromptTemplate(after_question=""),
    )
    settings.update(overrides)
    return RunConfig(**settings)


class Recorder(TrainerCallback):
    """Collects a training run's log lines and resume events; raises ``KeyboardInterrupt`` at step
    ``crash_at`` (an in-process crash, as Ctrl-C would)."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at = crash_at
        self.resumes: list = []
        self.logs: list[str] = []

    def on_step(self, event) -> None:
        if event.step == self.crash_at:
            raise KeyboardInterrupt(f"crash at step {event.step}")

    def on_resume(self, event) -> None:
        self.resumes.append(event)

    def on_log(self, message: str) -> None:
        self.logs.append(message)
