"""The Ask tab: one passage and question answered by the base model and a LoRA, ReFT and HEFT run.

``app.ask.AskService`` holds the model and answers; ``app.service`` picks the default runs;
``app.present`` draws the cards.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import gradio as gr

from app import present, service
from app.ask import AskService
from app.ui.manager import Manager
from heft_common.errors import HeftError
from heft_common.vocabulary import EMBEDDED_MODEL, SYNTHETIC_DATA, TRAINED_METHODS, RunStatus

logger = logging.getLogger(__name__)

PRIVATE = {"api_visibility": "private"}
PICKS = tuple(f"ask.pick.{slot}" for slot in TRAINED_METHODS)  # one run per trained method


def layout(ui: Manager) -> None:
    with gr.Tab("Ask", id="ask") as ask_tab:
        ui.add("ask.tab", ask_tab)
        with gr.Row():
            with gr.Column(scale=3):
                ui.add("ask.passage", gr.Textbox("", label="Passage", lines=6, max_lines=12, elem_id="heft-passage"))
                ui.add("ask.question", gr.Textbox("", label="Question (yes/no)", elem_id="heft-question"))
                with gr.Row():
                    ui.add("ask.example_source", gr.Dropdown(service.example_sources(), value=SYNTHETIC_DATA,
                                                             allow_custom_value=True, label="Example data", scale=2))
                    ui.add("ask.example", gr.Button("Random validation example", scale=1))
                ui.add("ask.gold_msg", gr.Markdown("", elem_id="heft-gold-msg"))
            with gr.Column(scale=2):
                for slot, name in zip(TRAINED_METHODS, PICKS):
                    ui.add(name, gr.Dropdown([service.NO_RUN], value=0, label=f"{present.method_title(slot)} run",
                                             elem_id=f"heft-pick-{slot}"))
                ui.add("ask.model", gr.Textbox(EMBEDDED_MODEL, label="Base model when no run is picked"))
                with gr.Row():
                    ui.add("ask.reload", gr.Button("Reload runs"))
                    ui.add("ask.release", gr.Button("Release model memory"))
                    ui.add("ask.answer", gr.Button("Answer", variant="primary", elem_id="heft-ask-btn"))
        ui.add("ask.msg", gr.Markdown(""))
        ui.add("ask.cards", gr.HTML(present.answer_cards_html([]), elem_id="heft-cards"))
        ui.add("ask.gold", gr.State(None))


def _picked(values: dict[str, Any]) -> dict[str, Any]:
    """{slot: run id} from the pick dropdowns' {name: value}."""
    return {slot: values.get(name) for slot, name in zip(TRAINED_METHODS, PICKS)}


def wire(ui: Manager, engine: Any, asker: AskService, limits: dict[str, Any] | None = None) -> None:
    """``limits``: the Answer event's concurrency settings (shared with the ask API endpoint)."""

    def on_tab(data: dict[Any, Any]) -> dict[Any, Any]:
        runs = service.list_runs(engine, status=RunStatus.COMPLETED)
        picks = service.ask_picks(runs, _picked(ui.values(data)))
        updates = {name: gr.Dropdown(choices=picks[slot][0], value=picks[slot][1])
                   for slot, name in zip(TRAINED_METHODS, PICKS)}
        return ui.updates({**updates, "ask.example_source": gr.Dropdown(choices=service.example_sources(runs))})

    def on_example(source: str) -> tuple[Any, ...]:
        try:
            example = asker.random_example(source)
        except HeftError as exc:  # a data source that cannot be read
            return gr.skip(), gr.skip(), present.error(str(exc)), None
        gold = {"passage": example.passage, "question": example.question, "answer": bool(example.answer)}
        return example.passage, example.question, present.gold_message(example.answer, source), gold

    def on_ask(data: dict[Any, Any]) -> Iterator[tuple[str, str]]:
        """Each card as soon as its variant is answered (variants sharing a prompt pass come together)."""
        values = ui.values(data)
        passage, question = values["ask.passage"], values["ask.question"]
        gold = service.gold_for(values["ask.gold"], passage, question)
        picked = _picked(values)
        waiting = ["base", *(slot for slot, run_id in picked.items() if run_id)]
        yield "Answering…", present.answer_cards_html(present.slot_cards([], pending=waiting), gold)
        result: dict[str, Any] | None = None
        try:
            for result in asker.answer_iter(passage, question, picked, values["ask.model"]):
                cards = present.slot_cards(result["answers"], pending=result["pending"])
                yield "Answering…", present.answer_cards_html(cards, gold)
        except HeftError as exc:  # AskError and what it wraps: the message says why
            yield present.error(str(exc)), present.answer_cards_html([])
            return
        except Exception as exc:  # a model that fails to run: say so, keep the page alive
            logger.exception("ask failed")
            yield present.error(f"could not answer: {type(exc).__name__}: {exc}"), present.answer_cards_html([])
            return
        if result is not None:
            yield (present.answered_message(result["model"]),
                   present.answer_cards_html(present.slot_cards(result["answers"]), gold))

    def on_edit(passage: str, question: str, gold: dict | None) -> tuple[Any, Any]:
        """A question typed over a drawn example is the user's own: its gold answer no longer applies."""
        if gold is None or service.gold_for(gold, passage, question) is not None:
            return gr.skip(), gr.skip()
        return "", None

    def on_release() -> str:
        asker.close()
        return "Released the loaded model; the next answer loads it again."

    picks, pick_outputs = ui.inputs(PICKS), ui.get(*PICKS, "ask.example_source")
    ui["ask.tab"].select(on_tab, picks, pick_outputs, **PRIVATE)
    ui["ask.reload"].click(on_tab, picks, pick_outputs, **PRIVATE)
    ui["ask.release"].click(on_release, None, ui["ask.msg"], **PRIVATE)
    ui["ask.example"].click(on_example, ui["ask.example_source"],
                            ui.get("ask.passage", "ask.question", "ask.gold_msg", "ask.gold"), **PRIVATE)
    ask_inputs = ui.inputs(("ask.passage", "ask.question", *PICKS, "ask.model", "ask.gold"))
    ui["ask.answer"].click(on_ask, ask_inputs, ui.get("ask.msg", "ask.cards"), **PRIVATE, **(limits or {}))
    edit_inputs = ui.get("ask.passage", "ask.question", "ask.gold")
    for box in ("ask.passage", "ask.question"):  # typed, pasted or set: a drawn example keeps its gold answer
        ui[box].change(on_edit, edit_inputs, ui.get("ask.gold_msg", "ask.gold"), show_progress="hidden", **PRIVATE)
