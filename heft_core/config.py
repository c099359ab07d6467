"""Run configuration: one validated dataclass per concern, in the style of peft's configs.

Everything a run depends on lives here and is stored with the run (``RunConfig.to_dict``).
Static checks run on construction; checks that need the model's shape (layer indices, target
module names) run in ``RunConfig.validate_for_model`` with only the model's config loaded.
Every error names the option and the allowed range.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heft_common.errors import ConfigError
from heft_common.vocabulary import EMBEDDED_MODEL, METHODS, SYNTHETIC_DATA
from heft_core.prompt import PromptTemplate

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STAGE2_MODES = ("adapter", "merged")
PRECISIONS = ("auto", "no", "bf16", "fp16")
# The LoRA stage's loss: cross-entropy on the answer token, or the paper's causal-LM loss over the
# whole prompt + answer + eos sequence (padding masked, the prompt not).
LORA_LOSSES = ("answer", "sequence")
# How evaluations score a question: the two answer tokens' logits; the paper's greedy generation of at
# most ``generation_max_new_tokens`` tokens with "Yes"/"No" looked for in the text (else "unparsed",
# counted wrong); or both on the same questions (the run's accuracy is then the logits'). Only a run's final
# evaluation uses it; those after earlier epochs score by logits (generation costs up to N passes a question).
SCORINGS = ("logits", "generation", "both")
MAX_GENERATION_TOKENS = 64


def primary_scoring(scoring: str) -> str:
    """The scoring a run's accuracy is given by: generation for "generation", else logits."""
    return "generation" if scoring == "generation" else "logits"

MAX_PROCESSES = 64  # data-parallel processes of one run, on one machine
# Experiment trackers a run can report to (heft_core.trackers), and W&B's modes.
TRACKERS = ("trackio", "tensorboard", "wandb", "mlflow")
WANDB_MODES = ("online", "offline", "disabled")

_POSITIONS_RE = re.compile(r"^(?:f(\d+))?(?:\+)?(?:l(\d+))?$")


def _number(value: Any) -> float:
    """``value`` as a float, or NaN when it is not a finite number, so that every range check fails on it.

    Only ints and floats count: a bool, a numeric string ("1e-3") or infinity would pass a range
    check through float() and then fail in the training process, after the run was queued.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not 1 epoch


def _require(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigError(option, message)


def _require_int(value: Any, option: str, low: int, high: int) -> None:
    in_range = _is_int(value) and low <= value <= high
    _require(in_range, option, f"must be an integer in {low}..{high}, got {value!r}")


def _require_bool(value: Any, option: str) -> None:
    _require(isinstance(value, bool), option, f"must be true or false, got {value!r}")


def _require_str(value: Any, option: str) -> None:
    _require(isinstance(value, str), option, f"must be text, got {value!r}")


def _require_choice(value: Any, option: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, option, f"must be one of {', '.join(choices)}, got {value!r}")


def parse_positions(text: str) -> tuple[int, int]:
    """Parse pyreft's position syntax: ``f7+l7`` -> (7, 7), ``l1`` -> (0, 1), ``f3`` -> (3, 0)."""
    if text is not None and not isinstance(text, str):
        raise ConfigError("reft.positions", f"must be a position string such as 'f7+l7' or 'l1', got {text!r}")
    cleaned = (text or "").strip().lower()
    match = _POSITIONS_RE.match(cleaned)
    if not cleaned or not match or (match.group(1) is None and match.group(2) is None):
        raise ConfigError(
            "reft.positions",
            f"{text!r} is not a position string; write f<n>, l<m> or f<n>+l<m> "
            "(first n / last m prompt tokens), e.g. 'f7+l7' or 'l1'",
        )
    if "+" in cleaned and (match.group(1) is None or match.group(2) is None):
        raise ConfigError("reft.positions", f"{text!r}: '+' must join f<n> and l<m>, e.g. 'f7+l7'")
    first = int(match.group(1) or 0)
    last = int(match.group(2) or 0)
    for value, letter in ((match.group(1), "f"), (match.group(2), "l")):
        if value is not None and not 1 <= int(value) <= 512:
            raise ConfigError("reft.positions", f"{letter}{value}: the count must be between 1 and 512")
    return first, last


def parse_layers(value: str | list[int] | tuple[int, ...] | None, option: str = "reft.layers") -> list[int] | str:
    """Parse a layer selection: ``"all"``, a list of ints, or text like ``"0,2,4-7"`` (errors name ``option``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return "all"
    if isinstance(value, str):
        layers: list[int] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            if re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(x) for x in part.split("-"))
                if lo > hi:
                    raise ConfigError(option, f"range {part!r} runs backwards")
                layers.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                layers.append(int(part))
            else:
                raise ConfigError(option, f"{part!r} is not a layer index; write e.g. '0,2,4-7' or 'all'")
        value = layers
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ConfigError(option, f"{value!r} is not a list of layer indices (whole numbers)")
    layers = sorted(set(value))
    if not layers:
        raise ConfigError(option, "choose at least one layer (or 'all')")
    return layers


@dataclass
class LoraSettings:
    """LoRA in weight space (peft ``LoraConfig``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # None: every layer

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        modules = self.target_modules
        _require(
            isinstance(modules, (list, tuple)) and all(isinstance(name, str) and name for name in modules),
            "lora.target_modules", f"must be a list of module names (or 'all-linear'), got {modules!r}",
        )
        self.target_modules = list(self.target_modules)
        if isinstance(self.layers, str):
            parsed = parse_layers(self.layers, "lora.layers")
            self.layers = None if parsed == "all" else parsed
        elif self.layers is not None:
            _require(
                isinstance(self.layers, (list, tuple)) and all(_is_int(v) for v in self.layers), "lora.layers",
                f"must be a list of layer indices (whole numbers) or empty for every layer, got {self.layers!r}",
            )
        _require_int(self.rank, "lora.rank", 1, 1024)
        _require(0 < _number(self.alpha) <= 4096, "lora.alpha", f"must be in (0, 4096], got {self.alpha!r}")
        _require(0.0 <= _number(self.dropout) < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
        _require(bool(self.target_modules), "lora.target_modules", "choose at least one module (or 'all-linear')")


@dataclass
class ReftSettings:
    """LoReFT interventions on the residual stream (pyreft ``LoreftIntervention``)."""

    rank: int = 4
    layers: list[int] | str = "all"
    positions: str = "f7+l7"
    share_weights: bool = True
    dropout: float = 0.05

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        _require_int(self.rank, "reft.rank", 1, 512)
        _require(0.0 <= _number(self.dropout) < 1.0, "reft.dropout", f"must be in [0, 1), got {self.dropout!r}")
        parse_positions(self.positions)
        _require_bool(self.share_weights, "reft.share_weights")

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)

    def resolved_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.layers == "all" else list(self.layers)


@dataclass
class StageSettings:
    """Optimiser settings of one training stage."""

    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0

    def optimizer_steps(self, num_examples: int, num_processes: int = 1) -> int:
        """Optimizer steps of this stage over ``num_examples`` training examples.

        With several processes each takes an equal share of whole batches (see the training loop).
        """
        batches = -(-num_examples // self.batch_size)
        if num_processes > 1:
            batches //= num_processes
        return -(-batches // self.grad_accum) * self.epochs

    def validate(self, prefix: str, allow_zero_epochs: bool = False) -> None:
        low = 0 if allow_zero_epochs else 1
        _require_int(self.epochs, f"{prefix}.epochs", low, 1000)
        _require(
            0 < _number(self.learning_rate) <= 1.0, f"{prefix}.learning_rate",
            f"must be in (0, 1], got {self.learning_rate!r}",
        )
        _require_int(self.batch_size, f"{prefix}.batch_size", 1, 4096)
        _require_int(self.grad_accum, f"{prefix}.grad_accum", 1, 1024)
        _require(
            0.0 <= _number(self.warmup_ratio) < 1.0, f"{prefix}.warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio!r}",
        )
        _require(
            0.0 <= _number(self.weight_decay) <= 1.0, f"{prefix}.weight_decay",
            f"must be in [0, 1], got {self.weight_decay!r}",
        )
        _require_choice(self.scheduler, f"{prefix}.scheduler", SCHEDULERS)
        _require(
            _number(self.max_grad_norm) >= 0, f"{prefix}.max_grad_norm",
            f"must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}",
        )


@dataclass
class ReportSettings:
    """Where a run is reported besides the registry (``heft_core.trackers``). Never changes what a run learns.

    Locations left empty take the tracker's own default: Trackio logs locally, TensorBoard into the run
    directory's ``tensorboard/``, W&B to ``project``, MLflow to ``MLFLOW_TRACKING_URI`` or a file store in
    the data home. Credentials come from each tracker's environment variables or login, never from here.
    """

    report_to: list[str] = field(default_factory=list)  # a subset of TRACKERS; empty: none
    project: str = "heft-studio"  # Trackio project, W&B project, MLflow experiment
    trackio_space_id: str = ""  # a Hugging Face Space ("user/space"); empty: local
    tensorboard_dir: str = ""  # empty: <run dir>/tensorboard
    wandb_mode: str = "online"  # online, offline or disabled
    mlflow_tracking_uri: str = ""
    group: str = ""  # a study sets it: runs of one study are one group
    tags: dict[str, str] = field(default_factory=dict)  # a study sets study, arm, seed and grid point

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # "trackio,tensorboard" from the CLI or a text box
            self.report_to = [name.strip().lower() for name in self.report_to.split(",") if name.strip()]
        _require(isinstance(self.report_to, (list, tuple)), "report.report_to",
                 f"must be a list of trackers ({', '.join(TRACKERS)}), got {self.report_to!r}")
        for name in self.report_to:
            _require_choice(name, "report.report_to", TRACKERS)
        self.report_to = list(dict.fromkeys(self.report_to))
        for option in ("project", "trackio_space_id", "tensorboard_dir", "mlflow_tracking_uri", "group"):
            _require_str(getattr(self, option), f"report.{option}")
        _require(bool(self.project.strip()), "report.project", "name the tracker project (e.g. heft-studio)")
        _require_choice(self.wandb_mode, "report.wandb_mode", WANDB_MODES)
        tags = self.tags
        texts = isinstance(tags, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
        _require(
            texts, "report.tags", f"must be a mapping of text to text, got {self.tags!r}",
        )


def _default_lora_stage() -> StageSettings:
    return StageSettings(epochs=1, learning_rate=2e-4)


def _default_reft_stage() -> StageSettings:
    return StageSettings(epochs=1, learning_rate=2e-3)


@dataclass
class RunConfig:
    """Everything one training run depends on. Stored verbatim with the run."""

    method: str = "heft"
    model: str = EMBEDDED_MODEL
    data: str = SYNTHETIC_DATA
    lora: LoraSettings = field(default_factory=LoraSettings)
    reft: ReftSettings = field(default_factory=ReftSettings)
    lora_stage: StageSettings = field(default_factory=_default_lora_stage)  # LoRA-only, and HEFT stage 1
    reft_stage: StageSettings = field(default_factory=_default_reft_stage)  # ReFT-only, and HEFT stage 2
    heft_stage2_mode: str = "adapter"  # keep stage-1 LoRA as a frozen adapter, or merge it
    lora_loss: str = "answer"  # one of LORA_LOSSES
    scoring: str = "logits"  # one of SCORINGS
    generation_max_new_tokens: int = 5  # with generation scoring; the paper's 5
    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_length: int = 256
    train_size: int | None = 256
    eval_size: int | None = 128
    eval_every_epoch: bool = True
    eval_batch_size: int = 16
    seed: int = 42
    precision: str = "auto"
    # MiB for ReFT prefix states kept across epochs (heft_core.prefix_cache); 0 recomputes them in
    # every step; "auto" takes a quarter of the memory available where they live when the stage starts.
    prefix_cache_mb: int | str = "auto"
    # MiB for the hidden states entering the first LoRA layer when lora.layers leaves layers 0..k-1
    # frozen (heft_core.frozen_cache): later epochs and evaluations skip them; 0 keeps none; "auto" as above.
    frozen_cache_mb: int | str = "auto"
    # Data-parallel processes for this one run (accelerate launch), given as many GPUs on one machine.
    # batch_size is per process: the global batch is processes x batch_size x grad_accum.
    processes: int = 1
    # Minutes of training between checkpoints inside an epoch (taken at an optimizer-step boundary);
    # 0: only at epoch ends. A checkpoint is always written at every epoch end (heft_core.checkpoint).
    checkpoint_minutes: float = 10.0
    keep_epoch_checkpoints: bool = False  # keep every epoch's checkpoint, not only the latest
    name: str = ""
    report: ReportSettings = field(default_factory=ReportSettings)  # trackers; not a learning setting

    def __post_init__(self) -> None:
        # Types first: a JSON config may hold anything (a number for a section, a string for a flag).
        for option, kind in (("lora", LoraSettings), ("reft", ReftSettings), ("lora_stage", StageSettings),
                             ("reft_stage", StageSettings), ("template", PromptTemplate),
                             ("report", ReportSettings)):
            value = getattr(self, option)
            _require(isinstance(value, kind), option, f"must be an object of {option} options, got {value!r}")
        for part in dataclasses.fields(PromptTemplate):
            _require_str(getattr(self.template, part.name), f"template.{part.name}")
        _require_str(self.method, "method")
        self.method = self.method.lower()
        _require_choice(self.method, "method", METHODS)
        _require(
            isinstance(self.model, str) and self.model.strip() != "", "model",
            "name the embedded model, a hub id or a local directory",
        )
        _require(
            isinstance(self.data, str) and self.data.strip() != "", "data",
            "name 'synthetic', 'hub', a hub dataset id or a local path",
        )
        if self.uses_lora:
            self.lora_stage.validate("lora_stage")
        if self.uses_reft:
            self.reft_stage.validate("reft_stage")
        _require_choice(self.heft_stage2_mode, "heft_stage2_mode", STAGE2_MODES)
        _require_choice(self.lora_loss, "lora_loss", LORA_LOSSES)
        _require_choice(self.scoring, "scoring", SCORINGS)
        _require_int(self.generation_max_new_tokens, "generation_max_new_tokens", 1, MAX_GENERATION_TOKENS)
        _require_choice(self.precision, "precision", PRECISIONS)
        _require_int(self.max_length, "max_length", 16, 32768)
        for option in ("train_size", "eval_size"):
            value = getattr(self, option)
            _require(
                value is None or (_is_int(value) and value >= 1), option,
                f"must be a positive integer or empty (all rows), got {value!r}",
            )
        _require_bool(self.eval_every_epoch, "eval_every_epoch")
        _require_int(self.eval_batch_size, "eval_batch_size", 1, 4096)
        _require(
            _is_int(self.seed) and 0 <= self.seed < 2**32, "seed",
            f"must be an integer in 0..2**32-1, got {self.seed!r}",
        )
        cache_mb = self.prefix_cache_mb
        _require(
            cache_mb == "auto" or (_is_int(cache_mb) and 0 <= cache_mb <= 1_048_576), "prefix_cache_mb",
            f"must be 'auto' or an integer in 0..1048576 (MiB), got {cache_mb!r}",
        )
        frozen_mb = self.frozen_cache_mb
        _require(
            frozen_mb == "auto" or (_is_int(frozen_mb) and 0 <= frozen_mb <= 1_048_576), "frozen_cache_mb",
            f"must be 'auto' or an integer in 0..1048576 (MiB), got {frozen_mb!r}",
        )
        _require_int(self.processes, "processes", 1, MAX_PROCESSES)
        minutes = self.checkpoint_minutes
        _require(
            0 <= _number(minutes) <= 1440, "checkpoint_minutes",
            f"must be a number of minutes in [0, 1440] (0: only at epoch ends), got {minutes!r}",
        )
        self.checkpoint_minutes = float(minutes)
        _require_bool(self.keep_epoch_checkpoints, "keep_epoch_checkpoints")
        _require_str(self.name, "name")

    # --- what the method uses -------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "heft")

    @property
    def uses_reft(self) -> bool:
        return self.method in ("reft", "heft")

    def stages(self) -> list[tuple[str, StageSettings]]:
        """The training stages in order: ("lora", ...), ("reft", ...)."""
        stages = []
        if self.uses_lora:
            stages.append(("lora", self.lora_stage))
        if self.uses_reft:
            stages.append(("reft", self.reft_stage))
        return stages

    @property
    def primary_scoring(self) -> str:
        """"logits" or "generation": the scoring the run's accuracy is given by."""
        return primary_scoring(self.scoring)

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for _, stage in self.stages())

    # --- checks that need the model's shape --------------------------------------------------
    def validate_for_model(self, num_layers: int, linear_modules: set[str]) -> None:
        """Check layer indices and target modules against the model (config only, no weights)."""
        if self.uses_reft and self.reft.layers != "all":
            bad = [layer for layer in self.reft.layers if not 0 <= layer < num_layers]
            _require(not bad, "reft.layers", f"{bad} outside the model's depth; allowed 0..{num_layers - 1}")
        if self.uses_lora:
            if self.lora.layers:
                bad = [layer for layer in self.lora.layers if not 0 <= layer < num_layers]
                _require(not bad, "lora.layers", f"{bad} outside the model's depth; allowed 0..{num_layers - 1}")
            if self.lora.target_modules != ["all-linear"]:
                unknown = [m for m in self.lora.target_modules if m not in linear_modules]
                _require(
                    not unknown, "lora.target_modules",
                    f"{unknown} are not linear layers of this model; "
                    f"choose from {', '.join(sorted(linear_modules))} or 'all-linear'",
                )

    def validate_for_tokenizer(self, tokenizer: Any) -> None:
        """Check the template against the model's tokenizer: one-token answers, and room in ``max_length``
        for the template, a short question and at least one passage token (else no prompt fits)."""
        from heft_core.prompt import PromptEncoder

        PromptEncoder(tokenizer, self.template, self.max_length).encode("", "is it")

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def effective_dict(self) -> dict[str, Any]:
        """``to_dict`` without what this method does not use (LoRA settings in a ReFT run, ...) and without
        ``report``: where a run is reported never changes what it learns."""
        data = self.to_dict()
        unused = ["report"]
        if not self.uses_lora:
            unused += ["lora", "lora_stage", "lora_loss", "frozen_cache_mb"]
        if not self.uses_reft:
            unused += ["reft", "reft_stage", "prefix_cache_mb"]
        if self.method != "heft":
            unused.append("heft_stage2_mode")
        for key in unused:
            data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown option; known options are {', '.join(sorted(known))}")
        nested = {
            "lora": LoraSettings, "reft": ReftSettings, "lora_stage": StageSettings, "reft_stage": StageSettings,
            "template": PromptTemplate, "report": ReportSettings,
        }
        for key, kind in nested.items():
            if key in data and isinstance(data[key], dict):
                allowed = {f.name for f in dataclasses.fields(kind)}
                bad = sorted(set(data[key]) - allowed)
                if bad:
                    known_here = ", ".join(sorted(allowed))
                    raise ConfigError(f"{key}.{bad[0]}", f"unknown option; known options are {known_here}")
                data[key] = kind(**data[key])
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Read a YAML or JSON config file."""
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError("config", f"cannot read {path} ({error.strerror or error})") from error
        try:
            if str(path).endswith((".yaml", ".yml")):
                data = yaml.load(text, Loader=_ConfigLoader) or {}
            else:
                data = json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            detail = " ".join(str(error).split())  # YAML's messages span lines; the CLI prints one
            raise ConfigError("config", f"{path} is not valid YAML or JSON ({detail})") from error
        if not isinstance(data, dict):
            raise ConfigError("config", f"{path} must hold a mapping of options")
        return cls.from_dict(data)


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; learning rates are written that way, so read them as floats
    (RunConfig refuses numeric strings)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
