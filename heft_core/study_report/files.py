"""The report directory: Markdown, CSV, JSON, charts, the spec and every per-question prediction."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path

import yaml

from heft_core.study import grid_label
from heft_core.study_report.build import primary_scoring
from heft_core.study_report.charts import write_charts
from heft_core.study_report.outcomes import RunOutcome
from heft_core.study_report.rows import StudyReport

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.yaml"


def write_report(report: StudyReport, directory: str | Path, outcomes: Iterable[RunOutcome] = ()) -> Path:
    """The report directory: ``results.md``, ``results.csv`` (runs), ``arms.csv``, ``contrasts.csv``,
    ``results.json``, ``spec.yaml``, the PNG charts and ``predictions.csv`` (one row per run and
    question, from ``outcomes``). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        report.charts = write_charts(report, directory)
    except Exception as exc:  # a chart problem must not lose the numbers
        logger.warning("charts not written: %r", exc)
        report.charts = []
    (directory / SPEC_FILE).write_text(yaml.safe_dump(report.spec, sort_keys=False, allow_unicode=True))
    (directory / "results.md").write_text(report.to_markdown())
    (directory / "results.json").write_text(report.to_json())
    (directory / "results.csv").write_text(report.to_csv("runs"))
    (directory / "arms.csv").write_text(report.to_csv("arms"))
    (directory / "contrasts.csv").write_text(report.to_csv("contrasts"))
    with open(directory / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        # predicted/correct: the run's primary scoring (column scoring); the others are there when that scoring ran
        writer.writerow(["arm", "grid_point", "seed", "uid", "label", "scoring", "p_yes", "predicted", "correct",
                         "logits_correct", "generated", "generation_predicted", "generation_correct"])
        for outcome in outcomes:
            if outcome.finished:
                scoring = primary_scoring(outcome.config)
                for p in outcome.predictions:
                    writer.writerow([
                        outcome.arm, grid_label(outcome.grid_point), outcome.seed, p["uid"], p["label"], scoring,
                        p.get("p_yes"), p["predicted"], int(bool(p["correct"])), _flag(p.get("logits_correct")),
                        p.get("generated"), p.get("generation_predicted"), _flag(p.get("generation_correct")),
                    ])
    return directory


def _flag(value: object) -> int | None:
    return None if value is None else int(bool(value))

