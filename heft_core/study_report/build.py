"""From a spec and its runs' recorded outcomes to the report's numbers: rows, contrasts, verdicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from heft_common.errors import HeftError
from heft_common.vocabulary import METHOD_TITLES
from heft_core import stats
from heft_core.data import data_label
from heft_core.study import TYPICAL_DISCORDANCE, PlannedRun, StudyArm, StudySpec, grid_key, grid_label
from heft_core.study_presets import paper_row
from heft_core.study_report.costs import decoder_shape, tokens_by_stage, training_flops
from heft_core.study_report.outcomes import RunOutcome, portable_run_dir
from heft_core.study_report.rows import ArmRow, ContrastRow, RunRow, SeedTest, StudyReport


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
    row.run_dir, row.run_id, row.error = portable_run_dir(outcome.run_dir), outcome.run_id, outcome.error
    row.wall_seconds = outcome.wall_seconds
    if not outcome.finished:
        return row
    correct = {p["uid"]: bool(p["correct"]) for p in outcome.predictions}
    predicted = [None if p["predicted"] is None else int(p["predicted"]) for p in outcome.predictions]
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
    _add_scorings(row, outcome)
    row.train_seconds_as_run = row.train_seconds
    if outcome.shared_stage1_from and row.train_seconds is not None:
        row.stage1_from = Path(outcome.shared_stage1_from).name
        row.train_seconds_as_run = max(0.0, row.train_seconds - float(outcome.shared_stage1_seconds or 0.0))
    return row


def primary_scoring(config: Mapping[str, Any]) -> str:
    """The scoring of a run's ``correct``/``accuracy``: logits unless it scored by generation only."""
    return "generation" if (config or {}).get("scoring") == "generation" else "logits"


def _add_scorings(row: RunRow, outcome: RunOutcome) -> None:
    """Each scoring's accuracy and, when both ran, their agreement and the unparsed count."""
    row.scoring = primary_scoring(outcome.config)
    predictions = outcome.predictions
    logits_right, generation_right, logits_answer, generation_answer = [], [], [], []
    for p in predictions:
        label = int(p["label"])
        if "logits_correct" in p or row.scoring == "logits":
            right = bool(p.get("logits_correct", p["correct"]))
            logits_right.append(right)
            logits_answer.append(label if right else 1 - label)
        if "generation_correct" in p or row.scoring == "generation":
            generation_right.append(bool(p.get("generation_correct", p["correct"])))
            answer = p.get("generation_predicted", p["predicted"] if row.scoring == "generation" else None)
            generation_answer.append(None if answer is None else int(answer))
    n = len(predictions)
    if logits_right and len(logits_right) == n:
        result = stats.accuracy_result(sum(logits_right), n)
        row.logits_accuracy, row.logits_low, row.logits_high = result.accuracy, result.low, result.high
    if generation_right and len(generation_right) == n:
        result = stats.accuracy_result(sum(generation_right), n)
        row.generation_accuracy, row.generation_low, row.generation_high = result.accuracy, result.low, result.high
        row.unparsed = sum(1 for answer in generation_answer if answer is None)
        if len(logits_answer) == n:
            row.scorings_agree = sum(a == b for a, b in zip(logits_answer, generation_answer)) / n


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
        scoring=_one_scoring(done), logits_accuracy_mean=_mean(r.logits_accuracy for r in done),
        generation_accuracy_mean=_mean(r.generation_accuracy for r in done),
        unparsed_mean=_mean(r.unparsed for r in done), scorings_agree_mean=_mean(r.scorings_agree for r in done),
    )


def _one_scoring(rows: Sequence[RunRow]) -> str:
    scorings = {r.scoring for r in rows}
    return scorings.pop() if len(scorings) == 1 else ("mixed" if scorings else "logits")


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
    if spec.compare_with_paper:
        for arm_row, arm in zip(arm_rows, [arm for _ in spec.grid_points() for arm in spec.arms]):
            row = paper_row(arm.method, arm.lora_epochs, arm.reft_epochs)
            if row is not None:
                arm_row.paper_accuracy, arm_row.paper_minutes = row.accuracy, row.minutes
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
        bootstrap_seed=bootstrap_seed, data=_data_name(spec, chosen.values()),
        compare_with_paper=spec.compare_with_paper,
    )


def _data_name(spec: StudySpec, outcomes: Iterable[RunOutcome]) -> str:
    """The study's data by label and content hash, as its runs recorded it (else computed here); no path."""
    for outcome in outcomes:
        label = outcome.data_label or ""
        if outcome.finished and label and not _holds_path(label):
            return label.removeprefix("BoolQ-format local: ")
    source = str(spec.plan_config().data)
    try:
        return data_label(source)
    except (HeftError, OSError):
        return Path(source).name if _holds_path(source) else source


def _holds_path(text: str) -> bool:
    return "/" in text and any(part.startswith(("/", "~")) for part in text.replace(": ", " ").split())


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
