"""The Compare tab: finished runs side by side, with loss curves, accuracy per epoch and McNemar tests.

``app.service.compare`` loads the runs, their metrics and predictions; ``app.present`` builds
the tables and charts; this module only shows them.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app import present, service
from app.ui.manager import Manager

PRIVATE = {"api_visibility": "private"}
RESULTS = ("compare.verdict", "compare.table", "compare.pairs", "compare.loss", "compare.accuracy")


def layout(ui: Manager) -> None:
    with gr.Tab("Compare", id="compare") as compare_tab:
        ui.add("compare.tab", compare_tab)
        gr.Markdown(present.paper_context(), elem_classes="heft-note")
        with gr.Row():
            ui.add("compare.pick", gr.Dropdown([], value=[], multiselect=True, scale=4, elem_id="heft-compare-pick",
                                               label="Finished runs to compare (two or more)"))
            ui.add("compare.latest", gr.Button("Latest batch", scale=0, min_width=120))
            ui.add("compare.run", gr.Button("Compare", variant="primary", scale=0, min_width=120,
                                            elem_id="heft-compare-btn"))
        ui.add("compare.verdict", gr.Markdown("", elem_id="heft-verdict"))
        ui.add("compare.table", gr.Dataframe(pd.DataFrame(columns=present.COMPARE_COLUMNS), label="Runs",
                                             interactive=False))
        ui.add("compare.pairs", gr.Dataframe(pd.DataFrame(columns=present.PAIR_COLUMNS), interactive=False, wrap=True,
                                             label="Pairwise McNemar exact tests (same questions)"))
        # matplotlib figures with their titles inside (a component label would sit over the top of the
        # plot), one line style and marker per run, legends below the axes (present.loss_figure).
        with gr.Row():
            ui.add("compare.loss", gr.Plot(label=present.LOSS_TITLE, show_label=False, format="png",
                                           elem_id="heft-compare-loss"))
            ui.add("compare.accuracy", gr.Plot(label=present.ACCURACY_TITLE, show_label=False, format="png",
                                               elem_id="heft-compare-acc"))


def wire(ui: Manager, engine: Any) -> None:
    def on_tab(current: list) -> Any:
        choices, runs = service.completed_choices(engine)
        return gr.Dropdown(choices=choices, value=service.compare_selection(current, choices, runs))

    def on_latest_batch() -> Any:
        choices, runs = service.completed_choices(engine)
        return gr.Dropdown(choices=choices, value=service.latest_batch(runs))

    def on_compare(selected: list) -> tuple[Any, ...]:
        result = service.compare(engine, selected)
        if result is None:
            empty = present.compare_runs([], {}, {}, {})
            return "Pick two or more completed runs.", empty["table"], empty["pairs"], None, None
        return (present.verdicts_markdown(result["verdicts"]), result["table"], result["pairs"],
                present.loss_figure(result["loss"], result["colors"]),
                present.accuracy_figure(result["accuracy"], result["colors"], result.get("majority")))

    pick = ui["compare.pick"]
    ui["compare.tab"].select(on_tab, pick, pick, **PRIVATE)
    ui["compare.latest"].click(on_latest_batch, None, pick, **PRIVATE)
    ui["compare.run"].click(on_compare, pick, ui.get(*RESULTS), **PRIVATE)
