"""This machine's measured speed for a model at a run's shapes: a few seconds of real work, cached.

A calibration loads the model, tokenises the run's data (the real token counts, not every row at
``max_length``), and times a warm-up step and a few optimizer steps of each training kind the run
needs (LoRA; ReFT on the base; ReFT on a LoRA model for HEFT's second stage) on length-grouped
batches picked across the data's length range, then a few evaluation batches. The rates are kept in
``<data home>/calibration.json``, keyed by this machine (CPU model and flags, GPU, threads), the
model and the shapes, so the second call reads the file instead of measuring again.

Importing this module does not import torch; ``calibrate`` and ``token_counts`` do.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from heft_common.home import data_home

logger = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
NO_CALIBRATION_ENV = "HEFT_NO_CALIBRATION"
CACHE_FORMAT = 1
TIMED_STEPS = 2  # per training kind, after one warm-up step
EVAL_BATCHES = 2  # timed, after one warm-up batch
# The training kinds a method's stages need: HEFT's ReFT stage runs on the frozen LoRA model.
KINDS_OF_METHOD = {"base": (), "lora": ("lora",), "reft": ("reft",), "heft": ("lora", "heft2")}
_lock = threading.Lock()


@dataclass(frozen=True)
class TokenCounts:
    """Real (unpadded) prompt tokens of a run's training and evaluation rows."""

    train_rows: int
    train_tokens: int  # one epoch
    eval_rows: int
    eval_tokens: int

    def per_train_row(self) -> float:
        return self.train_tokens / self.train_rows if self.train_rows else 0.0

    def per_eval_row(self) -> float:
        return self.eval_tokens / self.eval_rows if self.eval_rows else 0.0


@dataclass(frozen=True)
class Calibration:
    """Measured rates, in real tokens per second, of one model at one set of shapes on this machine."""

    machine: str
    model: str
    shapes: str
    train_tokens_per_second: dict[str, float]  # {"lora" | "reft" | "heft2": tokens/s}
    eval_tokens_per_second: float
    load_seconds: float
    parameters: int  # the model's matmul weights (estimates.matmul_parameters): to scale to other models
    seconds: float = 0.0  # how long the calibration took
    load_average: float = 0.0  # the 1-minute load average when it ended: other work slows the rates it measured
    measured_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


# --------------------------------------------------------------------------- keys and the cache


@functools.lru_cache(maxsize=1)
def machine_key() -> str:
    """This machine, as far as speed goes: CPU model, a digest of its flags, threads, and the GPU."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"{model} | flags {digest} | {threads} threads" + "".join(f" | {gpu}" for gpu in _gpu_names())


def _gpu_names() -> list[str]:
    """NVIDIA GPUs as the driver lists them (no torch import: the app reads this at start-up)."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            line = next((x for x in info.read_text().splitlines() if x.startswith("Model:")), "")
        except OSError:
            continue
        names.append(line.split(":", 1)[-1].strip() or "GPU")
    return names


def has_gpu() -> bool:
    """Whether this machine has a GPU to train on (torch asked only when it is imported already)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return bool(_gpu_names())


def running() -> bool:
    """Whether a calibration is being measured now."""
    return _lock.locked()


def model_key(model_ref: str) -> str:
    from heft_core.models import is_embedded

    return "embedded" if is_embedded(model_ref or "") else (model_ref or "").strip()


def shapes_key(config: Any) -> str:
    """The run options a step's cost depends on (not epochs, rates or seeds)."""
    shapes = {
        "lora": [config.lora.rank, list(config.lora.target_modules), list(config.lora.layers or [])],
        "reft": [config.reft.rank, str(config.reft.layers), config.reft.positions, config.reft.share_weights],
        "batch": [config.lora_stage.batch_size, config.reft_stage.batch_size, config.eval_batch_size],
        "max_length": config.max_length, "precision": config.precision,
    }
    return hashlib.sha1(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:12]


def cache_path() -> Path:
    return data_home() / CACHE_FILE


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("calibrations", {}) if data.get("format") == CACHE_FORMAT else {}


def _entry_key(machine: str, model: str, shapes: str) -> str:
    return f"{machine} || {model} || {shapes}"


def cached(config: Any) -> Calibration | None:
    """The stored calibration of ``config``'s model and shapes on this machine, or None."""
    entry = _read_cache().get(_entry_key(machine_key(), model_key(config.model), shapes_key(config)))
    return Calibration.from_dict(entry) if entry else None


def any_cached() -> Calibration | None:
    """The newest calibration of any model on this machine: to scale an estimate by model size."""
    machine = machine_key()
    found = [Calibration.from_dict(e) for e in _read_cache().values() if e.get("machine") == machine]
    return max(found, key=lambda c: c.measured_at) if found else None


def _store(calibration: Calibration) -> None:
    path = cache_path()
    entries = _read_cache()
    entries[_entry_key(calibration.machine, calibration.model, calibration.shapes)] = calibration.to_dict()
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"format": CACHE_FORMAT, "calibrations": entries}, indent=1, sort_keys=True))
    temporary.replace(path)  # atomic: a reader never sees half a file


# --------------------------------------------------------------------------- token counts


@functools.lru_cache(maxsize=32)
def _token_counts(config_json: str) -> TokenCounts:
    from heft_core.config import RunConfig
    from heft_core.train import prepare

    config = RunConfig.from_dict(json.loads(config_json))
    if config.method == "base":  # prepare() skips the training rows of a base run
        config = RunConfig.from_dict({**config.to_dict(), "method": "lora"})
    prepared = prepare(config)
    return TokenCounts(len(prepared.train_encoded), sum(len(e.input_ids) for e in prepared.train_encoded),
                       len(prepared.eval_encoded), sum(len(e.input_ids) for e in prepared.eval_encoded))


def token_counts(config: Any) -> TokenCounts:
    """Real prompt tokens of the run's training and evaluation rows (tokenised once per config)."""
    return _token_counts(json.dumps(config.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------- measuring


def _tokens(group: Any) -> int:
    return sum(len(example.input_ids) for example in group)


def _spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over a list sorted by length (quantiles, not the ends)."""
    if len(items) <= n:
        return list(items)
    return [items[int((i + 0.5) * len(items) / n)] for i in range(n)]


def _time_training(answer_model: Any, batches: list[Any], targets: Any, learning_rate: float,
                   autocast: Any) -> float:
    """Real tokens per second of optimizer steps on ``batches`` (the first one is a warm-up)."""
    import torch
    import torch.nn.functional as F

    params = answer_model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    answer_model.train()
    tokens, seconds = 0, 0.0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        with autocast():
            logits = answer_model.answer_logits(batch)
        loss = F.cross_entropy(logits.float(), targets[batch.labels])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step pays one-time costs (allocations, kernel choice)
            seconds += time.perf_counter() - start
            tokens += batch.num_tokens
    return tokens / seconds if seconds else 0.0


def calibrate(config: Any, kinds: Iterable[str] | None = None, steps: int = TIMED_STEPS,
              eval_batches: int = EVAL_BATCHES, refresh: bool = False) -> Calibration:
    """This machine's rates for ``config``'s model and shapes; the cached ones unless ``refresh``.

    ``kinds`` are the training kinds to time (default: all three); a cached calibration lacking one
    of them is measured again.
    """
    wanted = tuple(kinds) if kinds is not None else ("lora", "reft", "heft2")
    with _lock:  # one calibration at a time: two would slow each other down
        found = None if refresh else cached(config)
        if found is not None and all(kind in found.train_tokens_per_second for kind in wanted):
            return found
        calibration = _measure(config, wanted, steps, eval_batches)
        _store(calibration)
        logger.info("calibrated %s on %s in %.0f s: %s", calibration.model, calibration.machine,
                    calibration.seconds, calibration.train_tokens_per_second)
        return calibration


def _measure(config: Any, kinds: tuple[str, ...], steps: int, eval_batches: int) -> Calibration:
    import random
    from contextlib import nullcontext

    import torch

    from heft_core.adapters import PlainAnswerModel, ReftAnswerModel, build_lora_model
    from heft_core.batching import collate, length_grouped_batches, sorted_batches
    from heft_core.estimates import matmul_parameters, model_shape
    from heft_core.evaluate import predict
    from heft_core.hardware import resolve_precision
    from heft_core.models import load_model
    from heft_core.prefix_cache import PrefixStateCache
    from heft_core.train import prepare

    began = time.perf_counter()
    if config.method == "base":
        from heft_core.config import RunConfig

        config = RunConfig.from_dict({**config.to_dict(), "method": "lora"})
    prepared = prepare(config)
    mixed_precision, dtype = resolve_precision(config.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def autocast() -> Any:
        if mixed_precision in ("bf16", "fp16"):
            return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
        return nullcontext()

    start = time.perf_counter()
    model = load_model(config.model, dtype=dtype, device=device)
    load_seconds = time.perf_counter() - start
    parameters = matmul_parameters(model_shape(config.model))
    info, encoder = prepared.info, prepared.encoder
    targets = torch.tensor([encoder.no_id, encoder.yes_id], device=device)
    pad_id = prepared.tokenizer.pad_token_id

    def batches_for(batch_size: int) -> list[Any]:
        groups = length_grouped_batches(prepared.train_encoded, batch_size, random.Random(0))
        full = [group for group in groups if len(group) == batch_size] or groups
        chosen = _spread(sorted(full, key=_tokens), steps)
        warm_up = chosen[len(chosen) // 2]
        return [collate(group, pad_id).to(device) for group in [warm_up, *chosen]]

    rates: dict[str, float] = {}
    torch.manual_seed(0)
    lora_model = None
    if "lora" in kinds or "heft2" in kinds:
        lora_model = build_lora_model(model, config.lora, info.num_layers)
    if "lora" in kinds:
        rates["lora"] = _time_training(PlainAnswerModel(lora_model), batches_for(config.lora_stage.batch_size),
                                       targets, config.lora_stage.learning_rate, autocast)
    evaluated = PlainAnswerModel(lora_model) if lora_model is not None else PlainAnswerModel(model)
    for kind in ("reft", "heft2"):
        if kind not in kinds:
            continue
        if kind == "heft2":
            lora_model.requires_grad_(False)
            lora_model.eval()
            host = lora_model
        else:
            host = lora_model.get_base_model() if lora_model is not None else model
            if lora_model is not None:
                lora_model.disable_adapter_layers()
        # the first epoch's cost: nothing kept yet (later epochs reuse kept prefix states and are faster)
        reft_model = ReftAnswerModel(host, config.reft, info.num_layers, info.hidden_size,
                                     prefix_cache=PrefixStateCache(0))
        rates[kind] = _time_training(reft_model, batches_for(config.reft_stage.batch_size), targets,
                                     config.reft_stage.learning_rate, autocast)
        if kind == "reft" and lora_model is not None:
            lora_model.enable_adapter_layers()
    groups = list(sorted_batches(prepared.eval_encoded, config.eval_batch_size))
    chosen = _spread(sorted(groups, key=_tokens), eval_batches)
    # no warm-up batch: the training steps above ran the same weights and kernels
    eval_tokens, eval_seconds = 0, 0.0
    for group in chosen:
        start = time.perf_counter()
        predict(evaluated, group, yes_id=encoder.yes_id, no_id=encoder.no_id, pad_id=pad_id,
                batch_size=config.eval_batch_size, device=device, autocast=autocast)
        eval_seconds += time.perf_counter() - start
        eval_tokens += _tokens(group)
    return Calibration(
        machine=machine_key(), model=model_key(config.model), shapes=shapes_key(config),
        train_tokens_per_second=rates, eval_tokens_per_second=eval_tokens / eval_seconds if eval_seconds else 0.0,
        load_seconds=load_seconds, parameters=parameters, seconds=time.perf_counter() - began,
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
    )


def calibrate_in_background(config: Any, kinds: Iterable[str] | None = None) -> threading.Thread | None:
    """Start ``calibrate`` in a daemon thread unless this config is calibrated already (or being), or
    ``HEFT_NO_CALIBRATION`` is set (the test suite: its UI tests must not measure the embedded model)."""
    if os.environ.get(NO_CALIBRATION_ENV) or cached(config) is not None or _lock.locked():
        return None

    def work() -> None:
        try:
            calibrate(config, kinds)
        except Exception:  # an estimate falls back on the model's size; the app goes on
            logger.warning("calibration of %s failed", getattr(config, "model", "?"), exc_info=True)

    thread = threading.Thread(target=work, name="heft-calibration", daemon=True)
    thread.start()
    return thread
