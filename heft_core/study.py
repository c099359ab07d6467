"""Studies: the research question answered across arms, seeds and a grid, as one object.

A :class:`StudySpec` names **arms** (a method and its epoch budget: base; LoRA 3 epochs; HEFT
1+2; ...), **seeds**, an optional **grid** over any run option, and the options every run shares
(``base``: model, data, subset sizes, LoRA/ReFT settings). ``spec.plan()`` expands it into one
:class:`PlannedRun` per seed x grid point x arm, each with a complete, validated
:class:`~heft_core.config.RunConfig`. A spec is YAML/JSON (``from_file``, ``from_dict``,
``to_dict``): one schema for the UI, the API and the CLI.

Pairing. Every run of a study evaluates the same questions: the evaluation subset is drawn with
a fixed seed whatever the run's seed (``heft_core.train.prepare``), and ``model``, ``data`` and
``eval_size`` cannot vary inside a study. The run's seed draws the training subset, the initial
weights and the batch order, so the arms of one seed train on the same rows; the report pairs
runs by seed and questions by uid.

The presets (the paper's recipe and table, "Equal budget", the CPU presets) are ``heft_core.study_presets``;
the report is ``heft_core.study_report``; training a study in this process, ``heft_core.study_runner``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heft_common.errors import ConfigError
from heft_common.vocabulary import EMBEDDED_MODEL, METHOD_TITLES, METHODS
from heft_core import stats
from heft_core.config import RunConfig

logger = logging.getLogger(__name__)

MAX_RUNS_DEFAULT = 200
MAX_RUNS_CEILING = 2000
MAX_ARMS = 50
# Options the study itself sets for every run: never in ``base``, an arm's ``options`` or the grid.
STUDY_CONTROLLED = {
    "method": "each arm names its method",
    "seed": "the study's seeds set it",
    "lora_stage.epochs": "an arm's lora_epochs set it",
    "reft_stage.epochs": "an arm's reft_epochs set it",
    "name": "runs are named after the study, arm, seed and grid point",
    "report.group": "trackers group a study's runs under the study's name",
    "report.tags": "trackers tag each run with its study, arm, seed and grid point",
}
# Options every run must share so that all runs are paired on the same questions: ``base`` only.
SHARED_ONLY = {
    "model": "all runs of a study use one base model",
    "data": "all runs of a study use one data source",
    "eval_size": "all runs of a study are evaluated on the same questions",
}
ARM_NAME_PATTERN = re.compile(r"^[\w][\w .+()=,:-]{0,59}$")
# Typical share of questions two fine-tunes of one model disagree on; the pre-launch assumption.
TYPICAL_DISCORDANCE = 0.10


# --------------------------------------------------------------------------- dotted options


def _nested_groups() -> dict[str, type]:
    """RunConfig fields that hold a settings dataclass (lora, reft, lora_stage, ...), by name."""
    groups = {}
    for spec_field in dataclasses.fields(RunConfig):
        if spec_field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = spec_field.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                groups[spec_field.name] = type(default)
    return groups


def dotted_options() -> tuple[str, ...]:
    """Every RunConfig option by dotted name: ``seed``, ``lora.rank``, ``reft_stage.learning_rate``, ..."""
    groups = _nested_groups()
    names = []
    for spec_field in dataclasses.fields(RunConfig):
        if spec_field.name in groups:
            names.extend(f"{spec_field.name}.{inner.name}" for inner in dataclasses.fields(groups[spec_field.name]))
        else:
            names.append(spec_field.name)
    return tuple(names)


def _unknown_option(option: str, where: str) -> ConfigError:
    known = dotted_options()
    close = difflib.get_close_matches(option, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ConfigError(
        f"{where}.{option}", f"unknown option; {hint}options are RunConfig's dotted names: {', '.join(known)}"
    )


def _flatten(options: Any, where: str) -> dict[str, Any]:
    """``{"lora": {"rank": 8}, "reft_stage.learning_rate": 1e-3}`` -> dotted keys, checked against RunConfig."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(where, f"must be a mapping of RunConfig options, got {type(options).__name__}")
    groups = _nested_groups()
    known = set(dotted_options())
    flat: dict[str, Any] = {}
    for key, value in options.items():
        key = str(key)
        if key in groups and isinstance(value, Mapping):
            for inner_key, inner_value in value.items():
                flat[f"{key}.{inner_key}"] = inner_value
        else:
            flat[key] = value
    for key in flat:
        if key not in known:
            raise _unknown_option(key, where)
    return flat


def _config_from_flat(flat: Mapping[str, Any]) -> RunConfig:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            group, inner = key.split(".", 1)
            nested.setdefault(group, {})[inner] = copy.deepcopy(value)
        else:
            nested[key] = copy.deepcopy(value)
    return RunConfig.from_dict(nested)


def grid_key(point: Mapping[str, Any]) -> str:
    """A grid point as canonical JSON: equal points, equal keys."""
    return json.dumps(dict(point), sort_keys=True)


def grid_label(point: Mapping[str, Any]) -> str:
    """``lora.rank=8, lora_stage.learning_rate=0.001``; empty without a grid."""
    return ", ".join(
        f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in sorted(point.items())
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-") or "arm"


def _check_int(value: Any, option: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(option, f"must be an integer in {low}..{high}, got {value!r}")
    return value


# --------------------------------------------------------------------------- spec


@dataclass
class StudyArm:
    """One arm: a method and its epoch budget, plus options that differ from the study's ``base``.

    Budgets: ``base`` trains nothing (no epochs); ``lora`` needs ``lora_epochs``; ``reft`` needs
    ``reft_epochs``; ``heft`` needs both (LoRA for ``lora_epochs``, then ReFT for ``reft_epochs``).
    ``name`` defaults to e.g. "LoRA 3" or "HEFT 1+2".
    """

    method: str
    lora_epochs: int | None = None
    reft_epochs: int | None = None
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = str(self.method).strip().lower()
        if self.method not in METHODS:
            raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        needs = {
            "base": (),
            "lora": ("lora_epochs",),
            "reft": ("reft_epochs",),
            "heft": ("lora_epochs", "reft_epochs"),
        }[self.method]
        for budget in ("lora_epochs", "reft_epochs"):
            value = getattr(self, budget)
            if budget in needs:
                if value is None:
                    raise ConfigError(
                        budget, f"a {METHOD_TITLES[self.method]} arm needs an epoch budget: set {' and '.join(needs)}"
                    )
                _check_int(value, budget, 1, 1000)
            elif value not in (None, 0):
                stage = {"lora_epochs": "LoRA", "reft_epochs": "ReFT"}[budget]
                raise ConfigError(
                    budget, f"a {METHOD_TITLES[self.method]} arm trains no {stage} stage; leave {budget} out"
                )
            else:
                setattr(self, budget, None)
        self.name = str(self.name or self.default_name()).strip()
        if not ARM_NAME_PATTERN.match(self.name):
            raise ConfigError(
                "name",
                f"{self.name!r}: 1-60 letters, digits, spaces or . + ( ) = , : - characters, "
                "starting with a letter or digit",
            )
        flat = _flatten(self.options, "options")
        for key in flat:
            if key in STUDY_CONTROLLED or key in SHARED_ONLY:
                raise ConfigError(
                    f"options.{key}", f"cannot be set per arm: {STUDY_CONTROLLED.get(key) or SHARED_ONLY[key]}"
                )
        self.options = flat

    def default_name(self) -> str:
        title = METHOD_TITLES[self.method]
        return title if self.method == "base" else f"{title} {self.budget_label}"

    @property
    def budget_label(self) -> str:
        """The budget as text: "3" for one stage, "1+2" for HEFT, "0" for base."""
        if self.method == "heft":
            return f"{self.lora_epochs}+{self.reft_epochs}"
        return str(self.lora_epochs or self.reft_epochs or 0)

    @property
    def total_epochs(self) -> int:
        return (self.lora_epochs or 0) + (self.reft_epochs or 0)

    def run_options(self) -> dict[str, Any]:
        """The dotted options this arm sets on a run: its own options, then method and budget."""
        values: dict[str, Any] = dict(self.options)
        values["method"] = self.method
        if self.lora_epochs:
            values["lora_stage.epochs"] = self.lora_epochs
        if self.reft_epochs:
            values["reft_stage.epochs"] = self.reft_epochs
        return values

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "method": self.method}
        if self.lora_epochs:
            data["lora_epochs"] = self.lora_epochs
        if self.reft_epochs:
            data["reft_epochs"] = self.reft_epochs
        if self.options:
            data["options"] = dict(self.options)
        return data


@dataclass
class PlannedRun:
    """One run of a study's plan: its cell (arm, seed, grid point) and its complete config."""

    index: int
    arm: str
    method: str
    seed: int
    grid_point: dict[str, Any]
    grid_index: int
    config: RunConfig
    # index of the planned LoRA run whose finished adapter is this HEFT run's stage 1 (trained once, not twice)
    stage1_from: int | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return self.arm, self.seed, grid_key(self.grid_point)

    @property
    def grid_label(self) -> str:
        return grid_label(self.grid_point)

    @property
    def dir_name(self) -> str:
        """Directory of this run inside a study directory's ``runs/``."""
        suffix = f"-g{self.grid_index}" if self.grid_point else ""
        return f"{self.index:03d}-{_slug(self.arm)}-s{self.seed}{suffix}"

    def optimizer_steps(self, train_examples: int) -> int:
        """Optimizer steps of this run on ``train_examples`` training rows (0 for base)."""
        return sum(stage.optimizer_steps(train_examples, self.config.processes) for _, stage in self.config.stages())

    def queue_fields(self) -> dict[str, Any]:
        """One item of ``storage.queries.create_study``'s ``runs``."""
        return {
            "name": self.config.name,
            "method": self.method,
            "config": self.config.to_dict(),
            "base_model": self.config.model,
            "data_source": self.config.data,
            "total_epochs": float(self.config.total_epochs),
            "arm": self.arm,
            "seed": self.seed,
            "grid_point": dict(self.grid_point),
        }


@dataclass
class StudySpec:
    """A whole experiment: arms x seeds x grid points, everything else shared. Validated on construction.

    * ``name``: the study's name.
    * ``arms``: :class:`StudyArm` items (or dicts with their fields), at least one, unique names.
    * ``seeds``: at least one; each seed trains every arm once (same training rows for all arms).
    * ``grid``: dotted RunConfig option -> list of values (``{"lora.rank": [4, 8]}``); every
      combination is a grid point and each grid point x seed x arm is one run.
    * ``base``: RunConfig options every run shares (dotted or nested): model, data,
      train_size, eval_size, LoRA/ReFT settings, ...
    * ``max_runs``: refuse plans larger than this (default 200, at most 2000).
    * ``contrasts``: extra [arm A, arm B] pairs to test, beside the default ones
      (HEFT vs each LoRA and ReFT arm; a longer LoRA/ReFT arm vs HEFT).
    * ``description``: free text shown with the report.
    * ``compare_with_paper``: the report puts the paper's Table 1 number and time beside each arm that
      has a row there (same method and epochs); the "Paper table" presets set it.

    Every error is a :class:`ConfigError` naming the field, e.g. ``grid.lora.rnak``,
    ``arms[2].lora_epochs``, ``seeds``.
    """

    name: str
    arms: list[StudyArm]
    seeds: list[int] = field(default_factory=lambda: [42])
    grid: dict[str, list[Any]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    max_runs: int = MAX_RUNS_DEFAULT
    contrasts: list[list[str]] = field(default_factory=list)
    description: str = ""
    compare_with_paper: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 200:
            raise ConfigError("name", "give the study a name of 1-200 characters")
        self.name = self.name.strip()
        self.description = str(self.description or "")
        if not isinstance(self.compare_with_paper, bool):
            raise ConfigError("compare_with_paper", f"must be true or false, got {self.compare_with_paper!r}")
        self.max_runs = _check_int(self.max_runs, "max_runs", 1, MAX_RUNS_CEILING)
        self._check_arms()
        self._check_seeds()
        self.base = _flatten(self.base, "base")
        for key in self.base:
            if key in STUDY_CONTROLLED:
                raise ConfigError(f"base.{key}", f"cannot be shared: {STUDY_CONTROLLED[key]}")
        self._check_grid()
        self._check_contrasts()
        self._check_every_cell()

    # --- checks ----------------------------------------------------------------------------
    def _check_arms(self) -> None:
        if not isinstance(self.arms, (list, tuple)) or not self.arms:
            raise ConfigError("arms", "give at least one arm, e.g. {method: lora, lora_epochs: 3}")
        if len(self.arms) > MAX_ARMS:
            raise ConfigError("arms", f"at most {MAX_ARMS} arms, got {len(self.arms)}")
        arms = []
        for index, arm in enumerate(self.arms):
            where = f"arms[{index}]"
            try:
                if isinstance(arm, StudyArm):
                    arms.append(arm)
                elif isinstance(arm, Mapping):
                    allowed = {f.name for f in dataclasses.fields(StudyArm)}
                    unknown = sorted(set(arm) - allowed)
                    if unknown:
                        raise ConfigError(unknown[0], f"unknown arm field; arm fields are {', '.join(sorted(allowed))}")
                    if "method" not in arm:
                        raise ConfigError("method", f"every arm names its method: one of {', '.join(METHODS)}")
                    arms.append(StudyArm(**arm))
                else:
                    raise ConfigError(where, f"an arm is a mapping like {{method: lora, lora_epochs: 3}}, got {arm!r}")
            except ConfigError as error:
                raise _within(error, where) from None
        seen: dict[str, int] = {}
        for index, arm in enumerate(arms):
            folded = arm.name.casefold()
            if folded in seen:
                raise ConfigError(
                    f"arms[{index}].name",
                    f"{arm.name!r} is also the name of arms[{seen[folded]}]; give each arm its own name",
                )
            seen[folded] = index
        self.arms = arms

    def _check_seeds(self) -> None:
        seeds = self.seeds
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ConfigError("seeds", "give at least one seed, e.g. [42, 43, 44]")
        for index, seed in enumerate(seeds):
            _check_int(seed, f"seeds[{index}]", 0, 2**32 - 1)
        if len(set(seeds)) != len(seeds):
            raise ConfigError("seeds", f"each seed once, got {list(seeds)}")
        self.seeds = list(seeds)

    def _check_grid(self) -> None:
        if not isinstance(self.grid, Mapping):
            raise ConfigError("grid", "must map dotted RunConfig options to lists of values, e.g. {lora.rank: [4, 8]}")
        known = set(dotted_options())
        grid: dict[str, list[Any]] = {}
        for key, values in self.grid.items():
            key = str(key)
            if key not in known:
                raise _unknown_option(key, "grid")
            if key in STUDY_CONTROLLED or key in SHARED_ONLY:
                raise ConfigError(
                    f"grid.{key}", f"cannot vary in a grid: {STUDY_CONTROLLED.get(key) or SHARED_ONLY[key]}"
                )
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"grid.{key}", f"must be a non-empty list of values, got {values!r}")
            encoded = [json.dumps(value, sort_keys=True) for value in values]
            if len(set(encoded)) != len(encoded):
                raise ConfigError(f"grid.{key}", f"each value once, got {list(values)}")
            grid[key] = list(values)
        self.grid = grid
        points = self.grid_points_count
        runs = len(self.arms) * len(self.seeds) * points
        if runs > self.max_runs:
            field_name = "grid" if grid else "seeds"
            raise ConfigError(
                field_name,
                f"{len(self.arms)} arms x {len(self.seeds)} seeds x {points} grid points = {runs} runs, more than "
                f"max_runs={self.max_runs}; shrink the {'grid' if grid else 'seeds or arms'} "
                f"or raise max_runs (at most {MAX_RUNS_CEILING})",
            )

    def _check_contrasts(self) -> None:
        names = {arm.name for arm in self.arms}
        pairs = []
        for index, pair in enumerate(self.contrasts or []):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"contrasts[{index}]", f"a contrast is a pair of arm names [A, B], got {pair!r}")
            a, b = (str(name) for name in pair)
            for name in (a, b):
                if name not in names:
                    raise ConfigError(
                        f"contrasts[{index}]", f"{name!r} is not an arm of this study; arms: {', '.join(sorted(names))}"
                    )
            if a == b:
                raise ConfigError(f"contrasts[{index}]", f"compares {a!r} with itself")
            pairs.append([a, b])
        self.contrasts = pairs

    def _check_every_cell(self) -> None:
        """Build each arm x grid point's config once (with the first seed): every bad value found now."""
        for arm_index, arm in enumerate(self.arms):
            for point in self.grid_points():
                try:
                    self._config(arm, point, self.seeds[0])
                except ConfigError as error:
                    option = error.option
                    detail = getattr(error, "detail", str(error))
                    if option in point:
                        raise ConfigError(f"grid.{option}", f"{point[option]!r} (arm {arm.name!r}): {detail}") from None
                    if option in arm.options or option in ("lora_stage.epochs", "reft_stage.epochs"):
                        raise ConfigError(f"arms[{arm_index}].{option}", detail) from None
                    if option in self.base:
                        raise ConfigError(f"base.{option}", detail) from None
                    raise ConfigError(f"arms[{arm_index}]", f"{option}: {detail}") from None

    # --- the plan ------------------------------------------------------------------------
    @property
    def grid_points_count(self) -> int:
        return math.prod(len(values) for values in self.grid.values()) if self.grid else 1

    @property
    def run_count(self) -> int:
        return len(self.arms) * len(self.seeds) * self.grid_points_count

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values ([{}] without a grid), in the grid's order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[key] for key in keys))]

    def arm(self, name: str) -> StudyArm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def run_name(self, arm: StudyArm, seed: int, point: Mapping[str, Any]) -> str:
        suffix = f" · {grid_label(point)}" if point else ""
        return f"{self.name} · {arm.name} · seed {seed}{suffix}"

    def _config(self, arm: StudyArm, point: Mapping[str, Any], seed: int) -> RunConfig:
        flat = {**self.base, **arm.run_options(), **point, "seed": seed, "name": self.run_name(arm, seed, point)}
        # Trackers group the study's runs and tag each with its cell (heft_core.trackers).
        tags = {"study": self.name, "arm": arm.name, "seed": str(seed)}
        if point:
            tags["grid_point"] = grid_label(point)
        flat.update({"report.group": self.name, "report.tags": tags})
        # the arm's method decides; options of the other method stay as given (unused)
        return _config_from_flat(flat)

    def plan(self) -> list[PlannedRun]:
        """One run per seed x grid point x arm, seed by seed (so early results cover every arm)."""
        runs = []
        points = self.grid_points()
        for seed in self.seeds:
            for grid_index, point in enumerate(points):
                for arm in self.arms:
                    runs.append(
                        PlannedRun(
                            len(runs),
                            arm.name,
                            arm.method,
                            seed,
                            dict(point),
                            grid_index,
                            self._config(arm, point, seed),
                        )
                    )
        share_stage1(runs)
        return runs

    @property
    def model(self) -> str:
        return str(self.base.get("model", EMBEDDED_MODEL))

    @property
    def eval_size(self) -> int | None:
        """Evaluation questions every run answers (None: the whole validation split)."""
        return self.plan_config().eval_size

    def plan_config(self) -> RunConfig:
        """The config of the first planned run: what every run shares (model, data, eval_size)."""
        return self._config(self.arms[0], self.grid_points()[0], self.seeds[0])

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if self.description:
            data["description"] = self.description
        data["arms"] = [arm.to_dict() for arm in self.arms]
        data["seeds"] = list(self.seeds)
        if self.grid:
            data["grid"] = {key: list(values) for key, values in self.grid.items()}
        data["base"] = dict(self.base)
        data["max_runs"] = self.max_runs
        if self.contrasts:
            data["contrasts"] = [list(pair) for pair in self.contrasts]
        if self.compare_with_paper:
            data["compare_with_paper"] = True
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudySpec":
        if not isinstance(data, Mapping):
            raise ConfigError(
                "spec", f"a study spec is a mapping (name, arms, seeds, grid, base, ...), got {type(data).__name__}"
            )
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(str(unknown[0]), f"unknown study field; fields are {', '.join(sorted(allowed))}")
        for required in ("name", "arms"):
            if required not in data:
                raise ConfigError(required, "missing; a study needs a name and arms")
        return cls(**copy.deepcopy(dict(data)))

    @classmethod
    def from_text(cls, text: str, *, source: str = "spec") -> "StudySpec":
        """A spec from YAML or JSON text (JSON is YAML)."""
        try:
            data = yaml.load(text, Loader=_SpecLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError("spec", f"{source} is not valid YAML or JSON ({error})") from error
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "StudySpec":
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError("spec", f"cannot read {path} ({error.strerror or error})") from error
        return cls.from_text(text, source=str(path))


# Options that do not touch what stage 1 trains or records (the run's name, method and stage-2 settings, and
# how often it checkpoints): two runs equal in everything else train the same stage 1, bit for bit.
_NOT_STAGE1 = ("method", "name", "reft", "reft_stage", "heft_stage2_mode", "prefix_cache_mb", "frozen_cache_mb",
               "checkpoint_minutes", "keep_epoch_checkpoints", "report")


def stage1_key(config: RunConfig) -> str | None:
    """What determines a run's LoRA stage (seed, data, model, LoRA settings and schedule, its epochs included:
    a schedule over E epochs equals another only for the same E), as text; None without a LoRA stage."""
    if not config.uses_lora:
        return None
    values = {key: value for key, value in config.to_dict().items() if key not in _NOT_STAGE1}
    return json.dumps(values, sort_keys=True, default=str)


def share_stage1(runs: Sequence[PlannedRun]) -> None:
    """Point each HEFT run at an earlier LoRA run with the same stage 1 (``stage1_from``: the CLI trains the plan in
    order), and make every LoRA run whose stage 1 a HEFT run has, earlier or later in the plan, keep its epoch-end
    checkpoints: HEFT's stage 2 then starts from its final one (``heft_core.study_runner.start_from_shared_stage1``;
    the app's worker shares with a LoRA run anywhere in the study, ``app.shared_stages``)."""
    keys = {run.index: stage1_key(run.config) for run in runs}
    wanted = {keys[run.index] for run in runs if run.method == "heft" and keys[run.index] is not None}
    sources: dict[str, PlannedRun] = {}
    for run in runs:
        key = keys[run.index]
        if key is None:
            continue
        if run.method == "lora":
            sources.setdefault(key, run)
            if key in wanted and not run.config.keep_epoch_checkpoints:
                run.config = dataclasses.replace(run.config, keep_epoch_checkpoints=True)
        elif run.method == "heft" and key in sources:
            run.stage1_from = sources[key].index


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; learning rates are written that way, so read them as floats."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _within(error: ConfigError, where: str) -> ConfigError:
    detail = getattr(error, "detail", str(error))
    option = error.option
    return ConfigError(f"{where}.{option}" if option and option != where else where, detail)


def check_against_model(spec: StudySpec, model_info: Any = None) -> None:
    """Check layer indices and LoRA target modules of every arm against the model's shape.

    Reads the model's config only (``heft_core.models.model_info``), no weights. Raises
    ConfigError naming the arm.
    """
    if model_info is None:
        from heft_core.models import model_info as read_model_info

        model_info = read_model_info(spec.model)
    for index, arm in enumerate(spec.arms):
        for point in spec.grid_points():
            try:
                spec._config(arm, point, spec.seeds[0]).validate_for_model(
                    model_info.num_layers, set(model_info.linear_modules)
                )
            except ConfigError as error:
                where = f"arms[{index}]" + (f" at {grid_label(point)}" if point else "")
                raise _within(error, where) from None


def evaluation_warning(
    n_questions: int, *, discordance: float = TYPICAL_DISCORDANCE, wanted_difference: float = 0.03
) -> str | None:
    """A warning for before launch when ``n_questions`` cannot separate arms ``wanted_difference`` apart.

    Uses :func:`heft_core.stats.minimum_detectable_difference` at the typical discordance of two
    fine-tunes (10%). None when the evaluation is large enough.
    """
    smallest = stats.minimum_detectable_difference(n_questions, discordance)
    if smallest is not None and smallest <= wanted_difference:
        return None
    if smallest is None:
        return (
            f"{n_questions} evaluation questions cannot separate two runs that disagree on {discordance:.0%} of them: "
            "even if every disagreement went one way, an exact McNemar test would not reach 80% power. "
            "Evaluate on more questions."
        )
    return (
        f"With {n_questions} evaluation questions, two runs that disagree on {discordance:.0%} of them are told apart "
        f"(80% power, exact McNemar at 0.05) only if their accuracies differ by at least {smallest * 100:.1f} points; "
        f"differences between methods are often 1-3 points. Evaluate on more questions to see smaller ones."
    )
