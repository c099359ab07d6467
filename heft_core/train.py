"""Training: LoRA, ReFT, and HEFT (LoRA for E1 epochs, then ReFT on the frozen result for E2).

Read top to bottom: ``prepare`` checks everything and tokenises the data before any weights
load; ``train`` loads the model, runs each stage with ``_Trainer.run_stage`` (one plain loop),
evaluates after every epoch, and writes the run directory atomically at the end. The loop writes a
checkpoint at every epoch end and every ``checkpoint_minutes`` (``heft_core.checkpoint``); with
``resume=True`` it continues from the latest one exactly: finished stages are not retrained, the
epoch's batches are drawn again from the saved RNG state and the ones already trained are skipped.
Importing this module loads torch, accelerate and transformers, so the CLI and the app import it
only when they train.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed

from heft_common.errors import ConfigError
from heft_core import checkpoint as ckpt
from heft_core import data as data_lib
from heft_core.adapters import AnswerModel, PlainAnswerModel, ReftAnswerModel, build_lora_model, count_parameters
from heft_core.artifacts import RUN_FILE, RunResult, save_run
from heft_core.batching import collate, collate_sequences, length_grouped_batches, sorted_batches
from heft_core.callbacks import (
    CONVERTING,
    LOADING,
    PREPARING,
    SAVING,
    CallbackList,
    EvalEvent,
    ResumeEvent,
    StepEvent,
    TrainerCallback,
    evaluating_phase,
    training_phase,
)
from heft_core.config import RunConfig, StageSettings
from heft_core.data import EVAL_SUBSET_SEED
from heft_core.evaluate import Prediction, accuracies_of, accuracy_of, score
from heft_core.frozen_cache import lora_answer_model
from heft_core.hardware import precision_warning, resolve_precision
from heft_core.models import ModelInfo, load_model, load_tokenizer, model_info, needs_conversion
from heft_core.prefix_cache import PrefixStateCache, resolve_budget
from heft_core.prompt import EncodedExample, PromptEncoder
from heft_core.stats import yes_share

logger = logging.getLogger(__name__)


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


def prepare(
    config: RunConfig, data: data_lib.DatasetSplits | None = None, callbacks: TrainerCallback | None = None,
) -> Prepared:
    """Validate ``config`` against the model's shape and the data; tokenise. Loads no weights
    (but converts the embedded model on its first use, reported to ``callbacks`` as a phase)."""
    info = model_info(config.model)
    config.validate_for_model(info.num_layers, set(info.linear_modules))
    if data is None:
        data = data_lib.load_data(config.data)
    train_examples = data_lib.subset(data.train, config.train_size, config.seed) if config.method != "base" else []
    eval_examples = data_lib.subset(data.validation, config.eval_size, EVAL_SUBSET_SEED)
    if config.method != "base":
        if not train_examples:
            raise ConfigError("data", f"{data.label} has no training rows")
        answers = {e.answer for e in train_examples}
        if len(answers) < 2:
            only = "yes" if True in answers else "no"
            raise ConfigError("data", f"the training subset of {data.label} has only {only} answers; it needs both")
    if not eval_examples:
        raise ConfigError("data", f"{data.label} has no validation rows")
    if callbacks is not None and needs_conversion(config.model):
        callbacks.on_phase(CONVERTING, 0, 1)
    tokenizer = load_tokenizer(config.model)
    encoder = PromptEncoder(tokenizer, config.template, config.max_length)
    return Prepared(
        config, info, data, tokenizer, encoder,
        encoder.encode_examples(train_examples), encoder.encode_examples(eval_examples),
        data_lib.eval_signature(eval_examples),
    )


def _accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run. accelerate keeps its state per process; a single-process
    caller (tests, the CLI, benchmarks) may train runs of different precisions one after another."""
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision")) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def _environment(accelerator: Any) -> ckpt.Environment:
    """What a checkpoint must be resumed under: precision, device type, number of processes."""
    return ckpt.Environment(str(accelerator.mixed_precision), accelerator.device.type, accelerator.num_processes)


def _lora_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Trainer:
    """State shared by the stages of one run: device, callbacks, counters, eval data."""

    def __init__(self, prepared: Prepared, accelerator: Any, callbacks: CallbackList, run_dir: Path):
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
        self.total_steps = sum(
            stage.optimizer_steps(len(prepared.train_encoded), accelerator.num_processes)
            for _, stage in self.config.stages()
        )
        self.run_dir = run_dir
        self.environment = _environment(accelerator)
        self.lora_model: Any = None  # once built, its LoRA tensors go into every checkpoint
        self.resume_from: ckpt.Checkpoint | None = None
        self.last_checkpoint_at = time.monotonic()

    # --- checkpoints ------------------------------------------------------------------------
    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Counters and history as they were at the checkpoint; ``run_stage`` restores the rest."""
        self.resume_from = checkpoint
        self.step, self.cumulative_epoch = checkpoint.step, checkpoint.cumulative_epoch
        self.train_seconds, self.train_tokens = checkpoint.train_seconds, checkpoint.train_tokens
        self.steps, self.evals = list(checkpoint.steps), list(checkpoint.evals)
        self.last_predictions = [Prediction(**p) for p in checkpoint.predictions]

    def stage_finished(self, stage: str) -> bool:
        """True when the checkpoint resumed from was written after ``stage`` ended."""
        point = self.resume_from
        if point is None:
            return False
        order = [name for name, _ in self.config.stages()]
        epochs = dict(self.config.stages())[stage].epochs
        later_stage = order.index(point.stage) > order.index(stage)
        return later_stage or (point.stage == stage and point.stage_epochs_done >= epochs)

    def checkpoint_due(self) -> bool:
        """``checkpoint_minutes`` have passed since the last checkpoint (every process agrees)."""
        minutes = self.config.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self.last_checkpoint_at >= minutes * 60
        if self.accelerator.num_processes > 1:  # the main process decides: all must save together
            flag = torch.tensor([float(due and self.accelerator.is_main_process)], device=self.device)
            due = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return due

    def save_checkpoint(
        self, stage: str, model: AnswerModel, optimizer: Any, scheduler: Any, *,
        epochs_done: int, batches_done: int, data_rng_state: list[Any], epoch_end: bool = False,
    ) -> None:
        rng_states = [ckpt.capture_torch_rng()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)  # one entry per process, in rank order
        if self.accelerator.is_main_process:
            scaler = getattr(self.accelerator, "scaler", None)
            checkpoint = ckpt.Checkpoint(
                step=self.step, stage=stage, stage_epochs_done=epochs_done, batches_done=batches_done,
                cumulative_epoch=self.cumulative_epoch, train_seconds=self.train_seconds,
                train_tokens=self.train_tokens,
                data_rng_state=data_rng_state, environment=self.environment, config=self.config.to_dict(),
                epoch_end=epoch_end, steps=self.steps, evals=self.evals,
                predictions=[p.state() for p in self.last_predictions],
                lora_state=ckpt.lora_tensors(self.lora_model) if self.lora_model is not None else None,
                reft_state=model.intervention_state() if isinstance(model, ReftAnswerModel) else None,
                optimizer_state={
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                },
                rng_states=rng_states,
            )
            saved = ckpt.save_checkpoint(
                self.run_dir, checkpoint, keep_epoch_checkpoints=self.config.keep_epoch_checkpoints
            )
            self.callbacks.on_log(
                f"checkpoint at step {self.step} written in {saved.seconds:.2f} s ({saved.size_bytes / 2**20:.2f} MiB)"
            )
        self.accelerator.wait_for_everyone()
        self.last_checkpoint_at = time.monotonic()

    @torch.no_grad()
    def refill_prefix_cache(self, model: ReftAnswerModel, settings: StageSettings, point: ckpt.Checkpoint) -> None:
        """Rebuild the ReFT prefix states the interrupted process had kept, exactly as it built them.

        The store fills in the first epoch (its training batches, then its evaluation) and never changes
        after; each prompt's states depend on the batch they were computed in. Replaying those host passes
        in order gives the same store, so the resumed run's numbers stay bit for bit the same.
        """
        if not model.reuse_prefix or model.prefix_cache.full:
            return
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        stage_rng = random.Random(f"{self.config.seed}-reft")  # the batch order from the stage's start
        batches = length_grouped_batches(self.p.train_encoded, settings.batch_size, stage_rng)
        if world > 1:
            batches = batches[: len(batches) - len(batches) % world][rank::world]
        first_epoch_done = point.stage_epochs_done >= 1
        replay = batches if first_epoch_done else batches[: point.batches_done]
        if first_epoch_done and (self.config.eval_every_epoch or settings.epochs == 1):
            replay = replay + sorted_batches(self.p.eval_encoded, self.config.eval_batch_size)
        for chunk in replay:
            batch = collate(chunk, self.pad_id).to(self.device)
            cut = model.prefix_end(batch)
            if cut:
                with self.autocast():
                    model.prefix_cache.host_cache(model.module.model, batch, cut)

    def restore_stage(self, point: ckpt.Checkpoint, optimizer: Any, scheduler: Any, rng: random.Random) -> None:
        """Optimizer, scheduler, batch order and torch RNG of a stage resumed part-way."""
        optimizer.load_state_dict(point.optimizer_state["optimizer"])
        scheduler.load_state_dict(point.optimizer_state["scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and point.optimizer_state.get("scaler") is not None:
            scaler.load_state_dict(point.optimizer_state["scaler"])
        ckpt.set_python_rng_state(rng, point.data_rng_state)
        states, rank = point.rng_states or [], self.accelerator.process_index
        if states:
            ckpt.restore_torch_rng(states[rank] if rank < len(states) else states[0])

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def evaluate(self, model: AnswerModel, stage: str, epoch: int, final: bool = True) -> None:
        """Score the evaluation set. Generation costs up to ``generation_max_new_tokens`` forward passes per
        question, so only the run's final evaluation uses ``config.scoring``; the ones after earlier epochs
        (and after HEFT's stage 1) score by logits."""
        config, encoder = self.config, self.p.encoder
        scoring = config.scoring if final else "logits"
        phase = evaluating_phase(stage, epoch)
        self.callbacks.on_phase(phase, 0, len(self.p.eval_encoded) * (2 if scoring == "both" else 1))
        predictions = score(
            model, self.p.eval_encoded, scoring=scoring, yes_id=encoder.yes_id, no_id=encoder.no_id,
            yes_word=config.template.yes, no_word=config.template.no, tokenizer=self.p.tokenizer,
            max_new_tokens=config.generation_max_new_tokens, pad_id=self.pad_id,
            batch_size=config.eval_batch_size, device=self.device, autocast=self.autocast,
            on_batch=lambda done, total: self.callbacks.on_phase(phase, done, total),
        )
        acc = accuracy_of(predictions)
        event = EvalEvent(
            stage, epoch, self.cumulative_epoch, acc.accuracy, acc.low, acc.high, acc.n,
            scoring=predictions[0].scoring if predictions else "logits",
            yes_share=yes_share([p.predicted for p in predictions]),
        )
        generation = accuracies_of(predictions).get("generation")
        if generation is not None:
            event.generation_accuracy, event.generation_low = generation["accuracy"], generation["low"]
            event.generation_high, event.unparsed = generation["high"], generation["unparsed"]
        self.last_predictions = predictions
        self.evals.append(event)
        self.callbacks.on_evaluate(event)

    def sequence_batch(self, chunk: Sequence[EncodedExample]) -> Any:
        encoder = self.p.encoder
        return collate_sequences(
            chunk, yes_id=encoder.yes_id, no_id=encoder.no_id, eos_id=self.p.tokenizer.eos_token_id, pad_id=self.pad_id,
        ).to(self.device)

    def should_stop(self) -> bool:
        """The main process's callbacks decide; with several processes all of them stop at the same step."""
        stop = self.callbacks.should_stop()
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            stop = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return stop

    def run_stage(self, stage: str, model: AnswerModel, settings: StageSettings) -> None:
        """One stage: AdamW, a warmup schedule, gradient accumulation, eval after each epoch."""
        from transformers import get_scheduler  # heavy: deferred

        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        total = settings.optimizer_steps(len(self.p.train_encoded), self.accelerator.num_processes)
        scheduler = get_scheduler(
            settings.scheduler, optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total
        )
        # The optimizer goes through accelerate (fp16 loss scaling); the scheduler does not, since
        # accelerate would step it once per process while our step counts are already per process.
        optimizer = self.accelerator.prepare(optimizer)
        targets_of = torch.tensor([self.p.encoder.no_id, self.p.encoder.yes_id], device=self.device)
        # The paper's LoRA loss: causal-LM over prompt + answer + eos; ReFT keeps the answer-token loss.
        sequence_loss = stage == "lora" and self.config.lora_loss == "sequence"
        final_stage = self.config.stages()[-1][0] == stage
        rng = random.Random(f"{self.config.seed}-{stage}")
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        first_epoch, skip_batches = 1, 0
        point = self.resume_from if self.resume_from is not None and self.resume_from.stage == stage else None
        if point is not None:
            self.restore_stage(point, optimizer, scheduler, rng)
            first_epoch, skip_batches = point.stage_epochs_done + 1, point.batches_done
        self.callbacks.on_phase(training_phase(stage), scheduler.last_epoch, total)  # steps of this stage done
        self.last_checkpoint_at = time.monotonic()

        for epoch in range(first_epoch, settings.epochs + 1):
            model.train()
            epoch_rng_state = ckpt.python_rng_state(rng)  # a checkpoint in this epoch redraws its batches from here
            batches = length_grouped_batches(self.p.train_encoded, settings.batch_size, rng)
            if world > 1:  # every process takes the same number of batches, or the reduce would hang
                batches = batches[: len(batches) - len(batches) % world][rank::world]
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            for index, chunk in enumerate(batches):
                if epoch == first_epoch and index < skip_batches:
                    continue  # trained before the checkpoint this run resumed from
                if sequence_loss:
                    assert isinstance(model, PlainAnswerModel)
                    batch = self.sequence_batch(chunk)
                    with self.autocast():
                        loss = model.sequence_loss(batch).float()
                else:
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
                if world > 1:  # the loss of the global batch: the mean over the processes' shares
                    window_loss = self.accelerator.reduce(torch.tensor(window_loss, device=self.device), "mean").item()
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
                position = {"epochs_done": epoch - 1, "batches_done": index + 1, "data_rng_state": epoch_rng_state}
                if self.should_stop():
                    self.stopped = True
                    self.callbacks.on_log(f"stop requested: ending at step {self.step}")
                    self.save_checkpoint(stage, model, optimizer, scheduler, **position)  # a cancelled run can resume
                    return
                if index + 1 < len(batches) and self.checkpoint_due():  # the epoch's end writes one anyway
                    self.save_checkpoint(stage, model, optimizer, scheduler, **position)
            self.cumulative_epoch += 1
            if self.config.eval_every_epoch or epoch == settings.epochs:
                self.evaluate(model, stage, epoch, final=final_stage and epoch == settings.epochs)
            self.save_checkpoint(
                stage, model, optimizer, scheduler, epochs_done=epoch, batches_done=0,
                data_rng_state=ckpt.python_rng_state(rng), epoch_end=True,
            )


def _resume_point(
    run_dir: Path, config: RunConfig, environment: ckpt.Environment, resume: bool, is_main: bool,
) -> tuple[ckpt.Checkpoint | None, ResumeEvent | None]:
    """The checkpoint to continue from (checked against this config and machine), and what to report.

    A run to resume whose checkpoints are all missing or damaged starts over from step 0 and says why.
    ``resume=False`` removes old checkpoints, so none is ever mixed into a fresh run.
    """
    if not resume:
        if is_main:
            ckpt.clear_checkpoints(run_dir)
        return None, None
    checkpoint, found = ckpt.load_latest_checkpoint(run_dir)
    if checkpoint is None:
        return None, ResumeEvent(0, None, 0.0, 0, 0.0, f"{found}; starting over from step 0")
    ckpt.check_config(checkpoint.config, config.to_dict())
    ckpt.check_environment(checkpoint.environment, environment)
    message = (
        f"resumed from step {checkpoint.step} ({checkpoint.stage} epoch {checkpoint.last_epoch:g}) from {found}, "
        f"saved ~{checkpoint.train_seconds:.0f} s of training"
    )
    event = ResumeEvent(
        checkpoint.step, checkpoint.stage, checkpoint.last_epoch, checkpoint.cumulative_epoch,
        checkpoint.train_seconds, message,
    )
    return checkpoint, event


def _auto_precision_of_checkpoint(run_dir: Path, resolved: str) -> str:
    """The precision the latest checkpoint of an "auto" run trained in, when this machine can run it."""
    checkpoint, _ = ckpt.load_latest_checkpoint(run_dir)
    saved = checkpoint.environment.precision if checkpoint is not None else resolved
    return saved if saved in ("no", "bf16") and saved != resolved else resolved


def train(
    config: RunConfig, output_dir: str | Path, callbacks: Sequence[TrainerCallback] | None = None,
    data: data_lib.DatasetSplits | None = None, resume: bool = False,
) -> RunResult:
    """Train ``config.method`` and write the run directory. Returns the final evaluation.

    ``resume=True`` continues from the run directory's latest checkpoint when there is one (same config,
    precision, device type and process count, else ``ConfigError``); ``resume=False`` starts over.
    ``config.report.report_to`` reports the run to trackers too (``heft_core.trackers``); they never fail it.
    """
    if not config.report.report_to:
        return _train(config, output_dir, callbacks, data, resume)
    from heft_core.trackers import TrackerReporter

    listeners = CallbackList(callbacks)  # a tracker's warning goes where the run's log lines go
    reporter = TrackerReporter(config, output_dir, resume, say=listeners.on_log if listeners.callbacks else None)
    try:
        result = _train(config, output_dir, [*listeners.callbacks, reporter], data, resume)
    except BaseException:
        reporter.finish(status="failed")
        raise
    reporter.finish(result)
    return result


def _train(
    config: RunConfig, output_dir: str | Path, callbacks: Sequence[TrainerCallback] | None,
    data: data_lib.DatasetSplits | None, resume: bool,
) -> RunResult:
    output_dir = Path(output_dir)
    mixed_precision, dtype = resolve_precision(config.precision)
    if resume and config.precision == "auto":  # "auto" may resolve otherwise now; continue as it trained
        mixed_precision = _auto_precision_of_checkpoint(output_dir, mixed_precision)
    accelerator = _accelerator(mixed_precision)
    # Run in several processes (accelerate launch), only the main one reports: metrics are recorded once.
    cb = CallbackList(callbacks if accelerator.is_main_process else [])
    if config.processes != accelerator.num_processes:
        logger.warning("processes=%d but this run trains in %d process(es); start it with "
                       "`accelerate launch --num_processes %d`", config.processes, accelerator.num_processes,
                       config.processes)
    cb.on_phase(PREPARING, 0, 1)
    prepared = prepare(config, data, cb)  # every check happens before weights load
    environment = _environment(accelerator)
    checkpoint, resumed = _resume_point(output_dir, config, environment, resume, accelerator.is_main_process)
    if accelerator.is_main_process:
        (output_dir / RUN_FILE).unlink(missing_ok=True)  # a cancelled run resumed is not finished any more
        ckpt.write_run_config(output_dir, config.to_dict())
    set_seed(config.seed)
    cb.on_phase(LOADING, 0, 1)
    model = load_model(config.model, dtype=dtype, device=accelerator.device)
    trainer = _Trainer(prepared, accelerator, cb, output_dir)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    cb.on_train_begin({
        "method": config.method, "total_steps": trainer.total_steps, "train_examples": len(prepared.train_encoded),
        "eval_examples": len(prepared.eval_encoded), "data_label": prepared.data.label,
        "device": str(accelerator.device), "precision": mixed_precision,
    })
    trained_in = "fp32" if mixed_precision == "no" else mixed_precision
    cb.on_log(f"precision: {config.precision} -> {mixed_precision} (trains in {trained_in})")
    warning = precision_warning(mixed_precision, on_gpu=accelerator.device.type == "cuda")
    if warning:
        logger.warning(warning)
        cb.on_log(f"warning: {warning}")
    if resumed is not None:
        cb.on_log(resumed.message)
        cb.on_resume(resumed)
    info = prepared.info
    trainable: dict[str, int] = {}
    lora_model = None
    reft_model: ReftAnswerModel | None = None
    lora_unchanged = None

    if config.method == "base":
        trainer.evaluate(PlainAnswerModel(model), "base", 0)
    if config.uses_lora:
        lora_model = build_lora_model(model, config.lora, info.num_layers)
        answer_model, frozen_cache = lora_answer_model(lora_model, config, trainer.device)
        trainable["lora"] = count_parameters(answer_model.trainable_parameters())
        trainer.lora_model = lora_model
        if checkpoint is not None and checkpoint.lora_state is not None:
            ckpt.load_lora_tensors(lora_model, checkpoint.lora_state)
        if trainer.stage_finished("lora"):
            cb.on_log("stage lora: finished before the interruption; its LoRA comes from the checkpoint, not retrained")
        else:
            cb.on_log(f"stage lora: {trainable['lora']:,} trainable parameters")
            trainer.run_stage("lora", answer_model, config.lora_stage)
            if frozen_cache is not None:  # the states are rebuilt on resume, never saved
                cb.on_log(frozen_cache.summary(config.frozen_cache_mb))
        answer_model = frozen_cache = None  # free the kept states before stage 2 sizes its own cache
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
        if checkpoint is not None and checkpoint.stage == "reft":
            reft_model.load_intervention_state(checkpoint.reft_state)
            trainer.refill_prefix_cache(reft_model, config.reft_stage, checkpoint)
        trainable["reft"] = count_parameters(reft_model.trainable_parameters())
        cb.on_log(
            f"stage reft: {trainable['reft']:,} trainable parameters on layers {reft_model.layers} "
            f"at {config.reft.positions}"
        )
        trainer.run_stage("reft", reft_model, config.reft_stage)
        if prefix_cache.hits or prefix_cache.misses:
            cb.on_log(
                f"reft prefix states: {len(prefix_cache)} prompts kept ({prefix_cache.used_bytes / 2**20:.0f} "
                f"of {prefix_cache.budget_bytes / 2**20:.0f} MiB "
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
        scoring=config.primary_scoring, accuracies=accuracies_of(trainer.last_predictions) if accuracy else {},
        tokens_per_second=(
            trainer.train_tokens * accelerator.num_processes / trainer.train_seconds if trainer.train_seconds else 0.0
        ),
        trainable_params=trainable, steps=trainer.steps, evals=trainer.evals, lora_unchanged_by_stage2=lora_unchanged,
    )
    if accelerator.is_main_process:
        cb.on_phase(SAVING, 0, 1)
        save_run(
            output_dir, config, result, data=prepared.data, eval_signature=prepared.eval_signature,
            model_info=prepared.info, lora_model=lora_model, reft_model=reft_model,
        )
        if not trainer.stopped:  # finished: its results are saved; a cancelled run keeps its checkpoint
            ckpt.prune_finished(output_dir, keep_epoch_checkpoints=config.keep_epoch_checkpoints)
    return result

