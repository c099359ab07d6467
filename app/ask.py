"""The Ask service: answer one question with the base model and chosen runs, side by side.

One :class:`~heft_core.inference.SideBySide` per base model, created on first use and kept
while the chosen runs stay on that model; runs chosen later are added to it, and it is
rebuilt when it has accumulated too many adapters or a run's directory changed. Only one base
model is held at a time (a second 7B model would not fit next to the first). The app creates
one instance inside ``build_demo`` and closes over it; nothing here is module-level state.
"""
from __future__ import annotations

import json
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from app import present
from heft_common.errors import AskError, HeftError
from heft_common.vocabulary import EMBEDDED_MODEL, SYNTHETIC_DATA, RunStatus
from storage import queries

__all__ = ["AskError", "AskService", "Choice", "normalise_model", "parse_run_ids"]

logger = logging.getLogger(__name__)

MAX_LOADED_RUNS = 12


@dataclass
class _Server:
    model_ref: str
    side_by_side: Any
    loaded: dict[int, str] = field(default_factory=dict)  # run id -> artifact dir


@dataclass
class Choice:
    """One card: a slot ("base", "lora", ...) and the run serving it (None for the base model)."""

    slot: str
    title: str
    run: Any = None


def normalise_model(ref: str) -> str:
    from heft_core.models import is_embedded

    return EMBEDDED_MODEL if is_embedded(ref) else ref.strip()


class AskService:
    def __init__(self, engine: Any, *, max_loaded_runs: int = MAX_LOADED_RUNS):
        self.engine = engine
        self.max_loaded_runs = max_loaded_runs
        self._server: _Server | None = None
        self._lock = threading.Lock()  # loading and answering share one model
        self._examples: dict[str, list[Any]] = {}
        self._examples_lock = threading.Lock()

    # --- choosing runs -----------------------------------------------------------------
    def resolve(self, run_ids: Mapping[str, Any] | Sequence[Any],
                base_model: str | None = None) -> tuple[str, list[Choice]]:
        """Check the chosen runs and find their common base model.

        ``run_ids`` maps slots ("lora", "reft", "heft", or any label) to run ids (None/""/0: no
        run), or is a list of run ids. The base model always comes first.
        """
        if isinstance(run_ids, Mapping):
            items = [(str(slot), value) for slot, value in run_ids.items()]
        else:
            items = [("", value) for value in run_ids]
        choices: list[Choice] = []
        seen: set[int] = set()
        for slot, value in items:
            if value in (None, "", 0, "0"):
                continue
            try:
                run_id = queries.validate_run_id(value)
            except HeftError as exc:  # RunNotFound: not a run id
                raise AskError(str(exc)) from None
            run = queries.get_run(self.engine, run_id)
            if run is None:
                raise AskError(f"run {run_id} does not exist")
            if run.status != RunStatus.COMPLETED or not run.artifact_dir:
                raise AskError(f"run #{run_id} is {run.status}; only completed runs can answer questions")
            if run.method == "base":
                continue  # a zero-shot run is the base model, which always answers
            if run_id in seen:
                continue
            seen.add(run_id)
            slot = slot or run.method
            title = present.method_title(slot)
            choices.append(Choice(slot, f"{title} · run #{run.id}", run))
        models = {normalise_model(c.run.base_model) for c in choices}
        if len(models) > 1:
            detail = ", ".join(f"#{c.run.id} on {present.model_label(c.run.base_model)}" for c in choices)
            raise AskError(f"the chosen runs use different base models ({detail}); side-by-side answers need runs "
                           "trained on one base model — pick runs of the same model")
        if models:
            model_ref = choices[0].run.base_model
        else:
            model_ref = (base_model or EMBEDDED_MODEL).strip() or EMBEDDED_MODEL
        return model_ref, [Choice("base", "Base")] + choices

    # --- serving ---------------------------------------------------------------------------
    def _server_for(self, model_ref: str, runs: Sequence[Any]) -> _Server:
        """The SideBySide of ``model_ref`` with ``runs`` loaded (caller holds the lock)."""
        from heft_core.inference import SideBySide, same_model

        server = self._server
        wanted = {run.id: run.artifact_dir for run in runs}
        if server is not None:
            stale = any(server.loaded.get(rid, d) != d for rid, d in wanted.items())
            too_many = len(set(server.loaded) | set(wanted)) > self.max_loaded_runs
            if not same_model(server.model_ref, model_ref) or stale or too_many:
                logger.info("Ask: releasing %s (%d runs loaded)", server.model_ref, len(server.loaded))
                self._server = server = None
                _free_memory()
        if server is None:
            logger.info("Ask: loading base model %s", model_ref)
            server = _Server(model_ref, SideBySide(model_ref))
            self._server = server
        for run in runs:
            if run.id not in server.loaded:
                logger.info("Ask: loading run %d from %s", run.id, run.artifact_dir)
                try:
                    server.side_by_side.add_run(f"run{run.id}", run.artifact_dir)
                except (HeftError, OSError, ValueError) as exc:  # a damaged, missing or mismatched run directory
                    raise AskError(f"run #{run.id} ({run.name}): {exc}") from None
                server.loaded[run.id] = run.artifact_dir
        return server

    def answer(self, passage: str, question: str, run_ids: Mapping[str, Any] | Sequence[Any],
               base_model: str | None = None) -> dict[str, Any]:
        """Answers of the base model and each chosen run.

        Returns {"model", "answers": [{slot, title, run_id, answer, p_yes, latency_seconds}]} (in the
        order they were answered; ``latency_seconds`` counts from the start of the question). Raises
        AskError for empty input, unknown or unfinished runs, runs on different base models, or a
        model or run directory that cannot be loaded.
        """
        last: dict[str, Any] = {}
        for last in self.answer_iter(passage, question, run_ids, base_model):
            pass
        return {"model": last["model"], "answers": last["answers"]}

    def answer_iter(self, passage: str, question: str, run_ids: Mapping[str, Any] | Sequence[Any],
                    base_model: str | None = None) -> Iterator[dict[str, Any]]:
        """:meth:`answer`, one step per answered variant: {"model", "answers" so far, "pending" slots}.

        Variants on one host share its prompt pass (``SideBySide.answers``), so the base model and a
        ReFT run come first, then a LoRA run and a HEFT run on its adapter.
        """
        passage, question = (passage or "").strip(), (question or "").strip()
        if not question:
            raise AskError("enter a question (and the passage it is about)")
        if not passage:
            raise AskError("enter the passage the question is about")
        model_ref, choices = self.resolve(run_ids, base_model)
        runs = [c.run for c in choices if c.run is not None]
        by_name = {("base" if c.run is None else f"run{c.run.id}"): c for c in choices}
        with self._lock:  # loading: one model and its runs at a time
            try:
                server = self._server_for(model_ref, runs)
            except AskError:  # SideBySide refused a run as chosen; what is loaded stays usable
                raise
            except HeftError as exc:  # a model or run directory that cannot be loaded: start afresh next time
                self._server = None
                raise AskError(str(exc)) from None
        answers: list[dict[str, Any]] = []
        try:
            # SideBySide locks each forward itself, so a second question can be served in between.
            for name, result in server.side_by_side.answers(passage, question, list(by_name)):
                choice = by_name[name]
                answers.append({
                    "slot": choice.slot, "title": choice.title, "run_id": choice.run.id if choice.run else None,
                    "subtitle": (_subtitle(choice.run) if choice.run
                                 else f"zero-shot · {present.model_label(model_ref)}"),
                    **result.to_dict(),
                })
                done = {answer["slot"] for answer in answers}
                yield {"model": model_ref, "answers": list(answers),
                       "pending": [c.slot for c in choices if c.slot not in done]}
        except HeftError as exc:  # a model that fails on this input
            if self._server is server:
                self._server = None
            raise AskError(str(exc)) from None

    # --- examples ----------------------------------------------------------------------------
    def random_example(self, source: str, rng: random.Random | None = None) -> Any:
        """A random validation example (with its gold answer) from a data source."""
        from heft_core.data import load_data  # the data loaders: only when an example is drawn

        source = (source or SYNTHETIC_DATA).strip()
        with self._examples_lock:
            examples = self._examples.get(source)
            if examples is None:
                try:
                    examples = load_data(source).validation
                except HeftError as exc:
                    raise AskError(str(exc)) from None
                self._examples[source] = examples
        if not examples:
            raise AskError(f"{source} has no validation examples")
        return (rng or random).choice(examples)

    def close(self) -> None:
        with self._lock:
            self._server = None
        _free_memory()


def _subtitle(run: Any) -> str:
    acc = f" · {run.accuracy * 100:.1f}% on eval" if run.accuracy is not None else ""
    return f"{present.epochs_label(run)} ep{acc} · {present.data_label(run.data_source)}"


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - cleanup only
        pass


def parse_run_ids(text: str | None) -> Mapping[str, Any] | list[Any]:
    """The ask API's run_ids_json: a list of ids, or an object {"lora": 3, "reft": 4, "heft": 5}."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise AskError(f"run_ids_json is not valid JSON ({exc.msg}); write e.g. [3, 4, 5] or {{\"lora\": 3}}") from None
    if isinstance(value, (int, str)):
        return [value]
    if isinstance(value, (list, dict)):
        return value
    raise AskError("run_ids_json must be a list of run ids or an object mapping slots to run ids")
