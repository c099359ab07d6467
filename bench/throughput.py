"""Training and evaluation speed of heft_core against the recipes users would otherwise run.

Every figure is a RATIO of two sides measured side by side in one process: both sides get
the same model weights, the same pre-built batches of token ids in the same order, the same
optimizer (AdamW, constant learning rate, no warmup, gradient clipping at 1.0) and the same
initial adapter weights; they run in alternating chunks (A, B, A, B ...; the order rotates
each round) after untimed warmup steps, and the report gives the median of the per-round
ratios. Absolute numbers are printed only for context: other processes may share the CPU.

Pairs
-----
- LoRA: heft_core (``build_lora_model`` + ``PlainAnswerModel.answer_logits``: logits at the
  answer position only, cross-entropy on the answer token) vs a transformers ``Trainer`` on a
  peft LoRA model with the causal-LM loss (labels -100 except the answer token; full logits).
- ReFT: heft_core ``ReftAnswerModel`` vs pyreft's recipe (``get_reft_model`` + ``ReftModel``
  forward with ``labels`` and ``unit_locations`` from ``intervention_locations``, exactly as
  ``pyreft.ReftTrainer.compute_loss`` does it; batches laid out like
  ``make_last_position_supervised_data_module`` + ``ReftDataCollator``). heft_core's side appears
  three times, to measure each idea alone: ``reft-ours`` (a first epoch: the prompt before the
  first intervened position runs without autograd, see ``heft_core.prefix_cache``),
  ``reft-ours-full`` (that reuse off) and ``reft-ours-cached`` (a later epoch: the prefix states
  were kept from the first).
- LoRA in bf16 (CPU): heft_core vs the Trainer recipe again, both under bf16 autocast over fp32
  weights (``TrainingArguments(bf16=True)``); and heft_core bf16 vs its fp32.
- Evaluation: heft_core ``predict`` (one forward, two logits) vs greedy generation and a
  string match of yes/no, as pyreft's example evaluator does it for BoolQ (32 new tokens, stop at
  EOS): on the base model, and on a ReFT model (pyreft's ``IntervenableModel.generate`` with the
  interventions on the prompt vs heft_core's first and later-epoch evaluations).
- Memory: each training side runs alone in a fresh ``spawn`` subprocess (A, B, A, B ...);
  there the weights are copied out of their memory map, the RSS high-water mark (``VmHWM``) is
  reset once the model and adapter are built, and read after the training steps: "training
  increment" is that peak minus the RSS before the first step (``ru_maxrss`` would include the
  parent's RSS; see :func:`_memory_child` and :func:`_make_weights_anonymous`).
- Utilisation: achieved model FLOP/s (formula in :func:`step_flops`) over the peak FLOP/s of a
  plain square matmul measured in the same run, at sizes chosen by time (:func:`timed_matmul_peak`),
  for the dtypes the selected sides use only (no bf16 peak with ``--no-bf16``).

Run ``python -m bench.throughput --help`` from the repository root; ``--quick`` gives a smoke run in a minute or two.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import functools
import logging
import multiprocessing
import os
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from heft_core.data import local_boolq_dir

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.throughput")

IGNORE_INDEX = -100
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- machine and peak


def machine_description(device: torch.device | str = "cpu") -> dict[str, str]:
    """CPU model, cores, threads, library versions, load average, and the GPU if any."""
    from importlib import metadata

    info: dict[str, str] = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        info["cpu"] = match.group(1).strip() if match else platform.processor()
        flags = re.search(r"^Flags:\s*(.+)$", lscpu, re.M)
        if flags:
            wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags.group(1).split()]
            info["cpu features"] = ", ".join(wanted) or "no AVX-512/AMX"
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    info["cores (os.cpu_count)"] = str(os.cpu_count())
    try:
        info["cores usable (affinity)"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    info["torch threads"] = str(torch.get_num_threads())
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    versions = []
    for name in ("torch", "transformers", "peft", "pyreft", "pyvene", "accelerate"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    info["libraries"] = ", ".join(versions)
    info["python"] = platform.python_version()
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], iters: int = 4, repeats: int = 3) -> float:
    """Best FLOP/s of square n x n @ n x n matmuls (2 n^3 FLOPs each) at the fixed ``sizes`` given.

    For callers that know their machine (bench/gpu_check.py on a GPU); this script itself picks
    sizes by time with :func:`timed_matmul_peak`.
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                a @ b
            synchronize(device)
            best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


PEAK_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_START_SIZE = 256
PEAK_MAX_SIZE = 8192  # saturates a data-centre GPU; a CPU stops far below it on time
PEAK_MULTIPLY_LIMIT_S = 0.2  # grow the matrices while the next multiply is predicted to stay under this
PEAK_BUDGET_S = 3.0  # per dtype and measurement (a new size costs a warm-up multiply and a timed one)
PEAK_REPEATS = 3  # timed multiplies at the final size, best kept: other load only ever slows one down
QUICK_PEAK_MULTIPLY_LIMIT_S = 0.05
QUICK_PEAK_BUDGET_S = 0.5


@dataclass(frozen=True)
class MatmulPeak:
    """One timed peak measurement."""

    flops_per_second: float
    size: int  # n of the n x n @ n x n multiply that gave the best figure
    sizes: tuple[int, ...]  # every size timed, in order
    seconds: float  # wall time of the whole measurement


class MatmulPeaks(dict[str, float]):
    """Peak FLOP/s by dtype name (``PEAK_DTYPES``), plus the matrix size each figure came from."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}


def next_peak_size(n: int) -> int:
    """256, 384, 512, 768, 1024 ...: steps of x1.5 and x4/3, so each multiply costs 2.4-3.4x the last."""
    return n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3


class SquareMultiplyTimer:
    """Seconds of one warm n x n @ n x n multiply; keeps the operands of the last size asked for."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.size = 0
        self.a = self.b = None

    def __call__(self, n: int) -> float:
        if n != self.size:
            self.a = torch.randn(n, n, device=self.device).to(self.dtype)
            self.b = torch.randn(n, n, device=self.device).to(self.dtype)
            self.size = n
            self.a @ self.b  # the first multiply at a size pays for allocation and packing
            synchronize(self.device)
        start = time.perf_counter()
        self.a @ self.b
        synchronize(self.device)
        return time.perf_counter() - start


def timed_matmul_peak(
    device: torch.device, dtype: torch.dtype, *,
    budget_s: float = PEAK_BUDGET_S, multiply_limit_s: float = PEAK_MULTIPLY_LIMIT_S,
    start_size: int = PEAK_START_SIZE, max_size: int = PEAK_MAX_SIZE, repeats: int = PEAK_REPEATS,
    time_multiply: Callable[[int], float] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> MatmulPeak:
    """Best FLOP/s of square multiplies (2 n^3 FLOPs each) at sizes chosen by time, not a fixed ladder.

    Starts at ``start_size`` and grows (:func:`next_peak_size`) while the next multiply, predicted
    from the last by n^3, stays under ``multiply_limit_s`` and its warm-up plus timed multiply fit
    in what is left of ``budget_s``; then times the last size again (``repeats`` in all) while the
    budget allows. A fixed ladder up to 3072 ran for over 9 minutes on a CPU that emulates bf16;
    this stops at a few hundred there and goes on to ``max_size`` on a GPU. ``time_multiply(n)``
    (seconds of one warm multiply) and ``clock`` are parameters so that tests can fake them.
    """
    time_multiply = time_multiply or SquareMultiplyTimer(device, dtype)
    started = clock()
    timed: list[tuple[int, float]] = []  # (size, seconds of one multiply)
    size = start_size
    while True:
        seconds = time_multiply(size)
        timed.append((size, seconds))
        bigger = next_peak_size(size)
        predicted = seconds * (bigger / size) ** 3
        if bigger > max_size or predicted > multiply_limit_s or 2 * predicted > budget_s - (clock() - started):
            break
        size = bigger
    for _ in range(repeats - 1):
        if seconds > budget_s - (clock() - started):
            break
        seconds = time_multiply(size)
        timed.append((size, seconds))
    rate, best_size = max((2 * n**3 / max(s, 1e-12), n) for n, s in timed)
    return MatmulPeak(rate, best_size, tuple(dict.fromkeys(n for n, _ in timed)), clock() - started)


def peak_limits(quick: bool) -> tuple[float, float]:
    """(budget per dtype, limit per multiply) in seconds: ``--quick`` keeps the whole measurement under a second."""
    return (QUICK_PEAK_BUDGET_S, QUICK_PEAK_MULTIPLY_LIMIT_S) if quick else (PEAK_BUDGET_S, PEAK_MULTIPLY_LIMIT_S)


def refresh_peaks(
    peaks: dict[str, float], device: torch.device, names: Iterable[str], quick: bool = False,
) -> dict[str, float]:
    """Measure the matmul peaks of ``names`` (keys of ``PEAK_DTYPES``) again; keep the higher of old and new.

    Callers name only the dtypes their sides' utilisation is measured against, so that ``--no-bf16``
    measures no bf16 peak. main() measures before and after each group, so a burst of other load
    at the start does not shrink the peak (which would inflate utilisation).
    """
    for name in names:
        if name not in PEAK_DTYPES:
            raise ValueError(f"peak dtype {name!r}: expected one of {', '.join(PEAK_DTYPES)}")
        budget, limit = peak_limits(quick)
        result = timed_matmul_peak(device, PEAK_DTYPES[name], budget_s=budget, multiply_limit_s=limit)
        logger.info(
            "matmul peak %s: %.1f GFLOP/s at n=%d (sizes %s, %.1f s)",
            name, result.flops_per_second / 1e9, result.size, "/".join(map(str, result.sizes)), result.seconds,
        )
        if result.flops_per_second > peaks.get(name, 0.0):
            peaks[name] = result.flops_per_second
            if isinstance(peaks, MatmulPeaks):
                peaks.sizes[name] = result.size
    return peaks


def cpu_has_bf16_units(flags: set[str] | None = None, machine: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 in hardware; None where that cannot be told.

    x86: ``avx512_bf16`` or ``amx_bf16``; Arm: ``bf16``/``svebf16``. Without them torch converts
    bf16 to fp32 in software, often slower than fp32 itself. ``flags``/``machine`` are for tests.
    """
    machine = (machine or platform.machine()).lower()
    if flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
        if not match:
            return None
        flags = set(match.group(1).split())
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if machine in ("aarch64", "arm64"):
        return bool(flags & {"bf16", "svebf16"})
    return None


def peak_names(pairs: set[str], no_bf16: bool) -> list[str]:
    """The peaks main()'s selected sides are measured against: fp32 (LoRA and ReFT sides), bf16 (bf16 LoRA sides)."""
    names = ["fp32"] if pairs & {"lora", "reft"} else []
    return names + (["bf16"] if "lora" in pairs and not no_bf16 else [])


def peak_summary(peaks: dict[str, float], device: torch.device, bf16_units: bool | None, quick: bool = False) -> str:
    """The report's line on the matmul peaks: each figure with its matrix size, and what was not measured."""
    if not peaks:
        return "- plain square matmul peak: not measured (no training pair selected)"
    sizes = peaks.sizes if isinstance(peaks, MatmulPeaks) else {}
    parts = []
    for name, value in peaks.items():
        size = f" at {sizes[name]}×{sizes[name]}" if name in sizes else ""
        note = ""
        if name == "bf16" and device.type == "cpu" and bf16_units is False:
            note = " (emulated: this CPU has no bf16 units such as avx512_bf16/amx_bf16; bf16 runs in software)"
        parts.append(f"{name} {value / 1e9:,.0f} GFLOP/s{size}{note}")
    skipped = [name for name in PEAK_DTYPES if name not in peaks]
    tail = f"; {', '.join(skipped)} not measured (no side uses it)" if skipped else ""
    budget, limit = peak_limits(quick)
    return (
        f"- plain square matmul peak (sizes grown from {PEAK_START_SIZE} while one multiply takes under {limit:g} s, "
        f"about {budget:g} s per dtype at most; measured before and after each group, best kept): "
        + ", ".join(parts) + tail
    )


# --------------------------------------------------------------------------- batches


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


# --------------------------------------------------------------------------- sides


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


# --------------------------------------------------------------------------- building sides


@dataclass
class BenchOptions:
    """Everything a side builder needs; picklable (memory subprocesses rebuild from it)."""

    model: str = "embedded"
    device: str = "cpu"
    dtype: str = "float32"  # base weights
    seed: int = 42
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 2e-4
    reft_rank: int = 4
    reft_layers: str = "8,16,24"
    reft_positions: str = "l1"
    reft_lr: float = 2e-3
    bf16_autocast_ref: bool = False  # GPU: the reference recipes train under bf16 autocast too
    tiny_config: dict[str, Any] | None = None  # gpu_check: build a random model from this LlamaConfig

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def load_base(opts: BenchOptions, *, ours: bool) -> Any:
    """A frozen base model: heft_core's loader for our side, plain transformers for the references."""
    if opts.tiny_config is not None:  # a random Llama of the given shape, built in place (gpu_check)
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(opts.seed)
        with torch.device(opts.torch_device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**opts.tiny_config), dtype=opts.torch_dtype)
        model.eval().requires_grad_(False)
        model.config.use_cache = False
        return model
    if ours:
        from heft_core.models import load_model

        return load_model(opts.model, dtype=opts.torch_dtype, device=opts.torch_device)
    from transformers import AutoModelForCausalLM

    from heft_core.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(opts.model), dtype=opts.torch_dtype).to(opts.torch_device)
    model.config.use_cache = False  # as in ours: no KV cache while training
    return model


def model_shape(model: Any) -> tuple[int, int]:
    return model.config.num_hidden_layers, model.config.hidden_size


def bf16_autocast(device: torch.device) -> Callable[[], Any]:
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


def lora_settings(opts: BenchOptions) -> Any:
    from heft_core.config import LoraSettings

    return LoraSettings(rank=opts.lora_rank, alpha=opts.lora_alpha, dropout=0.0, target_modules=["all-linear"])


def reft_settings(opts: BenchOptions) -> Any:
    from heft_core.config import ReftSettings

    return ReftSettings(rank=opts.reft_rank, layers=opts.reft_layers, positions=opts.reft_positions, dropout=0.0, share_weights=True)


REFT_OURS_KINDS = ("reft-ours", "reft-ours-full", "reft-ours-cached", "heft2-ours")


def build_side(kind: str, opts: BenchOptions, workload: Workload, max_steps: int) -> Side:
    """Build one side from scratch. Kinds: lora-ours, lora-ours-bf16, lora-ours-compiled, lora-ref, lora-ref-bf16, reft-ref and ``REFT_OURS_KINDS``."""
    from heft_core.adapters import PlainAnswerModel, ReftAnswerModel, build_lora_model

    device = opts.torch_device
    gpu_autocast = bf16_autocast(device) if opts.bf16_autocast_ref else None
    # The bf16 sides keep fp32 base weights and train under bf16 autocast: heft_core's precision
    # "bf16" does that on CPUs (see heft_core.train.resolve_precision), and so does the Trainer's
    # bf16=True (mixed precision over the model as loaded).
    bf16_side = kind.endswith("-bf16")
    if kind in ("lora-ours", "lora-ours-bf16", "lora-ours-compiled"):
        base = load_base(opts, ours=True)
        torch.manual_seed(opts.seed)
        model = build_lora_model(base, lora_settings(opts), model_shape(base)[0])
        autocast = bf16_autocast(device) if bf16_side or opts.bf16_autocast_ref else None
        if kind == "lora-ours-compiled":  # a probe, not heft_core's path: see --compile-probe
            for layer in model.get_base_model().model.layers:
                layer.forward = torch.compile(layer.forward, dynamic=True)
        return OursSide(kind, PlainAnswerModel(model), workload.ours(device), yes_id=workload.yes_id, no_id=workload.no_id, lr=opts.lora_lr, autocast=autocast)
    if kind in ("lora-ref", "lora-ref-bf16"):
        from peft import LoraConfig, get_peft_model

        base = load_base(opts, ours=False)
        torch.manual_seed(opts.seed)
        config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, config)  # peft keeps LoRA weights in fp32 over a bf16 base
        # CPU batches, as a user's dataset gives them: the Trainer pins and moves them itself.
        return TrainerSide(kind, model, workload.reference(torch.device("cpu")), lr=opts.lora_lr, max_steps=max_steps, device=device, bf16=bf16_side or opts.bf16_autocast_ref, seed=opts.seed)
    if kind in REFT_OURS_KINDS:
        from heft_core.prefix_cache import PrefixStateCache

        base = load_base(opts, ours=True)
        layers, hidden = model_shape(base)
        host = base
        if kind == "heft2-ours":  # HEFT stage 2: ReFT on the frozen stage-1 LoRA model
            torch.manual_seed(opts.seed)
            host = build_lora_model(base, lora_settings(opts), layers)
            host.requires_grad_(False)
            host.eval()
        torch.manual_seed(opts.seed)
        cached = kind == "reft-ours-cached"
        answer_model = ReftAnswerModel(
            host, reft_settings(opts), layers, hidden,
            prefix_cache=PrefixStateCache(2**40 if cached else 0), reuse_prefix=kind != "reft-ours-full",
        )
        batches = workload.ours(device)
        if cached:  # a later epoch: the first one kept every prompt's prefix states
            with torch.no_grad(), (gpu_autocast or nullcontext)():
                for batch in batches:
                    answer_model.answer_logits(batch)
        return OursSide(kind, answer_model, batches, yes_id=workload.yes_id, no_id=workload.no_id, lr=opts.reft_lr, autocast=gpu_autocast)
    if kind == "reft-ref":
        import pyreft

        base = load_base(opts, ours=False)
        layers, hidden = model_shape(base)
        chosen = reft_settings(opts).resolved_layers(layers)
        torch.manual_seed(opts.seed)
        iv_dtype = torch.bfloat16 if opts.bf16_autocast_ref else base.dtype  # pyreft's default dtype is bf16
        representations = [{
            "layer": layer, "component": "block_output", "low_rank_dimension": opts.reft_rank,
            "intervention": pyreft.LoreftIntervention(embed_dim=hidden, low_rank_dimension=opts.reft_rank, dtype=iv_dtype),
        } for layer in chosen]
        reft_model = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=representations))
        for iv in reft_model.interventions.values():
            iv.to(device)
        batches = workload.reference(device, positions=opts.reft_positions, num_interventions=len(chosen))
        return PyreftSide(kind, reft_model, batches, lr=opts.reft_lr, autocast=gpu_autocast)
    raise ValueError(f"unknown side kind {kind!r}")


def _interventions(side: Side) -> list[torch.nn.Module] | None:
    model = getattr(side, "model", None)
    if isinstance(side, PyreftSide):
        return list(model.interventions.values())
    if model is not None and hasattr(model, "interventions"):  # ReftAnswerModel
        return list(model.interventions)
    return None


def copy_initial_weights(source: Side, target: Side) -> None:
    """Give ``target`` exactly the adapter weights of ``source`` (same init, for a fair loss check).

    ReFT: intervention states (orthogonal parametrisation included) are copied one by one, cast
    to the target's dtype. LoRA: every ``lora_`` tensor of the peft model.
    """
    with torch.no_grad():
        ours, theirs = _interventions(source), _interventions(target)
        if ours is not None and theirs is not None:
            if len(ours) != len(theirs):
                raise RuntimeError(f"{len(ours)} vs {len(theirs)} interventions")
            for a, b in zip(ours, theirs):
                dtype = next(b.parameters()).dtype
                state = {k: v.to(dtype) for k, v in torch.nn.Module.state_dict(a).items()}
                torch.nn.Module.load_state_dict(b, state)
            return
        lora = {k: v for k, v in source.model.module.state_dict().items() if "lora_" in k}
        destination = target.trainer.model if isinstance(target, TrainerSide) else target.model.module
        missing = set(lora) - set(destination.state_dict())
        if not lora or missing:
            raise RuntimeError(f"LoRA weights do not line up between {source.name} and {target.name}: {sorted(missing)[:3]}")
        destination.load_state_dict(lora, strict=False)


# --------------------------------------------------------------------------- alternation


@dataclass
class SideTiming:
    name: str
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_flops: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0  # untimed in the ratios; includes compiling for a compiled side
    peak_device_bytes: int | None = None  # CUDA only: max allocated during this side's chunks
    device_increment_bytes: int | None = None  # CUDA only: that peak minus what was allocated before the chunk

    @property
    def tokens_per_second(self) -> list[float]:
        return [t / s for t, s in zip(self.chunk_tokens, self.chunk_seconds)]

    @property
    def flops_per_second(self) -> list[float]:
        return [f / s for f, s in zip(self.chunk_flops, self.chunk_seconds)]


def alternate(sides: Sequence[Side], *, warmup: int, steps: int, repeats: int, device: torch.device, tokens: Sequence[int], flops: dict[str, Sequence[float]]) -> dict[str, SideTiming]:
    """Warm up every side, then ``repeats`` rounds of ``steps`` steps per side, order rotating."""
    timings = {side.name: SideTiming(side.name) for side in sides}
    for side in sides:
        logger.info("warmup %s (%d steps)", side.name, warmup)
        start = time.perf_counter()
        side.run(warmup)
        synchronize(device)
        timings[side.name].warmup_seconds = time.perf_counter() - start
    for round_index in range(repeats):
        order = list(sides[round_index % len(sides):]) + list(sides[: round_index % len(sides)])
        for side in order:
            first = side.position
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            side.run(steps)
            synchronize(device)
            seconds = time.perf_counter() - start
            timing = timings[side.name]
            timing.chunk_seconds.append(seconds)
            timing.chunk_tokens.append(sum(tokens[i % len(tokens)] for i in range(first, first + steps)))
            timing.chunk_flops.append(sum(flops[side.name][i % len(tokens)] for i in range(first, first + steps)))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                timing.peak_device_bytes = max(timing.peak_device_bytes or 0, peak)
                timing.device_increment_bytes = max(timing.device_increment_bytes or 0, peak - resident)
            logger.info("round %d %s: %d steps in %.2f s (loss %.4f)", round_index + 1, side.name, steps, seconds, side.losses[-1])
    for side in sides:
        timings[side.name].losses = list(side.losses)
    return timings


def copy_from_first(sides: Sequence[Side]) -> None:
    """Every side starts from the first side's adapter weights."""
    for index in range(1, len(sides)):
        copy_initial_weights(sides[0], sides[index])


def close_all(sides: list[Side]) -> None:
    """Close every side and drop the references, so their models can be freed."""
    while sides:
        sides.pop().close()


def paired_ratios(a: SideTiming, b: SideTiming) -> list[float]:
    """Per-round speed ratio a/b (tokens per second; same tokens per chunk on both sides)."""
    return [ta / tb for ta, tb in zip(a.tokens_per_second, b.tokens_per_second)]


# --------------------------------------------------------------------------- FLOPs


def step_flops(
    config: Any, batch_shape: tuple[int, int], *, logit_positions: int, lowest_trainable_layer: int, train: bool = True,
    forward_tokens: int | None = None, backward_tokens: int | None = None,
) -> float:
    """Executed model FLOPs of one step (multiply-add = 2 FLOPs), on padded shapes.

    forward  = 2 * P_layers * B*T            (every linear layer of every decoder layer)
             + 4 * L * B * T^2 * d           (attention scores and weighted sum, full square)
             + 2 * d * V * logit_positions   (vocabulary head; 1 per row for heft_core, B*T for full logits)
    backward = input gradients only (the base weights are frozen; adapter weight gradients are
               negligible): 1x the forward of each linear layer, 2x the attention matmuls, 1x
               the head, and only for decoder layers above ``lowest_trainable_layer`` (nothing
               below the lowest LoRA/intervention needs a gradient). LoRA adapters in every
               layer: lowest_trainable_layer = -1 (all layers, counting the layer holding it).
    ``forward_tokens`` / ``backward_tokens``: when only the last tokens of each row run (ReFT with a
    reused prefix), linear FLOPs count those tokens and attention counts them as queries over
    the whole width.
    Embedding lookups, norms, activations and the adapters' own FLOPs are not counted.
    """
    batch, width = batch_shape
    layers = config.num_hidden_layers
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ff = config.intermediate_size
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * ff
    def linear(queries: int) -> float:
        return 2 * per_layer * batch * queries

    def attention(queries: int) -> float:
        return 4 * batch * queries * width * heads * head_dim

    head = 2 * d * config.vocab_size * logit_positions
    fwd_tokens = forward_tokens or width
    forward = layers * (linear(fwd_tokens) + attention(fwd_tokens)) + head
    if not train:
        return float(forward)
    if lowest_trainable_layer < 0:
        backward_layers = layers
    else:
        backward_layers = layers - 1 - lowest_trainable_layer
    bwd_tokens = backward_tokens or width
    backward = backward_layers * (linear(bwd_tokens) + 2 * attention(bwd_tokens)) + head
    return float(forward + backward)


def side_flops(kind: str, config: Any, workload: Workload, opts: BenchOptions) -> list[float]:
    """FLOPs per batch for a side kind, from the shapes that side really runs."""
    layers_all = config.num_hidden_layers
    reft = reft_settings(opts)
    reft_lowest = min(reft.resolved_layers(layers_all))
    first, last = reft.first_last
    suffix = last if not first else 0  # tokens that run with interventions when the prefix is reused
    out = []
    for chunk in workload.chunks:
        batch = len(chunk)
        width = max(len(e.input_ids) for e in chunk)
        if kind.startswith("lora-ours"):
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=-1))
        elif kind in ("lora-ref", "lora-ref-bf16"):
            out.append(step_flops(config, (batch, width + 1), logit_positions=batch * (width + 1), lowest_trainable_layer=-1))
        elif kind in ("reft-ours-full", "heft2-ours") or (kind == "reft-ours" and not suffix):
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest))
        elif kind == "reft-ours":  # prefix without autograd, then the last positions with it
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest, backward_tokens=suffix))
        elif kind == "reft-ours-cached":  # only the last positions run at all
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest, backward_tokens=suffix, forward_tokens=suffix))
        elif kind == "reft-ref":
            out.append(step_flops(config, (batch, width + 1), logit_positions=batch * (width + 1), lowest_trainable_layer=reft_lowest))
        else:
            raise ValueError(kind)
    return out


# --------------------------------------------------------------------------- memory (subprocesses)


def _proc_status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux) in bytes, or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _side_modules(side: Side) -> list[torch.nn.Module]:
    if isinstance(side, TrainerSide):
        return [side.trainer.model]
    model = side.model
    return [m for m in (getattr(model, "module", None), getattr(model, "model", None), model) if isinstance(m, torch.nn.Module)]


def _make_weights_anonymous(side: Side) -> None:
    """Copy memory-mapped weights into ordinary memory.

    safetensors weights can stay file-backed (mmap); the kernel may drop such pages under
    memory pressure mid-run, which lowers RSS by up to the model's size and makes the peak
    depend on other processes. Copied weights count in RSS for every side alike.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in _side_modules(side):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if id(tensor) not in seen and tensor.device.type == "cpu":
                    seen.add(id(tensor))
                    tensor.data = tensor.data.clone()


def _memory_child(kind: str, opts: BenchOptions, workload: Workload, steps: int, threads: int) -> dict[str, float]:
    """In a fresh spawn process: build one side, reset the RSS high-water mark, train, read it.

    ``ru_maxrss`` is not used: Linux carries the RSS of the forked pre-exec copy of the parent
    into a spawned child's ``ru_maxrss``. /proc/self/status ``VmHWM`` belongs to the child's own
    address space; writing 5 to /proc/self/clear_refs resets it to the current RSS.
    """
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    side = build_side(kind, opts, workload, max_steps=steps)
    _make_weights_anonymous(side)
    build_peak = _proc_status_bytes("VmHWM")
    if build_peak is None or not _reset_peak_rss():  # not Linux: fall back to ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        side.run(steps)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        side.close()
        return {"baseline_bytes": before, "peak_bytes": after, "method": "ru_maxrss"}
    baseline = _proc_status_bytes("VmRSS") or 0
    side.run(steps)
    train_peak = _proc_status_bytes("VmHWM") or 0
    side.close()
    return {"baseline_bytes": baseline, "peak_bytes": max(train_peak, baseline), "build_peak_bytes": build_peak, "method": "VmHWM"}


def measure_memory(kinds: Sequence[str], opts: BenchOptions, workload: Workload, *, steps: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    """Each side alone in its own spawn subprocess, in the order A, B, (C,) A, B, ..."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    context = multiprocessing.get_context("spawn")
    for repeat in range(repeats):
        for kind in kinds:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    result = pool.submit(_memory_child, kind, opts, workload, steps, torch.get_num_threads()).result()
                except Exception as exc:  # keep going: a failed side is reported, not fatal
                    logger.warning("memory run of %s failed: %r", kind, exc)
                    continue
            results[kind].append(result)
            logger.info("memory %s run %d: peak %.0f MiB, training increment %.0f MiB", kind, repeat + 1, result["peak_bytes"] / 2**20, (result["peak_bytes"] - result["baseline_bytes"]) / 2**20)
    return results


# --------------------------------------------------------------------------- evaluation pair


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


# --------------------------------------------------------------------------- report


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_range(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    return f"{median(values):.{digits}f} (range {min(values):.{digits}f}–{max(values):.{digits}f}, n={len(values)})"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def training_table(title: str, timings: dict[str, SideTiming], reference: str, memory: dict[str, list[dict[str, float]]] | None, peaks: dict[str, float], peak_of: dict[str, str], descriptions: dict[str, str]) -> list[str]:
    """Markdown section for one group of training sides compared against ``reference``."""
    lines = [f"### {title}", ""]
    ref = timings[reference]
    on_gpu = ref.peak_device_bytes is not None
    peak_label = "peak GPU allocated MiB" if on_gpu else "peak RSS MiB"
    lines.append(f"| side | recipe | tokens/s (median) | speed ratio vs reference (median of paired rounds) | {peak_label} | training increment MiB | memory ratio (increment) | loss first → last step | achieved GFLOP/s | utilisation |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    mem_ref = _memory_summary(memory, reference) if memory else None
    for name, timing in timings.items():
        ratio = "1 (reference)" if name == reference else fmt_range(paired_ratios(timing, ref))
        mem = _memory_summary(memory, name) if memory else None
        mem_ratio = "n/a"
        if mem and mem_ref and mem_ref[1] > 0:
            mem_ratio = f"{mem[1] / mem_ref[1]:.2f}"
        if timing.peak_device_bytes is not None:  # GPU: in-process max_memory_allocated
            peak_col, inc_col = mib(timing.peak_device_bytes) + " (all resident models)", mib(timing.device_increment_bytes)
            ref_inc = ref.device_increment_bytes
            mem_ratio = f"{timing.device_increment_bytes / ref_inc:.2f}" if ref_inc else "n/a"
        else:
            peak_col = mib(mem[0]) if mem else "n/a"
            inc_col = mib(mem[1]) if mem else "n/a"
        flops = median(timing.flops_per_second)
        peak = peaks.get(peak_of.get(name, "fp32"))
        util = f"{flops / peak:.1%} of {peak_of.get(name, 'fp32')} peak" if peak else "n/a"
        losses = timing.losses
        loss_col = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "n/a"
        lines.append(f"| {name} | {descriptions.get(name, '')} | {median(timing.tokens_per_second):,.0f} | {ratio} | {peak_col} | {inc_col} | {mem_ratio} | {loss_col} | {flops / 1e9:,.1f} | {util} |")
    lines.append("")
    names = list(timings)
    if len(names) >= 2:
        final = {n: timings[n].losses[-1] for n in names if timings[n].losses}
        if final:
            spread = max(final.values()) - min(final.values())
            lines.append(f"Final loss after {len(ref.losses)} steps from the same initial weights: " + ", ".join(f"{n} {v:.5f}" for n, v in final.items()) + f" (spread {spread:.2e}).")
            lines.append("")
    return lines


def _memory_summary(memory: dict[str, list[dict[str, float]]] | None, name: str) -> tuple[float, float] | None:
    runs = (memory or {}).get(name) or []
    if not runs:
        return None
    return median([r["peak_bytes"] for r in runs]), median([r["peak_bytes"] - r["baseline_bytes"] for r in runs])


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument(
        "--data", default=None,
        help="data source (default: the local BoolQ directory, $HEFT_BOOLQ_DIR or ../shared/data/boolq, if present, "
        "else 'synthetic')",
    )
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side per round (small = fine alternation, robust to other load)")
    parser.add_argument("--repeats", type=int, default=8, help="rounds of alternation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the first round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passage-tokens", type=int, default=200, help="passages are cut to this many tokens; question and answer cue stay whole")
    parser.add_argument("--max-length", type=int, default=None, help="hard cap on the whole prompt (default: passage tokens + question + template)")
    parser.add_argument("--eval-questions", type=int, default=64)
    parser.add_argument("--eval-repeats", type=int, default=3, help="rounds of the evaluation pair")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation length of the reference evaluator (pyreft's BoolQ setting: 32)")
    parser.add_argument("--memory-repeats", type=int, default=2, help="subprocess runs per side (A,B,A,B); 0 skips memory")
    parser.add_argument("--memory-steps", type=int, default=2, help="optimizer steps in each memory subprocess")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--reft-rank", type=int, default=4)
    parser.add_argument("--reft-lr", type=float, default=2e-3)
    parser.add_argument("--reft-configs", default="8,16,24:l1", help="';'-separated layers:positions pairs for the ReFT pair, e.g. '8,16,24:l1;all:f7+l7'")
    parser.add_argument("--pairs", default="lora,reft,eval", help="which pairs to run (lora includes the bf16 precision side)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast sides and their bf16 matmul peak")
    parser.add_argument("--profile", default=None, metavar="KIND", help="print torch.profiler's table for one training step of a side (e.g. lora-ours, lora-ref, reft-ours) and exit")
    parser.add_argument("--compile-probe", action="store_true", help="add a LoRA side whose decoder layers run under torch.compile (measures that idea; heft_core does not compile)")
    parser.add_argument("--heft2", action="store_true", help="add heft_core's HEFT stage 2 (ReFT on a frozen LoRA model) to the ReFT group")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--out", default=None, help="report path (default: bench/results/throughput-<date>-cpu.md)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 1, 2, 1
        args.batch_size = min(args.batch_size, 2)
        args.passage_tokens = min(args.passage_tokens, 24)
        args.eval_questions = min(args.eval_questions, 4)
        args.memory_repeats = min(args.memory_repeats, 1)
        args.memory_steps = 1
        args.eval_repeats = min(args.eval_repeats, 2)
    if args.data is None:
        boolq = local_boolq_dir()
        args.data = str(boolq) if boolq else "synthetic"
    return args


def lora_kinds(args: argparse.Namespace, memory: bool = False) -> list[str]:
    kinds = ["lora-ours", "lora-ref"] + ([] if args.no_bf16 else ["lora-ours-bf16", "lora-ref-bf16"])
    return kinds + (["lora-ours-compiled"] if args.compile_probe and not memory else [])


def reft_kinds(heft2: bool) -> list[str]:
    return ["reft-ours", "reft-ref", "reft-ours-full", "reft-ours-cached"] + (["heft2-ours"] if heft2 else [])


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so later subprocesses have room."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_lora_group(args: argparse.Namespace, opts: BenchOptions, workload: Workload, config: Any, peaks: dict[str, float], peak_name: str = "fp32", memory: dict[str, list[dict[str, float]]] | None = None) -> list[str]:
    """LoRA: heft_core vs the Trainer recipe, plus (unless ``args.no_bf16``) heft_core under bf16 autocast."""
    kinds = lora_kinds(args)
    total = args.warmup + args.steps * args.repeats
    sides = []
    try:
        for kind in kinds:
            logger.info("building %s", kind)
            sides.append(build_side(kind, opts, workload, max_steps=total))
        copy_from_first(sides)
        flops = {kind: side_flops(kind, config, workload, opts) for kind in kinds}
        timings = alternate(sides, warmup=args.warmup, steps=args.steps, repeats=args.repeats, device=opts.torch_device, tokens=workload.real_tokens, flops=flops)
    finally:
        close_all(sides)
    release_memory()
    refresh_peaks(peaks, opts.torch_device, dict.fromkeys([peak_name] + ([] if args.no_bf16 else ["bf16"])), args.quick)
    precision = "bf16 autocast" if opts.bf16_autocast_ref else "fp32"
    descriptions = {
        "lora-ours": f"heft_core: answer-position logits, CE on the answer token, {precision}",
        "lora-ref": f"transformers Trainer + peft LoRA, causal-LM loss over full logits, {precision}",
        "lora-ours-bf16": "heft_core as lora-ours under torch.autocast(bfloat16) (fp32 weights: heft_core's bf16 on CPUs)",
        "lora-ref-bf16": "Trainer as lora-ref with TrainingArguments(bf16=True) (autocast over the fp32 model)",
        "lora-ours-compiled": f"lora-ours with every decoder layer's forward under torch.compile(dynamic=True), {precision}",
    }
    lines = training_table(f"LoRA (rank {opts.lora_rank}, all-linear) — heft_core vs transformers Trainer", {k: timings[k] for k in kinds[:2]}, "lora-ref", memory, peaks, {k: peak_name for k in kinds[:2]}, descriptions)
    if not args.no_bf16:
        lines += training_table("LoRA in bf16 — heft_core vs transformers Trainer, both under bf16 autocast", {k: timings[k] for k in ("lora-ours-bf16", "lora-ref-bf16")}, "lora-ref-bf16", memory, peaks, {"lora-ours-bf16": "bf16", "lora-ref-bf16": "bf16"}, descriptions)
        lines += training_table("Precision — heft_core LoRA bf16 vs fp32 (what the precision setting changes)", {k: timings[k] for k in ("lora-ours-bf16", "lora-ours")}, "lora-ours", memory, peaks, {"lora-ours-bf16": "bf16"}, descriptions)
    if args.compile_probe:
        pair = {k: timings[k] for k in ("lora-ours-compiled", "lora-ours", "lora-ref")}
        lines += training_table("Probe — torch.compile of the decoder layers (not heft_core's path)", pair, "lora-ours", None, peaks, {k: peak_name for k in pair}, descriptions)
        compiled = timings["lora-ours-compiled"]
        lines += [
            f"Untimed warmup ({args.warmup} step(s) per side), compiling included: lora-ours-compiled {compiled.warmup_seconds:.1f} s, "
            f"lora-ours {timings['lora-ours'].warmup_seconds:.1f} s (inductor's cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}). "
            f"Compiled vs the Trainer recipe: {fmt_range(paired_ratios(compiled, timings['lora-ref']))}.",
            "",
        ]
    return lines


def run_reft_group(args: argparse.Namespace, opts: BenchOptions, workload: Workload, config: Any, peaks: dict[str, float], layers: str, positions: str, heft2: bool = False, peak_name: str = "fp32", memory: dict[str, list[dict[str, float]]] | None = None) -> list[str]:
    """ReFT: heft_core vs pyreft (and, with ``heft2``, heft_core's HEFT stage 2 on a frozen LoRA model)."""
    opts = dataclasses.replace(opts, reft_layers=layers, reft_positions=positions)
    kinds = reft_kinds(heft2)
    total = args.warmup + args.steps * args.repeats
    sides = []
    try:
        for kind in kinds:
            logger.info("building %s (layers %s, positions %s)", kind, layers, positions)
            sides.append(build_side(kind, opts, workload, max_steps=total))
        copy_from_first(sides)
        flops = {kind: side_flops(kind, config, workload, opts) for kind in kinds}
        timings = alternate(sides, warmup=args.warmup, steps=args.steps, repeats=args.repeats, device=opts.torch_device, tokens=workload.real_tokens, flops=flops)
    finally:
        close_all(sides)
    release_memory()
    refresh_peaks(peaks, opts.torch_device, [peak_name], args.quick)
    descriptions = {
        "reft-ours": "heft_core ReftAnswerModel: answer-position logits, CE on the answer token; prefix before the first intervened position run without autograd (first epoch)",
        "reft-ours-full": "reft-ours with prefix reuse off: the whole prompt runs with autograd (measures that idea alone)",
        "reft-ours-cached": "reft-ours in a later epoch: prefix keys/values kept from the first epoch, only the intervened positions run",
        "reft-ref": "pyreft get_reft_model + ReftModel(labels=...) as ReftTrainer.compute_loss, full logits",
        "heft2-ours": "heft_core HEFT stage 2: ReftAnswerModel on the frozen LoRA (peft) model",
    }
    title = f"ReFT (LoReFT rank {opts.reft_rank}, layers {layers}, positions {positions}) — heft_core vs pyreft recipe" + (" (+ HEFT stage 2)" if heft2 else "")
    return training_table(title, timings, "reft-ref", memory, peaks, {k: peak_name for k in kinds}, descriptions)


def profile_side(kind: str, opts: BenchOptions, workload: Workload, warmup: int, rows: int = 25) -> str:
    """Where one training step of ``kind`` spends its time: torch.profiler's table by op and shape."""
    from torch.profiler import ProfilerActivity, profile

    side = build_side(kind, opts, workload, max_steps=warmup + 1)
    try:
        side.run(warmup)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.torch_device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            side.run(1)
            synchronize(opts.torch_device)
        index = warmup % len(workload.chunks)
        chunk = workload.chunks[index]
        title = f"{kind}: one step on batch {index} ({len(chunk)} rows, padded width {max(len(e.input_ids) for e in chunk)})"
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=60)
        return f"{title}\n{table}"
    finally:
        side.close()


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from heft_core.models import load_model, load_tokenizer, model_info

    started = time.perf_counter()
    load_start = load_average()
    device = torch.device("cpu")
    opts = BenchOptions(model=args.model, seed=args.seed, lora_rank=args.lora_rank, lora_lr=args.lora_lr, reft_rank=args.reft_rank, reft_lr=args.reft_lr)
    info = model_info(args.model)
    tokenizer = load_tokenizer(args.model)
    num_batches = args.warmup + args.steps * args.repeats
    workload = build_workload(args.data, tokenizer, batch_size=args.batch_size, num_batches=num_batches, passage_tokens=args.passage_tokens, max_length=args.max_length, seed=args.seed)
    if args.profile:
        report = profile_side(args.profile, opts, workload, max(1, args.warmup))
        print(report)
        return report
    from transformers import AutoConfig

    from heft_core.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    pairs = {p.strip() for p in args.pairs.split(",") if p.strip()}
    bf16_units = cpu_has_bf16_units()
    if "lora" in pairs and not args.no_bf16 and bf16_units is False:
        logger.warning("this CPU has no bf16 units (avx512_bf16/amx_bf16): the bf16 sides run emulated; --no-bf16 skips them")
    logger.info("measuring matmul peaks")
    peaks = refresh_peaks(MatmulPeaks(), device, peak_names(pairs, args.no_bf16), args.quick)

    sections: list[str] = []
    failures: list[str] = []
    reft_specs = []
    for spec in [s for s in args.reft_configs.split(";") if s.strip()]:
        layers, _, positions = spec.partition(":")
        reft_specs.append((spec, layers.strip() or "8,16,24", positions.strip() or "l1"))

    # Memory first, while this process is still small: the subprocesses then have the RAM.
    memory: dict[str, dict[str, list[dict[str, float]]]] = {}
    if args.memory_repeats:
        if "lora" in pairs:
            memory["lora"] = measure_memory(lora_kinds(args, memory=True), opts, workload, steps=args.memory_steps, repeats=args.memory_repeats)
        if "reft" in pairs:
            for spec, layers, positions in reft_specs:
                spec_opts = dataclasses.replace(opts, reft_layers=layers, reft_positions=positions)
                memory[spec] = measure_memory(reft_kinds(args.heft2), spec_opts, workload, steps=args.memory_steps, repeats=args.memory_repeats)

    if "lora" in pairs:
        try:
            sections += run_lora_group(args, opts, workload, config, peaks, memory=memory.get("lora"))
        except Exception as exc:  # report and continue with the other pairs
            logger.exception("LoRA group failed")
            failures.append(f"LoRA group: {exc!r}")
    if "reft" in pairs:
        for spec, layers, positions in reft_specs:
            try:
                sections += run_reft_group(args, opts, workload, config, peaks, layers, positions, heft2=args.heft2, memory=memory.get(spec))
            except Exception as exc:
                logger.exception("ReFT group %s failed", spec)
                failures.append(f"ReFT group {spec}: {exc!r}")
    if "eval" in pairs:
        try:
            eval_load = build_workload(args.data, tokenizer, batch_size=args.batch_size, num_batches=max(1, -(-args.eval_questions // args.batch_size)), passage_tokens=args.passage_tokens, max_length=args.max_length, seed=args.seed, split="validation")
            examples = [e for chunk in eval_load.chunks for e in chunk][: args.eval_questions]
            model = load_model(args.model, dtype=torch.float32, device=device)
            result = eval_pair(model, tokenizer, examples, yes_id=workload.yes_id, no_id=workload.no_id, pad_id=workload.pad_id, batch_size=args.batch_size, device=device, repeats=args.eval_repeats, max_new_tokens=args.max_new_tokens)
            sections += eval_table(result)
            del model
            release_memory()
            first_spec = reft_specs[0] if reft_specs else ("8,16,24:l1", "8,16,24", "l1")
            reft_opts = dataclasses.replace(opts, reft_layers=first_spec[1], reft_positions=first_spec[2])
            sections += eval_table(reft_eval_group(reft_opts, tokenizer, examples, yes_id=workload.yes_id, no_id=workload.no_id, pad_id=workload.pad_id, batch_size=args.batch_size, device=device, repeats=args.eval_repeats, max_new_tokens=args.max_new_tokens))
        except Exception as exc:
            logger.exception("evaluation pair failed")
            failures.append(f"evaluation pair: {exc!r}")

    tokens = workload.real_tokens
    widths = [max(len(e.input_ids) for e in c) for c in workload.chunks]
    header = [
        f"# HEFT Studio throughput benchmark (CPU) — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], '-m', 'bench.throughput', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine_description(device).items()],
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_average()} — other processes shared the CPU; only ratios are meaningful",
        peak_summary(peaks, device, bf16_units, args.quick),
        "",
        "## Settings",
        "",
        f"- model: {args.model} ({info.model_type}, {info.num_layers} layers, hidden {info.hidden_size}, vocab {config.vocab_size})",
        f"- data: {workload.label}; {len(workload.chunks)} batches of {args.batch_size}, built once and shared by every side; passages cut to {args.passage_tokens} tokens"
        + (f", prompts capped at {args.max_length}" if args.max_length else ""),
        f"- real prompt tokens per batch: median {median(tokens):.0f} (padded width median {median(widths):.0f}); tokens/s counts real prompt tokens, identical for both sides",
        f"- timing: {args.warmup} warmup step(s) per side, then {args.repeats} rounds × {args.steps} step(s) per side on the same batches, order rotating each round; ratio = median over rounds of (side tokens/s ÷ reference tokens/s in the same round); evaluation alternates batch by batch",
        f"- optimizer (all sides): AdamW, constant lr (LoRA {args.lora_lr:g}, ReFT {args.reft_lr:g}), no warmup, weight decay 0, grad-norm clip {MAX_GRAD_NORM}; adapter dropout 0 so that losses are comparable; same initial adapter weights (copied)",
        f"- memory: each side alone in a fresh spawn subprocess ({args.memory_repeats} run(s) per side, alternating, {args.memory_steps} step(s) each); weights copied out of their memory map, then the RSS high-water mark is reset (/proc/self/clear_refs); peak RSS = VmHWM during training (weights included); training increment = that peak − RSS before the first step",
        "- FLOPs (see `step_flops`): forward 2·P_layers·B·T + 4·L·B·T²·d + 2·d·V·(logit positions); backward = input gradients only through the layers above the lowest trainable one (1× linear, 2× attention) + head; utilisation = achieved ÷ matmul peak",
        "",
        "## Results",
        "",
    ]
    footer = ["", f"Total benchmark time: {time.perf_counter() - started:.0f} s."]
    if failures:
        footer += ["", "## Failures", "", *[f"- {f}" for f in failures]]
    report = "\n".join(header + sections + footer) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"throughput-{dt.date.today().isoformat()}-cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    logger.info("report written to %s", out)
    return report


def eval_table(result: dict[str, Any]) -> list[str]:
    n = result["n"]
    reference = result["reference"]
    lines = [f"### Evaluation — heft_core scoring vs generation ({n} validation questions, {result['title']})", ""]
    lines.append("| side | questions/s (median) | speed ratio vs generation (median of paired rounds) | accuracy |")
    lines.append("|---|---|---|---|")
    for name, seconds in result["seconds"].items():
        qps = [n / s for s in seconds]
        ratio = "1 (reference)" if name == reference else fmt_range(result["ratios"][name])
        lines.append(f"| {name} | {median(qps):,.2f} | {ratio} | {result['accuracy'][name]:.1%} |")
    lines += ["", (
        f"Generation as pyreft's example evaluator does it for BoolQ: greedy, max_new_tokens={result['max_new_tokens']}, stopping when every row has "
        "produced EOS, KV cache on; the answer is the first whole word 'yes'/'no' in the lower-cased text (neither counts as wrong). "
        "heft_core compares the ' yes' and ' no' logits at the answer position."
    ), ""]
    return lines


if __name__ == "__main__":
    main()
