"""What the Studies tab and the study API endpoints do, as plain functions over the database.

A study is one spec (``heft_core.study.StudySpec``: arms x seeds x grid, everything else
shared) whose runs go through the ordinary queue and worker. This module turns spec text into
a plan summary (run count, estimated time, the evaluation-too-small warning), queues a study
(``storage.queries.create_study``), reads its live arm x seed matrix, and builds its report
from the stored runs (``heft_core.study_report``) into ``<data home>/studies/<id>/``.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from app import present, service, timing
from app.forms import data_counts, error_text
from app.permissions import ANONYMOUS, Action, Actor
from heft_common.errors import ConfigError, HeftError
from heft_common.home import data_home
from heft_common.vocabulary import ACTIVE_STATUSES, EMBEDDED_MODEL, TERMINAL_STATUSES
from heft_core import stats, study_presets
from heft_core import study as study_lib
from heft_core.study import StudySpec
from heft_core.study_report import RunOutcome, StudyReport, study_report, write_report
from storage import queries
from storage.models import Run, Study

logger = logging.getLogger(__name__)

PRESET_TITLES = list(study_presets.PRESET_TITLES.values())
STUDIES_SUBDIR = "studies"
REPORT_SUBDIR = "report"
CHARTS_SHOWN = ("accuracy_vs_epochs.png", "frontier_flops.png", "frontier_wall_seconds.png", "accuracy_by_arm.png")


# ---------------------------------------------------------------------- building a spec


def preset_text(title: str) -> str:
    """The preset's spec as YAML, to edit before launch."""
    return study_presets.preset(title).to_yaml()


def parse_spec(text: str) -> StudySpec:
    """A StudySpec from YAML/JSON text; ConfigError naming the field when it is not valid."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("spec", "write a study spec (YAML or JSON), or pick a preset")
    return StudySpec.from_text(text)


def _training_rows(spec: StudySpec) -> tuple[int | None, int | None]:
    """(training rows per run, evaluation questions) as far as the data source says."""
    config = spec.plan_config()
    counts = data_counts(config.data)
    train, evaluate = config.train_size, config.eval_size
    if counts is not None:
        train = min(train, counts[0]) if train else counts[0]
        evaluate = min(evaluate, counts[1]) if evaluate else counts[1]
    return train, evaluate


def plan_tokens(spec: StudySpec) -> Any:
    """The real token counts of the spec's rows (``app.timing.real_tokens``), or None."""
    return timing.real_tokens(spec.plan_config())


def plan_summary(spec: StudySpec, speeds: Mapping[str, timing.Speed] | None = None,
                 tokens: Any = None, rates: timing.Rates | None = None) -> dict[str, Any]:
    """Run count, per-arm budget, optimizer steps and the estimated time of all runs one after another.

    ``speeds`` ({method: Speed}, ``app.timing.measured_speeds``) are this machine's finished runs of
    the spec's model; ``rates`` (``app.timing.rates_for``: its calibration, else its size) time the
    methods without one, over ``tokens`` (``plan_tokens``: the data's real token counts).
    """
    train_rows, eval_questions = _training_rows(spec)
    planned = spec.plan()
    steps = sum(run.optimizer_steps(train_rows) for run in planned) if train_rows else None
    seconds = low = high = basis = None
    if train_rows and eval_questions and (speeds or rates or timing.model_key(spec.model) == EMBEDDED_MODEL):
        estimates = [timing.estimate_seconds(run.config, train_rows, eval_questions,
                                             timing.speed_for(speeds, run.method), any_measured=bool(speeds),
                                             tokens=tokens, rates=rates)
                     for run in planned]
        seconds = sum(estimate.total for estimate in estimates)
        low, high = sum(e.low for e in estimates), sum(e.high for e in estimates)
        measured = sorted({speed.run_id for speed in (speeds or {}).values() if speed.run_id is not None})
        others = [e.basis for run, e in zip(planned, estimates) if timing.speed_for(speeds, run.method) is None]
        basis = others[0] if others else ""
        if measured:
            runs = ", ".join(f"#{i}" for i in measured)
            basis = f"from this machine's measured speeds (runs {runs})" + (f"; other methods {basis}" if basis else "")
    return {
        "runs": len(planned), "arms": [(arm.name, arm.method, arm.budget_label) for arm in spec.arms],
        "seeds": list(spec.seeds), "grid_points": spec.grid_points_count, "train_rows": train_rows,
        "eval_questions": eval_questions, "optimizer_steps": steps, "seconds": seconds, "low": low, "high": high,
        "basis": basis, "past_a_day": bool(seconds and seconds > timing.DAY_SECONDS),
        "warning": study_lib.evaluation_warning(eval_questions) if eval_questions else None,
    }


def default_preset_title() -> str:
    """The preset the Studies tab opens on: the CPU one on a machine without a GPU."""
    from heft_core.calibration import has_gpu

    return PRESET_TITLES[0] if has_gpu() else study_presets.PRESET_TITLES["cpu-boolq"]


def start_calibration(text: str) -> bool:
    """Measure this machine's speed for the spec's model and shapes in the background, once (cached);
    True when a calibration is running now."""
    from heft_core import calibration

    try:
        spec = parse_spec(text)
        config = spec.plan_config()
    except HeftError:
        return False
    if timing.is_hub(config.data):  # no calibration on rows this machine does not have
        return False
    kinds = sorted({kind for arm in spec.arms for kind in calibration.KINDS_OF_METHOD.get(arm.method, ())})
    calibration.calibrate_in_background(config, kinds)
    return calibration.running()


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def plan_markdown(text: str, engine: Any = None) -> str:
    """The plan of the spec in ``text`` for the page, or the validation error naming the field; with
    ``engine``, the time estimate rests on the finished runs of the spec's model on this machine."""
    try:
        spec = parse_spec(text)
        speeds = timing.measured_speeds(engine, spec.model) if engine is not None else None
        summary = plan_summary(spec, speeds, plan_tokens(spec), timing.rates_for(spec.plan_config()))
    except HeftError as exc:
        return present.error(error_text(exc))
    arms = ", ".join(f"{present.escape(name)} ({present.escape(budget)})" for name, _, budget in summary["arms"])
    lines = [
        f"**{summary['runs']} runs** planned: {len(summary['arms'])} arms × {_count(len(summary['seeds']), 'seed')}"
        + (f" × {summary['grid_points']} grid points" if summary["grid_points"] > 1 else "") + f". Arms: {arms}.",
    ]
    if summary["train_rows"]:
        lines.append(f"{present.format_int(summary['train_rows'])} training rows per run (the same rows for every "
                     f"arm of a seed), {present.format_int(summary['optimizer_steps'] or 0)} optimizer steps in all.")
    if summary["eval_questions"]:
        lines.append(f"Every run answers the same {present.format_int(summary['eval_questions'])} evaluation "
                     "questions.")
    if summary["seconds"]:
        duration = timing.format_range(summary["low"], summary["high"])
        lines.append(f"All runs one after another: **{duration}** of loading, training and evaluation "
                     f"({present.escape(summary['basis'])}); GPU slots train runs in parallel.")
        from heft_core import calibration

        if calibration.running():
            lines.append("*Measuring this machine's speed now (a few training steps and evaluation batches); "
                         "the estimate rests on it when you next open this tab or edit the spec.*")
    if summary["past_a_day"]:
        lines.append(present.warning(
            f"This plan runs past a day here ({present.escape(timing.format_range(summary['low'], summary['high']))}). "
            "To bring it within reach: fewer rows (`train_size`, `eval_size`), fewer seeds or arms, the "
            "\"CPU: learns on BoolQ\" preset, or a machine with a GPU."))
    if summary["warning"]:
        lines.append(present.warning(present.escape(summary["warning"])))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- queueing and cancelling


def start_study(engine: Any, text: str, name: str | None = None,
                actor: Actor | None = ANONYMOUS) -> tuple[Study, list[int]]:
    """Validate the spec (fields, then model shape and data source) and queue all its runs as one study
    (in public mode: an owner's, within the queue cap and the machine's memory; app.permissions)."""
    from heft_core.data import validate_source

    service.authorize(actor, Action.TRAIN)
    spec = parse_spec(text)
    if name and name.strip():
        spec = StudySpec.from_dict({**spec.to_dict(), "name": name.strip()})
    study_lib.check_against_model(spec)
    validate_source(spec.plan_config().data)
    planned = spec.plan()
    service.check_public_limits(engine, service.policy(), [run.config for run in planned])
    study = queries.create_study(engine, name=spec.name, spec=spec.to_dict(), runs=[r.queue_fields() for r in planned])
    run_ids = [run.id for run in queries.study_runs(engine, study.id)]
    logger.info("queued study %d (%s): %d runs", study.id, spec.name, len(run_ids))
    return study, run_ids


def cancel_study(engine: Any, study_id: Any, actor: Actor | None = ANONYMOUS) -> dict[int, str]:
    service.authorize(actor, Action.CANCEL)
    return queries.cancel_study(engine, study_id)


def study_choices(engine: Any) -> list[tuple[str, int]]:
    return [(f"#{s.id} {s.name}", s.id) for s in queries.list_studies(engine)]


def find_study(engine: Any, study_id: Any) -> Study | None:
    try:
        return queries.get_study(engine, study_id)
    except ValueError:
        return None


# ---------------------------------------------------------------------- the live matrix


def is_active(runs: list[Run]) -> bool:
    return any(run.status in ACTIVE_STATUSES for run in runs)


def _cell(run: Run | None) -> str:
    if run is None:
        return "—"
    icon = present.STATUS_ICONS.get(run.status, "")
    if run.status == "completed" and run.accuracy is not None:
        return f"{icon} {run.accuracy * 100:.1f}%"
    if run.status == "running":
        progress = run.progress or {}
        done, total = progress.get("step"), progress.get("total_steps")
        return f"{icon} running" + (f" {done}/{total}" if done is not None and total else "")
    return f"{icon} {run.status}"


def matrix_frame(spec: StudySpec, runs: list[Run]) -> pd.DataFrame:
    """Rows: arm (and grid point); columns: seeds; cells: status, or accuracy when completed.
    A re-queued cell shows its newest run."""
    newest: dict[tuple, Run] = {}
    for run in runs:  # oldest first: later ones replace
        newest[(run.arm, run.seed, study_lib.grid_key(run.grid_values))] = run
    rows = []
    for point in spec.grid_points():
        for arm in spec.arms:
            label = arm.name + (f" ({study_lib.grid_label(point)})" if point else "")
            key = study_lib.grid_key(point)
            rows.append([label] + [_cell(newest.get((arm.name, seed, key))) for seed in spec.seeds])
    return pd.DataFrame(rows, columns=["arm"] + [f"seed {seed}" for seed in spec.seeds])


def status_line(study: Study, runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    cancelled = " · cancelled by the user" if study.cancelled_at else ""
    return f"**Study #{study.id} · {present.escape(study.name)}** — {len(runs)} runs: {parts}{cancelled}"


def study_view(engine: Any, study_id: Any) -> dict[str, Any] | None:
    """What the matrix shows: {"study", "spec", "runs", "matrix", "status", "active"}; None if unknown."""
    study = find_study(engine, study_id) if study_id else None
    if study is None:
        return None
    spec = StudySpec.from_dict(study.spec)
    runs = queries.study_runs(engine, study.id)
    return {"study": study, "spec": spec, "runs": runs, "matrix": matrix_frame(spec, runs),
            "status": status_line(study, runs), "active": is_active(runs)}


# ---------------------------------------------------------------------- the report


def study_dir(study_id: int) -> Path:
    return data_home() / STUDIES_SUBDIR / str(int(study_id))


def build_report(engine: Any, study_id: Any) -> tuple[StudyReport, Path]:
    """The report from the study's stored runs, written to ``<data home>/studies/<id>/report``.

    What finished is reported; the report lists what is missing. Raises ValueError for an unknown study."""
    study = find_study(engine, study_id)
    if study is None:
        raise ValueError(f"study {study_id} does not exist")
    spec = StudySpec.from_dict(study.spec)
    outcomes = [RunOutcome.from_record(run) for run in queries.study_runs(engine, study.id)]
    report = study_report(spec, outcomes)
    directory = study_dir(study.id) / REPORT_SUBDIR
    if directory.exists():
        shutil.rmtree(directory)  # a rebuilt report replaces the old one whole
    write_report(report, directory, outcomes)
    queries.set_study_report_dir(engine, study.id, directory)
    return report, directory


def report_charts(directory: Path) -> list[str]:
    return [str(directory / name) for name in CHARTS_SHOWN if (directory / name).exists()]


def zip_report(directory: Path, study_id: int) -> Path:
    """``<data home>/studies/<id>/study-<id>-report.zip`` of the report directory."""
    target = directory.parent / f"study-{int(study_id)}-report"
    return Path(shutil.make_archive(str(target), "zip", root_dir=directory))


def pending_note(runs: list[Run]) -> str:
    waiting = [run for run in runs if run.status not in TERMINAL_STATUSES]
    if not waiting:
        return ""
    return (f"*{len(waiting)} of {len(runs)} runs still queued or running; this report covers what has finished "
            "and is rebuilt when the study ends.*")


# ---------------------------------------------------------------------- API payloads


def start_study_payload(engine: Any, spec_text: str, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """{"study_id", "run_ids"} or {"error"}."""
    try:
        study, run_ids = start_study(engine, spec_text, actor=actor)
    except (HeftError, ValueError) as exc:
        return {"error": error_text(exc)}
    except Exception as exc:  # a bug: logged with its traceback; the client gets one line
        logger.exception("start_study failed")
        return {"error": error_text(exc)}
    return {"study_id": study.id, "run_ids": run_ids}


def study_report_payload(engine: Any, study_id: Any) -> dict[str, Any]:
    """The report as JSON (results.json's content) plus its directory and the study's run statuses."""
    try:
        report, directory = build_report(engine, study_id)
        counts = queries.study_status_counts(engine, study_id)
    except (HeftError, ValueError) as exc:
        return {"error": error_text(exc)}
    except Exception as exc:
        logger.exception("study_report failed")
        return {"error": error_text(exc)}
    return {"study_id": int(study_id), "report_dir": str(directory), "status_counts": counts, **report.to_dict()}


def cancel_study_payload(engine: Any, study_id: Any, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    try:
        outcome = cancel_study(engine, study_id, actor)
    except (HeftError, ValueError) as exc:
        return {"error": error_text(exc)}
    return {"study_id": int(study_id), "runs": {str(run_id): result for run_id, result in outcome.items()}}


# ---------------------------------------------------------------------- majority baseline and one-class runs
# (for the Compare tab and the Runs table; the statistics are heft_core.stats')

@functools.lru_cache(maxsize=1024)
def _answers(path: str, mtime: float) -> tuple[tuple[str, int, int | None], ...]:
    """(uid, gold label, predicted) of a run directory's predictions.jsonl; cached per file version.
    ``predicted`` is None for an answer generation scoring could not parse (neither word in the text)."""
    with open(Path(path) / "predictions.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return tuple((str(p["uid"]), int(p["label"]), None if p["predicted"] is None else int(p["predicted"]))
                 for p in rows)


def run_answers(run: Any) -> tuple[tuple[str, int, int | None], ...] | None:
    """A completed run's (uid, label, predicted) answers, or None when they cannot be read."""
    if getattr(run, "status", None) != "completed" or not getattr(run, "artifact_dir", None):
        return None
    file = Path(run.artifact_dir) / "predictions.jsonl"
    try:
        return _answers(str(Path(run.artifact_dir)), file.stat().st_mtime)
    except (OSError, ValueError, KeyError) as exc:
        logger.debug("no answers for run %s: %s", getattr(run, "id", "?"), exc)
        return None


def one_class_flags(runs: Iterable[Any]) -> dict[int, str]:
    """run id -> "yes"/"no" for completed runs whose answers are at least 95% that one class."""
    flags = {}
    for run in runs:
        answers = run_answers(run)
        parsed = [predicted for _, _, predicted in answers or () if predicted is not None]
        flag = stats.one_class(parsed) if parsed else None
        if flag:
            flags[run.id] = flag
    return flags


def majority_of_runs(runs: Sequence[Any]) -> dict[str, Any] | None:
    """The majority-class baseline on the compared runs' questions (those of the first readable run):
    {"answer", "accuracy", "correct", "n", "low", "high", "same_questions"}; None without predictions."""
    for run in runs:
        answers = run_answers(run)
        if answers:
            labels = {uid: label for uid, label, _ in answers}
            baseline = stats.majority_baseline(labels)
            interval = stats.accuracy_result(baseline.correct, baseline.n)
            signatures = {r.eval_signature for r in runs}
            return {"answer": baseline.answer_word, "accuracy": baseline.accuracy, "correct": baseline.correct,
                    "n": baseline.n, "low": interval.low, "high": interval.high, "same_questions": len(signatures) == 1,
                    "run_id": run.id}
    return None
