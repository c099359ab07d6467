"""Training a whole study in this process, one run after another, into one study directory.

The CLI's ``python -m heft_core study SPEC --out DIR`` calls :func:`run_study_in_process`;
``study-report DIR`` reads the directory back with :func:`load_study_dir`. The directory holds
``spec.yaml``, ``study.json`` (the plan and each run's status), ``runs/<NNN-arm-sSEED>/`` run
directories and the report files (``heft_core.study_report.write_report``); zip it to share it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from heft_common.errors import ConfigError, HeftError, RunLoadError
from heft_core import stats
from heft_core.callbacks import TrainerCallback
from heft_core.config import RunConfig
from heft_core.study import PlannedRun, StudySpec, check_against_model
from heft_core.study_report import SPEC_FILE, RunOutcome, StudyReport, study_report, write_report
from heft_core.study_report.outcomes import RUNS_SUBDIR, SHARED_STAGE1_FILE

logger = logging.getLogger(__name__)

STUDY_INDEX_FILE = "study.json"
WALL_FILE = "study_wall.json"  # a run's wall seconds over all its attempts (a study continued after a stop)
WALL_WRITE_SECONDS = 30.0


def _write_index(directory: Path, spec: StudySpec, entries: Sequence[Mapping[str, Any]]) -> None:
    payload = {"name": spec.name, "runs": list(entries)}
    temporary = directory / f".{STUDY_INDEX_FILE}.tmp"
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, directory / STUDY_INDEX_FILE)  # a reader never sees half an index


def load_study_dir(directory: str | Path) -> tuple[StudySpec, list[RunOutcome]]:
    """The spec and the recorded outcomes of a study directory written by :func:`run_study_in_process`."""
    directory = Path(directory)
    spec = StudySpec.from_file(directory / SPEC_FILE)
    index_file = directory / STUDY_INDEX_FILE
    if not index_file.exists():
        raise RunLoadError(f"{directory} is not a study directory (no {STUDY_INDEX_FILE})")
    outcomes = []
    for entry in json.loads(index_file.read_text())["runs"]:
        cell = {key: entry[key] for key in ("arm", "seed", "grid_point", "method")}
        if entry["status"] in ("completed", "cancelled"):
            outcomes.append(RunOutcome.from_run_dir(
                directory / entry["run_dir"], **cell, status=entry["status"], wall_seconds=entry.get("wall_seconds"),
                train_examples=entry.get("train_examples"), error=entry.get("error"),
                shared_stage1_from=entry.get("stage1_from"), shared_stage1_seconds=entry.get("stage1_seconds"),
            ))
        else:
            outcomes.append(RunOutcome(**cell, status=entry["status"], error=entry.get("error")))
    return spec, outcomes


class _StepBar(TrainerCallback):
    """A per-run tqdm bar of optimizer steps, under the study's bar of runs."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled
        self.label = label
        self.bar: Any = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        if self.enabled and info.get("total_steps"):
            from tqdm import tqdm

            self.bar = tqdm(total=info["total_steps"], desc=self.label, unit="step", position=1, leave=False)

    def on_step(self, event: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=event.stage, loss=f"{event.loss:.3f}")

    def on_log(self, message: str) -> None:
        logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _WallClock(TrainerCallback):
    """The run's wall time over every attempt, kept in its directory every ~30 s: a study stopped by a
    kill (no ``finally`` runs) and continued later still reports the time its runs took, not the last part."""

    def __init__(self, run_dir: Path, before: float):
        self.path = run_dir / WALL_FILE
        self.before = before
        self.started = time.perf_counter()
        self.written = self.started

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def write(self) -> None:
        self.written = time.perf_counter()
        self.path.write_text(json.dumps({"wall_seconds": round(self.elapsed(), 1)}))

    def on_step(self, event: Any) -> None:
        if time.perf_counter() - self.written >= WALL_WRITE_SECONDS:
            self.write()

    def on_evaluate(self, event: Any) -> None:
        self.write()


def _earlier_wall_seconds(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / WALL_FILE).read_text())["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _resumable(run_dir: Path, config: RunConfig) -> bool:
    """True when ``run_dir`` holds a checkpoint written for exactly this run's settings (an attempt that was
    stopped part-way): a study continued with ``--resume`` goes on from it instead of training from step 0."""
    from heft_core import checkpoint as ckpt

    if not ckpt.checkpoints_dir(run_dir).is_dir():
        return False
    checkpoint, _ = ckpt.load_latest_checkpoint(run_dir)
    if checkpoint is None:
        return False
    try:
        ckpt.check_config(checkpoint.config, config.to_dict())
    except ConfigError as exc:
        logger.info("%s: its checkpoint is for other settings (%s); training it from the start", run_dir.name, exc)
        return False
    return True


def _shared_stage1_of(run_dir: Path) -> tuple[str, float] | None:
    """The LoRA run whose stage 1 an interrupted HEFT run started from (``start_from_shared_stage1``'s file)."""
    try:
        shared = json.loads((run_dir / SHARED_STAGE1_FILE).read_text())
        return f"{RUNS_SUBDIR}/{shared['from']}", float(shared["stage1_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_settings(recorded: Mapping[str, Any], planned: RunConfig) -> bool:
    from heft_core.data import LOCAL_BOOLQ, local_boolq_dir

    def learning(config: RunConfig) -> dict[str, Any]:
        values = {k: v for k, v in config.effective_dict().items() if k not in ("prefix_cache_mb", "frozen_cache_mb")}
        # (no "report" either: effective_dict leaves it out)
        if values.get("data") == LOCAL_BOOLQ:  # the label and the path it names here are the same data
            values["data"] = str(local_boolq_dir())
        return values

    try:
        return learning(RunConfig.from_dict(recorded)) == learning(planned)
    except (ConfigError, TypeError, ValueError):
        return False


def start_from_shared_stage1(source_dir: Path, config: RunConfig, run_dir: Path) -> float | None:
    """Put into ``run_dir`` a checkpoint at HEFT's stage boundary made of the LoRA run's final stage-1 epoch-end
    checkpoint (its adapter, counters, history and evaluations), so that training resumes at stage 2 and never
    trains stage 1 again. Stage 2 is seeded from the run's seed alone (``heft_core.train``), so it ends exactly as
    it would after its own stage 1. Returns the shared stage's training seconds, or None when the LoRA run kept
    no such checkpoint (the run then trains both stages)."""
    from heft_core import checkpoint as ckpt

    point = ckpt.load_stage_end_checkpoint(source_dir, "lora", config.lora_stage.epochs)
    if point is None:
        return None
    point.config = config.to_dict()
    ckpt.clear_checkpoints(run_dir)
    ckpt.save_checkpoint(run_dir, point)
    # Kept in the run directory, so a report built from the app's registry says so too (RunOutcome.from_run_dir).
    Path(run_dir, SHARED_STAGE1_FILE).write_text(json.dumps({"from": Path(source_dir).name,
                                                              "stage1_seconds": point.train_seconds}))
    return point.train_seconds


def _train_planned(
    run: PlannedRun, run_dir: Path, splits: Any, train_examples: int, progress: bool, resume: bool = False,
    wall_before: float = 0.0,
) -> RunOutcome:
    """Train one planned run into ``run_dir``; a failure becomes a failed outcome with its error.
    ``wall_before``: the wall seconds earlier attempts of a resumed run took."""
    from heft_core.train import train

    step_bar = _StepBar(progress, f"{run.arm} s{run.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = _WallClock(run_dir, wall_before)
    cell = {"arm": run.arm, "seed": run.seed, "grid_point": run.grid_point, "method": run.method}
    try:
        result = train(run.config, run_dir, callbacks=[step_bar, clock], data=splits, resume=resume)
    except Exception as exc:  # one failed run must not end the study; the report names it
        if isinstance(exc, HeftError):
            logger.error("%s failed: %s", run.config.name, exc)
        else:
            logger.exception("%s failed", run.config.name)
        return RunOutcome(
            **cell, status="failed", run_dir=str(run_dir), wall_seconds=clock.elapsed(),
            train_examples=train_examples, error=f"{type(exc).__name__}: {exc}",
        )
    finally:
        step_bar.close()
        clock.write()
    return RunOutcome.from_run_dir(
        run_dir, **cell, status=result.status, wall_seconds=clock.elapsed(), train_examples=train_examples
    )


def run_study_in_process(
    spec: StudySpec,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    data: Any = None,
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
) -> StudyReport:
    """Train every planned run of ``spec`` here, one after another, and write the study directory.

    ``out_dir`` becomes one self-contained directory: ``spec.yaml``, ``study.json`` (the plan
    and each run's status, rewritten after every run), ``runs/<NNN-arm-sSEED>/`` run
    directories, and the report files of :func:`write_report`. A run that fails is recorded
    with its error and the study goes on; the report says what is missing. ``resume`` reuses
    runs an earlier call finished in ``out_dir`` with the same settings and continues a run it stopped
    part-way from that run's latest checkpoint (wall seconds add up over the attempts). ``data`` (a
    ``heft_core.data.DatasetSplits``) replaces loading the spec's data source.
    """
    from heft_core import data as data_lib

    out = Path(out_dir)
    (out / RUNS_SUBDIR).mkdir(parents=True, exist_ok=True)
    planned = spec.plan()
    check_against_model(spec)
    (out / SPEC_FILE).write_text(spec.to_yaml())
    previous: dict[str, Mapping[str, Any]] = {}
    if resume and (out / STUDY_INDEX_FILE).exists():
        previous = {entry["run_dir"]: entry for entry in json.loads((out / STUDY_INDEX_FILE).read_text())["runs"]}
    splits = data if data is not None else data_lib.load_data(planned[0].config.data)
    entries = [
        {"index": run.index, "arm": run.arm, "method": run.method, "seed": run.seed, "grid_point": run.grid_point,
         "run_dir": f"{RUNS_SUBDIR}/{run.dir_name}", "status": "planned"}
        for run in planned
    ]
    outcomes: list[RunOutcome] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(planned), desc=spec.name, unit="run", position=0)
    logger.info("study %s: %d runs in %s", spec.name, len(planned), out)
    try:
        for run, entry in zip(planned, entries):
            run_dir = out / entry["run_dir"]
            train_examples = 0
            if run.method != "base":  # the rows prepare() will draw for this seed
                train_examples = len(data_lib.subset(splits.train, run.config.train_size, run.config.seed))
            entry["train_examples"] = train_examples
            outcome = None
            if resume:
                earlier = RunOutcome.from_run_dir(
                    run_dir, arm=run.arm, seed=run.seed, grid_point=run.grid_point, method=run.method,
                    wall_seconds=previous.get(entry["run_dir"], {}).get("wall_seconds"), train_examples=train_examples,
                )
                if earlier.finished and _same_settings(earlier.config, run.config):
                    logger.info("%s: finished earlier in %s; not trained again", run.config.name, run_dir)
                    outcome = earlier
                    before = previous.get(entry["run_dir"], {})
                    entry.update({key: before[key] for key in ("stage1_from", "stage1_seconds") if before.get(key)})
            if outcome is None:
                if bar is not None:
                    bar.set_postfix_str(f"{run.arm}, seed {run.seed}")
                shared = None
                continued = resume and _resumable(run_dir, run.config)  # stopped part-way: go on from there
                source = outcomes[run.stage1_from] if run.stage1_from is not None else None
                if continued:
                    logger.info("%s: continuing from its checkpoint in %s", run.config.name, run_dir)
                    if (earlier_share := _shared_stage1_of(run_dir)) is not None:
                        entry.update(stage1_from=earlier_share[0], stage1_seconds=earlier_share[1])
                elif source is not None and source.finished:
                    shared = start_from_shared_stage1(out / entries[run.stage1_from]["run_dir"], run.config, run_dir)
                    if shared is not None:
                        logger.info("%s: stage 1 is %s's finished LoRA; training stage 2 only", run.config.name,
                                    source.arm)
                if not continued:
                    (run_dir / WALL_FILE).unlink(missing_ok=True)  # a fresh start counts from zero
                outcome = _train_planned(run, run_dir, splits, train_examples, progress,
                                         resume=continued or shared is not None,
                                         wall_before=_earlier_wall_seconds(run_dir))
                if shared is not None:
                    entry.update(stage1_from=entries[run.stage1_from]["run_dir"], stage1_seconds=shared)
            if entry.get("stage1_from"):
                outcome.shared_stage1_from = entry["stage1_from"]
                outcome.shared_stage1_seconds = entry["stage1_seconds"]
            entry.update(status=outcome.status, error=outcome.error, wall_seconds=outcome.wall_seconds)
            outcomes.append(outcome)
            _write_index(out, spec, entries)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        _write_index(out, spec, entries)  # also when interrupted: what finished stays readable
    report = study_report(spec, outcomes, resamples=resamples)
    write_report(report, out, outcomes)
    from heft_core.study_manifest import write_manifest  # it imports this module

    write_manifest(out)  # the checksums an import verifies
    logger.info("study %s: %d of %d runs finished; report in %s", spec.name, report.finished_runs, len(planned), out)
    return report
