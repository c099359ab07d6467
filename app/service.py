"""What the UI and the API do, as plain functions over the database (testable without a browser).

Queue, cancel, re-queue and delete runs; read runs for the table, the live view, Compare and
Ask; build the API's payloads; store uploads and zip run directories. Bad configs are
rejected here, when queued, by heft_core's validation: no run is queued that would fail on
its options after a model has loaded.

storage answers a bad or unknown run id with ``RunNotFound`` (a HeftError) and refuses impossible
state changes (re-queue a running run, delete a running one) with ``RunStateError``; the UI's and
the API's edges show either message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from app import present
from app.ask import normalise_model, parse_run_ids
from app.forms import UPLOAD_EXTENSIONS, default_local_dir, error_text
from app.logs import LOG_FILE, log_tail
from app.permissions import ANONYMOUS, Action, Actor, PermissionRefused, Policy, base_params
from heft_common.errors import ConfigError, DataError, ExportError, HeftError, RunNotFound
from heft_common.home import data_home
from heft_common.vocabulary import (
    ACTIVE_STATUSES,
    HUB_DATA,
    METHOD_DESCRIPTIONS,
    METHOD_TITLES,
    REQUEUEABLE_STATUSES,
    STATUSES,
    SYNTHETIC_DATA,
    TRAINED_METHODS,
    RunStatus,
)
from heft_core.config import RunConfig
from heft_core.trackers import read_trackers_file
from storage import queries
from storage.imports import IMPORT_EXECUTOR
from storage.models import Run

logger = logging.getLogger(__name__)

LOG_LINES = 14  # lines of train.log in the live view
LIST_LIMIT = 500

# ---------------------------------------------------------------------- the database and permissions


def open_engine(path: str | os.PathLike | None = None) -> Any:
    """The registry's engine (checked, migrated: storage.db.open_db); the UI gets it from here."""
    from storage.db import open_db

    return open_db(path)


def policy() -> Policy:
    """The rules in force now (app.permissions, from the environment)."""
    return Policy.from_env()


def authorize(actor: Actor | None, action: Action) -> None:
    """Raise PermissionRefused unless ``actor`` may take ``action`` here (public mode: owners only)."""
    policy().check(actor, action)


def check_public_limits(engine: Any, rules: Policy, configs: Sequence[RunConfig]) -> None:
    """Public mode's limits: the queue cap, and base models that would not fit this machine's memory."""
    if not rules.public:
        return
    active = sum(len(queries.list_runs(engine, status=status, limit=None)) for status in ACTIVE_STATUSES)
    message = rules.queue_refusal(active, len(configs))
    if message:
        raise PermissionRefused(message)
    from heft_core.estimates import model_shape
    from heft_core.hardware import training_memory

    device, memory, bytes_per_param = training_memory()
    for model in sorted({config.model for config in configs}):
        message = rules.hardware_refusal(model, base_params(model_shape(model)), bytes_per_param, memory, device)
        if message:
            raise PermissionRefused(message)


# ---------------------------------------------------------------------- queue, cancel, re-queue, delete


def check_config(config: RunConfig) -> None:
    """Model-shape, tokenizer and data-source checks (static checks ran when ``config`` was built)."""
    from heft_core.data import validate_source
    from heft_core.models import load_tokenizer, model_info, needs_conversion  # loads torch: only when queued

    info = model_info(config.model)
    config.validate_for_model(info.num_layers, set(info.linear_modules))
    # One-token answers and a template that leaves room in max_length. The embedded model's tokenizer is
    # only cheap once its cache exists (converting it takes ~30 s); before that the training process checks.
    if not needs_conversion(config.model):
        config.validate_for_tokenizer(load_tokenizer(config.model))
    validate_source(config.data)


# A base run's name says that it is zero-shot; the other methods go by their short titles.
_NAME_TITLES = {**METHOD_TITLES, "base": METHOD_DESCRIPTIONS["base"]}


def default_name(config: RunConfig) -> str:
    """e.g. "HEFT 1+2 ep · embedded · boolq" (paths shortened to their last part)."""
    if config.name:
        return config.name
    epochs = "+".join(str(stage.epochs) for _, stage in config.stages()) or "0"
    return f"{_NAME_TITLES[config.method]} {epochs} ep · {_short(config.model)} · {_short(config.data)}"


def _short(ref: str) -> str:
    return os.path.basename(os.path.normpath(ref)) if os.sep in ref else ref


def submit_runs(engine: Any, configs: Sequence[RunConfig], batch: bool | None = None,
                actor: Actor | None = ANONYMOUS) -> list[Run]:
    """Validate every config first, then queue them all (one comparison batch if several).

    In public mode only an owner may queue, within the queue cap and the machine's memory (app.permissions)."""
    rules = policy()
    rules.check(actor, Action.TRAIN)
    check_public_limits(engine, rules, configs)  # first: a 7B model is refused before its config is downloaded
    for config in configs:
        check_config(config)
    batch_id = uuid.uuid4().hex[:12] if (batch if batch is not None else len(configs) > 1) else None
    return [
        queries.create_run(
            engine, name=default_name(config), method=config.method, config=config.to_dict(), base_model=config.model,
            data_source=config.data, batch_id=batch_id, total_epochs=config.total_epochs,
        )
        for config in configs
    ]


def cancel_run(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> str:
    """"cancelled" (it was queued), "cancel_requested" (it is running) or its final status."""
    authorize(actor, Action.CANCEL)
    return queries.request_cancel(engine, queries.validate_run_id(run_id))


def requeue_run(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> Run:
    rules = policy()
    rules.check(actor, Action.TRAIN)
    check_public_limits(engine, rules, [])
    return queries.requeue(engine, queries.validate_run_id(run_id))


def resume_run(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> tuple[Run, dict[str, Any] | None]:
    """Queue an interrupted, cancelled or crashed run again as itself (same id, same history), and the
    checkpoint it will continue from (None: it has none yet and restarts from step 0)."""
    authorize(actor, Action.RESUME)
    run = queries.resume_run(engine, queries.validate_run_id(run_id))
    return run, resume_point(run)


def resume_point(run: Run) -> dict[str, Any] | None:
    """Where a resume of ``run`` continues: the newest checkpoint's step, stage, epoch and training seconds."""
    from heft_core.checkpoint import latest_checkpoint_summary  # light: no torch

    manifest = latest_checkpoint_summary(run.artifact_dir) if run.artifact_dir else None
    if manifest is None:
        return None
    return {key: manifest.get(key) for key in ("step", "stage", "epoch", "train_seconds", "written_at")}


def delete_run(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> queries.DeletedRun | None:
    """What deleting the run did to its files (see present.delete_message), or None if it did not exist."""
    authorize(actor, Action.DELETE)
    return queries.delete_run_report(engine, queries.validate_run_id(run_id), data_home())


# ---------------------------------------------------------------------- reading runs


def list_runs(engine: Any, **filters: Any) -> list[Run]:
    return queries.list_runs(engine, limit=LIST_LIMIT, **filters)


def find_run(engine: Any, value: Any) -> Run | None:
    """The run with this id, or None for a bad or unknown id (a page shows that, it does not fail)."""
    try:
        return queries.get_run(engine, value)
    except HeftError:  # RunNotFound: not a run id
        return None


def any_active(engine: Any) -> bool:
    return any(queries.list_runs(engine, status=status, limit=1) for status in ACTIVE_STATUSES)


def filter_args(status: str | None, method: str | None, text: str | None) -> dict[str, Any]:
    """Keyword arguments for storage.queries.list_runs from the filter widgets."""
    return {
        "status": None if not status or status == "all" else status,
        "method": None if not method or method == "all" else method,
        "text": (text or "").strip() or None,
    }


def runs_table(engine: Any, status: str | None, method: str | None, text: str | None,
               shown: str | None) -> tuple[pd.DataFrame | None, str, bool]:
    """The runs table for the filters: (the frame, or None when it is what ``shown`` already shows;
    its signature; whether any run is queued or running, so the table keeps polling fast)."""
    from app.studies import one_class_flags  # loads scipy and statsmodels: only when a table is built

    runs = list_runs(engine, **filter_args(status, method, text))
    frame = present.runs_frame(runs, flags=one_class_flags(runs))
    signature = frame.to_json()
    return (None if signature == shown else frame), signature, any_active(engine)


def run_to_open(engine: Any, asked: str | None) -> tuple[int | None, bool]:
    """The run a page opens on load: (run id, whether it was asked for in ?run=N).

    A valid ?run=N wins; else the running run, else the newest one.
    """
    if asked:
        try:
            return queries.validate_run_id(asked), True
        except HeftError:  # ?run=abc: open what a plain visit opens
            pass
    running = queries.list_runs(engine, status=RunStatus.RUNNING, limit=1)
    latest = running or queries.list_runs(engine, limit=1)
    return (latest[0].id if latest else None), False


@dataclass(frozen=True)
class Actions:
    """Which run actions a run's status allows."""

    cancel: bool = False
    requeue: bool = False
    resume: bool = False
    delete: bool = False
    download: bool = False


def run_actions(run: Run | None) -> Actions:
    if run is None:
        return Actions()
    active = run.status in ACTIVE_STATUSES
    has_dir = bool(run.artifact_dir) and Path(run.artifact_dir).is_dir()
    return Actions(cancel=active, requeue=run.status in REQUEUEABLE_STATUSES,
                   resume=queries.resume_blocker(run) is None, delete=run.status != RunStatus.RUNNING,
                   download=has_dir and not active)


def executor_status() -> str:
    """The Runs tab's line on the Ray cluster runs train on (from the worker's record in the data home)."""
    from app.ray_executor import executor_line  # no ray import: it reads the worker's executor.json

    return present.executor_markdown(executor_line())


def run_log(run: Run) -> str:
    """The tail of a run's train.log, or a note when it was trained where no log is written."""
    if not run.artifact_dir:
        return ""
    log_path = Path(run.artifact_dir) / LOG_FILE
    text = log_tail(log_path, LOG_LINES)
    finished = run.status not in ACTIVE_STATUSES
    if not text and finished and log_path.parent.is_dir() and not log_path.exists():
        if run.executor == IMPORT_EXECUTOR:
            return present.LOG_OF_IMPORTED.format(log=LOG_FILE, origin=run.node or "from a study directory")
        return present.LOG_OUTSIDE_WORKER.format(log=LOG_FILE)
    # A tracker that turned itself off says so once, early in the log: keep it in view above the tail.
    warnings = [entry["warning"] for entry in read_trackers_file(run.artifact_dir).values()
                if isinstance(entry, dict) and entry.get("warning") and entry["warning"] not in text]
    return "\n".join([*warnings, text]) if warnings else text


# ---------------------------------------------------------------------- the live view of one run

EMPTY_LIVE_STATE: dict[str, Any] = {"run": None, "last_metric": 0, "n_evals": 0, "status": None}


@dataclass
class LiveView:
    """One update of a run's live view. A ``send_*`` flag that is False means: leave that part as it is.

    Re-rendering a chart resets its zoom and a table its scroll, so a tick sends only what
    changed since ``state`` (the last metric id, the number of evaluations, the status).
    """

    progress: str
    state: dict[str, Any]
    keep_polling: bool
    loss: Any = None
    loss_title: str = present.RUN_LOSS_TITLE
    send_loss: bool = True
    accuracy: Any = None
    accuracy_limits: present.Limits | None = None
    send_accuracy: bool = True
    log: str = ""
    send_log: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    send_config: bool = True
    actions: Actions | None = field(default_factory=Actions)  # None: leave the buttons as they are
    export: ExportOptions | None = None  # the Export section; None: leave it as it is


def live_view(engine: Any, value: Any, state: Mapping[str, Any] | None, full: bool) -> LiveView:
    """The live view of run ``value``; ``full`` re-renders everything (a run was just selected)."""
    run = find_run(engine, value) if value else None
    state = dict(state or {})
    if run is None:
        message = present.progress_markdown(None) if not value else present.missing_run_message(value)
        return LiveView(message, dict(EMPTY_LIVE_STATE), keep_polling=False, export=export_options(None))
    metrics = queries.metrics_since(engine, run.id, 0)
    evals = queries.evaluations(engine, run.id)
    last_metric = metrics[-1]["id"] if metrics else 0
    same_run = state.get("run") == run.id
    changed = full or not same_run or last_metric != state.get("last_metric") or len(evals) != state.get("n_evals")
    status_changed = full or not same_run or run.status != state.get("status")
    active = run.status in ACTIVE_STATUSES
    resumed_at = [entry["from_step"] for entry in run.resumes if entry.get("from_step")]
    # Gradio applies new data and new axis limits together only when the limits stay the same:
    # after the limits change, the same accuracy chart is sent once more on the next tick.
    accuracy = present.eval_frame(evals)
    limits = present.eval_limits(accuracy)
    send_accuracy = changed or bool(state.get("resend_eval"))
    resend = send_accuracy and limits != state.get("eval_limits") and limits is not None
    new_state = {"run": run.id, "last_metric": last_metric, "n_evals": len(evals), "status": run.status,
                 "eval_limits": limits if send_accuracy else state.get("eval_limits"), "resend_eval": resend}
    return LiveView(
        present.progress_markdown(run), new_state, keep_polling=active or resend,
        loss=present.plot_frame(present.loss_frame(metrics, resumed_at)), loss_title=present.loss_title(resumed_at),
        send_loss=changed,
        accuracy=None if accuracy.empty else accuracy, accuracy_limits=limits, send_accuracy=send_accuracy,
        log=run_log(run), send_log=changed or status_changed or active,
        config=run.config, send_config=full or not same_run,
        actions=run_actions(run) if status_changed else None,
        export=export_options(run) if status_changed else None,
    )


# ---------------------------------------------------------------------- compare


def completed_choices(engine: Any) -> tuple[list[tuple[str, int]], list[Run]]:
    """(label, id) choices of the completed runs, newest first, and the runs."""
    runs = list_runs(engine, status=RunStatus.COMPLETED)
    return [(present.run_choice_label(r), r.id) for r in runs], runs


def latest_batch(runs: Sequence[Run]) -> list[int]:
    """A sensible default selection (runs newest first): the newest run's batch, else the newest
    runs evaluated on the same questions as the newest run, else the newest batch."""
    if not runs:
        return []
    newest = runs[0]
    if newest.batch_id:
        batch = [r.id for r in runs if r.batch_id == newest.batch_id]
        if len(batch) >= 2:
            return sorted(batch)
    same = [r.id for r in runs if newest.eval_signature and r.eval_signature == newest.eval_signature][:4]
    if len(same) >= 2:
        return sorted(same)
    for run in runs:
        if run.batch_id:
            batch = [r.id for r in runs if r.batch_id == run.batch_id]
            if len(batch) >= 2:
                return sorted(batch)
    return []


def compare_selection(current: Sequence[Any] | None, choices: Sequence[tuple[str, int]],
                      runs: Sequence[Run]) -> list[int]:
    """Keep what is still selectable of ``current``; else the latest batch."""
    ids = {value for _, value in choices}
    kept = [value for value in (current or []) if value in ids]
    return kept or latest_batch(runs)


def _correctness(run: Run) -> Mapping[str, bool] | str:
    """uid -> correct from a run's predictions, or why they cannot be read."""
    from heft_core.artifacts import load_run

    if not run.artifact_dir:
        return "no artifact directory"
    try:
        return load_run(run.artifact_dir).correctness()
    except (HeftError, OSError, ValueError) as exc:  # a missing, damaged or foreign run directory
        return f"run #{run.id}'s predictions cannot be read ({exc})"


def compare(engine: Any, selected: Sequence[Any] | None) -> dict[str, Any] | None:
    """present.compare_runs for the selected completed runs, or None when fewer than two are left."""
    ids = []
    for value in selected or []:
        try:
            ids.append(queries.validate_run_id(value))
        except HeftError:  # not a run id: nothing to compare
            continue
    runs = [r for r in (find_run(engine, i) for i in ids) if r is not None and r.status == RunStatus.COMPLETED]
    if len(runs) < 2:
        return None
    metrics = {r.id: queries.metrics_since(engine, r.id, 0) for r in runs}
    evals = {r.id: queries.evaluations(engine, r.id) for r in runs}
    result = present.compare_runs(runs, metrics, evals, {r.id: _correctness(r) for r in runs})
    _add_majority(result, runs)
    return result


def _add_majority(result: dict[str, Any], runs: Sequence[Run]) -> None:
    """The majority-class baseline as a row of the table (and ``result["majority"]`` for the chart's line);
    each run that answered one class >= 95% of the time marked by its accuracy."""
    from app.studies import majority_of_runs, one_class_flags

    table = result["table"]
    for index, flag in ((i, one_class_flags([run]).get(run.id)) for i, run in enumerate(runs)):
        if flag:
            table.iat[index, table.columns.get_loc("accuracy [95% CI]")] += present.one_class_mark(flag)
    majority = majority_of_runs(runs)
    result["majority"] = majority
    if majority is None:
        return
    where = "" if majority["same_questions"] else f" (run #{majority['run_id']}'s questions)"
    row = {column: None for column in table.columns}
    row.update({"run": f"majority answer “{majority['answer']}”{where}", "method": "always the majority class",
                "accuracy [95% CI]": present.format_accuracy(majority["accuracy"], majority["low"], majority["high"]),
                "n": majority["n"], "trainable params": "0"})
    result["table"] = pd.concat([table, pd.DataFrame([row], columns=table.columns)], ignore_index=True)


# ---------------------------------------------------------------------- ask


def ask_defaults(runs: Sequence[Run]) -> dict[str, int]:
    """Latest completed LoRA/ReFT/HEFT run, all on the base model of the newest of them."""
    trained = [r for r in runs if r.method in TRAINED_METHODS]
    if not trained:
        return {}
    model_ref = normalise_model(trained[0].base_model)
    defaults: dict[str, int] = {}
    for run in trained:
        if run.method not in defaults and normalise_model(run.base_model) == model_ref:
            defaults[run.method] = run.id
    return defaults


NO_RUN = ("(none)", 0)


def ask_picks(runs: Sequence[Run], current: Mapping[str, Any]) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Per trained method: its run choices and the one to select (the current pick if still there)."""
    defaults = ask_defaults(runs)
    picks = {}
    for slot in TRAINED_METHODS:
        mine = [r for r in runs if r.method == slot]
        choices = [NO_RUN] + [(present.run_choice_label(r), r.id) for r in mine]
        chosen = current.get(slot)
        keep = chosen if chosen and any(r.id == chosen for r in mine) else defaults.get(slot, 0)
        picks[slot] = (choices, keep)
    return picks


def example_sources(runs: Sequence[Run] = ()) -> list[str]:
    """Data sources to draw Ask examples from: the offline set, the local BoolQ copy, the hub, then the runs' own."""
    sources = [SYNTHETIC_DATA]
    local = default_local_dir()
    if local:
        sources.append(local)
    sources.append(HUB_DATA)
    return sources + sorted({r.data_source for r in runs} - set(sources))


def gold_for(gold: Mapping[str, Any] | None, passage: str, question: str) -> bool | None:
    """The drawn example's gold answer, if the passage and question are still the example's."""
    if gold and gold.get("passage") == passage and gold.get("question") == question:
        return bool(gold["answer"])
    return None


# ---------------------------------------------------------------------- files


def save_upload(temp_path: str, uploads_dir: Path) -> Path:
    """Copy an uploaded data file into the data home (the path a run will read); checks the extension."""
    source = Path(temp_path)
    if source.suffix.lower() not in UPLOAD_EXTENSIONS:
        raise DataError(f"{source.name}: upload a {', '.join(UPLOAD_EXTENSIONS)} file")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    uploads_dir.mkdir(parents=True, exist_ok=True)
    target = uploads_dir / f"{digest}-{source.name}"
    if not target.exists():
        shutil.copyfile(source, target)
    return target


def zip_run_dir(run_dir: str | os.PathLike, run_id: int, out_dir: str | os.PathLike) -> Path:
    """Zip a run's artifact directory into ``out_dir`` (a fresh temporary directory)."""
    base = Path(out_dir) / f"heft-run-{run_id:06d}"
    return Path(shutil.make_archive(str(base), "zip", root_dir=str(run_dir)))


# ---------------------------------------------------------------------- export (heft_core.export)


@dataclass(frozen=True)
class ExportOptions:
    """What the Runs view's Export section offers for one run."""

    formats: list[tuple[str, str]]  # (title, format name) dropdown choices, the method's default first
    note: str = ""  # why this run cannot be exported; "" when it can

    @property
    def allowed(self) -> bool:
        return bool(self.formats)


def _export_blocker(run: Run | None) -> str | None:
    """Why ``run`` cannot be exported, or None when it can."""
    from heft_core.export import formats_for_method

    if run is None:
        return "select a run to export it"
    if not formats_for_method(run.method):
        return f"a {METHOD_DESCRIPTIONS.get(run.method, run.method)} run has nothing trained to export"
    if run.status != RunStatus.COMPLETED:
        return f"run #{run.id} is {run.status}; only a completed run can be exported"
    if not run.artifact_dir or not Path(run.artifact_dir).is_dir():
        return f"run #{run.id} has no run directory to export"
    return None


def export_options(run: Run | None) -> ExportOptions:
    """The formats ``run`` exports as (heft_core.export.formats_for_method), or why it cannot be exported."""
    from heft_core.export import EXPORT_FORMATS, formats_for_method

    blocker = _export_blocker(run)
    if blocker is not None:
        return ExportOptions([], blocker)
    return ExportOptions([(EXPORT_FORMATS[name].title, name) for name in formats_for_method(run.method)])


def _exportable(engine: Any, run_id: Any, fmt: str | None) -> tuple[Run, str]:
    """The run and the checked format (None or "": the method's default), or ExportError / RunNotFound."""
    from heft_core.export import check_format

    valid = queries.validate_run_id(run_id)
    run = queries.get_run(engine, valid)
    if run is None:
        raise RunNotFound(f"run {valid} does not exist")
    blocker = _export_blocker(run)
    if blocker is not None:
        raise ExportError(blocker)
    return run, check_format(fmt or None, run.method)


def export_run_archive(engine: Any, run_id: Any, fmt: str | None, out_dir: str | os.PathLike | None = None) -> Path:
    """Export a completed run as ``fmt`` and zip it into ``out_dir`` (default: a fresh temporary directory,
    removed again if the export fails); returns the zip (heft_core.export.export_archive)."""
    from heft_core.export import export_archive

    run, fmt = _exportable(engine, run_id, fmt)
    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="heft-export-"))
    try:
        return export_archive(run.artifact_dir, target / f"heft-run-{run.id:06d}-{fmt}.zip", fmt)
    except BaseException:
        if out_dir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise


def push_run(engine: Any, run_id: Any, fmt: str | None, repo_id: str, private: bool = False,
             api: Any = None, actor: Actor | None = ANONYMOUS) -> str:
    """Export a completed run into a temporary folder and push it to the hub repo ``repo_id``; returns its URL.

    The token comes from HF_TOKEN or the logged-in Hugging Face CLI (heft_core.export.resolve_token); it is
    checked before the export starts and is never stored or logged. ``api``: a stand-in for HfApi in tests.
    """
    from heft_core.export import check_repo_id, export_run, push_to_hub, resolve_token

    authorize(actor, Action.PUSH)
    run, fmt = _exportable(engine, run_id, fmt)
    repo = check_repo_id(repo_id)
    token = resolve_token()
    with tempfile.TemporaryDirectory(prefix="heft-push-") as scratch:
        folder = export_run(run.artifact_dir, Path(scratch) / f"heft-run-{run.id:06d}-{fmt}", fmt)
        return push_to_hub(folder, repo, private=bool(private), token=token, api=api)


def export_run_payload(engine: Any, run_id: Any, fmt: str | None) -> dict[str, Any]:
    """The export_run API: {"path": the zip (in a fresh temporary directory)} or {"error": "..."}."""
    try:
        path = export_run_archive(engine, run_id, fmt)
    except HeftError as exc:  # unknown run, unfinished run, base run, bad format
        return {"error": str(exc)}
    except Exception as exc:  # a bug or a damaged run directory: logged; the client gets one line
        logger.exception("export_run failed")
        return {"error": error_text(exc)}
    return {"path": str(path)}


# ---------------------------------------------------------------------- API payloads


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


RUN_FIELDS = (
    "id", "name", "status", "method", "base_model", "data_source", "eval_signature", "batch_id", "created_at",
    "started_at", "finished_at", "cancel_requested", "error", "artifact_dir", "trainable_params", "accuracy",
    "accuracy_low", "accuracy_high", "eval_n", "train_seconds", "tokens_per_second", "total_epochs",
    "executor", "node", "devices",  # where it trained: "local" or "ray", the host or Ray node, the GPUs
)
METRIC_FIELDS = ("id", "stage", "epoch", "step", "loss", "learning_rate", "tokens_per_second", "elapsed_seconds")
EVAL_FIELDS = ("stage", "epoch", "cumulative_epoch", "accuracy", "accuracy_low", "accuracy_high", "n", "scoring",
               "generation_accuracy", "generation_low", "generation_high", "unparsed", "yes_share")


def run_summary(run: Any) -> dict[str, Any]:
    """JSON-ready fields of a run row (what the list_runs API returns)."""
    summary = {key: _iso(getattr(run, key, None)) for key in RUN_FIELDS}
    summary["trainable_params_by_stage"] = run.trainable_params_by_stage
    summary["progress"] = run.progress
    summary["resumes"] = run.resumes
    summary["scoring"] = present.scoring_of(run)  # what "accuracy" is: "logits" or "generation"
    return summary


def run_detail(run: Any, metrics: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Everything about one run as JSON-ready data (the run_detail API)."""
    detail = run_summary(run)
    detail["config"] = run.config
    detail["metrics"] = [{k: _iso(m.get(k)) for k in METRIC_FIELDS} for m in metrics]
    detail["evals"] = [{k: _iso(e.get(k)) for k in EVAL_FIELDS} for e in evals]
    return detail


def parse_config_payload(text: str) -> list[RunConfig]:
    """The start_run API's input: one RunConfig as JSON, or {"configs": [...]} for a batch."""
    try:
        payload = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ConfigError("config_json", f"not valid JSON ({where})") from None
    if not isinstance(payload, dict):
        raise ConfigError("config_json", "must be a JSON object: a RunConfig, or {\"configs\": [...]}")
    items = payload["configs"] if "configs" in payload else [payload]
    if not isinstance(items, list) or not items:
        raise ConfigError("configs", "must be a non-empty list of RunConfig objects")
    configs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"configs[{index}]", "must be a JSON object")
        configs.append(RunConfig.from_dict(item))
    return configs


def start_run_payload(engine: Any, config_json: str, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """{"run_ids": [...]} for the queued runs, or {"error": "..."}."""
    try:
        authorize(actor, Action.TRAIN)  # before parsing: a visitor's refusal does not depend on the config
        runs = submit_runs(engine, parse_config_payload(config_json), actor=actor)
    except HeftError as exc:
        return {"error": error_text(exc)}
    except Exception as exc:  # a bug: logged with its traceback; the client still gets one line
        logger.exception("start_run failed")
        return {"error": error_text(exc)}
    return {"run_ids": [run.id for run in runs]}


def cancel_run_payload(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    try:
        authorize(actor, Action.CANCEL)
        valid = queries.validate_run_id(run_id)
        return {"run_id": valid, "status": cancel_run(engine, valid, actor)}
    except HeftError as exc:  # RunNotFound
        return {"error": str(exc)}


def resume_run_payload(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """{"run_id", "status": "queued", "checkpoint": {step, stage, epoch, train_seconds, written_at} or None},
    or {"error"}."""
    try:
        run, point = resume_run(engine, run_id, actor)
    except HeftError as exc:  # RunNotFound, or RunStateError: storage refuses a run that cannot be resumed
        return {"error": str(exc)}
    return {"run_id": run.id, "status": run.status, "checkpoint": point}


def list_runs_payload(engine: Any, status: str = "") -> list[dict[str, Any]] | dict[str, str]:
    """The list_runs API: run summaries newest first, or {"error": "..."} like every other endpoint."""
    wanted = (status or "").strip().lower() or None
    if wanted and wanted not in STATUSES:
        return {"error": f"unknown status {status!r}; use one of {', '.join(STATUSES)} or ''"}
    return [run_summary(run) for run in list_runs(engine, status=wanted)]


def run_detail_payload(engine: Any, run_id: Any, after_step: Any = None) -> dict[str, Any]:
    """The run_detail API. ``after_step`` (optional): only metrics of later steps, so a poller does not
    receive the whole history each time (None or 0: all of them)."""
    try:
        valid = queries.validate_run_id(run_id)
    except HeftError as exc:  # RunNotFound
        return {"error": str(exc)}
    if after_step is not None:
        if isinstance(after_step, float) and after_step.is_integer():
            after_step = int(after_step)  # Gradio number inputs deliver floats
        if isinstance(after_step, bool) or not isinstance(after_step, int) or not 0 <= after_step < 2**63:
            return {"error": f"after_step must be a step number >= 0 (0: all steps), got {after_step!r}"}
    run = queries.get_run(engine, valid)
    if run is None:
        return {"error": f"run {valid} does not exist"}
    metrics = queries.metrics_since(engine, valid, 0, after_step=after_step or None)
    return run_detail(run, metrics, queries.evaluations(engine, valid))


def ask_payload(asker: Any, passage: str, question: str, run_ids_json: str) -> dict[str, Any]:
    try:
        return asker.answer(passage, question, parse_run_ids(run_ids_json))
    except HeftError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a model that fails to run: logged; the client gets one line
        logger.exception("ask API failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def delete_run_payload(engine: Any, run_id: Any, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """{"run_id", "deleted": whether it existed, "files": what happened to its run directory} or {"error"}."""
    try:
        valid = queries.validate_run_id(run_id)
        deleted = delete_run(engine, valid, actor)
    except HeftError as exc:  # PermissionRefused, RunNotFound, RunStateError (a running run)
        return {"error": error_text(exc)}
    return {"run_id": valid, "deleted": bool(deleted), "files": getattr(deleted, "files", None)}


def push_run_payload(engine: Any, run_id: Any, fmt: str | None, repo_id: str, private: bool = False,
                     actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """{"url"} of the pushed export, or {"error"}."""
    try:
        return {"url": push_run(engine, run_id, fmt, repo_id, private, actor=actor)}
    except HeftError as exc:
        return {"error": error_text(exc)}
    except Exception as exc:  # the hub refused or could not be reached: logged; the client gets one line
        logger.exception("push_run failed")
        return {"error": error_text(exc)}
