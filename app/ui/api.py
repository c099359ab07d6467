"""The named API endpoints (gradio_client): start_run, cancel_run, resume_run, delete_run, list_runs, run_detail,
ask, start_study, study_report, cancel_study, export_run, push_run, import_study.

Each endpoint's name, parameters and docstring are what clients see; the work is done by
``app.service``'s payload functions, which answer errors as ``{"error": "..."}``. Gradio injects the caller's
``gr.Request`` (its HEFT_AUTH user) and ``gr.OAuthProfile`` (a signed-in Hugging Face account) into the endpoints
that change things, so public mode's rules (app.permissions) apply to the API as to the page.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app import service, studies, study_import
from app.ask import AskService
from app.permissions import actor_from


def register(engine: Any, asker: AskService, ask_limits: dict[str, Any] | None = None) -> None:
    """Add the endpoints to the Blocks being built; ``ask_limits``: the Ask event's concurrency settings."""

    def start_run(config_json: str, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Queue runs. config_json: a RunConfig as JSON, or {"configs": [...]} for a comparison batch.
        Returns {"run_ids": [...]} or {"error": "..."}."""
        return service.start_run_payload(engine, config_json, actor_from(profile, request))

    def cancel_run(run_id: int, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Cancel a queued or running run. Returns {"run_id", "status"} or {"error"}."""
        return service.cancel_run_payload(engine, run_id, actor_from(profile, request))

    def delete_run(run_id: int, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Delete a run that is not running, and its run directory. Returns {"run_id", "deleted", "files"} or
        {"error"}."""
        return service.delete_run_payload(engine, run_id, actor_from(profile, request))

    def resume_run(run_id: int, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Queue an interrupted, cancelled or crashed (not misconfigured) run again as the same run, to continue
        from its latest checkpoint. Returns {"run_id", "status": "queued", "checkpoint": {step, stage, epoch,
        train_seconds, written_at} or None (no checkpoint yet: it restarts from step 0)} or {"error"}."""
        return service.resume_run_payload(engine, run_id, actor_from(profile, request))

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

    def start_study(spec_text: str, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Queue a study: spec_text is a study spec as YAML or JSON (name, arms, seeds, grid, base, ...).
        Returns {"study_id", "run_ids"} or {"error": "..."} naming the bad field; nothing is queued on error."""
        return studies.start_study_payload(engine, spec_text, actor_from(profile, request))

    def study_report(study_id: int) -> dict:
        """A study's report from its runs so far (arms, runs, contrasts, majority baseline, missing runs, notes;
        also written to the data home's studies/<id>/report). Returns the report or {"error"}."""
        return studies.study_report_payload(engine, study_id)

    def cancel_study(study_id: int, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Cancel a study's queued and running runs. Returns {"study_id", "runs": {run id: outcome}} or {"error"}."""
        return studies.cancel_study_payload(engine, study_id, actor_from(profile, request))

    def export_run(run_id: int, format: str = "") -> dict:
        """Export a completed run as a zip (gradio_client downloads it and returns its local path). format: adapter
        or merged (LoRA, HEFT runs), reft (ReFT runs); "" picks the method's default. Returns the file or {"error"}."""
        result = service.export_run_payload(engine, run_id, format)
        if "error" in result:
            return result
        return gr.FileData(path=result["path"], orig_name=Path(result["path"]).name).model_dump()

    def push_run(run_id: int, format: str, repo_id: str, private: bool, request: gr.Request,
                 profile: gr.OAuthProfile | None) -> dict:
        """Export a completed run as format ("" for the method's default) and push it to the hub repo repo_id with
        the server's HF_TOKEN. Returns {"url"} or {"error"}."""
        return service.push_run_payload(engine, run_id, format, repo_id, private, actor_from(profile, request))

    def import_study(study_zip: gr.FileData, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
        """Import a zip of a study directory written by `python -m heft_core study` (pass gradio_client's
        handle_file(path)). Returns {"study_id", "run_ids", "origin"} or {"error"}; nothing is imported on error."""
        return study_import.import_study_payload(engine, study_zip, actor_from(profile, request))

    for endpoint in (start_run, cancel_run, resume_run, delete_run, list_runs, run_detail, start_study, study_report,
                     cancel_study, export_run, push_run, import_study):
        gr.api(endpoint, api_name=endpoint.__name__)
    gr.api(ask, api_name="ask", **(ask_limits or {}))
