"""What the pages show, as plain functions: labels, tables, chart frames, cards and short messages.

No Gradio and no database here: every function takes rows (``storage.models.Run`` or anything
with the same attributes) and returns strings, DataFrames or a matplotlib figure, so all of
it is tested without a browser. Text that goes into Markdown or HTML goes through :func:`escape`,
the one escaping helper of the app (forms' field messages and the UI's handlers use it too).
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from heft_common.vocabulary import (
    ACTIVE_STATUSES,
    DEFAULT_HUB_DATASET,
    EMBEDDED_MODEL,
    HUB_DATA,
    HUB_PREFIX,
    METHOD_TITLES,
    METHODS,
    STATUSES,
    SYNTHETIC_DATA,
    TRAINED_METHODS,
    RunStatus,
)
from heft_core.config import primary_scoring

HUB_BOOLQ_SOURCES = frozenset({HUB_DATA, DEFAULT_HUB_DATASET, HUB_PREFIX + DEFAULT_HUB_DATASET})
STATUS_FILTERS = ["all", *STATUSES]
METHOD_FILTERS = ["all", *TRAINED_METHODS]
STATUS_ICONS = {
    RunStatus.QUEUED: "…", RunStatus.RUNNING: "▶", RunStatus.COMPLETED: "✓", RunStatus.FAILED: "✗",
    RunStatus.CANCELLED: "■", RunStatus.INTERRUPTED: "!",
}
ASK_SLOTS = METHODS  # one answer card per method; "base" is the base model itself
# The training stages of each method, in order (RunConfig.stages() for a config at hand).
METHOD_STAGES: dict[str, tuple[str, ...]] = {"base": (), "lora": ("lora",), "reft": ("reft",), "heft": ("lora", "reft")}

# --------------------------------------------------------------------------- escaping

# HTML's special characters and those Markdown would read as markup (emphasis, code, links,
# tables, headings, escapes), as numeric character references, in one pass: they show as
# themselves in Markdown and in HTML.
_MARKUP = str.maketrans({char: f"&#{ord(char)};" for char in "&<>\"'\\`*_[]|~#"})


def escape(text: Any) -> str:
    """``text`` shown exactly as written where Markdown or HTML is rendered: no tags, no markup.

    Every message, name, path or file text that reaches a gr.Markdown or gr.HTML goes through
    here: "write f<n>, l<m>" would otherwise lose "<n>, l<m>" as an unknown HTML tag.
    """
    if text is None:
        return ""
    return str(text).translate(_MARKUP)


def code_block(text: str) -> str:
    """``text`` as a fenced Markdown code block whose fence no run of backticks inside can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


# --------------------------------------------------------------------------- labels and formatting


def format_int(value: int) -> str:
    return f"{value:,}"


def format_p(p: float) -> str:
    """A p-value: two significant digits, scientific notation below 0.001."""
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def scoring_of(run: Any) -> str:
    """Which scoring a run's stored accuracy is: "logits" (also for "both") or "generation" (the paper's)."""
    return primary_scoring((getattr(run, "config", None) or {}).get("scoring", "logits"))


def format_run_accuracy(run: Any) -> str:
    """A run's accuracy with its interval and the scoring that produced it, e.g. "78.1% [74.0, 81.7] (logits)"."""
    text = format_accuracy(run.accuracy, run.accuracy_low, run.accuracy_high)
    return f"{text} ({scoring_of(run)})" if run.accuracy is not None else text


def format_accuracy(accuracy: float | None, low: float | None = None, high: float | None = None) -> str:
    if accuracy is None:
        return ""
    text = f"{accuracy * 100:.1f}%"
    if low is not None and high is not None:
        text += f" [{low * 100:.1f}, {high * 100:.1f}]"
    return text


def data_label(source: str) -> str:
    """A short human label for a stored data source."""
    if source == SYNTHETIC_DATA:
        return SYNTHETIC_DATA
    if source in HUB_BOOLQ_SOURCES:
        return "BoolQ (hub)"
    if source.startswith(HUB_PREFIX):
        return source
    return Path(source).name or source


def short_path(text: str) -> str:
    """"/tmp/a/b/tiny-llama" -> "…/tiny-llama"; hub ids and short names unchanged."""
    text = str(text)
    if text.startswith(("/", "~", "./", "../")) and text.rstrip("/").count("/") > 1:
        return "…/" + Path(text.rstrip("/")).name
    return text


def short_paths_in(text: str) -> str:
    """Every absolute path inside ``text`` shortened, e.g. in default run names."""
    return re.sub(r"(?<![\w.])/[^\s·,]+", lambda m: short_path(m.group(0)), str(text))


def model_label(model: str) -> str:
    return "SmolLM2-135M (embedded)" if model.strip().lower() == EMBEDDED_MODEL else short_path(model)


def method_title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def epochs_label(run: Any) -> str:
    """Epochs per stage from a run's stored config, e.g. "1+2" for HEFT, "0" for a base run."""
    config = run.config or {}
    stages = METHOD_STAGES.get(run.method, ())
    parts = [str((config.get(f"{stage}_stage") or {}).get("epochs", "?")) for stage in stages]
    return "+".join(parts) if parts else "0"


def run_label(run: Any) -> str:
    """e.g. "#12 HEFT (1+2 ep)"."""
    return f"#{run.id} {method_title(run.method)} ({epochs_label(run)} ep)"


def run_choice_label(run: Any) -> str:
    """e.g. "#3 HEFT (1+1 ep) · 62.5% · SmolLM2-135M (embedded) · synthetic"."""
    acc = f" · {run.accuracy * 100:.1f}% ({scoring_of(run)})" if run.accuracy is not None else ""
    return f"{run_label(run)}{acc} · {model_label(run.base_model)} · {data_label(run.data_source)}"


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def run_duration(run: Any, now: datetime | None = None) -> float | None:
    started, finished = _as_utc(run.started_at), _as_utc(run.finished_at)
    if started is None:
        return None
    end = finished or (now or datetime.now(timezone.utc))
    return max(0.0, (end - started).total_seconds())


def _local_time(value: datetime | None) -> str:
    value = _as_utc(value)
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else ""


# --------------------------------------------------------------------------- runs table and live view

RUN_COLUMNS = ["id", "name", "status", "method", "model", "data", "epochs", "accuracy [95% CI]", "duration", "created"]


def runs_frame(runs: Iterable[Any], now: datetime | None = None,
               flags: Mapping[int, str] | None = None) -> pd.DataFrame:
    """The Runs table; ``flags``: run id -> the class ("yes"/"no") a run answered at least 95% of the time."""
    rows = [
        [run.id, short_paths_in(run.name), run.status, method_title(run.method), model_label(run.base_model),
         data_label(run.data_source), epochs_label(run),
         format_run_accuracy(run) + one_class_mark((flags or {}).get(run.id)),
         format_duration(run_duration(run, now)),
         _local_time(run.created_at)]
        for run in runs
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def one_class_mark(flag: str | None) -> str:
    """The mark by a run's accuracy when it answered one class at least 95% of the time."""
    return f" ⚠ ≥95% “{flag}”" if flag else ""


def phase_text(method: str, name: str, done: int | None, total: int | None) -> str:
    """A phase as the live view names it, with its own progress.

    "training stage 2 of 2 (ReFT): step 3 of 8", "evaluating lora epoch 1: 32 of 64 questions",
    "converting the embedded model (once)…".
    """
    kind, _, rest = name.partition(" ")
    if kind == "training":
        stages = METHOD_STAGES.get(method, ())
        stage = rest.strip()
        number = f" {stages.index(stage) + 1} of {len(stages)}" if stage in stages else ""
        text = f"training stage{number} ({escape(method_title(stage))})"
        return f"{text}: step {done or 0} of {total}" if total else text
    if kind == "evaluating" and total:
        return f"{escape(name)}: {done or 0} of {total} questions"
    return f"{escape(name)}…"


def _progress_bits(run: Any, progress: Mapping[str, Any]) -> list[str]:
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    bits = []
    if progress.get("phase") and run.status == RunStatus.RUNNING:
        bits.append("**" + phase_text(run.method, str(progress["phase"]), progress.get("phase_done"),
                                      progress.get("phase_total")) + "**")
    if progress.get("stage"):
        bits.append(f"stage **{progress['stage']}**")
    if progress.get("epoch") is not None:
        bits.append(f"epoch {float(progress['epoch']):.2f}")
    if total:
        bits.append(f"step {step}/{total} ({100 * step / total:.0f}%)")
    if progress.get("loss") is not None:
        bits.append(f"loss {float(progress['loss']):.4f}")
    if progress.get("tokens_per_second"):
        bits.append(f"{float(progress['tokens_per_second']):.0f} tokens/s")
    if run.status == RunStatus.RUNNING and progress.get("eta_seconds") is not None:
        basis = escape(progress.get("eta_basis") or "training steps")
        bits.append(f"ETA {format_duration(progress['eta_seconds'])} ({basis})")
    if progress.get("device"):
        bits.append(f"device {progress['device']}")
    return bits


def placement_line(run: Any) -> str:
    """Where a run trains or trained: the host or Ray node and its devices ("" before it started)."""
    node, devices = getattr(run, "node", None), getattr(run, "devices", None)
    if not node and not devices:
        return ""
    executor = getattr(run, "executor", None)
    where = " · ".join(escape(part) for part in (node, devices) if part)
    return f"Where: {where}" + (" (Ray cluster)" if executor == "ray" else "")


def startup_markdown(notice: str | None) -> str:
    """The Runs tab's line on what this start-up did to the registry (``StartupReport.notice``), or ""."""
    return f"**At start-up:** {escape(notice)}" if notice else ""


def executor_markdown(line: str) -> str:
    """The Runs tab's line on where runs train (a Ray cluster: nodes, GPUs, CPUs, or why it is unusable)."""
    return f"**{escape(line)}**" if line else ""


def progress_markdown(run: Any | None, now: datetime | None = None) -> str:
    """Status, stage, epoch, step/total and ETA of a run, from its database row."""
    if run is None:
        return "*No run selected. Click a row in the table above, or enter a run id.*"
    icon = STATUS_ICONS.get(run.status, "")
    head = f"### Run #{run.id} — {escape(short_paths_in(run.name))}\n**Status: {icon} {run.status}**"
    if run.cancel_requested and run.status == RunStatus.RUNNING:
        head += " (cancel requested; stops at the next step)"
    progress = run.progress or {}
    lines = [head]
    if run.status == RunStatus.QUEUED:
        lines.append("Waiting for the worker to pick it up.")
    if progress:
        bits = _progress_bits(run, progress)
        if bits:
            lines.append(" · ".join(bits))
        if progress.get("data_label"):
            lines.append(f"Data: {escape(progress['data_label'])} — {progress.get('train_examples', '?')} "
                         f"train / {progress.get('eval_examples', '?')} eval questions")
    where = placement_line(run)
    if where:
        lines.append(where)
    duration = run_duration(run, now)
    if duration is not None:
        lines.append(f"Elapsed: {format_duration(duration)}")
    lines += resume_lines(getattr(run, "resumes", None) or [])
    if run.accuracy is not None:
        lines.append(f"**Accuracy: {format_run_accuracy(run)}** on {run.eval_n} questions")
    by_stage = run.trainable_params_by_stage
    if by_stage:
        counts = ", ".join(f"{stage} {format_int(int(n))}" for stage, n in by_stage.items())
        lines.append(f"Trainable parameters: {counts}")
    if run.error and run.status != RunStatus.COMPLETED:
        lines.append(code_block(run.error.strip()[-2000:]))
    return "\n\n".join(lines)


def _when(iso: Any) -> str:
    try:
        return _local_time(datetime.fromisoformat(str(iso)))
    except ValueError:
        return escape(str(iso))


def resume_lines(resumes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per resume of a run (storage's ``Run.resumes``): from where, and how much work it kept."""
    lines = []
    for entry in resumes:
        who = "by the worker at start-up" if entry.get("by") == "worker" else "by hand"
        when = _when(entry.get("at"))
        if "from_step" not in entry:
            lines.append(f"↻ Resume requested {who} ({when}); waiting for the worker.")
        elif entry["from_step"]:
            stage, epoch = escape(str(entry.get("stage") or "")), float(entry.get("from_epoch") or 0)
            lines.append(f"↻ **Resumed from step {int(entry['from_step'])}** ({stage} epoch {epoch:g}) {who} ({when}): "
                         f"the checkpoint saved {format_duration(entry.get('saved_seconds') or 0)} of training.")
        else:
            lines.append(f"↻ Resumed {who} ({when}) with no usable checkpoint: it restarted from step 0.")
    return lines


def resume_message(run_id: int, point: Mapping[str, Any] | None) -> str:
    """What Resume did; ``point`` is the checkpoint it continues from (app.service.resume_point), if any."""
    if point is None:
        return f"Run #{run_id} queued again; it has no checkpoint yet, so it restarts from step 0."
    return (f"Run #{run_id} queued again to resume from step {point['step']} ({escape(str(point['stage']))} epoch "
            f"{float(point['epoch']):g}): the checkpoint keeps {format_duration(point['train_seconds'])} of training.")


def missing_run_message(value: Any) -> str:
    return f"⚠️ Run {escape(repr(value))} does not exist (it may have been deleted)."


def is_active(status: str | None) -> bool:
    return status in ACTIVE_STATUSES


LOSS_COLUMNS = ["step", "loss", "stage"]
EVAL_COLUMNS = ["cumulative_epoch", "accuracy", "stage", "low", "high", "scoring"]
# Every stage a chart can show. Each frame names all of them (see _with_stage_placeholders), so the
# colours and the legend are the same for every run and every update.
LOSS_STAGES = ("lora", "reft")
RESUME_SERIES = "resumed"  # a vertical rule on the loss chart at the step a run resumed from
RUN_LOSS_TITLE = "Training loss per step"  # the Runs tab's chart of one run
EVAL_STAGES = ("base", "lora", "reft")


def _thin(rows: list[dict[str, Any]], limit: int = 2000) -> list[dict[str, Any]]:
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


def _with_stage_placeholders(frame: pd.DataFrame, stages: Sequence[str], value_column: str) -> pd.DataFrame:
    """Put one empty (NaN) row per stage in front of the data, in the order of ``stages``.

    Gradio's plots fix their colour domain at the first render: a stage that first appears in a
    later update (a HEFT run's "reft" steps, or another run's) would be left undrawn. NaN rows are
    not drawn but keep every stage in the domain, and in the same legend order for every run.
    """
    if frame.empty:
        return frame
    filler = pd.DataFrame([{**frame.iloc[0].to_dict(), "stage": stage, value_column: float("nan")} for stage in stages],
                          columns=frame.columns)
    return pd.concat([filler, frame], ignore_index=True)


def _accuracy_row(evaluation: Mapping[str, Any], label: str) -> list[Any]:
    """[cumulative epoch, accuracy %, label, low %, high %, scoring] of one evaluation (shown in the tooltip:
    which scoring produced the point; evaluations stored before it was recorded were by logits)."""
    x = evaluation.get("cumulative_epoch")
    accuracy = evaluation["accuracy"]
    return [float(x if x is not None else evaluation["epoch"]), 100 * accuracy, label,
            100 * (evaluation.get("accuracy_low") or accuracy), 100 * (evaluation.get("accuracy_high") or accuracy),
            evaluation.get("scoring") or "logits"]


def loss_frame(metrics: Sequence[Mapping[str, Any]], resumed_at: Sequence[int] = ()) -> pd.DataFrame:
    """Loss per step by stage; with ``resumed_at`` (steps a run resumed from), a vertical "resumed" rule
    at the latest (one series: several rules would be joined by a line)."""
    rows = _thin([m for m in metrics if m.get("loss") is not None])
    frame = pd.DataFrame([[m["step"], float(m["loss"]), m["stage"]] for m in rows], columns=LOSS_COLUMNS)
    marks = [int(step) for step in resumed_at if step]
    if not marks or frame.empty:
        return _with_stage_placeholders(frame, LOSS_STAGES, "loss")
    step = marks[-1]
    rule = pd.DataFrame([[step, frame["loss"].min(), RESUME_SERIES], [step, frame["loss"].max(), RESUME_SERIES]],
                        columns=LOSS_COLUMNS)
    return _with_stage_placeholders(pd.concat([frame, rule], ignore_index=True), (*LOSS_STAGES, RESUME_SERIES), "loss")


def loss_title(resumed_at: Sequence[int] = ()) -> str:
    """The loss chart's title. It changes with a resume, which also makes Gradio redraw the chart with the
    "resumed" series in its colour domain (fixed at the first render otherwise; see _with_stage_placeholders)."""
    marks = [int(step) for step in resumed_at if step]
    return f"{RUN_LOSS_TITLE} (↻ resumed from step {marks[-1]})" if marks else RUN_LOSS_TITLE


def eval_frame(evals: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = [_accuracy_row(e, e["stage"]) for e in evals if e.get("accuracy") is not None]
    frame = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    return _with_stage_placeholders(frame, EVAL_STAGES, "accuracy")


def plot_frame(frame: pd.DataFrame) -> pd.DataFrame | None:
    """An empty frame draws bare axes with a stray legend; None shows the plot's empty state."""
    return None if frame.empty else frame


Limits = tuple[tuple[float, float], tuple[float, float]]


def eval_limits(frame: pd.DataFrame) -> Limits | None:
    """Axis limits of the accuracy chart with room around the points (Vega would put them on the edges)."""
    if frame.empty:
        return None
    low, high = float(frame["low"].min()), float(frame["high"].max())
    return (0.0, float(frame["cumulative_epoch"].max()) + 0.5), (max(0.0, low - 5), min(100.0, high + 5))


LOG_OUTSIDE_WORKER = ("(no {log} in this run's directory: it was trained outside the app's worker, "
                      "e.g. by a script through storage.queries.start_external_run)")
LOG_OF_IMPORTED = ("(no {log}: this run was imported ({origin}), and a study directory carries no training logs; "
                   "its step metrics and evaluations are in the charts above)")


# --------------------------------------------------------------------------- action messages


def warning(markdown: str) -> str:
    """A Markdown message shown as a warning."""
    return f"⚠️ {markdown}"


def error(text: str) -> str:
    """Plain text shown as a warning (escaped: it may quote user input or a file's text)."""
    return warning(escape(text))


def queued_message(run_ids: Sequence[int]) -> str:
    ids = ", ".join(f"#{run_id}" for run_id in run_ids)
    return f"✅ Queued {len(run_ids)} run{'s' if len(run_ids) > 1 else ''}: {ids}. Opening the Runs tab…"


def cancel_message(run_id: int, outcome: str) -> str:
    """What a cancel did: "cancelled" (was queued), "cancel_requested" (running), else the final status."""
    if outcome == RunStatus.CANCELLED:
        return f"Run #{run_id} cancelled."
    if outcome == "cancel_requested":
        return f"Cancel requested for run #{run_id}; it stops at the next step."
    return f"Run #{run_id} is already {outcome}."


def requeue_message(run_id: int, new_id: int) -> str:
    return f"Re-queued run #{run_id} as run #{new_id}."


def delete_message(run_id: Any, deleted: Any) -> str:
    """What Delete did: ``deleted`` is storage.queries.DeletedRun (what happened to the files), True, or falsy."""
    if not deleted:
        return f"Run {escape(run_id)} did not exist."
    files = getattr(deleted, "files", None)
    path = escape(getattr(deleted, "path", ""))
    if files == "deleted":
        return f"Deleted run #{int(run_id)} and its run directory {path}."
    if files == "kept":
        reason = escape(deleted.reason)
        return f"Deleted run #{int(run_id)} from the list; kept its files in {path} because {reason}."
    if files == "missing":
        return f"Deleted run #{int(run_id)}; its run directory {path} was already gone."
    if files == "none":
        return f"Deleted run #{int(run_id)} (it had no run directory)."
    return f"Deleted run #{int(run_id)} and its files."


def zip_message(run_id: int, size_bytes: int) -> str:
    return f"Zipped run #{run_id} ({size_bytes / 1e6:.1f} MB): download it below."


def upload_message(stored: Path) -> str:
    return f"Stored as {escape(stored)}; the run reads it from there (split 80/20 into train/validation)."


# --------------------------------------------------------------------------- compare

# One colour per compared run, shared by the loss chart and the accuracy chart (matplotlib's tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
COMPARE_COLUMNS = ["run", "method", "epochs", "accuracy [95% CI]", "n", "trainable params", "train seconds", "tokens/s",
                   "eval set"]
PAIR_COLUMNS = ["A", "B", "accuracy A", "accuracy B", "difference (points)", "A right only", "B right only",
                "McNemar p", "verdict"]


def significance(p_value: float) -> str:
    return "significant" if p_value < 0.05 else "not significant"


def verdict(label_a: str, label_b: str, comparison: Any) -> str:
    """One line per pair, e.g. "HEFT (3 ep) vs LoRA (20 ep): +0.4 points, 12 vs 9 discordant questions,
    McNemar p = 0.66 — not significant"."""
    diff = (comparison.accuracy_a - comparison.accuracy_b) * 100
    significant = "significant at 0.05" if comparison.p_value < 0.05 else "not significant"
    return (f"{label_a} vs {label_b}: {diff:+.1f} points, {comparison.a_only} vs {comparison.b_only} discordant "
            f"questions, McNemar p = {format_p(comparison.p_value)} — {significant}")


def _summary_row(run: Any, label: str) -> list[Any]:
    return [label, method_title(run.method), epochs_label(run),
            format_run_accuracy(run), run.eval_n,
            format_int(run.trainable_params) if run.trainable_params else "",
            round(run.train_seconds, 1) if run.train_seconds is not None else None,
            round(run.tokens_per_second, 1) if run.tokens_per_second is not None else None,
            (run.eval_signature or "")[:8]]


def _not_comparable(run_a: Any, run_b: Any, ca: Any, cb: Any) -> str | None:
    """Why two runs cannot be tested against each other, or None if they can."""
    if run_a.eval_signature != run_b.eval_signature or not run_a.eval_signature:
        return "not comparable: evaluated on different questions (different eval signature)"
    if isinstance(ca, str) or isinstance(cb, str) or ca is None or cb is None:
        why = ca if isinstance(ca, str) else cb if isinstance(cb, str) else "predictions missing"
        return f"not comparable: {why}"
    return None


def compare_runs(runs: Sequence[Any], metrics: Mapping[int, Sequence[Mapping[str, Any]]],
                 evals: Mapping[int, Sequence[Mapping[str, Any]]],
                 correctness: Mapping[int, Mapping[str, bool] | str]) -> dict[str, Any]:
    """Overlaid loss curves, accuracy per cumulative epoch, a summary table and pairwise McNemar tests.

    ``correctness[run_id]`` is uid -> correct from the run's predictions, or a string saying why
    they could not be read. Runs with different eval signatures are reported as not comparable.
    """
    from heft_core.stats import paired_comparison  # scipy and statsmodels: only when comparing

    labels = {run.id: run_label(run) for run in runs}
    colors = {labels[run.id]: PALETTE[i % len(PALETTE)] for i, run in enumerate(runs)}
    loss_rows, acc_rows, table = [], [], []
    for run in runs:
        label = labels[run.id]
        for m in _thin([m for m in metrics.get(run.id, []) if m.get("loss") is not None], 1000):
            loss_rows.append([m["step"], float(m["loss"]), label])
        acc_rows += [_accuracy_row(e, label) for e in evals.get(run.id, []) if e.get("accuracy") is not None]
        table.append(_summary_row(run, label))
    pairs, verdicts = [], []
    for i, run_a in enumerate(runs):
        for run_b in runs[i + 1:]:
            a, b = labels[run_a.id], labels[run_b.id]
            ca, cb = correctness.get(run_a.id), correctness.get(run_b.id)
            reason = _not_comparable(run_a, run_b, ca, cb)
            if reason is None:
                try:
                    result = paired_comparison(ca, cb)
                except ValueError as exc:  # e.g. predictions on different question ids
                    reason = f"not comparable: {exc}"
                else:
                    verdicts.append(verdict(a, b, result))
                    pairs.append([a, b, f"{result.accuracy_a * 100:.1f}%", f"{result.accuracy_b * 100:.1f}%",
                                  round((result.accuracy_a - result.accuracy_b) * 100, 2), result.a_only, result.b_only,
                                  format_p(result.p_value), significance(result.p_value)])
                    continue
            verdicts.append(f"{a} vs {b}: {reason}")
            pairs.append([a, b, "", "", None, None, None, "", reason])
    return {
        "loss": pd.DataFrame(loss_rows, columns=["step", "loss", "run"]),
        "accuracy": pd.DataFrame(acc_rows, columns=["cumulative_epoch", "accuracy", "run", "low", "high", "scoring"]),
        "table": pd.DataFrame(table, columns=COMPARE_COLUMNS),
        "pairs": pd.DataFrame(pairs, columns=PAIR_COLUMNS),
        "verdicts": verdicts,
        "colors": colors,
    }


def verdicts_markdown(verdicts: Sequence[str]) -> str:
    return "\n".join(f"- {escape(line)}" for line in verdicts)


ACCURACY_TITLE = "Accuracy vs cumulative epochs (95% Wilson intervals)"
LOSS_TITLE = "Training loss per optimizer step"
# Line styles and markers per compared run, in turn with the colours: a run drawn under another
# with the same values (a LoRA run under the identical stage 1 of a HEFT run) still shows.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _padded(low: float, high: float, share: float = 0.08, least: float = 1e-3) -> tuple[float, float]:
    """Axis limits with room on both sides, so no point, whisker or cap sits on the frame."""
    pad = max((high - low) * share, least)
    return low - pad, high + pad


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    ax.set_title(title, fontsize=10)  # inside the figure: the component shows no label over the plot
    ax.grid(alpha=0.3)
    return fig, ax


def _finish(fig: Any, ax: Any, labelled: bool) -> Any:
    import matplotlib.pyplot as plt

    if labelled:  # below the axes, where it cannot cover data; one entry per line, so none is cut off
        entries = len(ax.get_legend_handles_labels()[1])
        fig.set_size_inches(7, 3.6 + 0.2 * entries)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def accuracy_figure(frame: pd.DataFrame, colors: Mapping[str, str] | None = None,
                    majority: Mapping[str, Any] | None = None) -> Any:
    """Accuracy vs cumulative epochs per run with 95% interval error bars (matplotlib); ``majority``
    ({"answer", "accuracy"}, app.studies.majority_of_runs) is drawn as a horizontal line.

    The y-axis spans every interval's ends with padding (the whole interval stays visible, up to
    and beyond 100%), and the legend sits below the axes.
    """
    fig, ax = _figure(ACCURACY_TITLE)
    if frame.empty:
        ax.text(0.5, 0.5, "No evaluations yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    runs = list(dict.fromkeys(frame["run"])) if not frame.empty else []
    for index, label in enumerate(runs):
        group = frame[frame["run"] == label].sort_values("cumulative_epoch")
        offset = (index - (len(runs) - 1) / 2) * 0.03  # keep overlapping bars apart
        ax.errorbar(group["cumulative_epoch"] + offset, group["accuracy"],
                    yerr=[group["accuracy"] - group["low"], group["high"] - group["accuracy"]],
                    marker=MARKERS[index % len(MARKERS)], linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                    capsize=4, label=label, color=(colors or {}).get(label))
    if majority:
        ax.axhline(majority["accuracy"] * 100, color="grey", linestyle=":",
                   label=f'majority answer "{majority["answer"]}" {majority["accuracy"] * 100:.1f}%')
    if not frame.empty:
        low, high = float(frame["low"].min()), float(frame["high"].max())
        if majority:
            low, high = min(low, majority["accuracy"] * 100), max(high, majority["accuracy"] * 100)
        ax.set_ylim(*_padded(low, high, least=2.0))
        ax.set_xlim(*_padded(float(frame["cumulative_epoch"].min()), float(frame["cumulative_epoch"].max()),
                             share=0.05, least=0.3))
    ax.set_xlabel("cumulative epochs")
    ax.set_ylabel("accuracy (%) with 95% CI")
    return _finish(fig, ax, labelled=not frame.empty)


def coinciding_steps(frame: pd.DataFrame, tolerance: float = 1e-6) -> dict[str, list[tuple[str, int, int]]]:
    """{run: [(other run, first step, last step)]} for runs whose losses equal another's at the
    steps both have (two or more): such curves lie exactly on top of each other."""
    series = {label: dict(zip(group["step"], group["loss"])) for label, group in frame.groupby("run", sort=False)}
    found: dict[str, list[tuple[str, int, int]]] = {}
    for label, losses in series.items():
        for other, other_losses in series.items():
            common = sorted(set(losses) & set(other_losses))
            if other == label or len(common) < 2:
                continue
            if all(abs(losses[step] - other_losses[step]) <= tolerance for step in common):
                found.setdefault(label, []).append((other, int(common[0]), int(common[-1])))
    return found


def loss_figure(frame: pd.DataFrame, colors: Mapping[str, str] | None = None) -> Any:
    """Overlaid training-loss curves, one line style and marker per run; a run whose curve lies on
    another's says so in its legend entry ("same as #3 HEFT (1+1 ep) at steps 1–8")."""
    fig, ax = _figure(LOSS_TITLE)
    if frame.empty:
        ax.text(0.5, 0.5, "No training steps", ha="center", va="center", transform=ax.transAxes, color="grey")
        return _finish(fig, ax, labelled=False)
    same = coinciding_steps(frame)
    runs = list(dict.fromkeys(frame["run"]))
    for index, label in enumerate(runs):
        group = frame[frame["run"] == label].sort_values("step")
        notes = [f"same as {other} at steps {first}–{last}" for other, first, last in same.get(label, [])]
        shown = label + (f" ({'; '.join(notes)})" if notes else "")
        # Earlier runs are drawn wider, later ones narrower and dashed on top: both stay visible.
        ax.plot(group["step"], group["loss"], label=shown, color=(colors or {}).get(label),
                linestyle=LINE_STYLES[index % len(LINE_STYLES)], linewidth=max(1.0, 3.0 - index * 0.7),
                marker=MARKERS[index % len(MARKERS)], markevery=max(1, len(group) // 12), markersize=5)
    ax.set_ylim(*_padded(float(frame["loss"].min()), float(frame["loss"].max())))
    ax.set_xlim(*_padded(float(frame["step"].min()), float(frame["step"].max()), share=0.02, least=0.5))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    return _finish(fig, ax, labelled=True)


def paper_context() -> str:
    """What the paper's headline difference can and cannot show (stats.paper_claim_check)."""
    from heft_core.stats import paper_claim_check

    check = paper_claim_check(85.17, 85.05, 3270)
    return ("**Reading differences.** The paper reports HEFT (3 ep) 85.17% vs LoRA (20 ep) 85.05% on BoolQ's 3,270 dev "
            f"questions: {check['explanation']} Compare runs on the *same* questions with McNemar's test (below), not "
            "by accuracy alone.")


# --------------------------------------------------------------------------- ask


def gold_message(answer: bool, source: str) -> str:
    return f"Gold answer: **{'yes' if answer else 'no'}** (from {escape(source)})"


def answered_message(model_ref: str) -> str:
    return f"Answered with base model **{escape(model_label(model_ref))}**."


def slot_cards(answers: Sequence[Mapping[str, Any]], pending: Sequence[str] = ()) -> list[Mapping[str, Any]]:
    """One card per slot, in slot order; a slot still being answered (``pending``) or without a run says so."""
    shown = {a["slot"]: a for a in answers}
    cards = []
    for slot in ASK_SLOTS:
        if slot in shown:
            cards.append(shown[slot])
        elif slot in pending:
            cards.append({"slot": slot, "title": method_title(slot), "subtitle": "", "pending": True})
        else:
            cards.append({"slot": slot, "title": method_title(slot), "subtitle": "",
                          "error": f"no {method_title(slot)} run picked"})
    return cards


def answer_cards_html(results: Sequence[Mapping[str, Any]], gold: bool | None = None) -> str:
    """Side-by-side cards: one per variant with answer, P(yes), latency and ✓/✗ against the gold answer.

    A card still being answered shows "answering…"; the latency is from the question's start.
    """
    if not results:
        return "<div class='heft-cards-empty'>Answers appear here.</div>"
    cards = []
    for item in results:
        title = escape(item.get("title", ""))
        subtitle = escape(item.get("subtitle", ""))
        if item.get("pending"):
            body = "<div class='heft-card-wait'>answering…</div>"
            state = "pending"
        elif item.get("error"):
            body = f"<div class='heft-card-error'>{escape(item['error'])}</div>"
            state = "skipped"
        else:
            answer = item["answer"]
            mark = ""
            state = "neutral"
            if gold is not None:
                right = (answer == "yes") == bool(gold)
                mark = " <span class='heft-mark'>✓</span>" if right else " <span class='heft-mark'>✗</span>"
                state = "right" if right else "wrong"
            p_yes = float(item["p_yes"])
            body = (f"<div class='heft-answer'>{escape(answer)}{mark}</div>"
                    f"<div class='heft-bar'><div style='width:{p_yes * 100:.0f}%'></div></div>"
                    f"<div class='heft-meta'>P(yes) = {p_yes:.3f} · ready after "
                    f"{float(item['latency_seconds']) * 1000:.0f} ms</div>")
        cards.append(f"<div class='heft-card heft-{state}' data-variant='{escape(item.get('slot', ''))}'>"
                     f"<div class='heft-card-title'>{title}</div><div class='heft-card-sub'>{subtitle}</div>"
                     f"{body}</div>")
    gold_line = ""
    if gold is not None:
        gold_line = f"<div class='heft-gold'>Gold answer: <b>{'yes' if gold else 'no'}</b></div>"
    return f"<div class='heft-cards'>{''.join(cards)}</div>{gold_line}"
