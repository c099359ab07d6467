"""The Runs tab: the table of all runs and one run's live view (progress, charts, log, actions).

Everything shown comes from the database through ``app.service``, so a reload or another tab
shows the same run. Timers poll only while something is active; ``service.live_view`` decides
what changed since the last tick, and only that is re-rendered.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app import present, service
from app.logs import LOG_FILE
from app.permissions import actor_from
from app.ui.manager import Manager
from heft_common.errors import HeftError

PRIVATE = {"api_visibility": "private"}
TABLE_SECONDS = 2.0
IDLE_TABLE_SECONDS = 10.0  # nothing queued or running here: still notice runs queued elsewhere (API, CLI, bench)
LIVE_SECONDS = 1.5
EXECUTOR_SECONDS = 15.0  # the worker refreshes the cluster's state as often (app.worker.HEALTH_SECONDS)
# Stage colours, the same in every run (present.loss_frame/eval_frame name every stage in the data
# from the start; see present._with_stage_placeholders).
STAGE_COLORS = {"base": "#7f7f7f", "lora": "#1f77b4", "reft": "#ff7f0e", present.RESUME_SERIES: "#d62728"}
ACTIONS = ("runs.cancel", "runs.resume", "runs.requeue", "runs.delete", "runs.zip")
LIVE_OUTPUTS = ("runs.progress", "runs.loss_plot", "runs.eval_plot", "runs.log", "runs.config", *ACTIONS,
                "runs.live_state", "runs.live_timer")
FILTERS = ("runs.status_filter", "runs.method_filter", "runs.text_filter", "runs.table_shown")
TABLE_OUTPUTS = ("runs.table", "runs.table_timer", "runs.table_shown")
# The Export section follows the selected run's status like the action buttons.
EXPORT_OUTPUTS = ("runs.export_format", "runs.export", "runs.push", "runs.export_note")
LIVE_OUTPUTS += EXPORT_OUTPUTS
EXPORT_HELP = ("Exports load with the libraries themselves: the LoRA adapter with peft, a merged model with "
               "transformers, interventions with pyreft; each has a model card. Push to Hub takes the token "
               "from `HF_TOKEN` or the logged-in Hugging Face CLI (`hf auth login`); it is never stored.")


def layout(ui: Manager, startup_notice: str | None = None) -> None:
    with gr.Tab("Runs", id="runs") as runs_tab:
        ui.add("runs.tab", runs_tab)
        # What this start-up did to the registry (runs restored from the archive, or re-indexed), said once here.
        ui.add("runs.startup_notice", gr.Markdown(present.startup_markdown(startup_notice), elem_id="heft-startup",
                                                  visible=bool(startup_notice)))
        # Where runs train: the Ray cluster's nodes, GPUs and CPUs, or why it cannot be used (blank: local worker).
        ui.add("runs.executor", gr.Markdown(service.executor_status(), elem_id="heft-executor"))
        ui.add("runs.executor_timer", gr.Timer(EXECUTOR_SECONDS, active=True))
        with gr.Row():
            ui.add("runs.status_filter", gr.Dropdown(present.STATUS_FILTERS, value="all", label="status", scale=1))
            ui.add("runs.method_filter", gr.Dropdown(present.METHOD_FILTERS, value="all", label="method", scale=1))
            ui.add("runs.text_filter", gr.Textbox("", label="search name / model / data", scale=2))
            ui.add("runs.refresh", gr.Button("Refresh", scale=0, min_width=90))
        ui.add("runs.table", gr.Dataframe(present.runs_frame([]), label="Runs (click a row to open it)",
                                          interactive=False, max_height=320, elem_id="heft-runs-table", wrap=True,
                                          column_widths=["5%", "24%", "8%", "6%", "13%", "8%", "5%", "13%", "8%",
                                                         "10%"]))
        with gr.Row(elem_classes="heft-actions"):
            ui.add("runs.run_id", gr.Number(None, label="Selected run id", precision=0, minimum=0, scale=1,
                                            min_width=140, elem_id="heft-run-id"))
            with gr.Column(scale=4):
                with gr.Row():
                    ui.add("runs.cancel", gr.Button("Cancel", variant="stop", interactive=False, size="md"))
                    ui.add("runs.resume", gr.Button("Resume", interactive=False, size="md", elem_id="heft-resume"))
                    ui.add("runs.requeue", gr.Button("Re-queue", interactive=False, size="md"))
                    ui.add("runs.delete", gr.Button("Delete", interactive=False, size="md"))
                    ui.add("runs.zip", gr.Button("Download artifacts (zip)", interactive=False, size="md"))
                ui.add("runs.action_msg", gr.Markdown(""))
        ui.add("runs.zip_file", gr.File(label="Artifacts zip", interactive=False, visible=False, height=80))
        ui.add("runs.progress", gr.Markdown(present.progress_markdown(None), elem_id="heft-progress"))
        with gr.Row():
            ui.add("runs.loss_plot", gr.LinePlot(None, x="step", y="loss", color="stage", color_map=STAGE_COLORS,
                                                 title=present.RUN_LOSS_TITLE, height=280, elem_id="heft-loss-plot",
                                                 x_title="optimizer step"))
            ui.add("runs.eval_plot", gr.ScatterPlot(None, x="cumulative_epoch", y="accuracy", color="stage",
                                                    color_map=STAGE_COLORS, title="Validation accuracy (%) per epoch",
                                                    height=280, elem_id="heft-eval-plot", x_title="cumulative epoch",
                                                    y_title="accuracy (%)", tooltip="all", x_axis_format="~g",
                                                    y_axis_format=".1f"))
        ui.add("runs.log", gr.Textbox("", label=f"Log ({LOG_FILE}, last {service.LOG_LINES} lines)",
                                      lines=service.LOG_LINES, max_lines=service.LOG_LINES, interactive=False,
                                      elem_classes="heft-log", autoscroll=True))
        with gr.Accordion("Run configuration (stored with the run)", open=False):
            ui.add("runs.config", gr.JSON({}, label="config"))
        with gr.Accordion("Export / Push to Hub", open=True, elem_id="heft-export"):
            gr.Markdown(EXPORT_HELP)
            ui.add("runs.export_note", gr.Markdown("", elem_id="heft-export-note"))
            with gr.Row():
                ui.add("runs.export_format", gr.Dropdown([], label="export format", interactive=False, scale=2,
                                                         elem_id="heft-export-format"))
                ui.add("runs.export", gr.Button("Export (zip)", interactive=False, scale=1, elem_id="heft-export-btn"))
            with gr.Row():
                ui.add("runs.push_repo", gr.Textbox("", label="Hub repo id", placeholder="your-name/heft-boolq",
                                                    scale=2))
                ui.add("runs.push_private", gr.Checkbox(False, label="private repo", scale=0, min_width=140))
                ui.add("runs.push", gr.Button("Push to Hub", interactive=False, scale=1, elem_id="heft-push-btn"))
            ui.add("runs.export_msg", gr.Markdown("", elem_id="heft-export-msg"))
            ui.add("runs.export_file", gr.File(label="Export zip", interactive=False, visible=False, height=80,
                                               elem_id="heft-export-file"))
        ui.add("runs.table_timer", gr.Timer(TABLE_SECONDS, active=True))
        ui.add("runs.table_shown", gr.State(None))
        ui.add("runs.live_timer", gr.Timer(LIVE_SECONDS, active=False))
        ui.add("runs.live_state", gr.State(dict(service.EMPTY_LIVE_STATE)))


def _render(view: service.LiveView) -> list[Any]:
    """A LiveView as the updates of LIVE_OUTPUTS, in that order."""
    skip = gr.skip()
    if view.actions is None:
        buttons = [skip] * len(ACTIONS)
    else:
        allowed = (view.actions.cancel, view.actions.resume, view.actions.requeue, view.actions.delete,
                   view.actions.download)
        buttons = [gr.Button(interactive=flag) for flag in allowed]
    accuracy: Any = skip
    if view.send_accuracy:
        limits = view.accuracy_limits
        accuracy = None if view.accuracy is None or limits is None else gr.ScatterPlot(
            value=view.accuracy, x_lim=list(limits[0]), y_lim=list(limits[1]))
    loss = gr.LinePlot(value=view.loss, title=view.loss_title) if view.send_loss else skip
    return [view.progress, loss, accuracy, view.log if view.send_log else skip,
            view.config if view.send_config else skip, *buttons, view.state, gr.Timer(active=view.keep_polling),
            *_export_updates(view.export)]


def _export_updates(options: service.ExportOptions | None) -> list[Any]:
    """The Export section for a run's ExportOptions (None: leave it as it is), in EXPORT_OUTPUTS order."""
    if options is None:
        return [gr.skip()] * len(EXPORT_OUTPUTS)
    default = options.formats[0][1] if options.formats else None
    note = "" if options.allowed else f"*Export: {present.escape(options.note)}.*"
    return [gr.Dropdown(choices=options.formats, value=default, interactive=options.allowed),
            gr.Button(interactive=options.allowed), gr.Button(interactive=options.allowed), note]


def wire(ui: Manager, engine: Any, demo: gr.Blocks) -> None:
    """The Runs tab's events, and re-attaching a page to a run when it opens."""

    def refresh_table(status: str, method: str, text: str, shown: str | None) -> tuple[Any, Any, Any]:
        frame, signature, active = service.runs_table(engine, status, method, text, shown)
        timer = gr.Timer(TABLE_SECONDS if active else IDLE_TABLE_SECONDS, active=True)
        # unchanged: leave the table (and the user's scroll position) alone
        return (gr.skip() if frame is None else frame), timer, signature

    def on_row(evt: gr.SelectData) -> tuple[Any, Any]:
        row = evt.row_value or []
        try:
            return int(row[0]), ""
        except (IndexError, TypeError, ValueError):
            return gr.skip(), gr.skip()

    def on_select_run(value: Any, state: dict | None) -> list[Any]:
        hidden = gr.File(value=None, visible=False)
        return _render(service.live_view(engine, value, state, full=True)) + [hidden, hidden, ""]

    def on_tick(value: Any, state: dict | None) -> list[Any]:
        return _render(service.live_view(engine, value, state, full=False))

    def on_cancel(value: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> str:
        try:
            outcome = service.cancel_run(engine, value, actor_from(profile, request))
        except HeftError as exc:  # RunNotFound
            return present.error(str(exc))
        return present.cancel_message(int(value), outcome)

    def on_resume(value: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> tuple[Any, Any]:
        try:
            run, point = service.resume_run(engine, value, actor_from(profile, request))
        except (HeftError, ValueError) as exc:  # unknown run; storage refuses a run that cannot be resumed
            return present.error(str(exc)), gr.skip()
        return present.resume_message(run.id, point), gr.Timer(TABLE_SECONDS, active=True)

    def on_requeue(value: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> tuple[Any, Any, Any]:
        try:
            new = service.requeue_run(engine, value, actor_from(profile, request))
        except (HeftError, ValueError) as exc:  # unknown run; storage refuses a run that cannot be re-queued
            return present.error(str(exc)), gr.skip(), gr.skip()
        return present.requeue_message(int(value), new.id), new.id, gr.Timer(TABLE_SECONDS, active=True)

    def on_delete(value: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> tuple[Any, Any]:
        try:
            deleted = service.delete_run(engine, value, actor_from(profile, request))
        except (HeftError, ValueError) as exc:  # unknown run; storage refuses to delete a running run
            return present.error(str(exc)), gr.skip()
        return present.delete_message(value, deleted), None

    def on_zip(value: Any) -> tuple[Any, str]:
        run = service.find_run(engine, value) if value else None
        if run is None or not run.artifact_dir or not Path(run.artifact_dir).is_dir():
            return gr.File(value=None, visible=False), present.error("this run has no artifact directory to download")
        path = service.zip_run_dir(run.artifact_dir, run.id, tempfile.mkdtemp(prefix="heft-zip-"))
        return gr.File(value=str(path), visible=True), present.zip_message(run.id, path.stat().st_size)

    def on_export(value: Any, fmt: str | None) -> tuple[Any, str]:
        try:
            path = service.export_run_archive(engine, value, fmt)
        except HeftError as exc:  # unknown or unfinished run, base run, bad format, damaged run directory
            return gr.File(value=None, visible=False), present.error(str(exc))
        size = path.stat().st_size / 1e6
        return gr.File(value=str(path), visible=True), f"Exported as `{path.name}` ({size:.1f} MB): download it below."

    def on_push(value: Any, fmt: str | None, repo_id: str, private: bool, request: gr.Request,
                profile: gr.OAuthProfile | None) -> str:
        try:
            url = service.push_run(engine, value, fmt, repo_id, private,
                                   actor=actor_from(profile, request))
        except HeftError as exc:  # also: no token, a repo id the hub rejects, the upload failing
            return present.error(str(exc))
        return f"Pushed run #{int(value)} to {present.escape(url)}"

    def on_load(request: gr.Request) -> tuple[Any, ...]:
        """Re-attach: the run named in ?run=N (and open the Runs tab), else the running or newest run."""
        asked = request.query_params.get("run") if request is not None and request.query_params else None
        wanted, from_query = service.run_to_open(engine, asked)
        frame, timer, shown = refresh_table("all", "all", "", None)
        return frame, timer, shown, wanted, (gr.Tabs(selected="runs") if from_query else gr.skip())

    filters, table_outputs = ui.get(*FILTERS), ui.get(*TABLE_OUTPUTS)
    run_id, live = ui["runs.run_id"], ui.get("runs.run_id", "runs.live_state")
    live_outputs = ui.get(*LIVE_OUTPUTS)
    ui["runs.table_timer"].tick(refresh_table, filters, table_outputs, show_progress="hidden", **PRIVATE)
    gr.on([ui["runs.executor_timer"].tick, ui["runs.tab"].select], service.executor_status, None, ui["runs.executor"],
          show_progress="hidden", **PRIVATE)
    gr.on([ui["runs.refresh"].click, ui["runs.status_filter"].change, ui["runs.method_filter"].change,
           ui["runs.text_filter"].submit, ui["runs.tab"].select],
          refresh_table, filters, table_outputs, show_progress="hidden", **PRIVATE)
    ui["runs.table"].select(on_row, None, [run_id, ui["runs.action_msg"]], **PRIVATE)
    run_id.change(on_select_run, live, live_outputs + ui.get("runs.zip_file", "runs.export_file", "runs.export_msg"),
                  show_progress="hidden", **PRIVATE)
    ui["runs.live_timer"].tick(on_tick, live, live_outputs, show_progress="hidden", **PRIVATE)
    ui["runs.cancel"].click(on_cancel, run_id, ui["runs.action_msg"], **PRIVATE).then(
        on_tick, live, live_outputs, **PRIVATE)
    ui["runs.resume"].click(on_resume, run_id, ui.get("runs.action_msg", "runs.table_timer"), **PRIVATE).then(
        on_tick, live, live_outputs, **PRIVATE)
    ui["runs.requeue"].click(on_requeue, run_id, ui.get("runs.action_msg", "runs.run_id", "runs.table_timer"),
                             **PRIVATE)
    ui["runs.delete"].click(on_delete, run_id, ui.get("runs.action_msg", "runs.run_id"), **PRIVATE).then(
        refresh_table, filters, table_outputs, **PRIVATE)
    ui["runs.zip"].click(on_zip, run_id, ui.get("runs.zip_file", "runs.action_msg"), **PRIVATE)
    ui["runs.export"].click(on_export, ui.get("runs.run_id", "runs.export_format"),
                            ui.get("runs.export_file", "runs.export_msg"), **PRIVATE)
    ui["runs.push"].click(on_push, ui.get("runs.run_id", "runs.export_format", "runs.push_repo", "runs.push_private"),
                          ui["runs.export_msg"], **PRIVATE)
    demo.load(on_load, None, [*table_outputs, run_id, ui["tabs"]], **PRIVATE)
