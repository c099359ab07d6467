"""Run configuration: one validated dataclass per concern, in the style of peft's configs.

Everything a run depends on lives here and is stored with the run (``RunConfig.to_dict``).
Static checks run on construction; checks that need the model's shape (layer indices, target
module names) run in ``RunConfig.validate_for_model`` with only the model's config loaded.
Every error names the option and the allowed range.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heft_core.prompt import PromptTemplate

METHODS = ("base", "lora", "reft", "heft")  # "base": zero-shot, no training
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STAGE2_MODES = ("adapter", "merged")
PRECISIONS = ("auto", "no", "bf16", "fp16")
EMBEDDED_MODEL = "embedded"
SYNTHETIC_DATA = "synthetic"

_POSITIONS_RE = re.compile(r"^(?:f(\d+))?(?:\+)?(?:l(\d+))?$")


class ConfigError(ValueError):
    """A configuration value outside its allowed range. The message names the option."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


def _require(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigError(option, message)


def parse_positions(text: str) -> tuple[int, int]:
    """Parse pyreft's position syntax: ``f7+l7`` -> (7, 7), ``l1`` -> (0, 1), ``f3`` -> (3, 0)."""
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


def parse_layers(value: str | list[int] | tuple[int, ...] | None) -> list[int] | str:
    """Parse a layer selection: ``"all"``, a list of ints, or text like ``"0,2,4-7"``."""
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
                    raise ConfigError("reft.layers", f"range {part!r} runs backwards")
                layers.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                layers.append(int(part))
            else:
                raise ConfigError("reft.layers", f"{part!r} is not a layer index; write e.g. '0,2,4-7' or 'all'")
        value = layers
    try:
        layers = sorted({int(v) for v in value})
    except (TypeError, ValueError) as exc:
        raise ConfigError("reft.layers", f"{value!r} is not a list of layer indices") from exc
    if not layers:
        raise ConfigError("reft.layers", "choose at least one layer (or 'all')")
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
        self.target_modules = list(self.target_modules)
        if isinstance(self.layers, str):
            parsed = parse_layers(self.layers)
            self.layers = None if parsed == "all" else parsed
        _require(isinstance(self.rank, int) and 1 <= self.rank <= 1024, "lora.rank", f"must be an integer in 1..1024, got {self.rank!r}")
        _require(0 < float(self.alpha) <= 4096, "lora.alpha", f"must be in (0, 4096], got {self.alpha!r}")
        _require(0.0 <= float(self.dropout) < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
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
        _require(isinstance(self.rank, int) and 1 <= self.rank <= 512, "reft.rank", f"must be an integer in 1..512, got {self.rank!r}")
        _require(0.0 <= float(self.dropout) < 1.0, "reft.dropout", f"must be in [0, 1), got {self.dropout!r}")
        parse_positions(self.positions)

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
        _require(isinstance(self.epochs, int) and low <= self.epochs <= 1000, f"{prefix}.epochs", f"must be an integer in {low}..1000, got {self.epochs!r}")
        _require(0 < float(self.learning_rate) <= 1.0, f"{prefix}.learning_rate", f"must be in (0, 1], got {self.learning_rate!r}")
        _require(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 4096, f"{prefix}.batch_size", f"must be an integer in 1..4096, got {self.batch_size!r}")
        _require(isinstance(self.grad_accum, int) and 1 <= self.grad_accum <= 1024, f"{prefix}.grad_accum", f"must be an integer in 1..1024, got {self.grad_accum!r}")
        _require(0.0 <= float(self.warmup_ratio) < 1.0, f"{prefix}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        _require(0.0 <= float(self.weight_decay) <= 1.0, f"{prefix}.weight_decay", f"must be in [0, 1], got {self.weight_decay!r}")
        _require(self.scheduler in SCHEDULERS, f"{prefix}.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _require(float(self.max_grad_norm) >= 0, f"{prefix}.max_grad_norm", f"must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")


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
    name: str = ""

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        _require(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _require(isinstance(self.model, str) and self.model.strip() != "", "model", "name the embedded model, a hub id or a local directory")
        _require(isinstance(self.data, str) and self.data.strip() != "", "data", "name 'synthetic', 'hub', a hub dataset id or a local path")
        if self.uses_lora:
            self.lora_stage.validate("lora_stage")
        if self.uses_reft:
            self.reft_stage.validate("reft_stage")
        _require(self.heft_stage2_mode in STAGE2_MODES, "heft_stage2_mode", f"must be one of {', '.join(STAGE2_MODES)}, got {self.heft_stage2_mode!r}")
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(isinstance(self.max_length, int) and 16 <= self.max_length <= 32768, "max_length", f"must be an integer in 16..32768, got {self.max_length!r}")
        for option in ("train_size", "eval_size"):
            value = getattr(self, option)
            _require(value is None or (isinstance(value, int) and value >= 1), option, f"must be a positive integer or empty (all rows), got {value!r}")
        _require(isinstance(self.eval_batch_size, int) and 1 <= self.eval_batch_size <= 4096, "eval_batch_size", f"must be an integer in 1..4096, got {self.eval_batch_size!r}")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed", f"must be an integer in 0..2**32-1, got {self.seed!r}")
        _require(
            self.prefix_cache_mb == "auto" or (isinstance(self.prefix_cache_mb, int) and 0 <= self.prefix_cache_mb <= 1_048_576),
            "prefix_cache_mb", f"must be 'auto' or an integer in 0..1048576 (MiB), got {self.prefix_cache_mb!r}",
        )

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
                _require(not unknown, "lora.target_modules", f"{unknown} are not linear layers of this model; choose from {', '.join(sorted(linear_modules))} or 'all-linear'")

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def effective_dict(self) -> dict[str, Any]:
        """``to_dict`` without what this method does not use (LoRA settings in a ReFT run, ...)."""
        data = self.to_dict()
        unused = []
        if not self.uses_lora:
            unused += ["lora", "lora_stage"]
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
        nested = {"lora": LoraSettings, "reft": ReftSettings, "lora_stage": StageSettings, "reft_stage": StageSettings, "template": PromptTemplate}
        for key, kind in nested.items():
            if key in data and isinstance(data[key], dict):
                allowed = {f.name for f in dataclasses.fields(kind)}
                bad = sorted(set(data[key]) - allowed)
                if bad:
                    raise ConfigError(f"{key}.{bad[0]}", f"unknown option; known options are {', '.join(sorted(allowed))}")
                data[key] = kind(**data[key])
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Read a YAML or JSON config file."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("config", f"{path} must hold a mapping of options")
        return cls.from_dict(data)
