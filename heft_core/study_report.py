"""The report of a study: from its runs' recorded outcomes to numbers, verdicts, tables and charts.

:class:`RunOutcome` is one run as recorded (a run directory, and the database row when the app
ran it). :func:`study_report` turns a spec and its outcomes into a :class:`StudyReport`: per arm,
accuracy over seeds with each seed's Wilson interval, "yes" share, cost (trainable parameters,
tokens, seconds, estimated FLOPs); the majority-class baseline and each run against it; the
contrasts with per-seed exact McNemar tests, a bootstrap interval over seeds and questions and a
verdict that follows from both; and how small a difference the evaluation could see at all.
:func:`write_report` writes it as Markdown, CSV, JSON and PNG charts, with the spec and every
per-question prediction, into one directory.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heft_common.errors import HeftError, RunLoadError
from heft_common.vocabulary import METHOD_TITLES
from heft_core import stats
from heft_core.artifacts import load_run
from heft_core.config import RunConfig
from heft_core.study import TYPICAL_DISCORDANCE, PlannedRun, StudyArm, StudySpec, grid_key, grid_label

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.yaml"
CHART_FILES = ("accuracy_by_arm.png", "accuracy_vs_epochs.png", "frontier_flops.png", "frontier_wall_seconds.png")


# --------------------------------------------------------------------------- recorded outcomes


@dataclass
class RunOutcome:
    """One run of a study as recorded: its cell, its status and, when finished, what it answered.

    ``predictions``: dicts with ``uid``, ``label`` (1 yes / 0 no), ``predicted``, ``correct``
    (and ``p_yes``), as in a run directory's ``predictions.jsonl``. ``steps``: the per-step
    metrics (``stage``, ``tokens_per_second``, ``elapsed_seconds``), ``evals``: the per-epoch
    evaluations (``cumulative_epoch``, ``accuracy``).
    """

    arm: str
    seed: int
    grid_point: dict[str, Any]
    method: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: dict[str, int] = field(default_factory=dict)
    train_seconds: float | None = None
    wall_seconds: float | None = None
    train_examples: int | None = None
    eval_signature: str | None = None
    run_dir: str | None = None
    run_id: int | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        return self.arm, self.seed, grid_key(self.grid_point)

    @property
    def finished(self) -> bool:
        return self.status == "completed" and bool(self.predictions)

    @classmethod
    def from_run_dir(
        cls,
        path: str | Path,
        *,
        arm: str,
        seed: int,
        grid_point: Mapping[str, Any] | None = None,
        method: str | None = None,
        status: str | None = None,
        run_id: int | None = None,
        wall_seconds: float | None = None,
        train_examples: int | None = None,
        error: str | None = None,
    ) -> "RunOutcome":
        """Read a run directory (``heft_core.artifacts``); an unreadable one gives an outcome without results."""
        try:
            run = load_run(path)
        except (RunLoadError, OSError, ValueError) as exc:
            return cls(
                arm,
                seed,
                dict(grid_point or {}),
                method or "",
                status or "failed",
                run_dir=str(path),
                run_id=run_id,
                wall_seconds=wall_seconds,
                train_examples=train_examples,
                error=error or str(exc),
            )
        result = run.meta.get("result", {})
        config = run.meta.get("config", {})
        return cls(
            arm,
            seed,
            dict(grid_point or {}),
            method or config.get("method", ""),
            status or result.get("status", "completed"),
            config=config,
            predictions=run.predictions(),
            evals=run.evals(),
            steps=run.steps(),
            trainable_params={k: int(v) for k, v in (result.get("trainable_params_by_stage") or {}).items()},
            train_seconds=result.get("train_seconds"),
            wall_seconds=wall_seconds,
            train_examples=train_examples,
            eval_signature=run.meta.get("eval_signature"),
            run_dir=str(path),
            run_id=run_id,
            error=error,
        )

    @classmethod
    def from_record(cls, row: Any) -> "RunOutcome":
        """From a database row of a study run (``storage.models.Run``: arm, seed, grid_point, status,
        artifact_dir, ...); a completed run's answers are read from its run directory."""
        grid_point = json.loads(row.grid_point) if getattr(row, "grid_point", None) else {}
        wall = None
        if getattr(row, "started_at", None) and getattr(row, "finished_at", None):
            wall = (row.finished_at - row.started_at).total_seconds()
        if row.status == "completed" and row.artifact_dir:
            return cls.from_run_dir(
                row.artifact_dir,
                arm=row.arm,
                seed=row.seed,
                grid_point=grid_point,
                method=row.method,
                status=row.status,
                run_id=row.id,
                wall_seconds=wall,
                error=row.error,
            )
        return cls(
            row.arm,
            row.seed,
            grid_point,
            row.method,
            row.status,
            config=row.config,
            run_dir=row.artifact_dir,
            run_id=row.id,
            wall_seconds=wall,
            error=row.error,
        )


def tokens_by_stage(steps: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Training tokens (real, unpadded) per stage, from per-step tokens/s and cumulative training seconds."""
    totals: dict[str, float] = {}
    previous = 0.0
    for step in sorted(steps, key=lambda s: s.get("step", 0)):
        elapsed = float(step.get("elapsed_seconds") or 0.0)
        totals[step["stage"]] = totals.get(step["stage"], 0.0) + float(step.get("tokens_per_second") or 0.0) * (
            elapsed - previous
        )
        previous = elapsed
    return {stage: int(round(value)) for stage, value in totals.items()}


FLOPS_FORMULA = (
    "Estimated training FLOPs (multiply-add = 2), per stage over the real (unpadded) training tokens T of that stage: "
    "forward 2·N·T, with N the decoder's linear weights (layers x sum of in x out of each linear module); "
    "backward through what needs gradients: activation gradients 2·N·T·(L - l0)/L for LoRA (l0 the first adapted "
    "layer; all L layers by default) and 2·N·T_b·(L - 1 - l0)/L for ReFT (l0 the first intervened layer, whose output "
    "is intervened; T_b = T, or the last-n tokens of each training row when the positions are 'ln' only and the prefix "
    "is reused without gradients); plus 6·P·T_b for the P trained adapter or intervention parameters (their forward, "
    "input and weight gradients). Not counted: embeddings, norms, attention scores, the answer head, evaluation, "
    "and the forward work that cached ReFT prefix states save in later epochs (so ReFT is an upper bound)."
)


def training_flops(
    config: RunConfig,
    num_layers: int,
    linear_params: int,
    tokens: Mapping[str, int],
    trainable: Mapping[str, int],
    train_examples: int | None = None,
) -> float:
    """Estimated training FLOPs of one run: see :data:`FLOPS_FORMULA`. 0 for a base run."""
    total = 0.0
    for stage, settings in config.stages():
        stage_tokens = int(tokens.get(stage, 0))
        params = int(trainable.get(stage, 0))
        backward_tokens = stage_tokens
        if stage == "lora":
            first = min(config.lora.layers) if config.lora.layers else 0
            depth = (num_layers - first) / num_layers
        else:
            first = min(config.reft.resolved_layers(num_layers))
            depth = (num_layers - 1 - first) / num_layers
            first_n, last_n = config.reft.first_last
            if first_n == 0 and train_examples:  # prefix reuse: only the last n tokens run with gradients
                backward_tokens = min(stage_tokens, last_n * train_examples * settings.epochs)
        total += (
            2 * linear_params * stage_tokens
            + 2 * linear_params * backward_tokens * depth
            + 6 * params * backward_tokens
        )
    return total


def decoder_shape(model_ref: str) -> tuple[int, int]:
    """(decoder layers, linear weights of the decoder) from the model's config (no weights loaded)."""
    from heft_core.models import model_info

    info = model_info(model_ref)
    return info.num_layers, info.num_layers * sum(fan_in * fan_out for _, fan_in, fan_out in info.linear_shapes)


# --------------------------------------------------------------------------- the report


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
        """The report for people; every name and message from the spec or a run is escaped."""
        grid = any(row.grid for row in self.arms)
        maj = self.majority
        lines = [f"# Study: {_md(self.name)}", ""]
        if self.description:
            lines += [_md(self.description), ""]
        lines.append(
            f"{self.finished_runs} of {self.planned_runs} planned runs finished. Every run answered the same "
            f"{self.n_questions} evaluation questions"
            + (f" (signature `{_md(self.eval_signature)}`)" if self.eval_signature else "")
            + "."
        )
        if self.missing:
            lines += ["", f"**Missing ({len(self.missing)}):** " + "; ".join(_md(m) for m in self.missing)]
        lines += ["", "## Arms", ""]
        header = [
            "arm",
            *(["grid point"] if grid else []),
            "epochs",
            "seeds",
            "accuracy % (mean ± sd)",
            "each seed: accuracy % [95% Wilson]",
            "answers yes %",
            "trainable params",
            "tokens seen",
            "train s",
            "wall s",
            "est. training FLOPs",
        ]
        lines += [_row(header), _row(["---"] * len(header))]
        runs_by_cell: dict[tuple[str, str], list[RunRow]] = {}
        for run in self.runs:
            runs_by_cell.setdefault((run.arm, run.grid), []).append(run)
        for arm in self.arms:
            seeds = [r for r in runs_by_cell.get((arm.arm, arm.grid), []) if r.accuracy is not None]
            per_seed = (
                "<br>".join(
                    f"s{r.seed}: {_pct(r.accuracy)} [{_pct(r.low)}, {_pct(r.high)}]"
                    + (f" **all {r.one_class}**" if r.one_class else "")
                    for r in seeds
                )
                or "—"
            )
            mean = (
                "—"
                if arm.accuracy_mean is None
                else _pct(arm.accuracy_mean)
                + (f" ± {arm.accuracy_std * 100:.1f}" if arm.accuracy_std is not None else "")
            )
            lines.append(
                _row(
                    [
                        _md(arm.arm),
                        *([_md(arm.grid or "—")] if grid else []),
                        arm.budget,
                        f"{arm.seeds_finished}/{arm.seeds_planned}",
                        mean,
                        per_seed,
                        _pct(arm.yes_share_mean),
                        _int(arm.trainable_params),
                        _int(arm.tokens_seen_mean),
                        _num(arm.train_seconds_mean),
                        _num(arm.wall_seconds_mean),
                        _sci(arm.flops_mean),
                    ]
                )
            )
        lines.append(
            _row(
                [
                    f'majority answer ("{maj["answer"]}" to every question)',
                    *(["—"] if grid else []),
                    "—",
                    "—",
                    _pct(maj["accuracy"]),
                    f"{maj['correct']}/{maj['n']} [{_pct(maj['low'])}, {_pct(maj['high'])}]",
                    "100" if maj["answer"] == "yes" else "0",
                    "—",
                    "—",
                    "—",
                    "—",
                    "—",
                ]
            )
        )
        lines += [
            "",
            "## Runs",
            "",
            "Each run against always giving the majority answer: exact McNemar on the same questions "
            "(run-only right / majority-only right). **one class**: at least 95% of its answers are one class.",
            "",
        ]
        header = [
            "arm",
            *(["grid point"] if grid else []),
            "seed",
            "status",
            "accuracy % [95% Wilson]",
            "answers yes %",
            "flag",
            "vs majority",
            "wall s",
            "run",
        ]
        lines += [_row(header), _row(["---"] * len(header))]
        for run in self.runs:
            if run.accuracy is None:
                result, versus = (_md(run.error or run.status)), "—"
            else:
                result = f"{_pct(run.accuracy)} [{_pct(run.low)}, {_pct(run.high)}] ({run.correct}/{run.n})"
                counts = f"{run.vs_majority_run_only}/{run.vs_majority_majority_only}"
                versus = f"{counts}, p = {stats.format_p(run.vs_majority_p)}"
            where = f"#{run.run_id}" if run.run_id else (_md(Path(run.run_dir).name) if run.run_dir else "—")
            lines.append(
                _row(
                    [
                        _md(run.arm),
                        *([_md(run.grid or "—")] if grid else []),
                        str(run.seed),
                        _md(run.status),
                        result,
                        _pct(run.yes_share),
                        f"one class ({run.one_class})" if run.one_class else "",
                        versus,
                        _num(run.wall_seconds),
                        where,
                    ]
                )
            )
        lines += ["", "## Contrasts", ""]
        if self.contrasts:
            lines += [
                "Mean accuracy difference A - B over seeds with a 95% interval from a bootstrap over seeds and "
                f"questions ({self.bootstrap_resamples} resamples, seed {self.bootstrap_seed}); exact McNemar per seed "
                "(A-only / B-only right). The verdict says better or worse only when the interval excludes 0 and most "
                "seeds' tests agree (p < 0.05, same direction, none against).",
                "",
            ]
            header = [
                "A",
                "B",
                *(["grid point"] if grid else []),
                "A - B, points [95% CI]",
                "per seed: A-only/B-only, p",
                "discordance",
                "detectable (80% power)",
                "verdict",
            ]
            lines += [_row(header), _row(["---"] * len(header))]
            for c in self.contrasts:
                difference = (
                    "—"
                    if c.mean_difference is None
                    else f"{c.mean_difference * 100:+.1f} [{c.ci_low * 100:+.1f}, {c.ci_high * 100:+.1f}]"
                )
                tests = (
                    "<br>".join(f"s{t.seed}: {t.a_only}/{t.b_only}, p = {stats.format_p(t.p_value)}" for t in c.seeds)
                    or "—"
                )
                lines.append(
                    _row(
                        [
                            _md(c.a),
                            _md(c.b),
                            *([_md(c.grid or "—")] if grid else []),
                            difference,
                            tests,
                            _pct(c.discordance),
                            _points(c.detectable_difference),
                            _md(c.verdict),
                        ]
                    )
                )
        else:
            lines.append("No contrasts: the study has no HEFT arm and names no pairs (spec field `contrasts`).")
        lines += ["", "## What this evaluation can see", ""]
        source = "observed" if self.discordance_observed else "assumed, typical for two fine-tunes"
        share = f"{self.discordance:.0%} of the questions ({source})"
        if self.detectable_difference is None:
            lines.append(
                f"With {self.n_questions} questions and runs disagreeing on {share}, no accuracy difference between "
                "two runs is detectable at 80% power by an exact McNemar test at 0.05."
            )
        else:
            lines.append(
                f"With {self.n_questions} questions and runs disagreeing on {share}, two runs must differ by at "
                f"least {self.detectable_difference * 100:.1f} accuracy points for an exact McNemar test at 0.05 to "
                'detect it with 80% power (Connor 1987); smaller differences are "no difference detected", '
                'not "no difference".'
            )
        if self.charts:
            lines += ["", "## Charts", ""] + [
                f"![{_md(Path(chart).stem.replace('_', ' '))}]({_md(chart)})" for chart in self.charts
            ]
        lines += ["", "## Notes", ""] + [f"- {_md(note)}" for note in [*self.notes, self.flops_formula]]
        return "\n".join(lines) + "\n"


def _md(text: Any) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}"


def _points(value: float | None) -> str:
    return "none detectable" if value is None else f"{value * 100:.1f} points"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _int(value: float | None) -> str:
    return "—" if value is None else f"{round(value):,}"


def _sci(value: float | None) -> str:
    return "—" if value is None else ("0" if value == 0 else f"{value:.2e}")


def default_contrasts(spec: StudySpec) -> list[tuple[str, str, str]]:
    """(A, B, why): each HEFT arm against each LoRA and ReFT arm. A LoRA/ReFT arm with a larger
    budget than the HEFT arm is A ("long baseline vs HEFT"), else HEFT is A; then the spec's own pairs."""
    pairs: list[tuple[str, str, str]] = []
    for heft in (arm for arm in spec.arms if arm.method == "heft"):
        for other in (arm for arm in spec.arms if arm.method in ("lora", "reft")):
            title = METHOD_TITLES[other.method]
            if other.total_epochs > heft.total_epochs:
                pairs.append((other.name, heft.name, f"long {title} baseline vs HEFT"))
            else:
                pairs.append((heft.name, other.name, f"HEFT vs {title}"))
    seen = {frozenset(pair[:2]) for pair in pairs}
    for a, b in spec.contrasts:
        if frozenset((a, b)) not in seen:
            pairs.append((a, b, "picked"))
            seen.add(frozenset((a, b)))
    return pairs


def _verdict(
    a: str, b: str, tests: Sequence[SeedTest], interval: stats.BootstrapInterval, detectable: float | None
) -> tuple[str, str]:
    """("better" | "worse" | "none", one line): better or worse only if the bootstrap interval excludes 0
    and more than half of the seeds' McNemar tests are significant (p < 0.05) in that direction, none against."""
    seeds = len(tests)
    side = "better" if interval.low > 0 else "worse" if interval.high < 0 else None
    if side is None:
        scale = "the interval includes 0"
    else:
        sign = 1 if side == "better" else -1
        agree = sum(1 for t in tests if t.p_value < 0.05 and sign * (t.a_only - t.b_only) > 0)
        against = sum(1 for t in tests if t.p_value < 0.05 and sign * (t.a_only - t.b_only) < 0)
        if 2 * agree > seeds and against == 0:
            return side, (
                f"{a} is {side} than {b}: {interval.difference * 100:+.1f} points "
                f"[{interval.low * 100:+.1f}, {interval.high * 100:+.1f}], significant in {agree} of {seeds} seeds"
            )
        scale = f"the interval excludes 0 but {agree} of {seeds} seeds' tests agree" + (
            f" and {against} disagree" if against else ""
        )
    see = (
        "no difference is detectable per seed at this discordance"
        if detectable is None
        else f"per seed only differences of {detectable * 100:.1f}+ points are detectable"
    )
    return (
        "none",
        f"no difference detected at this scale, n = {seeds} seed{'s' if seeds != 1 else ''} × "
        f"{interval.questions} questions ({scale}; {see})",
    )


def _choose_outcomes(
    planned: Sequence[PlannedRun], outcomes: Iterable[RunOutcome], notes: list[str]
) -> dict[tuple, RunOutcome]:
    """One outcome per planned cell: the newest finished one, else the newest."""
    planned_keys = {run.key for run in planned}
    chosen: dict[tuple, RunOutcome] = {}
    for outcome in outcomes:
        if outcome.key not in planned_keys:
            where = f"{outcome.arm}, seed {outcome.seed} {grid_label(outcome.grid_point)}".strip()
            notes.append(f"ignored a run outside the plan: {where}")
            continue
        current = chosen.get(outcome.key)
        if current is None or outcome.finished or not current.finished:
            chosen[outcome.key] = outcome
    return chosen


def _study_questions(
    planned: Sequence[PlannedRun], chosen: dict[tuple, RunOutcome], notes: list[str]
) -> dict[str, int]:
    """uid -> gold label of the study's questions: those of the first finished run. A run that
    answered other questions is set aside (its outcome becomes "excluded")."""
    reference: dict[str, int] | None = None
    for run in planned:
        outcome = chosen.get(run.key)
        if outcome is None or not outcome.finished:
            continue
        labels = {p["uid"]: int(p["label"]) for p in outcome.predictions}
        if reference is None:
            reference = labels
        elif labels.keys() != reference.keys():
            notes.append(f"{outcome.arm}, seed {outcome.seed}: evaluated other questions than the study's; left out")
            chosen[run.key] = dataclasses.replace(
                outcome, status="excluded", predictions=[], error="evaluated other questions"
            )
    return reference or {}


def _run_row(
    run: PlannedRun, arm: StudyArm, outcome: RunOutcome | None, majority_correct: Mapping[str, bool],
    shape: tuple[int, int] | None,
) -> RunRow:
    row = RunRow(
        arm=run.arm, grid=run.grid_label, seed=run.seed, method=run.method,
        status=outcome.status if outcome else "not run", total_epochs=arm.total_epochs,
    )
    if outcome is None:
        return row
    row.run_dir, row.run_id, row.error = outcome.run_dir, outcome.run_id, outcome.error
    row.wall_seconds = outcome.wall_seconds
    if not outcome.finished:
        return row
    correct = {p["uid"]: bool(p["correct"]) for p in outcome.predictions}
    predicted = [int(p["predicted"]) for p in outcome.predictions]
    accuracy = stats.accuracy_result(sum(correct.values()), len(correct))
    row.accuracy, row.correct, row.n, row.low, row.high = (
        accuracy.accuracy, accuracy.correct, accuracy.n, accuracy.low, accuracy.high
    )
    row.yes_share = stats.yes_share(predicted)
    row.one_class = stats.one_class(predicted)
    versus = stats.paired_comparison(correct, majority_correct)
    row.vs_majority_p = versus.p_value
    row.vs_majority_run_only, row.vs_majority_majority_only = versus.a_only, versus.b_only
    tokens = tokens_by_stage(outcome.steps)
    row.trainable_params = sum(outcome.trainable_params.values())
    row.tokens_seen = sum(tokens.values())
    row.train_seconds = outcome.train_seconds
    if shape is not None:
        examples = outcome.train_examples or run.config.train_size
        row.flops = training_flops(run.config, shape[0], shape[1], tokens, outcome.trainable_params, examples)
    evals = [e for e in outcome.evals if e.get("accuracy") is not None]
    row.curve = [[float(e.get("cumulative_epoch") or 0), float(e["accuracy"])] for e in evals]
    return row


def _arm_row(arm: StudyArm, label: str, rows: Sequence[RunRow]) -> ArmRow:
    done = [r for r in rows if r.accuracy is not None]
    mean, std = stats.mean_and_std([r.accuracy for r in done])
    beats = [r for r in done if r.vs_majority_p < 0.05 and r.vs_majority_run_only > r.vs_majority_majority_only]
    return ArmRow(
        arm=arm.name, grid=label, method=arm.method, budget=arm.budget_label, total_epochs=arm.total_epochs,
        seeds_planned=len(rows), seeds_finished=len(done), accuracy_mean=mean, accuracy_std=std,
        yes_share_mean=_mean(r.yes_share for r in done), one_class_runs=sum(1 for r in done if r.one_class),
        beats_majority_runs=len(beats), trainable_params=done[0].trainable_params if done else None,
        tokens_seen_mean=_mean(r.tokens_seen for r in done), train_seconds_mean=_mean(r.train_seconds for r in done),
        wall_seconds_mean=_mean(r.wall_seconds for r in done), flops_mean=_mean(r.flops for r in done),
    )


def _contrast_row(
    a: str, b: str, why: str, point: Mapping[str, Any], seeds: Sequence[int],
    correctness: Mapping[tuple, dict[str, bool]], uids: Sequence[str], resamples: int, bootstrap_seed: int,
) -> ContrastRow:
    key = grid_key(point)
    contrast = ContrastRow(a=a, b=b, grid=grid_label(point), why=why, n_questions=len(uids))
    matrix_a, matrix_b = [], []
    for seed in seeds:
        right_a, right_b = correctness.get((a, seed, key)), correctness.get((b, seed, key))
        if right_a is None or right_b is None:
            continue
        pair = stats.paired_comparison(right_a, right_b)
        contrast.seeds.append(SeedTest(seed, pair.accuracy_a, pair.accuracy_b, pair.a_only, pair.b_only, pair.p_value))
        matrix_a.append([right_a[uid] for uid in uids])
        matrix_b.append([right_b[uid] for uid in uids])
    if not contrast.seeds:
        contrast.verdict = "not tested: no seed has both runs finished"
        return contrast
    interval = stats.paired_bootstrap_difference(matrix_a, matrix_b, resamples=resamples, seed=bootstrap_seed)
    contrast.mean_difference, contrast.ci_low, contrast.ci_high = interval.difference, interval.low, interval.high
    contrast.resamples = interval.resamples
    contrast.discordance = sum(t.a_only + t.b_only for t in contrast.seeds) / (len(contrast.seeds) * len(uids))
    if contrast.discordance > 0:
        contrast.detectable_difference = stats.minimum_detectable_difference(len(uids), contrast.discordance)
    contrast.outcome, contrast.verdict = _verdict(a, b, contrast.seeds, interval, contrast.detectable_difference)
    return contrast


def study_report(
    spec: StudySpec,
    outcomes: Iterable[RunOutcome],
    *,
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = 0,
    model_shape: tuple[int, int] | None = None,
) -> StudyReport:
    """The report of a study from its runs' recorded outcomes (finished or not).

    A cell (arm, seed, grid point) recorded more than once (a re-queued run) counts its newest
    finished outcome; planned cells without a finished run are listed as missing. The
    majority baseline is the majority gold answer of the study's questions. ``model_shape`` is
    (decoder layers, decoder linear weights) for the FLOPs estimate; by default it is read from
    the spec's model config (:func:`decoder_shape`), and FLOPs are left out if that fails.
    """
    planned = spec.plan()
    notes: list[str] = []
    chosen = _choose_outcomes(planned, outcomes, notes)
    labels = _study_questions(planned, chosen, notes)
    majority = stats.majority_baseline(labels)
    majority_correct = majority.correctness(labels)
    majority_interval = stats.accuracy_result(majority.correct, majority.n)
    shape = model_shape
    if shape is None and any(o.finished for o in chosen.values()):
        try:
            shape = decoder_shape(spec.model)
        except (HeftError, OSError, ValueError) as exc:
            notes.append(f"training FLOPs not estimated: the model's shape could not be read ({exc})")

    run_rows = [_run_row(run, spec.arm(run.arm), chosen.get(run.key), majority_correct, shape) for run in planned]
    missing = [
        f"{row.arm}, seed {row.seed}" + (f", {row.grid}" if row.grid else "") + f": {row.status}"
        + (f" ({row.error})" if row.error else "")
        for row in run_rows if row.accuracy is None
    ]
    correctness = {
        run.key: {p["uid"]: bool(p["correct"]) for p in chosen[run.key].predictions}
        for run, row in zip(planned, run_rows) if row.accuracy is not None
    }
    arm_rows = [
        _arm_row(arm, grid_label(point), [r for r in run_rows if r.arm == arm.name and r.grid == grid_label(point)])
        for point in spec.grid_points() for arm in spec.arms
    ]
    uids = sorted(labels)
    contrast_rows = [
        _contrast_row(a, b, why, point, spec.seeds, correctness, uids, resamples, bootstrap_seed)
        for point in spec.grid_points() for a, b, why in default_contrasts(spec)
    ]

    discordances = [c.discordance for c in contrast_rows if c.discordance]
    observed = bool(discordances)
    discordance = sum(discordances) / len(discordances) if observed else TYPICAL_DISCORDANCE
    signatures = {chosen[key].eval_signature for key in correctness if chosen[key].eval_signature}
    if len(spec.seeds) == 1:
        notes.append("One seed: the intervals cover the sampling of questions, not seed-to-seed training variance.")
    if len(signatures) > 1:
        notes.append(f"runs report {len(signatures)} different evaluation signatures for the same question uids")
    notes.append(
        "Accuracy intervals: 95% Wilson (statsmodels). McNemar: exact binomial (scipy), two-sided, "
        "not corrected for multiple comparisons."
    )
    return StudyReport(
        name=spec.name, description=spec.description, spec=spec.to_dict(), planned_runs=len(planned),
        finished_runs=len(correctness), n_questions=len(uids),
        eval_signature=next(iter(signatures)) if len(signatures) == 1 else None,
        majority={
            "answer": majority.answer_word, "accuracy": majority.accuracy, "correct": majority.correct, "n": majority.n,
            "low": majority_interval.low, "high": majority_interval.high,
        },
        arms=arm_rows, runs=run_rows, contrasts=contrast_rows, missing=missing, notes=notes,
        detectable_difference=stats.minimum_detectable_difference(len(uids), discordance) if uids else None,
        discordance=discordance, discordance_observed=observed, bootstrap_resamples=resamples,
        bootstrap_seed=bootstrap_seed,
    )


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# --------------------------------------------------------------------------- charts and files


def write_charts(report: StudyReport, directory: str | Path) -> list[str]:
    """PNG charts (matplotlib, Agg) into ``directory``; returns their file names.

    ``accuracy_by_arm.png`` (each seed and the mean), ``accuracy_vs_epochs.png``,
    ``frontier_flops.png`` and ``frontier_wall_seconds.png`` (one point per run, arms coloured).
    Every chart draws the majority answer's accuracy as a line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    majority = report.majority["accuracy"] * 100
    done = [r for r in report.runs if r.accuracy is not None]
    cells = list(dict.fromkeys((r.arm, r.grid) for r in report.runs))
    colours = {cell: plt.get_cmap("tab10")(index % 10) for index, cell in enumerate(cells)}
    names = {cell: cell[0] + (f" ({cell[1]})" if cell[1] else "") for cell in cells}
    written = []

    def finish(fig: Any, ax: Any, name: str, xlabel: str) -> None:
        ax.axhline(
            majority,
            color="grey",
            linestyle=":",
            label=f'majority answer "{report.majority["answer"]}" {majority:.1f}%',
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on the study's evaluation questions (%)")
        ax.set_title(report.name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cells) + 2), 5))
    for index, cell in enumerate(cells):
        values = [r.accuracy * 100 for r in done if (r.arm, r.grid) == cell]
        if values:
            ax.scatter([index] * len(values), values, color=colours[cell], alpha=0.7, label=names[cell])
            ax.hlines(sum(values) / len(values), index - 0.3, index + 0.3, color=colours[cell])
    ax.set_xticks(range(len(cells)), [names[c] for c in cells], rotation=30, ha="right", fontsize=8)
    finish(fig, ax, "accuracy_by_arm.png", "arm (dots: seeds; bar: mean)")

    fig, ax = plt.subplots(figsize=(8, 5))
    for cell in cells:
        by_epoch: dict[float, list[float]] = {}
        for run in (r for r in done if (r.arm, r.grid) == cell):
            for epoch, accuracy in run.curve:
                by_epoch.setdefault(epoch, []).append(accuracy * 100)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        if len(epochs) == 1 and epochs[0] == 0:  # a base run: one zero-shot point
            ax.axhline(means[0], color=colours[cell], linestyle="--", label=f"{names[cell]} {means[0]:.1f}%")
        else:
            ax.plot(epochs, means, "-o", markersize=4, color=colours[cell], label=names[cell])
    finish(fig, ax, "accuracy_vs_epochs.png", "cumulative training epochs (LoRA + ReFT), mean over seeds")

    for name, attribute, xlabel, log in (
        ("frontier_flops.png", "flops", "estimated training FLOPs", True),
        ("frontier_wall_seconds.png", "wall_seconds", "wall seconds per run", False),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for cell in cells:
            points = [
                (getattr(r, attribute), r.accuracy * 100)
                for r in done
                if (r.arm, r.grid) == cell and getattr(r, attribute) is not None
            ]
            positive = [(x, y) for x, y in points if x > 0]
            if positive:
                ax.scatter([x for x, _ in positive], [y for _, y in positive], color=colours[cell], label=names[cell])
            elif points:  # trains nothing (base): a line, it costs no training
                ax.axhline(
                    sum(y for _, y in points) / len(points),
                    color=colours[cell],
                    linestyle="--",
                    label=f"{names[cell]} (no training)",
                )
        if log and ax.collections:
            ax.set_xscale("log")
        finish(fig, ax, name, xlabel)
    return written


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
        writer.writerow(["arm", "grid_point", "seed", "uid", "label", "p_yes", "predicted", "correct"])
        for outcome in outcomes:
            if outcome.finished:
                for p in outcome.predictions:
                    writer.writerow(
                        [
                            outcome.arm,
                            grid_label(outcome.grid_point),
                            outcome.seed,
                            p["uid"],
                            p["label"],
                            p.get("p_yes"),
                            p["predicted"],
                            int(bool(p["correct"])),
                        ]
                    )
    return directory
