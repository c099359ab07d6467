"""What a first-time user tripped over (issue 12), without a browser: escaped messages, one
validation path, training phases in the live view, estimates from measured speed, charts that
keep their data visible, Ask's shared prompt states, and one error shape for the API.

The browser side of the same items is in ``tests/test_browser.py``.
"""
from __future__ import annotations

import html
import os
from types import SimpleNamespace

import pytest

from app import forms, present, recording, service, timing
from heft_common.errors import ConfigError, DataError
from heft_core.callbacks import EvalEvent, StepEvent, TrainerCallback
from heft_core.config import ReftSettings, RunConfig, StageSettings
from heft_core.prompt import PromptTemplate
from storage import queries
from storage.db import open_db
from tests.tiny import make_config

# --------------------------------------------------------------------------- 1. escaped messages


def test_escape_keeps_angle_brackets_and_markdown_markers_as_text():
    text = "write f<n>, l<m> or f<n>+l<m> * _x_ `y` [z](w) a|b & c"
    escaped = present.escape(text)
    for raw in "<>*_`[]|":
        assert raw not in escaped
    assert html.unescape(escaped) == text  # shown as written
    assert present.escape(None) == ""


def test_every_message_is_escaped_where_it_is_rendered():
    message = forms.positions_message("x7")
    assert "<" not in message and "write f<n>, l<m> or f<n>+l<m>" in html.unescape(message)
    missing = DataError("Unknown data source '/no/such': it is not 'synthetic', 'hub' or 'hub:<dataset id>', and no "
                        "file or directory exists at that path.")
    shown = forms.error_message(missing)
    assert "<" not in shown and "hub:<dataset id>" in html.unescape(shown)
    assert "no file or directory exists at that path" in shown
    assert "<dataset id>" in html.unescape(present.error(str(missing))) and "<" not in present.error(str(missing))
    run = SimpleNamespace(id=3, name="my <b>run</b> *one*", status="failed", cancel_requested=False, progress={},
                          started_at=None, finished_at=None, accuracy=None, trainable_params_by_stage={},
                          error="boom <tag>\n```\nnot a fence", method="lora", config={})
    progress = present.progress_markdown(run)
    assert "<b>" not in progress and "my <b>run</b> *one*" in html.unescape(progress) and "*one*" not in progress
    assert "````text" in progress  # a longer fence: the error's own ``` cannot close the block early
    cards = present.answer_cards_html([{"slot": "lora", "title": "LoRA <i>", "subtitle": "x<y", "error": "a<b"}])
    assert "<i>" not in cards and "a<b" in html.unescape(cards) and "x<y" in html.unescape(cards)
    assert "<x>" not in present.verdicts_markdown(["#1 <x> vs #2: not comparable"])


# --------------------------------------------------------------------------- 2. one validation path


@pytest.mark.parametrize("field, value, expected", [
    ("lora.rank", 0, "lora.rank: must be an integer in 1..1024, got 0"),
    ("lora.rank", None, "lora.rank: must be an integer in 1..1024, got empty"),
    ("lora.rank", 2.5, "lora.rank: must be an integer in 1..1024, got 2.5"),
    ("lora_stage.learning_rate", None, "lora_stage.learning_rate: must be in (0, 1], got empty"),
    ("lora_stage.learning_rate", "fast", "lora_stage.learning_rate: must be in (0, 1], got 'fast'"),
    ("*.batch_size", 0, "lora_stage.batch_size: must be an integer in 1..4096, got 0"),
    ("max_length", None, "max_length: must be an integer in 16..32768, got empty"),
    ("seed", -1, "seed: must be an integer in 0..2**32-1, got -1"),
])
def test_invalid_values_are_reported_with_the_option_and_its_range(field, value, expected):
    form = dict(forms.default_form(), **{field: value})
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(form)
    assert str(info.value) == expected
    errors = forms.field_errors(form)
    assert errors[field] == expected
    estimate = forms.estimate_markdown(form)
    assert estimate.startswith("*Estimate unavailable") and "invalid" in estimate and "optimizer steps" not in estimate


def test_field_errors_lists_every_invalid_field_and_ignores_unused_stages():
    form = dict(forms.default_form(), **{"lora.rank": 0, "reft.rank": None, "reft.positions": "x7"})
    errors = forms.field_errors(form)
    assert set(errors) == {"lora.rank", "reft.rank", "reft.positions"}
    assert "write f<n>, l<m>" in errors["reft.positions"]  # plain text here; the UI escapes it
    # A LoRA-only run does not use the ReFT stage: an empty ReFT learning rate is no error, and the
    # config keeps the default for it (nothing unserialisable sneaks into the stored config).
    lora_only = dict(forms.default_form(), method=forms.METHOD_LABELS["lora"], **{"reft_stage.learning_rate": None})
    assert forms.field_errors(lora_only) == {}
    [config] = forms.form_to_configs(lora_only)
    assert config.reft_stage.learning_rate == StageSettings().learning_rate
    config.to_json()


def test_field_errors_check_the_model_shape(tiny_model):
    form = dict(forms.default_form(), model=tiny_model, **{"reft.layers": "1,99"})
    assert "reft.layers" in forms.field_errors(form) and "0..3" in forms.field_errors(form)["reft.layers"]


def test_no_gradio_minimum_on_number_fields(tmp_path):
    """Gradio's own minimum= check fails before our validation with a pop-up naming no field."""
    import gradio as gr

    from app.ui import build_demo

    engine = open_db(tmp_path / "minimum-check.db")
    demo = build_demo(engine)
    try:
        numbers = [name for name in forms.FORM_FIELDS
                   if isinstance(demo.heft_components[name], gr.Number)]
        assert "lora.rank" in numbers and "*.batch_size" in numbers
        assert all(demo.heft_components[name].minimum is None for name in numbers)
    finally:
        demo.heft_ask_service.close()


# --------------------------------------------------------------------------- 3. phases


class PhaseLog(TrainerCallback):
    def __init__(self) -> None:
        self.phases: list[tuple[str, int, int]] = []

    def on_phase(self, name: str, done: int, total: int) -> None:
        self.phases.append((name, done, total))


def _l2_config(tiny_model: str, method: str, **overrides) -> RunConfig:
    settings = dict(
        reft=ReftSettings(rank=4, layers=[1, 2], positions="l2", dropout=0.0),
        lora_stage=StageSettings(epochs=1, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0),
        reft_stage=StageSettings(epochs=1, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0),
        train_size=32, eval_size=16,
    )
    settings.update(overrides)
    return make_config(tiny_model, method, **settings)


@pytest.fixture(scope="module")
def l2_runs(tiny_model, easy_data, tmp_path_factory):
    """A LoRA, a ReFT (positions l2) and a HEFT run of one comparison batch, with the phases each reported."""
    from heft_core.train import train

    root = tmp_path_factory.mktemp("l2-runs")
    runs = {}
    for method in ("lora", "reft", "heft"):
        log = PhaseLog()
        result = train(_l2_config(tiny_model, method), root / method, callbacks=[log], data=easy_data)
        runs[method] = SimpleNamespace(result=result, phases=log.phases, run_dir=str(root / method))
    return runs


def test_training_reports_each_phase_with_its_own_progress(l2_runs):
    phases = l2_runs["heft"].phases
    names = [name for name, _, _ in phases]
    order = list(dict.fromkeys(names))
    assert order == ["preparing data", "loading the model", "training lora", "evaluating lora epoch 1",
                     "training reft", "evaluating reft epoch 1", "saving the run"]
    evaluating = [(done, total) for name, done, total in phases if name == "evaluating lora epoch 1"]
    assert evaluating[0] == (0, 16) and evaluating[-1] == (16, 16)
    assert [done for done, _ in evaluating] == sorted(done for done, _ in evaluating)
    training = [(done, total) for name, done, total in phases if name == "training lora"]
    assert training[0] == (0, 4)  # 32 questions in batches of 8


def test_embedded_model_conversion_is_a_phase(monkeypatch, tiny_model, easy_data, tmp_path):
    """The one-time conversion of the embedded model is reported before it starts."""
    from heft_core import train as train_module

    monkeypatch.setattr(train_module, "needs_conversion", lambda ref: True)
    log = PhaseLog()
    train_module.prepare(_l2_config(tiny_model, "lora"), easy_data, callbacks=log)
    assert ("converting the embedded model (once)", 0, 1) in log.phases


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(home):
    return open_db(home / "heft.db")


def _recorded_run(engine, config: RunConfig, **fields):
    return queries.start_external_run(engine, worker_pid=os.getpid(), name=fields.pop("name", "r"),
                                      method=config.method, config=config.to_dict(), base_model=config.model,
                                      data_source=config.data, **fields)


def _step(step: int, total: int, elapsed: float, stage: str = "lora") -> StepEvent:
    return StepEvent(stage=stage, epoch=step / total, step=step, total_steps=total, loss=0.5, learning_rate=1e-3,
                     tokens_per_second=100.0, elapsed_seconds=elapsed)


def test_recorder_stores_the_phase_and_an_eta_that_includes_evaluation(engine, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(recording.time, "monotonic", clock)
    config = RunConfig(method="lora", train_size=40, eval_size=20, lora_stage=StageSettings(epochs=2, batch_size=4))
    run = _recorded_run(engine, config)
    recorder = recording.DatabaseCallback(engine, run.id)
    recorder.on_phase("preparing data", 0, 1)
    clock.now += 2
    recorder.on_phase("loading the model", 0, 1)
    clock.now += 8
    recorder.on_train_begin({"method": "lora", "total_steps": 20, "train_examples": 40, "eval_examples": 20,
                             "data_label": "x", "device": "cpu"})
    recorder.on_phase("training lora", 0, 20)
    clock.now += 10
    recorder.on_step(_step(10, 20, 10.0))
    progress = queries.get_run(engine, run.id).progress
    assert progress["phase"] == "training lora" and progress["phase_done"] == 10 and progress["phase_total"] == 20
    assert progress["phase_seconds"]["loading"] == pytest.approx(8.0)
    # 10 s of training left, plus two evaluations of 20 questions that have not run yet
    train_only = 10.0
    assert progress["eta_seconds"] > train_only
    recorder.on_phase("evaluating lora epoch 1", 0, 20)
    clock.now += 4
    recorder.on_phase("evaluating lora epoch 1", 10, 20)
    recorder.flush()
    progress = queries.get_run(engine, run.id).progress
    assert (progress["phase"], progress["phase_done"], progress["phase_total"]) == ("evaluating lora epoch 1", 10, 20)
    clock.now += 4
    recorder.on_phase("evaluating lora epoch 1", 20, 20)
    recorder.on_evaluate(EvalEvent("lora", 1, 1, 0.5, 0.3, 0.7, 20))
    recorder.on_phase("training lora", 10, 20)
    recorder.flush()
    progress = queries.get_run(engine, run.id).progress
    assert progress["phase_seconds"]["evaluating"] == pytest.approx(8.0) and progress["eval_questions_done"] == 20
    # measured: 8 s per evaluation of 20 questions; 10 s of training and one evaluation left
    assert progress["eta_seconds"] == pytest.approx(10.0 + 8.0)
    text = present.progress_markdown(SimpleNamespace(**{**_running_row(run.id), "progress": progress}))
    assert "training stage 1 of 1 (LoRA): step 10 of 20" in text and "ETA 18 s (training and evaluation)" in text


def _running_row(run_id: int) -> dict:
    return dict(id=run_id, name="r", status="running", cancel_requested=False, started_at=None, finished_at=None,
                accuracy=None, trainable_params_by_stage={}, error=None, method="lora", config={})


def test_progress_markdown_names_the_phase_with_its_progress():
    row = _running_row(1)
    progress = {"phase": "evaluating lora epoch 1", "phase_done": 32, "phase_total": 64, "step": 8, "total_steps": 8,
                "eta_seconds": 75, "stage": "lora"}
    text = present.progress_markdown(SimpleNamespace(**row, progress=progress))
    assert "evaluating lora epoch 1: 32 of 64 questions" in text and "ETA 1 min 15 s" in text
    assert "ETA 0 s" not in text
    converting = {"phase": "converting the embedded model (once)", "phase_done": 0, "phase_total": 1}
    loading = present.progress_markdown(SimpleNamespace(**row, progress=converting))
    assert "converting the embedded model (once)" in loading


def test_a_recorded_training_run_keeps_its_phase_timings(engine, tiny_model, easy_data, tmp_path):
    from heft_core.train import train

    config = _l2_config(tiny_model, "reft")
    run = _recorded_run(engine, config)
    recorder = recording.DatabaseCallback(engine, run.id)
    train(config, tmp_path / "run", callbacks=[recorder], data=easy_data)
    recorder.flush()
    progress = queries.get_run(engine, run.id).progress
    assert progress["phase"] == "saving the run"
    assert set(progress["phase_seconds"]) >= {"preparing", "loading", "training", "evaluating", "saving"}
    assert progress["eval_questions_done"] == 16


# --------------------------------------------------------------------------- 4. estimates from measured speed


def _finished(engine, config: RunConfig, tokens_per_second: float, progress: dict | None = None) -> int:
    run = _recorded_run(engine, config)
    if progress:
        queries.update_progress(engine, run.id, progress)
    queries.finish_run(engine, run.id, "completed", results={"tokens_per_second": tokens_per_second,
                                                             "train_seconds": 60.0, "accuracy": 0.5})
    return run.id


def test_estimate_without_a_finished_run_says_what_it_assumes(engine):
    form = forms.preset_form(forms.PRESET_QUICK)
    speeds = timing.measured_speeds(engine, form["model"])
    text = html.unescape(forms.estimate_markdown(form, speeds=speeds))
    assert "estimated from the model's size" in text and "not measured on this machine yet" in text
    assert "evaluation" in text and "loading" in text


def test_estimate_uses_the_last_finished_run_of_the_same_model_and_method(engine):
    form = forms.preset_form(forms.PRESET_QUICK)  # HEFT on the embedded model
    heft = RunConfig.from_dict({"method": "heft", "model": form["model"], "train_size": 128, "eval_size": 64})
    _finished(engine, heft, 500.0)
    newest = _finished(engine, heft, 180.0, {"phase_seconds": {"loading": 12.0, "evaluating": 64.0},
                                             "eval_questions_done": 128, "train_examples": 128})
    _finished(engine, RunConfig.from_dict({"method": "lora", "model": form["model"]}), 999.0)
    _finished(engine, RunConfig.from_dict({"method": "heft", "model": "other/model"}), 999.0)
    speeds = timing.measured_speeds(engine, form["model"])
    assert speeds["heft"].run_id == newest and speeds["heft"].tokens_per_second == 180.0
    assert speeds["heft"].eval_seconds_per_question == pytest.approx(0.5)
    text = html.unescape(forms.estimate_markdown(form, speeds=speeds))
    assert f"based on run #{newest}'s 180 tokens/s" in text
    assert "0.50 s per evaluated question" in text and "12 s to load the model" in text
    slow = timing.estimate_seconds(forms.form_to_configs(form)[0], 128, 64, speeds["heft"], convert=False)
    fast = timing.estimate_seconds(forms.form_to_configs(form)[0], 128, 64,
                                   timing.Speed(tokens_per_second=500.0,
                                                tokens_per_question=speeds["heft"].tokens_per_question), convert=False)
    # 180 tokens/s over 60 s of training on 128 questions x 2 epochs: 42.2 tokens per question
    assert speeds["heft"].tokens_per_question == pytest.approx(180.0 * 60.0 / 256)
    assert slow.train == pytest.approx(128 * 4 * 180.0 * 60.0 / 256 / 180.0)
    assert slow.train > fast.train and slow.evaluation == pytest.approx(0.5 * 64 * 4) and slow.load == 12.0
    assert slow.total == pytest.approx(slow.load + slow.train + slow.evaluation)


def test_estimate_counts_the_embedded_conversion_while_it_has_not_happened(monkeypatch):
    from heft_core import models

    config = RunConfig(method="lora", train_size=8, eval_size=8)
    monkeypatch.setattr(models, "needs_conversion", lambda ref: True)
    converting = timing.estimate_seconds(config, 8, 8, None)
    monkeypatch.setattr(models, "needs_conversion", lambda ref: False)
    converted = timing.estimate_seconds(config, 8, 8, None)
    assert converting.load == pytest.approx(converted.load + timing.CONVERSION_SECONDS)


# --------------------------------------------------------------------------- 5. charts


def _acc_frame():
    import pandas as pd

    rows = [[1.0, 90.0, "#1 LoRA (1 ep)", 80.0, 99.5], [2.0, 95.0, "#1 LoRA (1 ep)", 88.0, 100.0],
            [1.0, 60.0, "#2 ReFT (1 ep)", 40.0, 75.0]]
    return pd.DataFrame(rows, columns=["cumulative_epoch", "accuracy", "run", "low", "high"])


def test_accuracy_chart_keeps_every_interval_inside_the_axes():
    figure = present.accuracy_figure(_acc_frame())
    [ax] = figure.axes
    low, high = ax.get_ylim()
    assert low < 40.0 and high > 100.0  # padding beyond the lowest and highest interval ends
    assert ax.get_title()  # the title is the figure's own, not a badge laid over the plot


def test_identical_loss_curves_are_told_apart():
    import pandas as pd

    steps = list(range(1, 9))
    loss = [1.0 / s for s in steps]
    frame = pd.DataFrame([[s, v, "#1 LoRA (1 ep)"] for s, v in zip(steps, loss)]
                         + [[s, v, "#3 HEFT (1+1 ep)"] for s, v in zip(steps, loss)]
                         + [[s + 8, 0.1, "#3 HEFT (1+1 ep)"] for s in range(1, 5)],
                         columns=["step", "loss", "run"])
    figure = present.loss_figure(frame)
    [ax] = figure.axes
    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(lines) == 2
    assert (lines[0].get_linestyle(), lines[0].get_marker()) != (lines[1].get_linestyle(), lines[1].get_marker())
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("same as #3 HEFT (1+1 ep)" in text and "steps 1–8" in text for text in legend), legend
    low, high = ax.get_ylim()
    assert low < 0.1 and high > 1.0


# --------------------------------------------------------------------------- 6. Ask


def _embedding_calls(model):
    """Token counts of every forward through the embeddings (wrapping forward: pyvene drops hooks)."""
    embeddings = model.get_input_embeddings()
    original = embeddings.forward
    seen: list[int] = []

    def forward(input_ids, *args, **kwargs):
        seen.append(int(input_ids.shape[1]))
        return original(input_ids, *args, **kwargs)

    embeddings.forward = forward
    return seen, lambda: setattr(embeddings, "forward", original)


@pytest.fixture(scope="module")
def l2_server(l2_runs, tiny_model):
    from heft_core.inference import SideBySide

    server = SideBySide(tiny_model, template=PromptTemplate(after_question=""), max_length=64)
    for method in ("lora", "reft", "heft"):
        server.add_run(method, l2_runs[method].run_dir)
    return server


def test_two_prompt_passes_serve_four_answers_with_todays_answers(l2_server, easy_data):
    names = ["base", "lora", "reft", "heft"]
    example = easy_data.validation[3]
    # HEFT's stage 1 is the LoRA run (same seed and data): one adapter, loaded once
    assert l2_server.sharing_groups(example.passage, example.question, names) == [["base", "reft"], ["lora", "heft"]]
    for example in easy_data.validation[:6]:
        seen, restore = _embedding_calls(l2_server.model)
        try:
            shared = dict(l2_server.answers(example.passage, example.question, names, share_prefix=True))
            long_shared = [n for n in seen if n > 2]
            seen.clear()
            today = dict(l2_server.answers(example.passage, example.question, names, share_prefix=False))
            long_today = [n for n in seen if n > 2]
        finally:
            restore()
        assert list(shared) == ["base", "reft", "lora", "heft"]
        for name in names:
            assert shared[name].p_yes == pytest.approx(today[name].p_yes, abs=1e-5), name
            assert shared[name].answer == today[name].answer
            assert shared[name].p_yes == pytest.approx(l2_server.answer(name, example.passage, example.question).p_yes,
                                                       abs=1e-5)
        assert len(long_shared) == 2 and len(long_today) == 4  # prompt passes (the rest are 2-token tails)


def test_answers_without_a_reusable_prefix_still_agree(l2_server, easy_data, tiny_model, l2_runs, tmp_path):
    """A run with first positions (f1+l1) has no prefix to share: it gets its own pass, same answers."""
    from heft_core.inference import SideBySide
    from heft_core.train import train

    config = _l2_config(tiny_model, "reft", reft=ReftSettings(rank=4, layers=[1], positions="f1+l1", dropout=0.0))
    train(config, tmp_path / "f1", data=easy_data)
    server = SideBySide(tiny_model, template=PromptTemplate(after_question=""), max_length=64)
    server.add_run("f1", tmp_path / "f1")
    server.add_run("reft", l2_runs["reft"].run_dir)
    example = easy_data.validation[0]
    groups = server.sharing_groups(example.passage, example.question, ["base", "f1", "reft"])
    assert groups == [["base", "reft"], ["f1"]]
    shared = dict(server.answers(example.passage, example.question, ["base", "f1", "reft"]))
    for name in ("base", "f1", "reft"):
        assert shared[name].p_yes == pytest.approx(server.answer(name, example.passage, example.question).p_yes,
                                                   abs=1e-5)


def _completed_from_dir(engine, run_dir: str, config: RunConfig) -> int:
    from app.recording import run_results
    from heft_core.artifacts import load_run

    run = _recorded_run(engine, config, name=f"{config.method} run")
    summary = load_run(run_dir).meta["result"]
    queries.finish_run(engine, run.id, "completed", results=run_results(summary, run_dir, None))
    return run.id


def test_ask_shows_each_card_as_soon_as_its_variant_is_answered(engine, l2_runs, tiny_model, easy_data):
    from app.ask import AskService

    ids = {method: _completed_from_dir(engine, l2_runs[method].run_dir, _l2_config(tiny_model, method))
           for method in ("lora", "reft", "heft")}
    asker = AskService(engine)
    example = easy_data.validation[1]
    try:
        steps = list(asker.answer_iter(example.passage, example.question, ids))
        assert [len(step["answers"]) for step in steps] == [1, 2, 3, 4]
        # The tiny runs' template differs from the base model's default one, so the base model has a pass of
        # its own here; the LoRA and HEFT runs share one adapter and one pass, the ReFT run has the third.
        assert [a["slot"] for a in steps[-1]["answers"]] == ["base", "lora", "heft", "reft"]
        whole = asker.answer(example.passage, example.question, ids)
        assert {a["slot"]: a["p_yes"] for a in whole["answers"]} == pytest.approx(
            {a["slot"]: a["p_yes"] for a in steps[-1]["answers"]}, abs=1e-5)
        assert steps[0]["pending"] == ["lora", "reft", "heft"] and steps[-1]["pending"] == []
        cards = present.answer_cards_html(present.slot_cards(steps[0]["answers"], pending=steps[0]["pending"]))
        assert cards.count("heft-pending") == 3 and "answering" in cards
    finally:
        asker.close()


def test_ask_latency_bench_runs_on_the_tiny_model(tiny_model, tmp_path):
    from bench import ask_latency

    report = ask_latency.main(["--model", tiny_model, "--data", "synthetic", "--quick", "--passage-tokens", "20",
                               "--layers", "1,2", "--runs-dir", str(tmp_path / "runs"),
                               "--out", str(tmp_path / "r.json")])
    [case] = report["cases"].values()
    assert case["prompt_passes_shared"] == 2 and case["prompt_passes_per_variant"] == 4
    assert case["max_p_yes_difference"] < 1e-4 and case["ratio_median"] > 0
    assert (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- 7. one error shape


def test_every_payload_answers_errors_as_one_error_dict(engine):
    assert service.list_runs_payload(engine, "bogus") == {
        "error": "unknown status 'bogus'; use one of queued, running, completed, failed, cancelled, interrupted or ''"}
    assert service.list_runs_payload(engine, "") == []
    for payload in (service.run_detail_payload(engine, "x"), service.cancel_run_payload(engine, -1),
                    service.start_run_payload(engine, "{")):
        assert list(payload) == ["error"] and isinstance(payload["error"], str)

