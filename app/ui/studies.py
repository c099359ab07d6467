"""The Studies tab: build a study (arms x seeds x grid) from a preset or by hand, launch it, watch
its arm x seed matrix fill in, read and download its report.

The work is done by ``app.studies``; this module lays out the components and wires them. The
matrix polls on a timer only while the study has queued or running runs; when it ends, the
report is built from the stored runs.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app import present, studies, study_import
from app.forms import error_message
from app.permissions import actor_from
from app.ui.manager import Manager
from heft_common.errors import HeftError

PRIVATE = {"api_visibility": "private"}
MATRIX_SECONDS = 2.0
VIEW_OUTPUTS = ("studies.status", "studies.matrix", "studies.timer")
REPORT_OUTPUTS = ("studies.report", "studies.charts", "studies.report_state")


def layout(ui: Manager) -> None:
    first = studies.default_preset_title()  # the CPU preset on a machine without a GPU
    first_text = studies.preset_text(first)
    studies.start_calibration(first_text)  # this machine's speed, measured once in the background (cached)
    with gr.Tab("Studies", id="studies") as tab:
        ui.add("studies.tab", tab)
        gr.Markdown("A **study** answers the research question across arms (method + epoch budget), seeds and an "
                    "optional grid, with a majority-answer baseline, per-seed McNemar tests and bootstrap intervals. "
                    "Its runs go through the same queue as single runs.", elem_classes="heft-note")
        with gr.Accordion("New study", open=True):
            with gr.Row():
                ui.add("studies.preset", gr.Dropdown(studies.PRESET_TITLES, value=first, label="study preset",
                                                     scale=2, elem_id="heft-study-preset"))
                ui.add("studies.name", gr.Textbox("", label="study name (blank: the spec's name)", scale=3,
                                                  elem_id="heft-study-name"))
            ui.add("studies.spec", gr.Code(first_text, language="yaml", label="study spec (YAML or JSON)", lines=14,
                                           elem_id="heft-study-spec"))
            ui.add("studies.plan", gr.Markdown(studies.plan_markdown(first_text), elem_id="heft-study-plan"))
            with gr.Row():
                ui.add("studies.launch", gr.Button("Launch study", variant="primary", scale=0, min_width=160,
                                                   elem_id="heft-study-launch"))
                ui.add("studies.launch_msg", gr.Markdown("", elem_id="heft-study-launch-msg"))
        with gr.Row():
            ui.add("studies.pick", gr.Dropdown([], value=None, label="study", scale=4, elem_id="heft-study-pick"))
            ui.add("studies.refresh", gr.Button("Refresh", scale=0, min_width=90))
            ui.add("studies.cancel", gr.Button("Cancel study", variant="stop", scale=0, min_width=130,
                                               elem_id="heft-study-cancel"))
            ui.add("studies.import", gr.UploadButton("Import study (zip)", file_types=[".zip"], scale=0, min_width=170,
                                                     elem_id="heft-study-import"))
        ui.add("studies.status", gr.Markdown("", elem_id="heft-study-status"))
        ui.add("studies.matrix", gr.Dataframe(pd.DataFrame(columns=["arm"]), label="arm × seed (status or accuracy)",
                                              interactive=False, elem_id="heft-study-matrix"))
        with gr.Row():
            ui.add("studies.build", gr.Button("Build report now", scale=0, min_width=150))
            ui.add("studies.download", gr.Button("Download report (zip)", scale=0, min_width=180,
                                                 elem_id="heft-study-download"))
        ui.add("studies.zip_file", gr.File(label="Report zip", interactive=False, visible=False, height=80,
                                           elem_id="heft-study-zip"))
        ui.add("studies.report", gr.Markdown("", elem_id="heft-study-report"))
        # "contain": the whole chart (axes, legend) in each tile; the default "cover" crops them
        ui.add("studies.charts", gr.Gallery([], label="charts (majority answer dotted)", columns=2, height="auto",
                                            object_fit="contain", elem_id="heft-study-charts"))
        ui.add("studies.timer", gr.Timer(MATRIX_SECONDS, active=False))
        ui.add("studies.report_state", gr.State(None))  # id of the study whose report is shown


def _view_updates(view: dict[str, Any] | None) -> list[Any]:
    if view is None:
        return ["", pd.DataFrame(columns=["arm"]), gr.Timer(active=False)]
    return [view["status"], view["matrix"], gr.Timer(active=view["active"])]


def _report_updates(engine: Any, study_id: Any) -> list[Any]:
    try:
        report, directory = studies.build_report(engine, study_id)
    except (HeftError, ValueError) as exc:
        return [present.error(str(exc)), [], None]
    view = studies.study_view(engine, study_id)
    note = studies.pending_note(view["runs"]) if view else ""
    # the charts are in the gallery below; the report's relative image links would show as broken images
    body = "\n".join(line for line in report.to_markdown().splitlines() if not line.startswith("!["))
    markdown = (note + "\n\n" if note else "") + body
    return [markdown, studies.report_charts(directory), int(study_id)]


def wire(ui: Manager, engine: Any) -> None:
    def on_preset(title: str) -> tuple[str, str]:
        text = studies.preset_text(title)
        studies.start_calibration(text)
        return text, studies.plan_markdown(text, engine)

    def on_spec(text: str) -> str:
        studies.start_calibration(text)
        return studies.plan_markdown(text, engine)

    def choices(selected: Any = None) -> Any:
        options = studies.study_choices(engine)
        ids = [value for _, value in options]
        value = selected if selected in ids else (ids[0] if ids else None)
        return gr.Dropdown(choices=options, value=value)

    def on_launch(text: str, name: str, request: gr.Request, profile: gr.OAuthProfile | None) -> tuple[Any, Any]:
        try:
            study, run_ids = studies.start_study(engine, text, name, actor_from(profile, request))
        except HeftError as exc:
            return error_message(exc), gr.skip()
        except ValueError as exc:  # storage refused the study (e.g. an empty name)
            return present.error(str(exc)), gr.skip()
        return (f"Queued study #{study.id} ({len(run_ids)} runs: #{run_ids[0]}–#{run_ids[-1]}); the worker trains "
                "them in order, seed by seed."), choices(study.id)

    def on_pick(study_id: Any, shown: Any) -> list[Any]:
        view = studies.study_view(engine, study_id)
        updates = _view_updates(view)
        if view is None:
            return updates + ["", [], None]
        if not view["active"]:
            return updates + _report_updates(engine, study_id)
        return updates + ["*The report is built when the study's runs have finished (or press Build report now).*",
                          [], None]

    def on_tick(study_id: Any, shown: Any) -> list[Any]:
        view = studies.study_view(engine, study_id)
        updates = _view_updates(view)
        if view is not None and not view["active"] and shown != view["study"].id:
            return updates + _report_updates(engine, study_id)  # the study just ended
        return updates + [gr.skip()] * len(REPORT_OUTPUTS)

    def on_cancel(study_id: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> str:
        if not study_id:
            return present.error("pick a study first")
        try:
            outcome = studies.cancel_study(engine, study_id, actor_from(profile, request))
        except (HeftError, ValueError) as exc:
            return present.error(str(exc))
        changed = sum(1 for result in outcome.values() if result in ("cancelled", "cancel_requested"))
        return (f"Cancelled study #{int(study_id)}: {changed} queued or running runs cancelled or asked to stop; "
                "finished runs keep their results.")

    def on_import(file_value: Any, request: gr.Request, profile: gr.OAuthProfile | None) -> tuple[Any, Any]:
        path = file_value if isinstance(file_value, str) else getattr(file_value, "name", None)
        try:
            imported = study_import.import_study_zip(engine, path, actor_from(profile, request))
        except HeftError as exc:  # not allowed here, or incomplete, altered or incompatible: nothing was imported
            return error_message(exc), gr.skip()
        origin = present.escape(imported.origin)
        message = f"Imported study #{imported.study_id} ({len(imported.run_ids)} runs, {origin})."
        return message, choices(imported.study_id)

    def on_build(study_id: Any) -> list[Any]:
        if not study_id:
            return [present.error("pick a study first"), [], None]
        return _report_updates(engine, study_id)

    def on_download(study_id: Any) -> tuple[Any, Any]:
        if not study_id:
            return gr.File(value=None, visible=False), present.error("pick a study first")
        try:
            _, directory = studies.build_report(engine, study_id)
        except (HeftError, ValueError) as exc:
            return gr.File(value=None, visible=False), present.error(str(exc))
        return gr.File(value=str(studies.zip_report(directory, int(study_id))), visible=True), gr.skip()

    pick, shown = ui["studies.pick"], ui["studies.report_state"]
    views, reports = ui.get(*VIEW_OUTPUTS), ui.get(*REPORT_OUTPUTS)
    ui["studies.preset"].change(on_preset, ui["studies.preset"], ui.get("studies.spec", "studies.plan"), **PRIVATE)
    ui["studies.spec"].change(on_spec, ui["studies.spec"], ui["studies.plan"], show_progress="hidden", **PRIVATE)
    ui["studies.launch"].click(on_launch, ui.get("studies.spec", "studies.name"),
                               ui.get("studies.launch_msg", "studies.pick"), **PRIVATE)
    gr.on([ui["studies.tab"].select, ui["studies.refresh"].click], lambda current: choices(current), pick, pick,
          **PRIVATE)
    # a calibration finished since the page was built: the plan's estimate rests on it now
    ui["studies.tab"].select(on_spec, ui["studies.spec"], ui["studies.plan"], show_progress="hidden", **PRIVATE)
    pick.change(on_pick, [pick, shown], views + reports, show_progress="hidden", **PRIVATE)
    ui["studies.timer"].tick(on_tick, [pick, shown], views + reports, show_progress="hidden", **PRIVATE)
    ui["studies.cancel"].click(on_cancel, pick, ui["studies.launch_msg"], **PRIVATE).then(
        on_tick, [pick, shown], views + reports, **PRIVATE)
    ui["studies.build"].click(on_build, pick, reports, **PRIVATE)
    ui["studies.import"].upload(on_import, ui["studies.import"], ui.get("studies.launch_msg", "studies.pick"),
                                **PRIVATE)
    ui["studies.download"].click(on_download, pick, ui.get("studies.zip_file", "studies.launch_msg"), **PRIVATE)
