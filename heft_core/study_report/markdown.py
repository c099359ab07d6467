"""The report as Markdown, for people; every name and message from the spec or a run is escaped."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heft_core import stats
from heft_core.study_report.rows import RunRow, StudyReport


def report_markdown(report: StudyReport) -> str:
    """The report for people; every name and message from the spec or a run is escaped."""
    grid = any(row.grid for row in report.arms)
    maj = report.majority
    done = [r for r in report.runs if r.accuracy is not None]
    scorings = {r.scoring for r in done} or {"logits"}
    primary = scorings.pop() if len(scorings) == 1 else "each run's scoring"
    both = any(r.logits_accuracy is not None and r.generation_accuracy is not None for r in done)
    other = {"logits": "generation", "generation": "logits"}.get(primary, "the other scoring")
    mixed = primary not in ("logits", "generation")
    lines = [f"# Study: {_md(report.name)}", ""]
    if report.description:
        lines += [_md(report.description), ""]
    lines.append(
        f"{report.finished_runs} of {report.planned_runs} planned runs finished. Every run answered the same "
        f"{report.n_questions} evaluation questions"
        + (f" (signature `{_md(report.eval_signature)}`)" if report.eval_signature else "")
        + "."
    )
    if report.data:
        lines += ["", f"Data: {_md(report.data)}."]
    lines += ["", _scoring_sentence(primary, both)]
    if report.missing:
        lines += ["", f"**Missing ({len(report.missing)}):** " + "; ".join(_md(m) for m in report.missing)]
    if report.compare_with_paper:
        lines += _paper_section(report)
    lines += ["", "## Arms", ""]
    header = [
        "arm",
        *(["grid point"] if grid else []),
        "epochs",
        "seeds",
        f"accuracy % by {primary} (mean ± sd)",
        "each seed: accuracy % [95% Wilson]",
        *([f"by {other} % (mean)", "logits = generation % (mean)", "unparsed (mean)"] if both else []),
        "answers yes %",
        "trainable params",
        "tokens seen",
        "train s",
        "wall s",
        "est. training FLOPs",
    ]
    lines += [_row(header), _row(["---"] * len(header))]
    runs_by_cell: dict[tuple[str, str], list[RunRow]] = {}
    for run in report.runs:
        runs_by_cell.setdefault((run.arm, run.grid), []).append(run)
    for arm in report.arms:
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
                    *([_pct(arm.generation_accuracy_mean if other == "generation" else arm.logits_accuracy_mean),
                       _pct(arm.scorings_agree_mean), _num(arm.unparsed_mean)] if both else []),
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
                *(["—", "—", "—"] if both else []),
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
        f"accuracy % by {primary} [95% Wilson]",
        *([f"by {other} % [95% Wilson]", "logits = generation %", "unparsed"] if both else []),
        "answers yes %",
        "flag",
        "vs majority",
        "wall s",
        "run",
    ]
    lines += [_row(header), _row(["---"] * len(header))]
    for run in report.runs:
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
                    result + (f" ({run.scoring})" if mixed and run.accuracy is not None else ""),
                    *(_other_scoring(run, other) if both else []),
                    _pct(run.yes_share),
                    f"one class ({run.one_class})" if run.one_class else "",
                    versus,
                    _num(run.wall_seconds),
                    where,
                ]
            )
        )
    shared = [run for run in report.runs if run.stage1_from]
    if shared:
        lines += [
            "",
            "## Shared stages",
            "",
            "A HEFT run whose stage 1 equals another run's LoRA (same seed, data, settings and schedule) trained "
            "stage 2 on that run's finished adapter instead of training stage 1 again. Its cost alone counts the "
            "shared stage (what the arm costs by itself, as on the frontier charts); as run it does not.",
            "",
            _row(["arm", *(["grid point"] if grid else []), "seed", "stage 1 from", "train s as run", "train s alone"]),
            _row(["---"] * (5 + bool(grid))),
        ]
        lines += [
            _row([_md(run.arm), *([_md(run.grid or "—")] if grid else []), str(run.seed), _md(run.stage1_from),
                  _num(run.train_seconds_as_run), _num(run.train_seconds)])
            for run in shared
        ]
        total_alone = sum(r.train_seconds or 0.0 for r in report.runs)
        total_run = sum((r.train_seconds_as_run if r.stage1_from else r.train_seconds) or 0.0 for r in report.runs)
        lines += ["", f"Training seconds of the whole study: {_num(total_run)} as run, {_num(total_alone)} "
                      "if every arm had trained alone."]
    lines += ["", "## Contrasts", ""]
    if report.contrasts:
        lines += [
            "Mean accuracy difference A - B over seeds with a 95% interval from a bootstrap over seeds and "
            f"questions ({report.bootstrap_resamples} resamples, seed {report.bootstrap_seed}); exact McNemar per seed "
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
        for c in report.contrasts:
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
    source = "observed" if report.discordance_observed else "assumed, typical for two fine-tunes"
    share = f"{report.discordance:.0%} of the questions ({source})"
    if report.detectable_difference is None:
        lines.append(
            f"With {report.n_questions} questions and runs disagreeing on {share}, no accuracy difference between "
            "two runs is detectable at 80% power by an exact McNemar test at 0.05."
        )
    else:
        lines.append(
            f"With {report.n_questions} questions and runs disagreeing on {share}, two runs must differ by at "
            f"least {report.detectable_difference * 100:.1f} accuracy points for an exact McNemar test at 0.05 to "
            'detect it with 80% power (Connor 1987); smaller differences are "no difference detected", '
            'not "no difference".'
        )
    if report.charts:
        lines += ["", "## Charts", ""] + [
            f"![{_md(Path(chart).stem.replace('_', ' '))}]({_md(chart)})" for chart in report.charts
        ]
    lines += ["", "## Notes", ""] + [f"- {_md(note)}" for note in [*report.notes, report.flops_formula]]
    return "\n".join(lines) + "\n"


def _scoring_sentence(primary: str, both: bool) -> str:
    meaning = {
        "logits": "the two answer tokens' logits at the last prompt position",
        "generation": 'greedy generation, "Yes"/"No" looked for in the text (anything else unparsed, counted wrong)',
    }
    text = f"Accuracy, the tests against the majority answer and the contrasts are by {primary}"
    text += f" ({meaning[primary]})." if primary in meaning else " (the runs differ; each says which)."
    if both:
        text += (
            " Where a run was scored both ways, both accuracies are shown, with the share of questions on which the "
            "two scorings give the same answer and the count of unparsed generations."
        )
    return text


def _other_scoring(run: RunRow, other: str) -> list[str]:
    if other == "generation":
        accuracy, low, high = run.generation_accuracy, run.generation_low, run.generation_high
    else:
        accuracy, low, high = run.logits_accuracy, run.logits_low, run.logits_high
    if accuracy is None or run.accuracy is None:
        return ["—", "—", "—"]
    return [f"{_pct(accuracy)} [{_pct(low)}, {_pct(high)}]", _pct(run.scorings_agree), _int(run.unparsed)]


def _paper_section(report: StudyReport) -> list[str]:
    """The paper's Table 1 beside ours: its accuracy and h:mm per row, ours by each scoring and in h:mm."""
    from heft_core.study_presets import PAPER_QUESTIONS

    lines = [
        "",
        "## Against the paper (arXiv 2509.09801, Table 1)",
        "",
        f"The paper: Llama-2-7b-chat, full BoolQ ({PAPER_QUESTIONS:,} validation questions), one seed, scored by "
        "generation, time per row as it gives it (h:mm of training on its GPU). Ours: mean over seeds on this "
        "study's questions; train and wall time per run in h:mm.",
        "",
    ]
    header = ["arm", "LoRA + ReFT epochs", "paper accuracy % (generation)", "paper time h:mm",
              "ours by logits % (mean)", "ours by generation % (mean)", "ours train h:mm", "ours wall h:mm"]
    lines += [_row(header), _row(["---"] * len(header))]
    for arm in report.arms:
        if arm.grid and arm.paper_accuracy is None:
            continue
        epochs = arm.budget if arm.method == "heft" else (
            f"{arm.budget}+0" if arm.method == "lora" else f"0+{arm.budget}" if arm.method == "reft" else "0+0")
        lines.append(_row([
            _md(arm.arm) + (f" ({_md(arm.grid)})" if arm.grid else ""),
            epochs,
            _pct(arm.paper_accuracy),
            _hmm(arm.paper_minutes * 60 if arm.paper_minutes is not None else None),
            _pct(arm.logits_accuracy_mean),
            _pct(arm.generation_accuracy_mean),
            _hmm(arm.train_seconds_mean),
            _hmm(arm.wall_seconds_mean),
        ]))
    return lines


def _hmm(seconds: float | None) -> str:
    """Seconds as h:mm, the paper's unit."""
    if seconds is None:
        return "—"
    minutes = round(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


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
