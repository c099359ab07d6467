"""How long a run will take: from this machine's measured speed, saying what each figure assumes.

The Train tab's and the Studies tab's estimates and a running run's ETA (``app.recording``) come
from here. In order of preference, a run's speed is measured by

1. the last finished run of the same model and method: its training tokens/s, and, where its
   progress snapshot holds them, the seconds its evaluations took per question and its model load;
2. this machine's calibration of the model at the run's shapes (``heft_core.calibration``: a few
   seconds of real training steps and evaluation batches, cached per machine and model);
3. the model's size (its matmul weights, from its config): another model's calibration on this
   machine scaled by size, or the documented 2-core defaults below; the estimate says so.

Token counts are the data's real ones (``heft_core.calibration.token_counts``) where the caller has
them, not every row at ``max_length``. An estimate is a range: how wide depends on what it rests on.

No Gradio, no torch: ``storage`` rows and calibration records in, numbers and short sentences out.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

from heft_common.errors import HeftError
from heft_common.vocabulary import DEFAULT_HUB_DATASET, HUB_DATA, HUB_PREFIX, METHOD_TITLES, RunStatus
from heft_core.config import RunConfig

logger = logging.getLogger(__name__)
KIND_TITLES = {"lora": "LoRA", "reft": "ReFT", "heft2": "HEFT's ReFT stage"}

# The defaults an estimate falls back on, each named in the estimate when it is used.
DEFAULT_TOKENS_PER_SECOND = 120.0  # the embedded model, forward + backward, on 2 CPU cores
EVAL_SPEEDUP = 3.0  # scoring is a forward pass only: about 3x the tokens/s of a training step (forward + backward)
DEFAULT_LOAD_SECONDS = 15.0  # reading the embedded model's weights from its safetensors cache
CONVERSION_SECONDS = 110.0  # the embedded model's one-time GGUF conversion, measured on 2 CPU cores
RUNS_SCANNED = 200  # finished runs looked at for a model's speeds, newest first
# A model this machine has not measured: tokens/s x matmul weights (heft_core.estimates.matmul_parameters),
# from the embedded model's (106 M matmul weights) runs on 2 CPU cores: LoRA 462 tokens/s on an AMX Xeon and
# 259 on an AMD EPYC without AVX-512, ReFT 1.76x LoRA, evaluation about 2.4x (bench/results/study-cpu-boolq-2ep-*).
EMBEDDED_MATMUL_PARAMETERS = 106_168_320
SIZE_RATES = {"lora": 300.0 * EMBEDDED_MATMUL_PARAMETERS, "reft": 530.0 * EMBEDDED_MATMUL_PARAMETERS,
              "heft2": 530.0 * EMBEDDED_MATMUL_PARAMETERS}
SIZE_EVAL_RATE = 720.0 * EMBEDDED_MATMUL_PARAMETERS
# How far the truth may lie from the point estimate, by what it rests on (low, high factors).
SPREAD_MEASURED_RUN = (0.85, 1.2)
SPREAD_CALIBRATED = (0.8, 1.25)  # a few steps on a machine other work may load
SPREAD_SCALED = (0.6, 1.7)  # another model's calibration scaled by size
SPREAD_ASSUMED = (0.5, 2.0)  # nothing measured on this machine
DAY_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Speed:
    """What one finished run measured (or, with ``run_id`` None, what is assumed)."""

    tokens_per_second: float
    eval_seconds_per_question: float | None = None
    load_seconds: float | None = None
    tokens_per_question: float | None = None  # real (unpadded) training tokens per question
    run_id: int | None = None


@dataclass(frozen=True)
class Rates:
    """Training tokens/s per kind ("lora", "reft", "heft2": ReFT on a LoRA model), evaluation tokens/s
    and load seconds, from a calibration or from the model's size, with what they rest on."""

    train: Mapping[str, float]
    eval_tokens_per_second: float
    load_seconds: float
    basis: str
    spread: tuple[float, float]
    from_size: bool = False


@dataclass(frozen=True)
class Estimate:
    """Seconds to load the model, train and evaluate, and the sentence that says what it rests on."""

    load: float
    train: float
    evaluation: float
    basis: str
    spread: tuple[float, float] = SPREAD_ASSUMED

    @property
    def total(self) -> float:
        return self.load + self.train + self.evaluation

    @property
    def low(self) -> float:
        return self.total * self.spread[0]

    @property
    def high(self) -> float:
        return self.total * self.spread[1]


def format_range(low: float, high: float) -> str:
    """"about 31–45 min", "about 2.1–3.4 h", "about 1,320–3,900 h"."""
    if high < 90:
        return f"about {max(1, round(low))}–{max(1, round(high))} s"
    if high < 5400:
        return f"about {max(1, round(low / 60))}–{max(1, round(high / 60))} min"
    if high < 36000:
        return f"about {low / 3600:.1f}–{high / 3600:.1f} h"
    return f"about {low / 3600:,.0f}–{high / 3600:,.0f} h"


def rates_from_calibration(calibration: Any) -> Rates:
    """Rates measured by ``heft_core.calibration.calibrate`` on this machine."""
    measured = ", ".join(f"{KIND_TITLES.get(kind, kind)} {rate:.0f}"
                         for kind, rate in calibration.train_tokens_per_second.items())
    basis = (f"from this machine's calibration of the model (training tokens/s: {measured}; evaluation "
             f"{calibration.eval_tokens_per_second:.0f} tokens/s; {calibration.load_seconds:.0f} s to load)")
    cores = os.cpu_count() or 1
    if getattr(calibration, "load_average", 0.0) > 1.5 * cores:  # the rates are this machine's under that load
        basis += (f"; measured while other work loaded the machine (load average {calibration.load_average:.0f} on "
                  f"{cores} cores): the estimate is too long by as much")
    return Rates(dict(calibration.train_tokens_per_second), calibration.eval_tokens_per_second,
                 calibration.load_seconds, basis, SPREAD_CALIBRATED)


def rates_from_size(parameters: int, reference: Any = None) -> Rates:
    """Rates of a model with ``parameters`` matmul weights that this machine has not measured: another
    model's calibration here (``reference``) scaled by size, else the documented 2-core defaults."""
    millions = f"{parameters / 1e6:,.0f} M matmul weights"
    if reference is not None and reference.parameters:
        scale = reference.parameters / parameters
        train = {kind: rate * scale for kind, rate in reference.train_tokens_per_second.items()}
        lora = train.get("lora")
        for kind, default in SIZE_RATES.items():  # kinds the reference did not time: the documented ratios
            if kind not in train:
                train[kind] = lora * default / SIZE_RATES["lora"] if lora else default / parameters
        basis = (f"estimated from the model's size ({millions}): not loaded on this machine yet; scaled from "
                 f"this machine's calibration of {reference.model}")
        return Rates(train, reference.eval_tokens_per_second * scale, DEFAULT_LOAD_SECONDS / scale, basis,
                     SPREAD_SCALED, from_size=True)
    train = {kind: rate / parameters for kind, rate in SIZE_RATES.items()}
    basis = (f"estimated from the model's size ({millions}): not measured on this machine yet; assumes "
             f"{train['lora']:.0f} training tokens/s for LoRA, as 2 CPU cores give")
    return Rates(train, SIZE_EVAL_RATE / parameters, DEFAULT_LOAD_SECONDS, basis, SPREAD_ASSUMED, from_size=True)


def is_hub(source: str) -> bool:
    """A hub dataset: its rows cannot be read here without downloading them."""
    return source in (HUB_DATA, DEFAULT_HUB_DATASET) or source.startswith(HUB_PREFIX)


def real_tokens(config: RunConfig) -> Any:
    """The real token counts of the run's training and evaluation rows (``heft_core.calibration.TokenCounts``),
    or None while they cannot be read without waiting: the hub, an unreadable source, the embedded model
    not converted yet (its tokenizer comes with the conversion)."""
    from heft_core import calibration
    from heft_core.models import needs_conversion

    if is_hub(config.data) or needs_conversion(config.model):
        return None
    try:
        return calibration.token_counts(config)
    except (HeftError, OSError, ValueError) as exc:
        logger.debug("no token counts for %s: %s", config.data, exc)
        return None


def rates_for(config: RunConfig) -> Rates:
    """This machine's rates for ``config``'s model and shapes: its calibration, else its size."""
    from heft_core import calibration
    from heft_core.estimates import matmul_parameters, model_shape

    found = calibration.cached(config)
    if found is not None:
        return rates_from_calibration(found)
    try:
        parameters = matmul_parameters(model_shape(config.model))
    except HeftError:  # the model's config is not readable (yet): the embedded model's size
        parameters = EMBEDDED_MATMUL_PARAMETERS
    return rates_from_size(parameters, calibration.any_cached())


def model_key(model_ref: str) -> str:
    """One spelling per model, so "embedded" and the embedded model's other names match."""
    from heft_core.models import is_embedded  # no torch at import

    return "embedded" if is_embedded(model_ref or "") else (model_ref or "").strip()


def planned_evaluations(config: RunConfig) -> int:
    """Evaluations a run makes: after every epoch, or after each stage's last epoch; a base run makes one."""
    if config.method == "base":
        return 1
    if config.eval_every_epoch:
        return config.total_epochs
    return len(config.stages())


def speed_of(run: Any) -> Speed | None:
    """The speed a finished run measured, or None when it recorded no training speed."""
    if not run.tokens_per_second:
        return None
    progress = run.progress or {}
    phase_seconds = progress.get("phase_seconds") or {}
    questions = progress.get("eval_questions_done") or 0
    evaluating = phase_seconds.get("evaluating")
    per_question = evaluating / questions if evaluating and questions else None
    tokens_per_question = None
    try:
        epochs = RunConfig.from_dict(run.config or {}).total_epochs
    except (HeftError, TypeError):  # a config written by another version: no token count then
        epochs = 0
    examples = progress.get("train_examples") or 0
    if run.train_seconds and examples and epochs:
        tokens_per_question = run.tokens_per_second * run.train_seconds / (examples * epochs)
    return Speed(float(run.tokens_per_second), per_question, phase_seconds.get("loading"), tokens_per_question, run.id)


def measured_speeds(engine: Any, model_ref: str) -> dict[str, Speed]:
    """{method: Speed} from the newest completed run of each method on ``model_ref``."""
    from storage import queries

    wanted = model_key(model_ref)
    speeds: dict[str, Speed] = {}
    for run in queries.list_runs(engine, status=RunStatus.COMPLETED, limit=RUNS_SCANNED):
        if run.method in speeds or model_key(run.base_model) != wanted:
            continue
        speed = speed_of(run)
        if speed is not None:
            speeds[run.method] = speed
    return speeds


def _needs_conversion(model_ref: str) -> bool:
    from heft_core.models import needs_conversion  # no torch at import

    return needs_conversion(model_ref)


def estimate_seconds(config: RunConfig, n_train: int, n_eval: int, speed: Speed | None,
                     convert: bool | None = None, any_measured: bool = False, tokens: Any = None,
                     rates: Rates | None = None) -> Estimate:
    """Loading, training and evaluation seconds of ``config`` on ``n_train``/``n_eval`` questions.

    ``speed`` (a finished run's) comes first, then ``rates`` (a calibration's or the model's size's,
    ``rates_for``); with neither, the documented 120 tokens/s. ``tokens``
    (``heft_core.calibration.TokenCounts``) gives the data's real tokens per row. ``convert``
    (default: whether the embedded model's cache is missing) adds its one-time conversion;
    ``any_measured`` says whether the model has finished runs of other methods, only for wording.
    """
    measured_run = speed is not None and speed.run_id is not None
    per_question_tokens = float(config.max_length)
    if tokens is not None and tokens.train_rows:
        per_question_tokens = tokens.per_train_row()
    elif speed and speed.tokens_per_question:
        per_question_tokens = min(per_question_tokens, speed.tokens_per_question)
    per_eval_tokens = tokens.per_eval_row() if tokens is not None and tokens.eval_rows else per_question_tokens
    if rates is not None and not measured_run:
        note = (f"{per_question_tokens:.0f} real tokens per training row" if tokens is not None and tokens.train_rows
                else f"every row at max_length {config.max_length} tokens (the data's tokens not counted yet)")
        return _estimate_from_rates(config, n_train, n_eval, rates, per_question_tokens, per_eval_tokens, convert,
                                    note)
    tokens_per_second = speed.tokens_per_second if speed else DEFAULT_TOKENS_PER_SECOND
    epochs = config.total_epochs if config.method != "base" else 0
    train = n_train * epochs * per_question_tokens / tokens_per_second
    per_question_eval = per_eval_tokens / (tokens_per_second * EVAL_SPEEDUP)
    if speed and speed.eval_seconds_per_question:
        per_question_eval = speed.eval_seconds_per_question
    evaluation = planned_evaluations(config) * n_eval * per_question_eval
    load = speed.load_seconds if speed and speed.load_seconds else DEFAULT_LOAD_SECONDS
    if convert if convert is not None else _needs_conversion(config.model):
        load += CONVERSION_SECONDS
    spread = SPREAD_MEASURED_RUN if measured_run else SPREAD_ASSUMED
    return Estimate(load, train, evaluation, _basis(config, speed, any_measured), spread)


def _estimate_from_rates(config: RunConfig, n_train: int, n_eval: int, rates: Rates, per_train_row: float,
                         per_eval_row: float, convert: bool | None, tokens_note: str) -> Estimate:
    """Each stage's epochs at its kind's rate (HEFT's ReFT stage: ReFT on the LoRA model)."""
    train = 0.0
    if config.method != "base":
        for stage, settings in config.stages():
            kind = "lora" if stage == "lora" else ("heft2" if config.method == "heft" else "reft")
            rate = rates.train.get(kind) or rates.train.get("lora") or DEFAULT_TOKENS_PER_SECOND
            train += n_train * settings.epochs * per_train_row / rate
    evaluation = planned_evaluations(config) * n_eval * per_eval_row / max(rates.eval_tokens_per_second, 1e-9)
    load = rates.load_seconds
    if convert if convert is not None else _needs_conversion(config.model):
        load += CONVERSION_SECONDS
    basis = f"{rates.basis}, {tokens_note}"
    return Estimate(load, train, evaluation, basis, rates.spread)


def _basis(config: RunConfig, speed: Speed | None, any_measured: bool) -> str:
    if speed is None or speed.run_id is None:
        title = METHOD_TITLES.get(config.method, config.method)
        whose = f"no finished {title} run" if any_measured else "no finished run"
        return (f"assumes {DEFAULT_TOKENS_PER_SECOND:.0f} tokens/s: {whose} of this model yet; evaluation at "
                f"{EVAL_SPEEDUP:.0f}× that speed (forward only) and ~{DEFAULT_LOAD_SECONDS:.0f} s to load the model")
    parts = [f"based on run #{speed.run_id}'s {speed.tokens_per_second:.0f} tokens/s"]
    if speed.eval_seconds_per_question:
        parts.append(f"{speed.eval_seconds_per_question:.2f} s per evaluated question")
    else:
        parts.append(f"evaluation assumed at {EVAL_SPEEDUP:.0f}× that speed (forward only)")
    if speed.load_seconds:
        parts.append(f"{speed.load_seconds:.0f} s to load the model")
    else:
        parts.append(f"~{DEFAULT_LOAD_SECONDS:.0f} s assumed to load the model")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def speed_for(speeds: Mapping[str, Speed] | None, method: str) -> Speed | None:
    return (speeds or {}).get(method)
