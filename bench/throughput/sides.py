"""The training recipes timed against each other: heft_core's step, pyreft's and the transformers Trainer's."""
from __future__ import annotations

import tempfile
import threading
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.throughput.common import MAX_GRAD_NORM


class Side:
    """One training recipe: ``run(n)`` does n optimizer steps on the next n batches."""

    name: str
    losses: list[float]
    position: int = 0  # batches consumed so far

    def run(self, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OursSide(Side):
    """heft_core's training step (mirrors ``heft_core.train._Trainer.run_stage``)."""

    def __init__(self, name: str, answer_model: Any, batches: list[Any], *, yes_id: int, no_id: int, lr: float, autocast: Callable[[], Any] | None = None):
        self.name = name
        self.model = answer_model
        self.batches = batches
        self.targets_of = torch.tensor([no_id, yes_id], device=batches[0].input_ids.device)
        self.params = answer_model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.autocast = autocast or nullcontext
        self.losses = []
        self.model.train()

    def run(self, n: int) -> None:
        for _ in range(n):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            with self.autocast():
                logits = self.model.answer_logits(batch)
            loss = F.cross_entropy(logits.float(), self.targets_of[batch.labels])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())


class PyreftSide(Side):
    """pyreft's training step, written as ``pyreft.ReftTrainer.compute_loss`` + the Trainer's update."""

    def __init__(self, name: str, reft_model: Any, batches: list[dict[str, torch.Tensor]], *, lr: float, autocast: Callable[[], Any] | None = None):
        self.name = name
        self.model = reft_model
        self.batches = batches
        self.params = [p for iv in reft_model.interventions.values() for p in iv.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.autocast = autocast or nullcontext
        self.losses = []
        reft_model.train()  # what the Trainer does; pyvene switches the host model only
        for iv in reft_model.interventions.values():
            iv.train()

    def run(self, n: int) -> None:
        for _ in range(n):
            inputs = self.batches[self.position % len(self.batches)]
            self.position += 1
            with self.autocast():
                _, cf_outputs = self.model(
                    {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                    unit_locations={"sources->base": (None, inputs["intervention_locations"].permute(1, 0, 2).tolist())},
                    labels=inputs["labels"],
                )
            loss = cf_outputs.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def _unwrap(items: list[Any]) -> Any:
    return items[0]


class TrainerSide(Side):
    """A transformers ``Trainer`` over pre-built batches, paused between chunks.

    ``trainer.train()`` runs in a helper thread; a callback blocks it at the end of each chunk
    and ``run(n)`` releases it for n more steps, so a chunk's time covers everything the
    Trainer does per step (data loading, forward, backward, clipping, optimizer). Only one
    side computes at any time.
    """

    def __init__(self, name: str, model: Any, batches: list[dict[str, torch.Tensor]], *, lr: float, max_steps: int, device: torch.device, bf16: bool = False, seed: int = 42):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        self.name = name
        self.losses = []
        self.max_steps = max_steps
        self._remaining = 0
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-trainer-")
        side = self
        items = [batches[i % len(batches)] for i in range(max_steps)]

        class _Gate(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                side._remaining -= 1
                if side._remaining <= 0:
                    side._done.release()
                    side._go.acquire()

        class _LossTrainer(Trainer):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                side.losses.append(float(loss.detach()))
                return loss

        args = TrainingArguments(
            output_dir=self._tmp.name, per_device_train_batch_size=1, max_steps=max_steps, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0, train_sampling_strategy="sequential",
            use_cpu=device.type == "cpu", bf16=bf16, seed=seed,
        )
        self.trainer = _LossTrainer(model=model, args=args, train_dataset=_ListDataset(items), data_collator=_unwrap, callbacks=[_Gate()])
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # logging is off; don't print the final metrics

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as exc:  # surfaced in run()
            self._error = exc
        finally:
            self._done.release()

    def run(self, n: int) -> None:
        if self.position + n > self.max_steps:
            raise RuntimeError(f"{self.name}: {self.position + n} steps requested, the Trainer was set up for {self.max_steps}")
        self._remaining = n
        self.position += n
        if self._thread is None:
            self._thread = threading.Thread(target=self._train, name="bench-trainer", daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError(f"{self.name}: the Trainer failed: {self._error!r}") from self._error

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._go.release()
            self._thread.join(timeout=600)
        self._tmp.cleanup()
