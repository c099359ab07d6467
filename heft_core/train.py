"""Training: LoRA, ReFT, and HEFT (LoRA for E1 epochs, then ReFT on the frozen result for E2).

Read top to bottom: ``prepare`` checks everything and tokenises the data before any weights
load; ``train`` loads the model, runs each stage with ``_Trainer.run_stage`` (one plain loop),
evaluates after every epoch, and writes the run directory atomically at the end.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
import torch.nn.functional as F

from heft_core import data as data_lib
from heft_core.adapters import AnswerModel, PlainAnswerModel, ReftAnswerModel, build_lora_model, count_parameters
from heft_core.batching import collate, length_grouped_batches
from heft_core.callbacks import CallbackList, EvalEvent, StepEvent, TrainerCallback
from heft_core.config import ConfigError, RunConfig, StageSettings
from heft_core.evaluate import Prediction, accuracy_of, predict
from heft_core.models import ModelInfo, load_model, load_tokenizer, model_info
from heft_core.prefix_cache import PrefixStateCache, resolve_budget
from heft_core.prompt import EncodedExample, PromptEncoder
from heft_core.stats import AccuracyResult

logger = logging.getLogger(__name__)

EVAL_SUBSET_SEED = 0


@dataclass
class Prepared:
    """Everything a run needs except model weights: checked config, data, tokens."""

    config: RunConfig
    info: ModelInfo
    data: data_lib.DatasetSplits
    tokenizer: Any
    encoder: PromptEncoder
    train_encoded: list[EncodedExample]
    eval_encoded: list[EncodedExample]
    eval_signature: str


def prepare(config: RunConfig, data: data_lib.DatasetSplits | None = None) -> Prepared:
    """Validate ``config`` against the model's shape and the data; tokenise. Loads no weights."""
    info = model_info(config.model)
    config.validate_for_model(info.num_layers, set(info.linear_modules))
    if data is None:
        data = data_lib.load_data(config.data)
    train_examples = data_lib.subset(data.train, config.train_size, config.seed) if config.method != "base" else []
    # The eval subset ignores the run's seed so that runs of any seed are paired on the same questions.
    eval_examples = data_lib.subset(data.validation, config.eval_size, EVAL_SUBSET_SEED)
    if config.method != "base":
        if not train_examples:
            raise ConfigError("data", f"{data.label} has no training rows")
        answers = {e.answer for e in train_examples}
        if len(answers) < 2:
            raise ConfigError("data", f"the training subset of {data.label} has only {'yes' if True in answers else 'no'} answers; it needs both")
    if not eval_examples:
        raise ConfigError("data", f"{data.label} has no validation rows")
    tokenizer = load_tokenizer(config.model)
    encoder = PromptEncoder(tokenizer, config.template, config.max_length)
    return Prepared(
        config, info, data, tokenizer, encoder,
        encoder.encode_examples(train_examples), encoder.encode_examples(eval_examples),
        data_lib.eval_signature(eval_examples),
    )


@dataclass
class RunResult:
    run_dir: str
    status: str  # "completed" or "cancelled"
    accuracy: AccuracyResult | None
    predictions: list[Prediction]
    train_seconds: float
    tokens_per_second: float
    trainable_params: dict[str, int]
    steps: list[StepEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    lora_unchanged_by_stage2: bool | None = None

    def summary(self) -> dict[str, Any]:
        """The one-line JSON the CLI prints."""
        acc = self.accuracy
        return {
            "status": self.status,
            "accuracy": acc.accuracy if acc else None,
            "accuracy_ci": [acc.low, acc.high] if acc else None,
            "eval_n": acc.n if acc else 0,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "trainable_params": sum(self.trainable_params.values()),
            "trainable_params_by_stage": self.trainable_params,
            "run_dir": self.run_dir,
        }


def resolve_precision(precision: str) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision mode and the dtype to hold base weights in.

    "auto" is bf16 on GPUs that have it and fp32 on CPUs: bf16 autocast is faster on CPUs
    with AMX (see bench/results) but its losses drift from fp32's, so it is opt-in there.
    On GPUs the base weights are held in the half dtype (memory); on CPUs they stay fp32 and
    autocast runs the matrix products in bf16, because bf16 elementwise work (norms, residual
    adds, rotary) is slower than fp32 on CPUs: fp32 weights + autocast trained 1.17x faster than
    bf16 weights + autocast on this project's 2-core AMX machine (bench/README.md).
    """
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    dtype = torch.float32
    if torch.cuda.is_available():
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return precision, dtype


def _accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run. accelerate keeps its state per process; a single-process
    caller (tests, the CLI, benchmarks) may train runs of different precisions one after another."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision")) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def _lora_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Trainer:
    """State shared by the stages of one run: device, callbacks, counters, eval data."""

    def __init__(self, prepared: Prepared, accelerator: Any, callbacks: CallbackList):
        self.p = prepared
        self.config = prepared.config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.callbacks = callbacks
        self.pad_id = prepared.tokenizer.pad_token_id
        self.step = 0
        self.cumulative_epoch = 0
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.stopped = False
        self.steps: list[StepEvent] = []
        self.evals: list[EvalEvent] = []
        self.last_predictions: list[Prediction] = []
        self.total_steps = sum(s.optimizer_steps(len(prepared.train_encoded), accelerator.num_processes) for _, s in self.config.stages())

    def autocast(self) -> ContextManager:
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def evaluate(self, model: AnswerModel, stage: str, epoch: int) -> None:
        predictions = predict(
            model, self.p.eval_encoded, yes_id=self.p.encoder.yes_id, no_id=self.p.encoder.no_id,
            pad_id=self.pad_id, batch_size=self.config.eval_batch_size, device=self.device, autocast=self.autocast,
        )
        acc = accuracy_of(predictions)
        event = EvalEvent(stage, epoch, self.cumulative_epoch, acc.accuracy, acc.low, acc.high, acc.n)
        self.last_predictions = predictions
        self.evals.append(event)
        self.callbacks.on_evaluate(event)

    def run_stage(self, stage: str, model: AnswerModel, settings: StageSettings) -> None:
        """One stage: AdamW, a warmup schedule, gradient accumulation, eval after each epoch."""
        from transformers import get_scheduler

        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        total = settings.optimizer_steps(len(self.p.train_encoded), self.accelerator.num_processes)
        scheduler = get_scheduler(settings.scheduler, optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total)
        # The optimizer goes through accelerate (fp16 loss scaling); the scheduler does not, since
        # accelerate would step it once per process while our step counts are already per process.
        optimizer = self.accelerator.prepare(optimizer)
        targets_of = torch.tensor([self.p.encoder.no_id, self.p.encoder.yes_id], device=self.device)
        rng = random.Random(f"{self.config.seed}-{stage}")
        rank, world = self.accelerator.process_index, self.accelerator.num_processes

        for epoch in range(1, settings.epochs + 1):
            model.train()
            batches = length_grouped_batches(self.p.train_encoded, settings.batch_size, rng)
            if world > 1:  # every process takes the same number of batches, or the reduce would hang
                batches = batches[: len(batches) - len(batches) % world][rank::world]
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            for index, chunk in enumerate(batches):
                batch = collate(chunk, self.pad_id).to(self.device)
                with self.autocast():
                    logits = model.answer_logits(batch)
                # Cross-entropy over the vocabulary at the answer position only.
                loss = F.cross_entropy(logits.float(), targets_of[batch.labels])
                # A last, shorter accumulation window is averaged over its own length.
                window = min(settings.grad_accum, len(batches) - index // settings.grad_accum * settings.grad_accum)
                self.accelerator.backward(loss / window)
                window_loss += loss.item() / window
                window_tokens += batch.num_tokens
                if (index + 1) % settings.grad_accum and index + 1 != len(batches):
                    continue
                if world > 1:  # average gradients across processes (accelerate launch)
                    for param in params:
                        if param.grad is not None:
                            param.grad = self.accelerator.reduce(param.grad, "mean")
                if settings.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - window_start
                self.step += 1
                self.train_seconds += seconds
                self.train_tokens += window_tokens
                event = StepEvent(
                    stage=stage, epoch=round(epoch - 1 + (index + 1) / len(batches), 4), step=self.step,
                    total_steps=self.total_steps, loss=window_loss, learning_rate=scheduler.get_last_lr()[0],
                    tokens_per_second=window_tokens * world / max(seconds, 1e-9), elapsed_seconds=self.train_seconds,
                )
                self.steps.append(event)
                self.callbacks.on_step(event)
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
                if self.callbacks.should_stop():
                    self.stopped = True
                    self.callbacks.on_log(f"stop requested: ending at step {self.step}")
                    return
            self.cumulative_epoch += 1
            if self.config.eval_every_epoch or epoch == settings.epochs:
                self.evaluate(model, stage, epoch)


def train(config: RunConfig, output_dir: str | Path, callbacks: Sequence[TrainerCallback] | None = None, data: data_lib.DatasetSplits | None = None) -> RunResult:
    """Train ``config.method`` and write the run directory. Returns the final evaluation."""
    from accelerate.utils import set_seed

    from heft_core.artifacts import save_run

    cb = CallbackList(callbacks)
    prepared = prepare(config, data)  # every check happens before weights load
    mixed_precision, dtype = resolve_precision(config.precision)
    accelerator = _accelerator(mixed_precision)
    set_seed(config.seed)
    model = load_model(config.model, dtype=dtype, device=accelerator.device)
    trainer = _Trainer(prepared, accelerator, cb)
    cb.on_train_begin({
        "method": config.method, "total_steps": trainer.total_steps, "train_examples": len(prepared.train_encoded),
        "eval_examples": len(prepared.eval_encoded), "data_label": prepared.data.label, "device": str(accelerator.device),
    })
    info = prepared.info
    trainable: dict[str, int] = {}
    lora_model = None
    reft_model: ReftAnswerModel | None = None
    lora_unchanged = None

    if config.method == "base":
        trainer.evaluate(PlainAnswerModel(model), "base", 0)
    if config.uses_lora:
        lora_model = build_lora_model(model, config.lora, info.num_layers)
        answer_model = PlainAnswerModel(lora_model)
        trainable["lora"] = count_parameters(answer_model.trainable_parameters())
        cb.on_log(f"stage lora: {trainable['lora']:,} trainable parameters")
        trainer.run_stage("lora", answer_model, config.lora_stage)
        lora_model.requires_grad_(False)
        lora_model.eval()
    if config.uses_reft and not trainer.stopped:
        host = model
        fingerprint = None
        if lora_model is not None:
            fingerprint = _lora_fingerprint(lora_model)
            # HEFT stage 2: the LoRA-adapted model is frozen; keep it as an adapter or merge it.
            # merge_adapter() folds LoRA into the base weights in place and skips the LoRA branch
            # in forward, while the adapter's own weights stay as they are (and get saved).
            if config.heft_stage2_mode == "merged":
                lora_model.merge_adapter()
            host = lora_model
        torch.manual_seed(config.seed)
        prefix_cache = PrefixStateCache(resolve_budget(config.prefix_cache_mb, trainer.device))
        reft_model = ReftAnswerModel(host, config.reft, info.num_layers, info.hidden_size, prefix_cache=prefix_cache)
        trainable["reft"] = count_parameters(reft_model.trainable_parameters())
        cb.on_log(f"stage reft: {trainable['reft']:,} trainable parameters on layers {reft_model.layers} at {config.reft.positions}")
        trainer.run_stage("reft", reft_model, config.reft_stage)
        if prefix_cache.hits or prefix_cache.misses:
            cb.on_log(
                f"reft prefix states: {len(prefix_cache)} prompts kept ({prefix_cache.used_bytes / 2**20:.0f} of {prefix_cache.budget_bytes / 2**20:.0f} MiB "
                f"budget, prefix_cache_mb={config.prefix_cache_mb}), "
                f"{prefix_cache.hits} reused, {prefix_cache.misses} computed"
            )
        if fingerprint is not None:
            lora_unchanged = _lora_fingerprint(lora_model) == fingerprint
            if not lora_unchanged:
                raise RuntimeError("stage 2 changed the stage-1 LoRA weights; this is a bug")

    accuracy = accuracy_of(trainer.last_predictions) if trainer.last_predictions and not trainer.stopped else None
    result = RunResult(
        run_dir=str(output_dir), status="cancelled" if trainer.stopped else "completed", accuracy=accuracy,
        predictions=trainer.last_predictions if not trainer.stopped else [], train_seconds=trainer.train_seconds,
        tokens_per_second=trainer.train_tokens * accelerator.num_processes / trainer.train_seconds if trainer.train_seconds else 0.0,
        trainable_params=trainable, steps=trainer.steps, evals=trainer.evals, lora_unchanged_by_stage2=lora_unchanged,
    )
    if accelerator.is_main_process:
        save_run(output_dir, prepared, result, lora_model=lora_model, reft_model=reft_model)
    return result

