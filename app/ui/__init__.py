"""HEFT Studio's Gradio app: four tabs and the named API, composed over one registry of components.

``build_demo(engine)`` returns the Blocks. Each tab module lays out its components (registered
by name in a :class:`~app.ui.manager.Manager`) and wires its events; handlers call the plain
modules ``app.forms``, ``app.present`` and ``app.service``. Everything a page shows comes from
the database or from run directories, so a reload or a second tab shows the same state.
Named API endpoints (gradio_client): start_run, cancel_run, list_runs, run_detail, ask, start_study,
study_report, cancel_study.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import gradio as gr

from app import service
from app.ask import AskService
from app.startup import import_engine_modules
from app.ui import api, ask, compare, runs, studies, train
from app.ui.manager import Manager
from app.ui.style import CSS, THEME
from heft_common.errors import HeftError
from heft_common.vocabulary import EMBEDDED_MODEL
from heft_core.estimates import model_shape

logger = logging.getLogger(__name__)

HEADER = (
    "# HEFT Studio\nTrain **LoRA**, **ReFT** (LoReFT) and **HEFT** (LoRA for E1 epochs, then ReFT on the frozen "
    "LoRA model for E2 epochs; arXiv 2509.09801) on BoolQ yes/no questions, compare runs with proper statistics, "
    "and ask all variants the same question. Training runs in a background worker: closing this page does not stop it."
)


# One shared Space must stay usable under load: Ask (a model forward per variant) runs at most this many at once,
# the page's API and Answer button sharing the slots, and at most QUEUE_MAX_SIZE events wait in the queue.
ASK_CONCURRENCY = int(os.environ.get("HEFT_ASK_CONCURRENCY", "2"))
QUEUE_MAX_SIZE = int(os.environ.get("HEFT_QUEUE_SIZE", "64"))
ASK_LIMITS = {"concurrency_limit": ASK_CONCURRENCY, "concurrency_id": "heft-ask"}


def queue_kwargs() -> dict[str, Any]:
    """Blocks.queue()'s settings: a bounded queue (a full one refuses new events instead of growing)."""
    return {"default_concurrency_limit": 4, "max_size": QUEUE_MAX_SIZE}


def _public_header(rules: Any) -> None:
    """Public mode's notice, Hugging Face sign-in (on a Space, where OAuth exists) and the Duplicate button."""
    with gr.Row(elem_id="heft-public"):
        gr.Markdown(rules.notice(), elem_id="heft-public-notice")
        if rules.on_space:  # gr.LoginButton needs the Space's OAuth app (hf_oauth: true); elsewhere it cannot work
            gr.LoginButton(scale=0, min_width=160)
        gr.DuplicateButton("Duplicate this Space", scale=0, min_width=180, elem_id="heft-duplicate")


def launch_kwargs() -> dict[str, Any]:
    """theme and css go to launch() in Gradio 6; the study reports' charts live under the data home, which is
    neither the working directory nor the temp directory that Gradio serves files from by default."""
    from heft_common.home import data_home

    return {"theme": THEME, "css": CSS, "allowed_paths": [str(data_home() / "studies")]}


def _warm(model_ref: str) -> None:
    try:
        model_shape(model_ref)  # cached; the form's first estimate and launching a run read it
    except HeftError as exc:  # only a cache warm-up
        logger.info("could not read %s's shape in advance: %s", model_ref, exc)


def build_demo(engine: Any = None, startup_notice: str | None = None) -> gr.Blocks:
    """The app over ``engine``; ``startup_notice`` (what start-up restored or re-indexed,
    :class:`storage.lifecycle.StartupReport`) is shown at the top of the Runs tab."""
    engine = engine if engine is not None else service.open_engine()
    rules = service.policy()
    asker = AskService(engine)
    # transformers' lazy imports are not thread-safe: import the engine here, before the warm-up thread and
    # before any request can import it at the same time ("cannot import name 'AutoConfig'").
    import_engine_modules()
    # Reading the embedded model's shape takes ~10 s the first time; do it before anyone asks.
    threading.Thread(target=_warm, args=(EMBEDDED_MODEL,), daemon=True, name="heft-warm").start()
    ui = Manager()
    with gr.Blocks(title="HEFT Studio", analytics_enabled=False) as demo:
        gr.Markdown(HEADER, elem_classes="heft-header")
        if rules.public:
            _public_header(rules)
        with gr.Tabs(selected="train") as tabs:
            ui.add("tabs", tabs)
            train.layout(ui)
            runs.layout(ui, startup_notice)
            compare.layout(ui)
            studies.layout(ui)
            ask.layout(ui)
        train.wire(ui, engine, demo)
        runs.wire(ui, engine, demo)
        compare.wire(ui, engine)
        studies.wire(ui, engine)
        ask.wire(ui, engine, asker, ASK_LIMITS)
        api.register(engine, asker, ASK_LIMITS)
    demo.heft_ask_service = asker  # so callers can release the model (demo.heft_ask_service.close())
    demo.heft_components = ui  # the registry, for tests and tools that drive the page by name
    return demo
