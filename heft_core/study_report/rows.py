"""The report as plain data: one row per run, per arm, per contrast, and the :class:`StudyReport`."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

from heft_core.study_report.costs import FLOPS_FORMULA


@dataclass
class RunRow:
    """One run of the report."""

    arm: str
    grid: str
    seed: int
    method: str
    status: str
    accuracy: float | None = None
    correct: int | None = None
    n: int | None = None
    low: float | None = None
    high: float | None = None
    yes_share: float | None = None
    one_class: str | None = None  # "yes" / "no" when >= 95% of its answers are that class
    vs_majority_p: float | None = None
    vs_majority_run_only: int | None = None  # questions the run got right and the majority answer wrong
    vs_majority_majority_only: int | None = None
    trainable_params: int | None = None
    tokens_seen: int | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    flops: float | None = None
    total_epochs: int = 0
    curve: list[list[float]] = field(default_factory=list)  # [cumulative epoch, accuracy]
    run_dir: str | None = None
    run_id: int | None = None
    error: str | None = None
    # which scoring ``accuracy`` (and every test) is: "logits" or "generation"; each scoring that ran on its own
    scoring: str = "logits"
    logits_accuracy: float | None = None
    logits_low: float | None = None
    logits_high: float | None = None
    generation_accuracy: float | None = None
    generation_low: float | None = None
    generation_high: float | None = None
    unparsed: int | None = None  # generated answers with neither "Yes" nor "No" (counted wrong)
    scorings_agree: float | None = None  # share of questions where logits and generation predict the same answer
    # stage 1 taken from another run's finished LoRA (that run's directory): train_seconds counts it (the run's
    # cost alone); train_seconds_as_run is what this run itself trained
    stage1_from: str | None = None
    train_seconds_as_run: float | None = None


@dataclass
class ArmRow:
    """One arm at one grid point, over its seeds."""

    arm: str
    grid: str
    method: str
    budget: str
    total_epochs: int
    seeds_planned: int
    seeds_finished: int
    accuracy_mean: float | None = None
    accuracy_std: float | None = None  # sample std over seeds; None with one seed
    yes_share_mean: float | None = None
    one_class_runs: int = 0
    beats_majority_runs: int = 0  # runs above the majority answer with McNemar p < 0.05
    trainable_params: int | None = None
    tokens_seen_mean: float | None = None
    train_seconds_mean: float | None = None
    wall_seconds_mean: float | None = None
    flops_mean: float | None = None
    scoring: str = "logits"  # of accuracy_mean; "mixed" when the seeds' runs differ
    logits_accuracy_mean: float | None = None
    generation_accuracy_mean: float | None = None
    unparsed_mean: float | None = None
    scorings_agree_mean: float | None = None
    paper_accuracy: float | None = None  # the paper's Table 1 row of this method and epochs (compare_with_paper)
    paper_minutes: int | None = None


@dataclass
class SeedTest:
    """One seed's exact McNemar test of a contrast."""

    seed: int
    accuracy_a: float
    accuracy_b: float
    a_only: int
    b_only: int
    p_value: float


@dataclass
class ContrastRow:
    """Arm A against arm B at one grid point: per-seed tests, a bootstrap interval, a verdict."""

    a: str
    b: str
    grid: str
    why: str
    seeds: list[SeedTest] = field(default_factory=list)
    n_questions: int = 0
    mean_difference: float | None = None  # accuracy A - B, mean over seeds
    ci_low: float | None = None
    ci_high: float | None = None
    resamples: int = 0
    discordance: float | None = None  # mean share of questions the two arms disagree on
    detectable_difference: float | None = None  # per seed, 80% power, at that discordance
    outcome: str = "none"  # "better", "worse", or "none"
    verdict: str = ""


@dataclass
class StudyReport:
    """Everything a study found, as plain data (see :meth:`to_json`, :meth:`to_markdown`, :meth:`to_csv`)."""

    name: str
    description: str
    spec: dict[str, Any]
    planned_runs: int
    finished_runs: int
    n_questions: int
    eval_signature: str | None
    majority: dict[str, Any]
    arms: list[ArmRow]
    runs: list[RunRow]
    contrasts: list[ContrastRow]
    missing: list[str]
    notes: list[str]
    detectable_difference: float | None  # per pair of runs, at the observed (else typical) discordance
    discordance: float
    discordance_observed: bool
    bootstrap_resamples: int
    bootstrap_seed: int
    flops_formula: str = FLOPS_FORMULA
    charts: list[str] = field(default_factory=list)
    data: str = ""  # the data by label and content hash, never a path
    compare_with_paper: bool = False

    # --- plain forms ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_csv(self, table: str = "runs") -> str:
        """One table as CSV: ``runs`` (one row per run), ``arms`` or ``contrasts``."""
        buffer = io.StringIO()
        if table == "runs":
            names = [f.name for f in dataclasses.fields(RunRow) if f.name != "curve"]
            rows = [{k: v for k, v in dataclasses.asdict(r).items() if k != "curve"} for r in self.runs]
        elif table == "arms":
            names = [f.name for f in dataclasses.fields(ArmRow)]
            rows = [dataclasses.asdict(r) for r in self.arms]
        elif table == "contrasts":
            names = [f.name for f in dataclasses.fields(ContrastRow) if f.name != "seeds"] + ["seed_tests"]
            rows = []
            for contrast in self.contrasts:
                row = {k: v for k, v in dataclasses.asdict(contrast).items() if k != "seeds"}
                row["seed_tests"] = "; ".join(
                    f"seed {t.seed}: {t.a_only}/{t.b_only} p={t.p_value:.4g}" for t in contrast.seeds
                )
                rows.append(row)
        else:
            raise ValueError(f"table must be runs, arms or contrasts, got {table!r}")
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """The report for people (:func:`heft_core.study_report.markdown.report_markdown`)."""
        from heft_core.study_report.markdown import report_markdown

        return report_markdown(self)
