"""The named API endpoints (gradio_client): start_run, cancel_run, resume_run, list_runs, run_detail, ask,
start_study, study_report, cancel_study, export_run.

Each endpoint's name, parameters and docstring are what clients see; the work is done by
``app.service``'s payload functions, which answer errors as ``{"error": "..."}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app import service, studies
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

    def resume_run(run_id: int) -> dict:
        """Queue an interrupted, cancelled or crashed (not misconfigured) run again as the same run, to continue
        from its latest checkpoint. Returns {"run_id", "status": "queued", "checkpoint": {step, stage, epoch,
        train_seconds, written_at} or None (no checkpoint yet: it restarts from step 0)} or {"error"}."""
        return service.resume_run_payload(engine, run_id)

    def list_runs(status: str = "") -> list[dict] | dict:
        """Runs newest first, optionally only those with a status (queued, running, completed, failed, cancelled,
        interrupted). Returns a list of runs, or {"error": "..."} for an unknown status."""
        return service.list_runs_payload(engine, status)

    def run_detail(run_id: int, after_step: int = 0) -> dict:
        """One run: fields, progress, config, step metrics and per-epoch evaluations; or {"error"}.
        after_step (optional): only the metrics of steps after this one, for polling (0: all)."""
        return service.run_detail_payload(engine, run_id, after_step)

    def ask(passage: str, question: str, run_ids_json: str) -> dict:
        """Answer with the base model and runs: run_ids_json is [3, 4, 5] or {"lora": 3, "reft": 4, "heft": 5}.
        Returns {"model", "answers": [{slot, title, run_id, answer, p_yes, latency_seconds}]} or {"error"}."""
        return service.ask_payload(asker, passage, question, run_ids_json)

    def start_study(spec_text: str) -> dict:
        """Queue a study: spec_text is a study spec as YAML or JSON (name, arms, seeds, grid, base, ...).
        Returns {"study_id", "run_ids"} or {"error": "..."} naming the bad field; nothing is queued on error."""
        return studies.start_study_payload(engine, spec_text)

    def study_report(study_id: int) -> dict:
        """A study's report from its runs so far (arms, runs, contrasts, majority baseline, missing runs, notes;
        also written to the data home's studies/<id>/report). Returns the report or {"error"}."""
        return studies.study_report_payload(engine, study_id)

    def cancel_study(study_id: int) -> dict:
        """Cancel a study's queued and running runs. Returns {"study_id", "runs": {run id: outcome}} or {"error"}."""
        return studies.cancel_study_payload(engine, study_id)

    def export_run(run_id: int, format: str = "") -> dict:
        """Export a completed run as a zip (gradio_client downloads it and returns its local path). format: adapter
        or merged (LoRA, HEFT runs), reft (ReFT runs); "" picks the method's default. Returns the file or {"error"}."""
        result = service.export_run_payload(engine, run_id, format)
        if "error" in result:
            return result
        return gr.FileData(path=result["path"], orig_name=Path(result["path"]).name).model_dump()

    for endpoint in (start_run, cancel_run, resume_run, list_runs, run_detail, ask, start_study, study_report,
                     cancel_study, export_run):
        gr.api(endpoint, api_name=endpoint.__name__)
