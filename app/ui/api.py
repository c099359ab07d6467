"""The named API endpoints (gradio_client): start_run, cancel_run, list_runs, run_detail, ask.

Each endpoint's name, parameters and docstring are what clients see; the work is done by
``app.service``'s payload functions, which answer errors as ``{"error": "..."}``.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from app import service
from app.ask import AskService


def register(engine: Any, asker: AskService) -> None:
    """Add the endpoints to the Blocks being built."""

    def start_run(config_json: str) -> dict:
        """Queue runs. config_json: a RunConfig as JSON, or {"configs": [...]} for a comparison batch.
        Returns {"run_ids": [...]} or {"error": "..."}."""
        return service.start_run_payload(engine, config_json)

    def cancel_run(run_id: int) -> dict:
        """Cancel a queued or running run. Returns {"run_id", "status"} or {"error"}."""
        return service.cancel_run_payload(engine, run_id)

    def list_runs(status: str = "") -> list[dict]:
        """Runs newest first, optionally only those with a status (queued, running, completed, failed, cancelled,
        interrupted)."""
        return service.list_runs_payload(engine, status)

    def run_detail(run_id: int) -> dict:
        """One run: fields, progress, config, step metrics and per-epoch evaluations; or {"error"}."""
        return service.run_detail_payload(engine, run_id)

    def ask(passage: str, question: str, run_ids_json: str) -> dict:
        """Answer with the base model and runs: run_ids_json is [3, 4, 5] or {"lora": 3, "reft": 4, "heft": 5}.
        Returns {"model", "answers": [{slot, title, run_id, answer, p_yes, latency_seconds}]} or {"error"}."""
        return service.ask_payload(asker, passage, question, run_ids_json)

    for endpoint in (start_run, cancel_run, list_runs, run_detail, ask):
        gr.api(endpoint, api_name=endpoint.__name__)
