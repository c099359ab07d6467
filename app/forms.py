"""The training form as plain data: its fields by name, presets, the RunConfigs it builds, field messages.

A form is a dict keyed by field name. A field that sets a run option is named by the option's
dotted ``RunConfig`` name (``"lora.rank"``, ``"reft.layers"``, ``"lora_stage.epochs"``; ``"*.x"``
sets ``x`` of both stages, as the CLI's flags do) and parsed by its entry in
:data:`CONFIG_FIELDS`. A few fields are the form's own (which method or batch, where the data
comes from). Nothing here depends on the order of fields, and nothing imports Gradio: the UI
(``app.ui.train``) registers one component per field under the same name.

Adding a run option: its field in ``heft_core.config``, its parser in :data:`CONFIG_FIELDS`,
its component in ``app/ui/train.py`` (and its value in the presets, if they should set it).

Validation has one path: parsers only convert what the widgets send; a value they cannot
convert (an empty box, text in a number field) is passed on as :class:`Invalid`, and
``heft_core.config`` rejects it like any out-of-range value, with a message naming the dotted
option and its allowed range ("lora.rank: must be an integer in 1..1024, got empty").
:func:`field_errors` gives that message per field for the UI to show next to each one.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from app import timing
from app.permissions import PermissionRefused
from app.present import HUB_BOOLQ_SOURCES, METHOD_STAGES, error, escape, format_duration, format_int, model_label
from heft_common.errors import ConfigError, DataError, HeftError, ModelLoadError
from heft_common.vocabulary import (
    DEFAULT_HUB_DATASET,
    EMBEDDED_MODEL,
    HUB_DATA,
    HUB_PREFIX,
    METHOD_DESCRIPTIONS,
    METHOD_TITLES,
    SYNTHETIC_DATA,
    TRAINED_METHODS,
)
from heft_core.config import RunConfig, parse_layers, parse_positions
from heft_core.data import LOCAL_BOOLQ, local_boolq_dir
from heft_core.estimates import LLAMA2_7B_CHAT, lora_params, model_shape, reft_params
from heft_core.hardware import cpu_has_native_bf16, precision_warning

# --------------------------------------------------------------------------- choices

EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded, offline)"
PAPER_MODEL = LLAMA2_7B_CHAT  # the paper's: Llama-2-7b-chat-hf
MODEL_CHOICES = [(EMBEDDED_LABEL, EMBEDDED_MODEL), (f"{PAPER_MODEL} (hub, GPU)", PAPER_MODEL)]

DATA_SYNTHETIC = "Synthetic (offline, NOT BoolQ)"
DATA_HUB = f"BoolQ from the hub ({DEFAULT_HUB_DATASET})"
DATA_LOCAL = "Local BoolQ directory"
DATA_UPLOAD = "Upload file"
DATA_KINDS = [DATA_SYNTHETIC, DATA_HUB, DATA_LOCAL, DATA_UPLOAD]
UPLOAD_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

BATCH = "all"  # the method choice that queues one run per trained method, as one comparison batch
METHOD_LABELS = {
    "lora": METHOD_TITLES["lora"],
    "reft": METHOD_TITLES["reft"],
    "heft": METHOD_DESCRIPTIONS["heft"],
    BATCH: "Compare all three (one batch)",
}
METHOD_BY_LABEL = {label: code for code, label in METHOD_LABELS.items()}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Known dataset sizes, so estimates work without loading the data.
SYNTHETIC_SIZES = (800, 200)  # heft_core.data.load_data's default synthetic_size
HUB_BOOLQ_SIZES = (9427, 3270)

# --------------------------------------------------------------------------- field parsers

Parser = Callable[[Any, str], Any]


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class Invalid:
    """A widget value that is not a number (an empty box, text): heft_core's range check rejects it.

    Its ``repr`` is how the message quotes it: "got empty", "got 'fast'".
    """

    def __init__(self, raw: Any):
        self.raw = raw

    def __repr__(self) -> str:
        return "empty" if _is_empty(self.raw) else repr(self.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Invalid) and other.raw == self.raw

    __hash__ = None  # type: ignore[assignment]


def whole(value: Any, option: str) -> int | float | Invalid:
    """A whole number from a number box (which sends floats, or None when empty).

    A fraction stays a float and anything else an :class:`Invalid`, for heft_core to reject by range.
    """
    if isinstance(value, bool) or _is_empty(value):
        return Invalid(value)
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        return Invalid(value)
    return int(parsed) if parsed.is_integer() else parsed


def whole_or_all(value: Any, option: str) -> int | float | Invalid | None:
    """A subset size: empty or 0 means every row (None)."""
    return None if _is_empty(value) else whole(value, option) or None


def number(value: Any, option: str) -> float | Invalid:
    if isinstance(value, bool) or _is_empty(value):
        return Invalid(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return Invalid(value)


def flag(value: Any, option: str) -> bool:
    return bool(value)


def text(default: str) -> Parser:
    """Free text or a choice; an empty field means ``default``."""
    return lambda value, option: str(value or default)


def modules(value: Any, option: str) -> list[str]:
    """Ticked module names, or a comma-separated string of them."""
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return list(value or [])


def whole_or_shared(value: Any, option: str) -> int | float | Invalid | None:
    """A LoRA-stage override of a both-stages field: empty means "as for both stages" (None, left out)."""
    return None if _is_empty(value) else whole(value, option)


def layers_or_every(value: Any, option: str) -> str | None:
    """A LoRA layer subset; empty or "all" means every layer (None)."""
    chosen = str(value or "").strip()
    return chosen if chosen and chosen.lower() != "all" else None


# Every form field that sets a run option, by its dotted RunConfig name ("*." = both stages).
CONFIG_FIELDS: dict[str, Parser] = {
    "lora.rank": whole,
    "lora.alpha": number,
    "lora.dropout": number,
    "lora.target_modules": modules,
    "lora.layers": layers_or_every,
    "reft.rank": whole,
    "reft.layers": text("all"),
    "reft.positions": text(""),
    "reft.share_weights": flag,
    "reft.dropout": number,
    "lora_stage.epochs": whole,
    "reft_stage.epochs": whole,
    "lora_stage.learning_rate": number,
    "reft_stage.learning_rate": number,
    "*.batch_size": whole,
    "*.grad_accum": whole,
    "*.warmup_ratio": number,
    "*.weight_decay": number,
    "*.scheduler": text("linear"),
    # After "*.batch_size"/"*.grad_accum", so that when set they override them for the LoRA stage only
    # (the paper trains LoRA at 1 x 32 and ReFT at 8 x 4).
    "lora_stage.batch_size": whole_or_shared,
    "lora_stage.grad_accum": whole_or_shared,
    "lora_loss": text("answer"),
    "scoring": text("logits"),
    "generation_max_new_tokens": whole,
    "template.format": text("plain"),
    "template.system": lambda value, option: str(value or ""),
    "template.after_question": lambda value, option: str(value or ""),
    "template.yes": text(" yes"),
    "template.no": text(" no"),
    "max_length": whole,
    "train_size": whole_or_all,
    "eval_size": whole_or_all,
    "seed": whole,
    "heft_stage2_mode": text("adapter"),
    "precision": text("auto"),
    "checkpoint_minutes": number,
    "keep_epoch_checkpoints": flag,
    "processes": whole,
    "report.report_to": modules,
    "report.project": text("heft-studio"),
    "report.trackio_space_id": text(""),
    "report.tensorboard_dir": text(""),
    "report.wandb_mode": text("online"),
    "report.mlflow_tracking_uri": text(""),
}
# The form's own fields: read by form_to_configs itself.
FORM_ONLY_FIELDS = ("model", "data_kind", "data_local", "method", "include_base", "name")
FORM_FIELDS: tuple[str, ...] = FORM_ONLY_FIELDS + tuple(CONFIG_FIELDS)
STAGE_OVERRIDES = ("lora_stage.batch_size", "lora_stage.grad_accum")  # empty: as "*.batch_size"/"*.grad_accum"
"""Every field a preset sets (all of them). The uploaded file's path is not one: a preset keeps it."""
UPLOAD_FIELD = "data_upload"
STAGES = ("lora_stage", "reft_stage")


def _option_paths(name: str) -> list[list[str]]:
    """"lora.rank" -> [["lora", "rank"]]; "*.batch_size" -> one path per stage."""
    head, _, rest = name.partition(".")
    if head == "*":
        return [[stage, *rest.split(".")] for stage in STAGES]
    return [name.split(".")]


def get_option(config: RunConfig, name: str) -> Any:
    """The value of a dotted option in a config ("*.x": the first stage's)."""
    value: Any = config
    for part in _option_paths(name)[0]:
        value = getattr(value, part)
    return value


def set_option(tree: dict[str, Any], name: str, value: Any) -> None:
    """Set a dotted option in a nested dict of RunConfig fields."""
    for path in _option_paths(name):
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = copy.copy(value)


def _form_value(value: Any) -> Any:
    """A config value as its form field shows it."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value)) if value and all(isinstance(v, int) for v in value) else list(value)
    return value


# --------------------------------------------------------------------------- default form and presets


def default_local_dir() -> str:
    from heft_core.data import local_boolq_dir

    found = local_boolq_dir()
    return str(found) if found else ""


def default_form() -> dict[str, Any]:
    """The form as it opens: RunConfig's own defaults, the embedded model, synthetic data."""
    config = RunConfig()
    form: dict[str, Any] = {
        "model": EMBEDDED_MODEL,
        "data_kind": DATA_SYNTHETIC,
        "data_local": default_local_dir(),
        "method": METHOD_LABELS[config.method],
        "include_base": False,
        "name": "",
    }
    form.update({name: _form_value(get_option(config, name)) for name in CONFIG_FIELDS})
    form.update({name: "" for name in STAGE_OVERRIDES})
    return form


PRESET_QUICK = "Quick CPU demo (embedded model, synthetic data, a few minutes)"
PRESET_PAPER = "Paper setting (Llama-2-7B-chat, BoolQ, GPU)"
PRESET_PAPER_ALL_LINEAR = "Paper setting, LoRA on all linear layers (the paper's text)"
PRESETS = (PRESET_QUICK, PRESET_PAPER, PRESET_PAPER_ALL_LINEAR)


def _preset_values(name: str) -> dict[str, Any]:
    if name == PRESET_QUICK:
        return {
            "model": EMBEDDED_MODEL, "data_kind": DATA_SYNTHETIC, "method": METHOD_LABELS["heft"],
            "include_base": False, "name": "",
            "lora.rank": 8, "lora.alpha": 16.0, "lora.dropout": 0.05, "lora.target_modules": ["q_proj", "v_proj"],
            "lora.layers": "",
            "reft.rank": 4, "reft.layers": "8,16,24", "reft.positions": "l1", "reft.share_weights": True,
            "reft.dropout": 0.05,
            "lora_stage.epochs": 3, "reft_stage.epochs": 1, "lora_stage.learning_rate": 1e-3,
            "reft_stage.learning_rate": 1e-3,
            "*.batch_size": 8, "*.grad_accum": 1, "*.warmup_ratio": 0.1, "*.weight_decay": 0.0, "*.scheduler": "linear",
            "max_length": 128, "train_size": 128, "eval_size": 64, "seed": 42, "heft_stage2_mode": "adapter",
            "precision": "bf16" if cpu_has_native_bf16() else "auto",
        }
    if name in (PRESET_PAPER, PRESET_PAPER_ALL_LINEAR):
        # arXiv 2509.09801, sections 3.2-3.4 and its appendix's script: heft_core.study_presets.paper_options is the one
        # place the recipe is written down; the form takes every option it has fields for.
        from heft_core.study_presets import paper_options

        reading = "code" if name == PRESET_PAPER else "text"
        values = {key: _form_value(value) for key, value in paper_options(PAPER_MODEL, lora_targets=reading).items()
                  if key in CONFIG_FIELDS}
        values.update({
            "model": PAPER_MODEL, "data_kind": DATA_HUB, "method": METHOD_LABELS["heft"], "include_base": False,
            "name": "", "lora.layers": "", "reft.share_weights": False, "lora_stage.epochs": 3, "reft_stage.epochs": 3,
            # the shared batch fields carry the ReFT stage's 8 x 4; the LoRA stage overrides them with 1 x 32
            "*.batch_size": 8, "*.grad_accum": 4, "*.warmup_ratio": 0.0, "*.weight_decay": 0.0,
            "*.scheduler": "linear", "train_size": "", "eval_size": "", "seed": 42,
        })
        return values
    raise ConfigError("preset", f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def preset_form(name: str) -> dict[str, Any]:
    """A complete form for a preset: every field of FORM_FIELDS is set, nothing is hidden."""
    form = default_form()
    form.update(_preset_values(name))
    return form


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
        "**Paper setting.** arXiv 2509.09801's recipe as its sections 3.2–3.4 and its appendix's script state it: "
        "Llama-2-7b-chat-hf on all of BoolQ (9,427 train, 3,270 validation); HEFT = **3 LoRA epochs + 3 ReFT "
        "epochs** (the paper's 85.17%; LoRA 20+0 85.05%, ReFT 0+20 83.36%, HEFT 20+20 85.47%). LoRA rank 8, "
        "alpha 32, dropout 0.05 on q_proj and v_proj (peft's default for Llama: the script sets no target modules; "
        "its text says \"the model's linear layers\", which the next preset follows), lr 2e-4, batch 1 × 32 "
        "accumulation, the loss over the whole prompt + answer (causal LM, padding masked); then merged into the "
        "weights. ReFT: one rank-4 LoReFT on layer 15's output at the last prompt token, lr 2e-4, batch 8 × 4, loss "
        "on the answer token. Both stages: linear decay, no warmup, no weight decay, bf16. The prompt is Llama-2's "
        "chat format with a system line (ours in wording), answers \" Yes\" / \" No\". Scored both ways on the "
        "same questions: the paper's (greedy generation of up to 5 tokens, \"Yes\"/\"No\" looked for, anything "
        "else wrong and counted as unparsed) and the two answer logits (the run's headline number; both are shown). "
        "Max length 2,048 as the paper pads to: nothing is truncated, and padding is masked, so it costs nothing "
        "here. Departures: evaluation after each epoch (the paper evaluates once, at the end), per-epoch ones by "
        "logits only; the loss over an accumulation window averages its batches. Needs a GPU with "
        "≥ 24 GB and access to the gated model on the hub."
    ),
    PRESET_PAPER_ALL_LINEAR: (
        "**Paper setting, all linear layers.** As the paper setting, but LoRA on every linear layer (q, k, v, o, "
        "gate, up, down), the reading of the paper's text rather than of its script (which adapts q and v)."
    ),
}


# --------------------------------------------------------------------------- form -> configs


def method_codes(label: str) -> list[str]:
    """The methods a method choice trains: one, or every trained method for the batch choice."""
    code = METHOD_BY_LABEL.get(label, str(label).lower())
    if code == BATCH:
        return list(TRAINED_METHODS)
    if code not in TRAINED_METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHOD_LABELS.values())}, got {label!r}")
    return [code]


@dataclass(frozen=True)
class MethodParts:
    """Which parts of the form a method choice uses (the UI hides or locks the others)."""

    lora: bool
    reft: bool
    heft: bool
    batch: bool


def method_parts(label: str | None) -> MethodParts:
    codes = method_codes(label) if label else ["heft"]
    stages = {stage for code in codes for stage in METHOD_STAGES[code]}
    return MethodParts(lora="lora" in stages, reft="reft" in stages, heft="heft" in codes, batch=len(codes) > 1)


def data_source(data_kind: str, data_local: str | None = None, upload_path: str | None = None) -> str:
    """The ``RunConfig.data`` string for the form's data choice."""
    if data_kind == DATA_SYNTHETIC:
        return SYNTHETIC_DATA
    if data_kind == DATA_HUB:
        return HUB_DATA
    if data_kind == DATA_LOCAL:
        path = (data_local or "").strip()
        if not path:
            raise ConfigError("data", "enter the path of a local BoolQ directory (train.jsonl + validation.jsonl) "
                                      "or file")
        return path
    if data_kind == DATA_UPLOAD:
        if not upload_path:
            raise ConfigError("data", "upload a .jsonl, .json, .csv or .parquet file first")
        return str(upload_path)
    raise ConfigError("data", f"choose one of: {', '.join(DATA_KINDS)}")


def form_to_configs(form: Mapping[str, Any], upload_path: str | None = None) -> list[RunConfig]:
    """The RunConfig(s) the form describes: one, or lora+reft+heft (plus base) for a comparison batch.

    ``upload_path`` defaults to the form's ``data_upload`` field. Raises ConfigError naming the
    option (static checks only; model and data checks are ``app.service.check_config``'s job).
    """
    methods = method_codes(form.get("method", ""))
    model = str(form.get("model") or "").strip()
    if not model:
        raise ConfigError("model", "choose the embedded model or enter a hub id or local directory")
    upload = upload_path if upload_path is not None else form.get(UPLOAD_FIELD)
    data = data_source(form.get("data_kind", ""), form.get("data_local"), upload or None)
    values = {name: parse(form[name], name) for name, parse in CONFIG_FIELDS.items() if name in form}
    if not values.get("lora.target_modules", ["q_proj"]) and any("lora" in METHOD_STAGES[m] for m in methods):
        raise ConfigError("lora.target_modules", "tick at least one module to adapt")
    runs = list(methods)
    if form.get("include_base") and len(methods) > 1:
        runs.append("base")
    name = str(form.get("name") or "").strip()
    configs = []
    for method in runs:
        run_name = f"{name} · {METHOD_TITLES[method]}" if name and len(runs) > 1 else name
        options = _options_for(method, values)
        configs.append(RunConfig.from_dict({**options, "method": method, "model": model, "data": data,
                                            "name": run_name}))
    return configs


def _unused_parts(method: str) -> set[str]:
    """The RunConfig parts ``method`` never reads: its unused stage and adapter settings."""
    stages = METHOD_STAGES[method]
    unused = set()
    if "lora" not in stages:
        unused |= {"lora", "lora_stage"}
    if "reft" not in stages:
        unused |= {"reft", "reft_stage"}
    return unused


def _options_for(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested RunConfig fields for ``method``; an :class:`Invalid` value in a part it does not use is
    left out (the default stays), so a hidden, unused box never blocks a launch nor gets stored."""
    options: dict[str, Any] = {}
    unused = _unused_parts(method)
    for name, value in values.items():
        if value is None and name in STAGE_OVERRIDES:
            continue  # empty: the LoRA stage takes the both-stages value
        for path in _option_paths(name):
            if isinstance(value, Invalid) and path[0] in unused:
                continue
            node = options
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = copy.copy(value)
    lora = options.setdefault("lora", {})
    if not lora.get("target_modules"):
        lora["target_modules"] = ["q_proj"]  # unused by ReFT-only runs, but LoraSettings needs one
    return options


def _field_of(option: str) -> str:
    """The form field that sets a dotted option ("reft_stage.batch_size" -> "*.batch_size")."""
    if option in CONFIG_FIELDS:
        return option
    head, _, rest = option.partition(".")
    if head in STAGES and f"*.{rest}" in CONFIG_FIELDS:
        return f"*.{rest}"
    return option


def field_errors(form: Mapping[str, Any], upload_path: str | None = None) -> dict[str, str]:
    """{field name: message} for every invalid field of ``form``, each checked on its own.

    The message is heft_core's ("lora.rank: must be an integer in 1..1024, got 0"), including the
    checks against the chosen model's shape (layer indices, module names) when the model can be
    read, and the local data path's existence. Plain text: the UI escapes it where it renders it.
    """
    errors: dict[str, str] = {}
    try:
        methods = method_codes(form.get("method", ""))
    except ConfigError as exc:
        return {"method": str(exc)}
    try:
        shape = model_shape(str(form.get("model") or "").strip())
    except HeftError:
        shape = None  # the model message (next to the model box) says why
    baseline = {**default_form(), "method": form.get("method"), "model": form.get("model") or EMBEDDED_MODEL,
                "data_kind": DATA_SYNTHETIC}
    for field in CONFIG_FIELDS:
        if field not in form:
            continue
        try:
            for config in form_to_configs({**baseline, field: form[field]}, upload_path):
                if shape is not None and config.method in methods:
                    config.validate_for_model(shape["num_layers"], set(shape["linear"]))
        except ConfigError as exc:
            shared = field.startswith("*.") and exc.option.endswith(field[1:])  # a both-stages field's own error
            errors[field if shared else _field_of(exc.option)] = str(exc)
    try:
        source = data_source(form.get("data_kind", ""), form.get("data_local"),
                             upload_path if upload_path is not None else form.get(UPLOAD_FIELD) or None)
        if form.get("data_kind") == DATA_LOCAL:
            from heft_core.data import validate_source  # reads a header at most; no torch

            validate_source(source)
    except ConfigError as exc:
        errors["data_local" if form.get("data_kind") == DATA_LOCAL else "data_kind"] = str(exc)
    except DataError as exc:
        errors["data_local"] = str(exc)
    return errors


# --------------------------------------------------------------------------- messages


def _reason(exc: HeftError) -> str:
    """A ConfigError's message without its option name."""
    return exc.detail if isinstance(exc, ConfigError) else str(exc)


def _error_parts(exc: BaseException) -> tuple[str, str]:
    """(heading, detail) of an error a form or an API call can raise."""
    if isinstance(exc, ConfigError):
        return f"Invalid option `{exc.option}`", exc.detail
    if isinstance(exc, DataError):
        return "Data source problem", str(exc)
    if isinstance(exc, ModelLoadError):
        return "Model problem", str(exc)
    if isinstance(exc, PermissionRefused):
        return "Not allowed here", str(exc)
    return "Error", str(exc).strip() or type(exc).__name__


def error_message(exc: BaseException) -> str:
    """A readable one-paragraph Markdown message for the errors a form or an API call can raise."""
    heading, detail = _error_parts(exc)
    return f"**{heading}** — {escape(detail)}"


def error_text(exc: BaseException) -> str:
    """The same message as plain text, for API answers."""
    heading, detail = _error_parts(exc)
    return f"{heading} — {detail}".replace("`", "")


def epochs_message(form: Mapping[str, Any]) -> str:
    """The epoch count of the chosen method, e.g. "HEFT: total = E1 + E2 = 1 + 2 = 3 epochs"."""
    try:
        codes = method_codes(form.get("method", ""))
        e1 = whole(form.get("lora_stage.epochs"), "lora_stage.epochs")
        e2 = whole(form.get("reft_stage.epochs"), "reft_stage.epochs")
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


@functools.lru_cache(maxsize=1)
def _machine_has_gpu() -> bool:
    from app.worker import gpu_slots  # the worker's own count of GPU slots (nvidia-smi, HEFT_GPUS)

    return gpu_slots() != [None]


def precision_message(value: str, on_gpu: bool | None = None) -> str:
    """The precision field's note: a warning for bf16 where this machine would emulate it (CPU only)."""
    if on_gpu is None:
        on_gpu = _machine_has_gpu()
    warning = precision_warning(str(value or ""), on_gpu=on_gpu)
    return error(warning) if warning else ""


def positions_message(text: str) -> str:
    """Live check of the ReFT positions field."""
    try:
        first, last = parse_positions(text)
    except ConfigError as exc:
        return error(_reason(exc))
    parts = []
    if first:
        parts.append(f"first {first}")
    if last:
        parts.append(f"last {last}")
    message = f"✓ intervenes on the {' and '.join(parts)} prompt token{'s' if first + last > 1 else ''}"
    if first:
        return message + (" · last-only positions (e.g. l1) train faster: the prompt before them is computed once, "
                          "not every epoch")
    return message + " · fast path: the prompt before them is computed once and reused in later epochs"


def layers_message(text: str, num_layers: int | None) -> str:
    """Live check of a layer list against the model's depth."""
    try:
        layers = parse_layers(text)
    except ConfigError as exc:
        return error(_reason(exc))
    if num_layers is None:
        return ""
    if layers == "all":
        return f"✓ all {num_layers} layers (valid: 0..{num_layers - 1})"
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        return error(f"{bad} outside the model's depth; valid layers are 0..{num_layers - 1}")
    return f"✓ {len(layers)} of {num_layers} layers (valid: 0..{num_layers - 1})"


@dataclass(frozen=True)
class ModelFields:
    """What the form shows for a chosen model: its linear modules, the targets to keep ticked, a summary."""

    modules: list[str]
    targets: list[str]
    summary: str
    layers_message: str


def model_fields(model_ref: str, current_targets: list[str] | None, layers_text: str) -> ModelFields:
    """Read the model's shape (config only) for the LoRA targets and the layer check; raises HeftError."""
    shape = model_shape(model_ref)
    names = sorted(shape["linear"])
    kept = ([m for m in (current_targets or []) if m in names] or [m for m in ("q_proj", "v_proj") if m in names]
            or names[:1])
    summary = (f"{escape(model_label(model_ref))}: {shape['num_layers']} layers (valid indices "
               f"0..{shape['num_layers'] - 1}), hidden size {shape['hidden_size']}, linear layers: {', '.join(names)}")
    return ModelFields(names, kept, summary, layers_message(layers_text, shape["num_layers"]))


def model_depth(model_ref: str) -> int | None:
    """The model's number of layers, or None while it cannot be read."""
    try:
        return model_shape((model_ref or "").strip())["num_layers"]
    except HeftError:
        return None


# --------------------------------------------------------------------------- estimates


@functools.lru_cache(maxsize=32)
def _local_counts(path: str, mtime: float) -> tuple[int, int]:
    from heft_core.data import load_data

    splits = load_data(path)
    return len(splits.train), len(splits.validation)


def data_counts(source: str) -> tuple[int, int] | None:
    """(train rows, validation rows) of a data source, or None if unknown without the hub."""
    if source == SYNTHETIC_DATA:
        return SYNTHETIC_SIZES
    if source in HUB_BOOLQ_SOURCES:
        return HUB_BOOLQ_SIZES
    if source.startswith(HUB_PREFIX):
        return None
    path = Path(local_boolq_dir() or source if source == LOCAL_BOOLQ else source).expanduser()
    try:
        return _local_counts(str(path.resolve()), path.stat().st_mtime)
    except (HeftError, OSError):  # not readable (yet): the estimate goes without row counts
        return None


def estimate_markdown(form: Mapping[str, Any], upload_path: str | None = None,
                      speeds: Mapping[str, timing.Speed] | None = None) -> str:
    """Trainable parameters per stage, examples x epochs, optimizer steps and time for the form.

    ``speeds`` ({method: Speed}, from ``app.timing.measured_speeds``) are this machine's measured
    speeds for the form's model; without them the time says what it assumes.
    """
    try:
        configs = form_to_configs(form, upload_path)
        shape = model_shape(configs[0].model)
    except ConfigError as exc:
        return (f"*Estimate unavailable:* {error_message(exc)}. The form has an invalid value (see the message next "
                "to the field); nothing can be launched until it is fixed.")
    except HeftError as exc:
        return f"*Estimate unavailable:* {error_message(exc)}"
    counts = data_counts(configs[0].data)
    rows = ["| run | stage | trainable params | examples × epochs | optimizer steps |", "|:--|:--|--:|--:|--:|"]
    times = []
    for config in configs:
        if config.method == "base":
            rows.append(f"| {METHOD_DESCRIPTIONS['base']} | — | 0 | — | 0 |")
            continue
        n_train = config.train_size
        if counts is not None:
            n_train = min(n_train, counts[0]) if n_train else counts[0]
        for stage, settings in config.stages():
            if stage == "lora":
                params = lora_params(shape, config.lora.rank, config.lora.target_modules, config.lora.layers)
            else:
                layers = config.reft.resolved_layers(shape["num_layers"])
                params = reft_params(shape["hidden_size"], config.reft.rank, len(layers), config.reft.positions,
                                     config.reft.share_weights)
            if n_train:
                steps = format_int(settings.optimizer_steps(n_train, config.processes))
                work = f"{format_int(n_train)} × {settings.epochs}"
            else:
                steps, work = "?", f"all × {settings.epochs}"
            rows.append(f"| {METHOD_TITLES[config.method]} | {stage} | {format_int(params)} | {work} | {steps} |")
        times.append(_time_line(config, n_train, counts, speeds))
    lines = ["\n".join(rows)]
    first = configs[0]
    if first.method == "heft":
        lines.append(f"HEFT total = {first.lora_stage.epochs} LoRA + {first.reft_stage.epochs} ReFT = "
                     f"**{first.total_epochs} epochs**.")
    if counts is not None:
        n_eval = min(first.eval_size, counts[1]) if first.eval_size else counts[1]
        lines.append(f"Evaluation: {format_int(n_eval)} validation questions after every epoch (data has "
                     f"{format_int(counts[0])} train / {format_int(counts[1])} validation rows).")
    lines += [line for line in times if line]
    return "\n\n".join(lines)


def _time_line(config: RunConfig, n_train: int | None, counts: tuple[int, int] | None,
               speeds: Mapping[str, timing.Speed] | None) -> str:
    """"**HEFT: ~9 min** (loading ~15 s, training ~7 min, evaluation ~2 min) — based on run #12's ..."."""
    n_eval = config.eval_size
    if counts is not None:
        n_eval = min(n_eval, counts[1]) if n_eval else counts[1]
    if not n_train or not n_eval:
        return ""
    speed = timing.speed_for(speeds, config.method)
    rates = timing.rates_for(config)  # this machine's calibration of the model, else its size
    estimate = timing.estimate_seconds(config, n_train, n_eval, speed, any_measured=bool(speeds),
                                       tokens=timing.real_tokens(config), rates=rates)
    return (f"**{METHOD_TITLES[config.method]}: {timing.format_range(estimate.low, estimate.high)}** (loading "
            f"~{format_duration(estimate.load)}, training ~{format_duration(estimate.train)}, evaluation "
            f"~{format_duration(estimate.evaluation)}) — {escape(estimate.basis)}.")
