"""What the HEFT Studio pages show, as plain functions: no Gradio, no global state.

The UI (``app.ui``) only wires components to these functions, so everything here is testable
without a browser: the training form as a dict and the ``RunConfig`` it builds, presets that
fill every field, parameter/step estimates, validation messages, and the DataFrames and small
HTML/Markdown snippets behind the tables, charts and cards.
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from heft_core.hardware import cpu_has_native_bf16
from heft_core.config import (
    EMBEDDED_MODEL,
    PRECISIONS,
    SCHEDULERS,
    STAGE2_MODES,
    ConfigError,
    LoraSettings,
    ReftSettings,
    RunConfig,
    StageSettings,
    parse_layers,
    parse_positions,
)

# --------------------------------------------------------------------------- choices

EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded, offline)"
PAPER_MODEL = "meta-llama/Llama-2-7b-hf"
MODEL_CHOICES = [(EMBEDDED_LABEL, EMBEDDED_MODEL), (f"{PAPER_MODEL} (hub, GPU)", PAPER_MODEL)]

DATA_SYNTHETIC = "Synthetic (offline, NOT BoolQ)"
DATA_HUB = "BoolQ from the hub (google/boolq)"
DATA_LOCAL = "Local BoolQ directory"
DATA_UPLOAD = "Upload file"
DATA_KINDS = [DATA_SYNTHETIC, DATA_HUB, DATA_LOCAL, DATA_UPLOAD]
UPLOAD_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

METHOD_LABELS = {
    "lora": "LoRA",
    "reft": "ReFT",
    "heft": "HEFT (LoRA, then ReFT)",
    "all": "Compare all three (one batch)",
}
METHOD_BY_LABEL = {label: code for code, label in METHOD_LABELS.items()}
SHORT_METHOD = {"lora": "LoRA", "reft": "ReFT", "heft": "HEFT", "base": "Base"}

ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("completed", "failed", "cancelled", "interrupted")
STATUS_FILTERS = ["all", *ACTIVE_STATUSES, *TERMINAL_STATUSES]
METHOD_FILTERS = ["all", "lora", "reft", "heft"]

# Known dataset sizes, so estimates work without loading the data.
SYNTHETIC_SIZES = (800, 200)  # heft_core.data.load_data's default synthetic_size
HUB_BOOLQ_SIZES = (9427, 3270)
# CPU throughput of the embedded model measured on 2 cores (forward + backward).
EMBEDDED_CPU_TOKENS_PER_SECOND = 120

# Every field of the training form, in the order the UI passes them. Presets set all of them.
FORM_FIELDS: tuple[str, ...] = (
    "model", "data_kind", "data_local", "method", "include_base", "name",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers",
    "reft_rank", "reft_layers", "reft_positions", "reft_share", "reft_dropout",
    "lora_epochs", "reft_epochs", "lora_lr", "reft_lr", "batch_size", "grad_accum",
    "warmup_ratio", "weight_decay", "scheduler", "max_length", "train_size", "eval_size",
    "seed", "stage2_mode", "precision",
)


def base_runs_supported() -> bool:
    """Whether the run store accepts zero-shot "base" runs (storage.models.METHODS)."""
    from storage.models import METHODS as STORED_METHODS

    return "base" in STORED_METHODS


def default_local_dir() -> str:
    from heft_core.data import local_boolq_dir

    found = local_boolq_dir()
    return str(found) if found else ""


def default_form() -> dict[str, Any]:
    """The form as it opens: RunConfig's own defaults, the embedded model, synthetic data."""
    config = RunConfig()
    return {
        "model": EMBEDDED_MODEL,
        "data_kind": DATA_SYNTHETIC,
        "data_local": default_local_dir(),
        "method": METHOD_LABELS["heft"],
        "include_base": False,
        "name": "",
        "lora_rank": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "lora_targets": list(config.lora.target_modules),
        "lora_layers": "",
        "reft_rank": config.reft.rank,
        "reft_layers": "all",
        "reft_positions": config.reft.positions,
        "reft_share": config.reft.share_weights,
        "reft_dropout": config.reft.dropout,
        "lora_epochs": config.lora_stage.epochs,
        "reft_epochs": config.reft_stage.epochs,
        "lora_lr": config.lora_stage.learning_rate,
        "reft_lr": config.reft_stage.learning_rate,
        "batch_size": config.lora_stage.batch_size,
        "grad_accum": config.lora_stage.grad_accum,
        "warmup_ratio": config.lora_stage.warmup_ratio,
        "weight_decay": config.lora_stage.weight_decay,
        "scheduler": config.lora_stage.scheduler,
        "max_length": config.max_length,
        "train_size": config.train_size or 0,
        "eval_size": config.eval_size or 0,
        "seed": config.seed,
        "stage2_mode": config.heft_stage2_mode,
        "precision": config.precision,
    }


PRESET_QUICK = "Quick CPU demo (embedded model, synthetic data, a few minutes)"
PRESET_PAPER = "Paper setting (Llama-2-7B, BoolQ, GPU)"


def preset_form(name: str) -> dict[str, Any]:
    """A complete form for a preset: every field of FORM_FIELDS is set, nothing is hidden."""
    form = default_form()
    if name == PRESET_QUICK:
        form.update(
            model=EMBEDDED_MODEL, data_kind=DATA_SYNTHETIC, method=METHOD_LABELS["heft"], include_base=False, name="",
            lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets=["q_proj", "v_proj"], lora_layers="",
            reft_rank=4, reft_layers="8,16,24", reft_positions="l1", reft_share=True, reft_dropout=0.05,
            lora_epochs=3, reft_epochs=1, lora_lr=1e-3, reft_lr=1e-3, batch_size=8, grad_accum=1,
            warmup_ratio=0.1, weight_decay=0.0, scheduler="linear", max_length=128, train_size=128, eval_size=64,
            seed=42, stage2_mode="adapter", precision="bf16" if cpu_has_native_bf16() else "auto",
        )
    elif name == PRESET_PAPER:
        form.update(
            model=PAPER_MODEL, data_kind=DATA_HUB, method=METHOD_LABELS["heft"], include_base=False, name="",
            lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            lora_layers="", reft_rank=8, reft_layers="all", reft_positions="f7+l7", reft_share=False, reft_dropout=0.05,
            lora_epochs=1, reft_epochs=2, lora_lr=2e-4, reft_lr=9e-4, batch_size=16, grad_accum=2,
            warmup_ratio=0.06, weight_decay=0.0, scheduler="linear", max_length=512, train_size=0, eval_size=0,
            seed=42, stage2_mode="adapter", precision="bf16",
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return form


PRESETS = (PRESET_QUICK, PRESET_PAPER)

PRESET_NOTES = {
    PRESET_QUICK: (
        "**Quick CPU demo.** The embedded SmolLM2-135M on 128 synthetic training questions: HEFT with three LoRA "
        "epochs (rank 8 on q/v, lr 1e-3) then one ReFT epoch (rank 4 on layers 8, 16, 24 at the last prompt token, "
        "lr 1e-3), max length 128, evaluated on 64 questions after every epoch; bf16 autocast where the CPU has bf16 "
        "units (AMX), else fp32. A few minutes on 2 CPU cores; measured here: 56% → 77% → 78% over the LoRA epochs and "
        "81% after the ReFT epoch, against 50% zero-shot. Synthetic data is **not BoolQ**: use it to see the pipeline "
        "work, not to judge methods."
    ),
    PRESET_PAPER: (
        "**Paper setting.** arXiv 2509.09801 reports Llama-2-7B on BoolQ: HEFT 3 epochs 85.17%, LoRA 20 epochs 85.05%, "
        "ReFT 20 epochs 83.36%, but gives no hyperparameters. Our choices, to edit freely: HEFT = 1 LoRA epoch + 2 ReFT "
        "epochs (3 in total, as in the paper); LoRA rank 8, alpha 16 on q/k/v/o (peft's common default), lr 2e-4; "
        "LoReFT rank 8 on all 32 layers at the first 7 + last 7 prompt tokens with separate weights (pyreft's BoolQ "
        "recipe), lr 9e-4; batch 16 × 2 accumulation, warmup 6%, max length 512, bf16; full train set (9,427) and full "
        "validation set (3,270). Needs a GPU with ~24 GB and access to the gated model on the hub."
    ),
}


def method_codes(label: str) -> list[str]:
    code = METHOD_BY_LABEL.get(label, str(label).lower())
    if code == "all":
        return ["lora", "reft", "heft"]
    if code not in ("lora", "reft", "heft"):
        raise ConfigError("method", f"must be one of {', '.join(METHOD_LABELS.values())}, got {label!r}")
    return [code]


# --------------------------------------------------------------------------- form -> config


def _int(form: Mapping[str, Any], key: str, option: str, *, allow_empty: bool = False) -> int | None:
    value = form.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return None
        raise ConfigError(option, "is empty; enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, f"{value!r} is not a number") from None
    if not number.is_integer():
        raise ConfigError(option, f"must be a whole number, got {value!r}")
    return int(number)


def _float(form: Mapping[str, Any], key: str, option: str) -> float:
    value = form.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, f"{value!r} is not a number") from None


def data_source(data_kind: str, data_local: str | None = None, upload_path: str | None = None) -> str:
    """The ``RunConfig.data`` string for the form's data choice."""
    if data_kind == DATA_SYNTHETIC:
        return "synthetic"
    if data_kind == DATA_HUB:
        return "hub"
    if data_kind == DATA_LOCAL:
        path = (data_local or "").strip()
        if not path:
            raise ConfigError("data", "enter the path of a local BoolQ directory (train.jsonl + validation.jsonl) or file")
        return path
    if data_kind == DATA_UPLOAD:
        if not upload_path:
            raise ConfigError("data", "upload a .jsonl, .json, .csv or .parquet file first")
        return str(upload_path)
    raise ConfigError("data", f"choose one of: {', '.join(DATA_KINDS)}")


def data_label(source: str) -> str:
    """A short human label for a stored data source."""
    if source == "synthetic":
        return "synthetic"
    if source in ("hub", "google/boolq", "hub:google/boolq"):
        return "BoolQ (hub)"
    if source.startswith("hub:"):
        return source
    return Path(source).name or source


def short_path(text: str) -> str:
    """"/tmp/a/b/tiny-llama" -> "…/tiny-llama"; hub ids and short names unchanged."""
    text = str(text)
    if text.startswith(("/", "~", "./", "../")) and text.rstrip("/").count("/") > 1:
        return "…/" + Path(text.rstrip("/")).name
    return text


def short_paths_in(text: str) -> str:
    """Every absolute path inside ``text`` shortened, e.g. in default run names."""
    import re

    return re.sub(r"(?<![\w.])/[^\s·,]+", lambda m: short_path(m.group(0)), str(text))


def model_label(model: str) -> str:
    return "SmolLM2-135M (embedded)" if model.strip().lower() == EMBEDDED_MODEL else short_path(model)


def form_to_configs(form: Mapping[str, Any], upload_path: str | None = None) -> list[RunConfig]:
    """The RunConfig(s) the form describes: one, or lora+reft+heft (plus base) for a comparison batch.

    Raises ConfigError naming the option (static checks only; model and data checks are
    ``app.service.check_config``'s job).
    """
    methods = method_codes(form.get("method", ""))
    model = str(form.get("model") or "").strip()
    if not model:
        raise ConfigError("model", "choose the embedded model or enter a hub id or local directory")
    data = data_source(form.get("data_kind", ""), form.get("data_local"), upload_path)
    targets = form.get("lora_targets") or []
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets and any(m in ("lora", "heft") for m in methods):
        raise ConfigError("lora.target_modules", "tick at least one module to adapt")
    lora_layers = str(form.get("lora_layers") or "").strip()
    common_stage = dict(
        batch_size=_int(form, "batch_size", "batch_size"),
        grad_accum=_int(form, "grad_accum", "grad_accum"),
        warmup_ratio=_float(form, "warmup_ratio", "warmup_ratio"),
        weight_decay=_float(form, "weight_decay", "weight_decay"),
        scheduler=str(form.get("scheduler") or "linear"),
    )
    train_size = _int(form, "train_size", "train_size", allow_empty=True)
    eval_size = _int(form, "eval_size", "eval_size", allow_empty=True)
    name = str(form.get("name") or "").strip()
    configs = []
    runs = list(methods)
    if form.get("include_base") and len(methods) > 1 and base_runs_supported():
        runs.append("base")
    for method in runs:
        lora = LoraSettings(
            rank=_int(form, "lora_rank", "lora.rank"), alpha=_float(form, "lora_alpha", "lora.alpha"),
            dropout=_float(form, "lora_dropout", "lora.dropout"), target_modules=list(targets) or ["q_proj"],
            layers=lora_layers if lora_layers and lora_layers.lower() != "all" else None,
        )
        reft = ReftSettings(
            rank=_int(form, "reft_rank", "reft.rank"), layers=str(form.get("reft_layers") or "all"),
            positions=str(form.get("reft_positions") or ""), share_weights=bool(form.get("reft_share")),
            dropout=_float(form, "reft_dropout", "reft.dropout"),
        )
        lora_stage = StageSettings(epochs=_int(form, "lora_epochs", "lora_stage.epochs"), learning_rate=_float(form, "lora_lr", "lora_stage.learning_rate"), **common_stage)
        reft_stage = StageSettings(epochs=_int(form, "reft_epochs", "reft_stage.epochs"), learning_rate=_float(form, "reft_lr", "reft_stage.learning_rate"), **common_stage)
        run_name = ""
        if name:
            run_name = f"{name} · {SHORT_METHOD[method]}" if len(runs) > 1 else name
        configs.append(RunConfig(
            method=method, model=model, data=data, lora=lora, reft=reft, lora_stage=lora_stage, reft_stage=reft_stage,
            heft_stage2_mode=str(form.get("stage2_mode") or "adapter"), max_length=_int(form, "max_length", "max_length"),
            train_size=train_size or None, eval_size=eval_size or None, seed=_int(form, "seed", "seed"),
            precision=str(form.get("precision") or "auto"), name=run_name,
        ))
    return configs


def error_message(exc: BaseException) -> str:
    """A readable one-paragraph message for the errors a form or an API call can raise."""
    from heft_core.data import DataError
    from heft_core.models import ModelLoadError

    if isinstance(exc, ConfigError):
        return f"**Invalid option `{exc.option}`** — {str(exc)[len(exc.option) + 2:]}"
    if isinstance(exc, DataError):
        return f"**Data source problem** — {exc}"
    if isinstance(exc, ModelLoadError):
        return f"**Model problem** — {exc}"
    text = str(exc).strip() or type(exc).__name__
    return f"**Error** — {text}"


def plain(message: str) -> str:
    """Markdown message without emphasis, for API answers."""
    return message.replace("**", "").replace("`", "")


def epochs_message(form: Mapping[str, Any]) -> str:
    """The epoch count of the chosen method, e.g. "HEFT: total = E1 + E2 = 1 + 2 = 3 epochs"."""
    try:
        codes = method_codes(form.get("method", ""))
        e1, e2 = _int(form, "lora_epochs", "lora_stage.epochs"), _int(form, "reft_epochs", "reft_stage.epochs")
    except ConfigError:
        return ""
    parts = []
    for code in codes:
        if code == "heft":
            parts.append(f"HEFT: total = E1 + E2 = {e1} + {e2} = **{e1 + e2} epochs**")
        elif code == "lora":
            parts.append(f"LoRA: **{e1}** epoch{'s' if e1 != 1 else ''} (E1)")
        else:
            parts.append(f"ReFT: **{e2}** epoch{'s' if e2 != 1 else ''} (E2)")
    return " · ".join(parts)


def positions_message(text: str) -> str:
    """Live check of the ReFT positions field."""
    try:
        first, last = parse_positions(text)
    except ConfigError as exc:
        return f"⚠️ {str(exc)[len(exc.option) + 2:]}"
    parts = []
    if first:
        parts.append(f"first {first}")
    if last:
        parts.append(f"last {last}")
    message = f"✓ intervenes on the {' and '.join(parts)} prompt token{'s' if first + last > 1 else ''}"
    if first:
        return message + " · last-only positions (e.g. l1) train faster: the prompt before them is computed once, not every epoch"
    return message + " · fast path: the prompt before them is computed once and reused in later epochs"


def layers_message(text: str, num_layers: int | None, option: str = "reft.layers") -> str:
    """Live check of a layer list against the model's depth."""
    try:
        layers = parse_layers(text)
    except ConfigError as exc:
        return f"⚠️ {str(exc)[len(exc.option) + 2:]}"
    if num_layers is None:
        return ""
    if layers == "all":
        return f"✓ all {num_layers} layers (valid: 0..{num_layers - 1})"
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        return f"⚠️ {bad} outside the model's depth; valid layers are 0..{num_layers - 1}"
    return f"✓ {len(layers)} of {num_layers} layers (valid: 0..{num_layers - 1})"


# --------------------------------------------------------------------------- model shapes and estimates

# The paper's model, so its preset gets an estimate without hub access.
_KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    PAPER_MODEL: {
        "num_layers": 32, "hidden_size": 4096,
        "linear": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
    },
}


def model_shape(model_ref: str) -> dict[str, Any]:
    """{"num_layers", "hidden_size", "linear": {module: (in, out)}} for a model, from its config only.

    Raises ModelLoadError with a readable message when the model cannot be read.
    """
    from heft_core import models as hm

    ref = (model_ref or "").strip()
    if ref in _KNOWN_SHAPES:
        return _KNOWN_SHAPES[ref]
    info = hm.model_info(ref)  # cached per model reference
    linear = {name: (fan_in, fan_out) for name, fan_in, fan_out in info.linear_shapes}
    return {"num_layers": info.num_layers, "hidden_size": info.hidden_size, "linear": linear}


def lora_params(shape: Mapping[str, Any], rank: int, targets: Sequence[str], layers: Sequence[int] | None = None) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted linear layer."""
    linear = shape["linear"]
    modules = sorted(linear) if list(targets) == ["all-linear"] else [t for t in targets if t in linear]
    n_layers = len(layers) if layers else shape["num_layers"]
    return sum(rank * (linear[m][0] + linear[m][1]) for m in modules) * n_layers


def reft_params(hidden_size: int, rank: int, n_layers: int, positions: str, share_weights: bool) -> int:
    """Trainable LoReFT parameters: R (d x r) + W, b (d x r + r) per intervention; doubled when the
    first and last positions get separate weights."""
    first, last = parse_positions(positions)
    groups = 2 if (first and last and not share_weights) else 1
    return (2 * hidden_size * rank + rank) * n_layers * groups


@functools.lru_cache(maxsize=32)
def _local_counts(path: str, mtime: float) -> tuple[int, int]:
    from heft_core.data import load_data

    splits = load_data(path)
    return len(splits.train), len(splits.validation)


def data_counts(source: str) -> tuple[int, int] | None:
    """(train rows, validation rows) of a data source, or None if unknown without the hub."""
    if source == "synthetic":
        return SYNTHETIC_SIZES
    if source in ("hub", "google/boolq", "hub:google/boolq"):
        return HUB_BOOLQ_SIZES
    if source.startswith("hub:"):
        return None
    path = Path(source).expanduser()
    try:
        return _local_counts(str(path.resolve()), path.stat().st_mtime)
    except Exception:
        return None


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def estimate_markdown(form: Mapping[str, Any], upload_path: str | None = None) -> str:
    """Trainable parameters per stage, examples x epochs and optimizer steps for the form."""
    from heft_core.models import ModelLoadError

    try:
        configs = form_to_configs(form, upload_path)
    except (ConfigError, ValueError) as exc:
        return f"*Estimate unavailable:* {error_message(exc)}"
    try:
        shape = model_shape(configs[0].model)
    except ModelLoadError as exc:
        return f"*Estimate unavailable:* {error_message(exc)}"
    counts = data_counts(configs[0].data)
    rows = ["| run | stage | trainable params | examples × epochs | optimizer steps |", "|:--|:--|--:|--:|--:|"]
    total_seconds = 0.0
    for config in configs:
        if config.method == "base":
            rows.append("| Base (zero-shot) | — | 0 | — | 0 |")
            continue
        n_train = config.train_size
        if counts is not None:
            n_train = min(n_train, counts[0]) if n_train else counts[0]
        for stage, settings in config.stages():
            if stage == "lora":
                params = lora_params(shape, config.lora.rank, config.lora.target_modules, config.lora.layers)
            else:
                layers = config.reft.resolved_layers(shape["num_layers"])
                params = reft_params(shape["hidden_size"], config.reft.rank, len(layers), config.reft.positions, config.reft.share_weights)
            if n_train:
                steps = settings.optimizer_steps(n_train)
                work = f"{_fmt_int(n_train)} × {settings.epochs}"
                total_seconds += n_train * settings.epochs * config.max_length / EMBEDDED_CPU_TOKENS_PER_SECOND
            else:
                steps, work = None, f"all × {settings.epochs}"
            rows.append(f"| {SHORT_METHOD[config.method]} | {stage} | {_fmt_int(params)} | {work} | {_fmt_int(steps) if steps is not None else '?'} |")
    lines = ["\n".join(rows)]
    first = configs[0]
    if first.method == "heft":
        lines.append(f"HEFT total = {first.lora_stage.epochs} LoRA + {first.reft_stage.epochs} ReFT = **{first.total_epochs} epochs**.")
    if counts is not None:
        n_eval = min(first.eval_size, counts[1]) if first.eval_size else counts[1]
        lines.append(f"Evaluation: {_fmt_int(n_eval)} validation questions after every epoch (data has {_fmt_int(counts[0])} train / {_fmt_int(counts[1])} validation rows).")
    if first.model.strip().lower() == EMBEDDED_MODEL and total_seconds:
        lines.append(f"On 2 CPU cores the embedded model needs at most ~{max(1, round(total_seconds / 60))} min of training (≤ {first.max_length} tokens per question at ~{EMBEDDED_CPU_TOKENS_PER_SECOND} tokens/s), plus evaluation.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- runs table and live view


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run_duration(run: Any, now: datetime | None = None) -> float | None:
    started, finished = _as_utc(run.started_at), _as_utc(run.finished_at)
    if started is None:
        return None
    end = finished or (now or datetime.now(timezone.utc))
    return max(0.0, (end - started).total_seconds())


def format_accuracy(accuracy: float | None, low: float | None = None, high: float | None = None) -> str:
    if accuracy is None:
        return ""
    text = f"{accuracy * 100:.1f}%"
    if low is not None and high is not None:
        text += f" [{low * 100:.1f}, {high * 100:.1f}]"
    return text


def epochs_label(run: Any) -> str:
    config = run.config or {}
    parts = []
    if run.method in ("lora", "heft"):
        parts.append(str((config.get("lora_stage") or {}).get("epochs", "?")))
    if run.method in ("reft", "heft"):
        parts.append(str((config.get("reft_stage") or {}).get("epochs", "?")))
    return "+".join(parts) if parts else "0"


def run_label(run: Any) -> str:
    """e.g. "#12 HEFT (1+2 ep)"."""
    return f"#{run.id} {SHORT_METHOD.get(run.method, run.method)} ({epochs_label(run)} ep)"


def _local_time(value: datetime | None) -> str:
    value = _as_utc(value)
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else ""


RUN_COLUMNS = ["id", "name", "status", "method", "model", "data", "epochs", "accuracy [95% CI]", "duration", "created"]


def runs_frame(runs: Iterable[Any], now: datetime | None = None) -> pd.DataFrame:
    rows = [
        [run.id, short_paths_in(run.name), run.status, SHORT_METHOD.get(run.method, run.method), model_label(run.base_model),
         data_label(run.data_source), epochs_label(run), format_accuracy(run.accuracy, run.accuracy_low, run.accuracy_high),
         format_duration(run_duration(run, now)), _local_time(run.created_at)]
        for run in runs
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def filter_args(status: str | None, method: str | None, text: str | None) -> dict[str, Any]:
    """Keyword arguments for storage.queries.list_runs from the filter widgets."""
    return {
        "status": None if not status or status == "all" else status,
        "method": None if not method or method == "all" else method,
        "text": (text or "").strip() or None,
    }


STATUS_ICONS = {"queued": "…", "running": "▶", "completed": "✓", "failed": "✗", "cancelled": "■", "interrupted": "!"}


def progress_markdown(run: Any | None, now: datetime | None = None) -> str:
    """Status, stage, epoch, step/total and ETA of a run, from its database row."""
    if run is None:
        return "*No run selected. Click a row in the table above, or enter a run id.*"
    icon = STATUS_ICONS.get(run.status, "")
    head = f"### Run #{run.id} — {html.escape(short_paths_in(run.name))}\n**Status: {icon} {run.status}**"
    if run.cancel_requested and run.status == "running":
        head += " (cancel requested; stops at the next step)"
    progress = run.progress or {}
    lines = [head]
    if run.status == "queued":
        lines.append("Waiting for the worker to pick it up.")
    if progress:
        step, total = progress.get("step") or 0, progress.get("total_steps") or 0
        bits = []
        if progress.get("stage"):
            bits.append(f"stage **{progress['stage']}**")
        if progress.get("epoch") is not None:
            bits.append(f"epoch {float(progress['epoch']):.2f}")
        if total:
            bits.append(f"step {step}/{total} ({100 * step / total:.0f}%)")
        if progress.get("loss") is not None:
            bits.append(f"loss {float(progress['loss']):.4f}")
        if progress.get("tokens_per_second"):
            bits.append(f"{float(progress['tokens_per_second']):.0f} tokens/s")
        if run.status == "running" and progress.get("eta_seconds") is not None:
            bits.append(f"ETA {format_duration(progress['eta_seconds'])} (training steps)")
        if progress.get("device"):
            bits.append(f"device {progress['device']}")
        if bits:
            lines.append(" · ".join(bits))
        if progress.get("data_label"):
            lines.append(f"Data: {progress['data_label']} — {progress.get('train_examples', '?')} train / {progress.get('eval_examples', '?')} eval questions")
    duration = run_duration(run, now)
    if duration is not None:
        lines.append(f"Elapsed: {format_duration(duration)}")
    if run.accuracy is not None:
        lines.append(f"**Accuracy: {format_accuracy(run.accuracy, run.accuracy_low, run.accuracy_high)}** on {run.eval_n} questions")
    by_stage = run.trainable_params_by_stage
    if by_stage:
        lines.append("Trainable parameters: " + ", ".join(f"{stage} {_fmt_int(int(n))}" for stage, n in by_stage.items()))
    if run.error and run.status != "completed":
        lines.append("```text\n" + run.error.strip()[-2000:] + "\n```")
    return "\n\n".join(lines)


LOSS_COLUMNS = ["step", "loss", "stage"]
EVAL_COLUMNS = ["cumulative_epoch", "accuracy", "stage", "low", "high"]


def _thin(rows: list[dict[str, Any]], limit: int = 2000) -> list[dict[str, Any]]:
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


# Every stage a chart can show. Each frame names all of them (see _with_stage_placeholders), so the
# colours and the legend are the same for every run and every update.
LOSS_STAGES = ("lora", "reft")
EVAL_STAGES = ("base", "lora", "reft")


def _with_stage_placeholders(frame: pd.DataFrame, stages: Sequence[str], value_column: str) -> pd.DataFrame:
    """Put one empty (NaN) row per stage in front of the data, in the order of ``stages``.

    Gradio's plots fix their colour domain at the first render: a stage that first appears in a
    later update (a HEFT run's "reft" steps, or another run's) would be left undrawn. NaN rows are
    not drawn but keep every stage in the domain, and in the same legend order for every run.
    """
    if frame.empty:
        return frame
    filler = pd.DataFrame([{**frame.iloc[0].to_dict(), "stage": stage, value_column: float("nan")} for stage in stages], columns=frame.columns)
    return pd.concat([filler, frame], ignore_index=True)


def loss_frame(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = [m for m in metrics if m.get("loss") is not None]
    rows = _thin(rows)
    frame = pd.DataFrame([[m["step"], float(m["loss"]), m["stage"]] for m in rows], columns=LOSS_COLUMNS)
    return _with_stage_placeholders(frame, LOSS_STAGES, "loss")


def eval_frame(evals: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for e in evals:
        if e.get("accuracy") is None:
            continue
        x = e.get("cumulative_epoch")
        rows.append([float(x if x is not None else e["epoch"]), 100 * e["accuracy"], e["stage"],
                     100 * (e.get("accuracy_low") or e["accuracy"]), 100 * (e.get("accuracy_high") or e["accuracy"])])
    frame = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    return _with_stage_placeholders(frame, EVAL_STAGES, "accuracy")


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


RUN_FIELDS = (
    "id", "name", "status", "method", "base_model", "data_source", "eval_signature", "batch_id", "created_at",
    "started_at", "finished_at", "cancel_requested", "error", "artifact_dir", "trainable_params", "accuracy",
    "accuracy_low", "accuracy_high", "eval_n", "train_seconds", "tokens_per_second", "total_epochs",
)


def run_summary(run: Any) -> dict[str, Any]:
    """JSON-ready fields of a run row (what the list_runs API returns)."""
    summary = {key: _iso(getattr(run, key, None)) for key in RUN_FIELDS}
    summary["trainable_params_by_stage"] = run.trainable_params_by_stage
    summary["progress"] = run.progress
    return summary


def run_detail(run: Any, metrics: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Everything about one run as JSON-ready data (the run_detail API)."""
    detail = run_summary(run)
    detail["config"] = run.config
    detail["metrics"] = [
        {k: _iso(m.get(k)) for k in ("id", "stage", "epoch", "step", "loss", "learning_rate", "tokens_per_second", "elapsed_seconds")}
        for m in metrics
    ]
    detail["evals"] = [
        {k: _iso(e.get(k)) for k in ("stage", "epoch", "cumulative_epoch", "accuracy", "accuracy_low", "accuracy_high", "n")}
        for e in evals
    ]
    return detail


def parse_config_payload(text: str) -> list[RunConfig]:
    """The start_run API's input: one RunConfig as JSON, or {"configs": [...]} for a batch."""
    try:
        payload = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise ConfigError("config_json", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(payload, dict):
        raise ConfigError("config_json", "must be a JSON object: a RunConfig, or {\"configs\": [...]}")
    items = payload["configs"] if "configs" in payload else [payload]
    if not isinstance(items, list) or not items:
        raise ConfigError("configs", "must be a non-empty list of RunConfig objects")
    configs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"configs[{index}]", "must be a JSON object")
        configs.append(RunConfig.from_dict(item))
    return configs


# --------------------------------------------------------------------------- compare


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def verdict(label_a: str, label_b: str, comparison: Any) -> str:
    """e.g. "HEFT (3 ep) vs LoRA (20 ep): +0.4 points, 12 vs 9 discordant questions, McNemar p = 0.66 — not significant"."""
    diff = (comparison.accuracy_a - comparison.accuracy_b) * 100
    significant = "significant at 0.05" if comparison.p_value < 0.05 else "not significant"
    return (f"{label_a} vs {label_b}: {diff:+.1f} points, {comparison.a_only} vs {comparison.b_only} discordant questions, "
            f"McNemar p = {_fmt_p(comparison.p_value)} — {significant}")


# One colour per compared run, shared by the loss chart and the accuracy chart (matplotlib's tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

COMPARE_COLUMNS = ["run", "method", "epochs", "accuracy [95% CI]", "n", "trainable params", "train seconds", "tokens/s", "eval set"]
PAIR_COLUMNS = ["A", "B", "accuracy A", "accuracy B", "difference (points)", "A right only", "B right only", "McNemar p", "verdict"]


def compare_runs(runs: Sequence[Any], metrics: Mapping[int, Sequence[Mapping[str, Any]]], evals: Mapping[int, Sequence[Mapping[str, Any]]],
                 correctness: Mapping[int, Mapping[str, bool] | str]) -> dict[str, Any]:
    """Overlaid loss curves, accuracy per cumulative epoch, a summary table and pairwise McNemar tests.

    ``correctness[run_id]`` is uid -> correct from the run's predictions, or a string saying why
    they could not be read. Runs with different eval signatures are reported as not comparable.
    """
    from heft_core.stats import paired_comparison

    labels = {run.id: run_label(run) for run in runs}
    colors = {labels[run.id]: PALETTE[i % len(PALETTE)] for i, run in enumerate(runs)}
    loss_rows, acc_rows, table = [], [], []
    for run in runs:
        for m in _thin([m for m in metrics.get(run.id, []) if m.get("loss") is not None], 1000):
            loss_rows.append([m["step"], float(m["loss"]), labels[run.id]])
        for e in evals.get(run.id, []):
            if e.get("accuracy") is None:
                continue
            x = e.get("cumulative_epoch") if e.get("cumulative_epoch") is not None else e["epoch"]
            acc_rows.append([float(x), 100 * e["accuracy"], labels[run.id], 100 * (e.get("accuracy_low") or e["accuracy"]),
                             100 * (e.get("accuracy_high") or e["accuracy"])])
        table.append([labels[run.id], SHORT_METHOD.get(run.method, run.method), epochs_label(run),
                      format_accuracy(run.accuracy, run.accuracy_low, run.accuracy_high), run.eval_n,
                      _fmt_int(run.trainable_params) if run.trainable_params else "",
                      round(run.train_seconds, 1) if run.train_seconds is not None else None,
                      round(run.tokens_per_second, 1) if run.tokens_per_second is not None else None,
                      (run.eval_signature or "")[:8]])
    pairs, verdicts = [], []
    for i, run_a in enumerate(runs):
        for run_b in runs[i + 1:]:
            a, b = labels[run_a.id], labels[run_b.id]
            ca, cb = correctness.get(run_a.id), correctness.get(run_b.id)
            if run_a.eval_signature != run_b.eval_signature or not run_a.eval_signature:
                reason = "not comparable: evaluated on different questions (different eval signature)"
            elif isinstance(ca, str) or isinstance(cb, str) or ca is None or cb is None:
                reason = f"not comparable: {ca if isinstance(ca, str) else cb if isinstance(cb, str) else 'predictions missing'}"
            else:
                try:
                    result = paired_comparison(ca, cb)
                except ValueError as exc:
                    reason = f"not comparable: {exc}"
                else:
                    line = verdict(a, b, result)
                    verdicts.append(line)
                    pairs.append([a, b, f"{result.accuracy_a * 100:.1f}%", f"{result.accuracy_b * 100:.1f}%",
                                  round((result.accuracy_a - result.accuracy_b) * 100, 2), result.a_only, result.b_only,
                                  _fmt_p(result.p_value), "significant" if result.p_value < 0.05 else "not significant"])
                    continue
            verdicts.append(f"{a} vs {b}: {reason}")
            pairs.append([a, b, "", "", None, None, None, "", reason])
    return {
        "loss": pd.DataFrame(loss_rows, columns=["step", "loss", "run"]),
        "accuracy": pd.DataFrame(acc_rows, columns=["cumulative_epoch", "accuracy", "run", "low", "high"]),
        "table": pd.DataFrame(table, columns=COMPARE_COLUMNS),
        "pairs": pd.DataFrame(pairs, columns=PAIR_COLUMNS),
        "verdicts": verdicts,
        "colors": colors,
    }


def accuracy_figure(frame: pd.DataFrame, colors: Mapping[str, str] | None = None):
    """Accuracy vs cumulative epochs per run with 95% interval error bars (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    if frame.empty:
        ax.text(0.5, 0.5, "No evaluations yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    for index, (label, group) in enumerate(frame.groupby("run", sort=False)):
        group = group.sort_values("cumulative_epoch")
        offset = (index - (frame["run"].nunique() - 1) / 2) * 0.03  # keep overlapping bars apart
        ax.errorbar(group["cumulative_epoch"] + offset, group["accuracy"],
                    yerr=[group["accuracy"] - group["low"], group["high"] - group["accuracy"]],
                    marker="o", capsize=4, label=label, color=(colors or {}).get(label))
    ax.set_xlabel("cumulative epochs")
    ax.set_ylabel("accuracy (%) with 95% CI")
    ax.grid(alpha=0.3)
    if not frame.empty:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    plt.close(fig)
    return fig


def paper_context() -> str:
    """What the paper's headline difference can and cannot show (stats.paper_claim_check)."""
    from heft_core.stats import paper_claim_check

    check = paper_claim_check(85.17, 85.05, 3270)
    return ("**Reading differences.** The paper reports HEFT (3 ep) 85.17% vs LoRA (20 ep) 85.05% on BoolQ's 3,270 dev questions: "
            f"{check['explanation']} Compare runs on the *same* questions with McNemar's test (below), not by accuracy alone.")


# --------------------------------------------------------------------------- ask


ASK_SLOTS = ("base", "lora", "reft", "heft")


def run_choice_label(run: Any) -> str:
    """e.g. "#3 HEFT (1+1 ep) · 62.5% · SmolLM2-135M (embedded) · synthetic"."""
    acc = f" · {run.accuracy * 100:.1f}%" if run.accuracy is not None else ""
    return f"{run_label(run)}{acc} · {model_label(run.base_model)} · {data_label(run.data_source)}"


def answer_cards_html(results: Sequence[Mapping[str, Any]], gold: bool | None = None) -> str:
    """Side-by-side cards: one per variant with answer, P(yes), latency and ✓/✗ against the gold answer."""
    if not results:
        return "<div class='heft-cards-empty'>Answers appear here.</div>"
    cards = []
    for item in results:
        title = html.escape(str(item.get("title", "")))
        subtitle = html.escape(str(item.get("subtitle", "")))
        if item.get("error"):
            body = f"<div class='heft-card-error'>{html.escape(str(item['error']))}</div>"
            state = "skipped"
        else:
            answer = item["answer"]
            mark = ""
            state = "neutral"
            if gold is not None:
                right = (answer == "yes") == bool(gold)
                mark = " <span class='heft-mark'>✓</span>" if right else " <span class='heft-mark'>✗</span>"
                state = "right" if right else "wrong"
            p_yes = float(item["p_yes"])
            body = (f"<div class='heft-answer'>{html.escape(answer)}{mark}</div>"
                    f"<div class='heft-bar'><div style='width:{p_yes * 100:.0f}%'></div></div>"
                    f"<div class='heft-meta'>P(yes) = {p_yes:.3f} · {float(item['latency_seconds']) * 1000:.0f} ms</div>")
        cards.append(f"<div class='heft-card heft-{state}' data-variant='{html.escape(str(item.get('slot', '')))}'>"
                     f"<div class='heft-card-title'>{title}</div><div class='heft-card-sub'>{subtitle}</div>{body}</div>")
    gold_line = ""
    if gold is not None:
        gold_line = f"<div class='heft-gold'>Gold answer: <b>{'yes' if gold else 'no'}</b></div>"
    return f"<div class='heft-cards'>{''.join(cards)}</div>{gold_line}"


def save_upload(temp_path: str, uploads_dir: Path) -> Path:
    """Copy an uploaded data file into the data home (the path a run will read); checks the extension."""
    import hashlib
    import shutil

    source = Path(temp_path)
    if source.suffix.lower() not in UPLOAD_EXTENSIONS:
        raise ValueError(f"{source.name}: upload a {', '.join(UPLOAD_EXTENSIONS)} file")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    uploads_dir.mkdir(parents=True, exist_ok=True)
    target = uploads_dir / f"{digest}-{source.name}"
    if not target.exists():
        shutil.copyfile(source, target)
    return target


def zip_run_dir(run_dir: str | os.PathLike, run_id: int, out_dir: str | os.PathLike) -> Path:
    """Zip a run's artifact directory into ``out_dir`` (a fresh temporary directory)."""
    import shutil

    base = Path(out_dir) / f"heft-run-{run_id:06d}"
    return Path(shutil.make_archive(str(base), "zip", root_dir=str(run_dir)))

