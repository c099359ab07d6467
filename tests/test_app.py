"""The web app without a browser: form, presentation and service functions, and the API through gradio_client."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from app import forms, present, service
from heft_common.errors import ConfigError
from heft_common.vocabulary import TERMINAL_STATUSES
from heft_core import estimates
from heft_core.config import RunConfig, StageSettings
from heft_core.stats import paired_comparison

# --------------------------------------------------------------------------- form and presets


@pytest.mark.parametrize("preset", forms.PRESETS)
def test_presets_fill_every_field_and_build_configs(preset):
    form = forms.preset_form(preset)
    assert set(form) == set(forms.FORM_FIELDS)
    assert all(form[key] is not None for key in forms.FORM_FIELDS)
    assert preset in forms.PRESET_NOTES
    [config] = forms.form_to_configs(form)
    assert config.method == "heft"


def test_quick_preset_matches_the_brief():
    [config] = forms.form_to_configs(forms.preset_form(forms.PRESET_QUICK))
    assert (config.model, config.data, config.train_size, config.eval_size, config.max_length) == (
        "embedded", "synthetic", 128, 64, 128)
    assert config.lora_stage.batch_size == config.reft_stage.batch_size == 8
    assert (config.lora.rank, config.lora.target_modules, config.lora_stage.learning_rate) == (
        8, ["q_proj", "v_proj"], 1e-3)
    assert (config.reft.rank, config.reft.layers, config.reft.positions, config.reft_stage.learning_rate) == (
        4, [8, 16, 24], "l1", 1e-3)
    assert (config.lora_stage.epochs, config.reft_stage.epochs) == (3, 1)


def test_paper_preset_is_the_papers_recipe():
    """arXiv 2509.09801's recipe (shared notes, paper-recipe.md): a preset that drifts from it fails here."""
    [config] = forms.form_to_configs(forms.preset_form(forms.PRESET_PAPER))
    assert (config.model, config.data, config.train_size, config.eval_size) == (
        "meta-llama/Llama-2-7b-chat-hf", "hub", None, None)
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout, config.lora.target_modules) == (
        8, 32.0, 0.05, ["q_proj", "v_proj"])
    assert (config.reft.rank, config.reft.layers, config.reft.positions) == (4, [15], "l1")
    lora, reft = config.lora_stage, config.reft_stage
    assert (lora.epochs, lora.learning_rate, lora.batch_size, lora.grad_accum) == (3, 2e-4, 1, 32)
    assert (reft.epochs, reft.learning_rate, reft.batch_size, reft.grad_accum) == (3, 2e-4, 8, 4)
    assert {(s.scheduler, s.warmup_ratio) for s in (lora, reft)} == {("linear", 0.0)}
    assert (config.lora_loss, config.scoring, config.generation_max_new_tokens) == ("sequence", "both", 5)
    template = config.template
    assert (template.format, template.yes, template.no) == ("chat", " Yes", " No")
    assert template.after_question == "?\nAnswer:"
    assert template.system and config.heft_stage2_mode == "merged" and config.precision == "auto"
    [variant] = forms.form_to_configs(forms.preset_form(forms.PRESET_PAPER_ALL_LINEAR))
    assert variant.lora.target_modules == ["all-linear"]
    assert RunConfig.from_dict({**variant.to_dict(), "lora": config.lora.__dict__}) == config
    assert "no hyperparameters" not in forms.PRESET_NOTES[forms.PRESET_PAPER]


def test_lora_stage_batch_fields_override_the_shared_ones_only_when_set():
    form = dict(forms.default_form(), **{"*.batch_size": 4, "*.grad_accum": 2})
    [config] = forms.form_to_configs(form)
    assert (config.lora_stage.batch_size, config.lora_stage.grad_accum, config.reft_stage.batch_size) == (4, 2, 4)
    [config] = forms.form_to_configs(dict(form, **{"lora_stage.batch_size": 1, "lora_stage.grad_accum": 32}))
    assert (config.lora_stage.batch_size, config.lora_stage.grad_accum) == (1, 32)
    assert (config.reft_stage.batch_size, config.reft_stage.grad_accum) == (4, 2)
    assert forms.field_errors(dict(form, **{"lora_stage.batch_size": 0})) == {
        "lora_stage.batch_size": "lora_stage.batch_size: must be an integer in 1..4096, got 0"}
    assert set(forms.field_errors(dict(form, scoring="accuracy"))) == {"scoring"}
    assert set(forms.field_errors(dict(form, generation_max_new_tokens=65))) == {"generation_max_new_tokens"}


def test_compare_all_three_queues_one_batch_with_shared_settings():
    form = dict(forms.default_form(), method=forms.METHOD_LABELS["all"], include_base=True, name="cmp", seed=7)
    configs = forms.form_to_configs(form)
    methods = [c.method for c in configs]
    assert methods[:3] == ["lora", "reft", "heft"]
    assert methods[3:] == ["base"]
    assert {c.seed for c in configs} == {7} and len({(c.train_size, c.eval_size, c.data) for c in configs}) == 1
    assert configs[0].name == "cmp · LoRA"


def test_form_errors_name_the_option():
    form = dict(forms.default_form(), **{"reft.positions": "x9"})
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(form)
    assert info.value.option == "reft.positions"
    assert "`reft.positions`" in forms.error_message(info.value)
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(dict(forms.default_form(), data_kind=forms.DATA_LOCAL, data_local=""))
    assert info.value.option == "data"
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(dict(forms.default_form(), **{"lora.rank": 2.5}))
    assert info.value.option == "lora.rank"
    with pytest.raises(ConfigError):
        forms.form_to_configs(dict(forms.default_form(), data_kind=forms.DATA_UPLOAD))
    assert forms.data_source(forms.DATA_UPLOAD, None, "/x/y.jsonl") == "/x/y.jsonl"


def test_field_messages():
    assert forms.positions_message("f7+l7").startswith("✓")
    assert "fast path" in forms.positions_message("l1") and "fast path" not in forms.positions_message("f1+l1")
    assert forms.positions_message("7").startswith("⚠️")
    assert "0..3" in forms.layers_message("0,9", 4) and forms.layers_message("0,9", 4).startswith("⚠️")
    assert forms.layers_message("all", 30) == "✓ all 30 layers (valid: 0..29)"
    form = dict(forms.default_form(), **{"lora_stage.epochs": 1, "reft_stage.epochs": 2})
    assert "1 + 2 = **3 epochs**" in forms.epochs_message(form)


# --------------------------------------------------------------------------- estimates


def test_parameter_estimates():
    shape = estimates.model_shape("embedded")
    # SmolLM2-135M: q 576->576, v 576->192; r * (in + out) per layer, 30 layers.
    assert estimates.lora_params(shape, 8, ["q_proj", "v_proj"]) == 8 * ((576 + 576) + (576 + 192)) * 30
    assert estimates.lora_params(shape, 8, ["q_proj"], layers=[0, 1]) == 8 * 1152 * 2
    assert estimates.reft_params(576, 4, 3, "l1", True) == (2 * 576 * 4 + 4) * 3
    assert estimates.reft_params(576, 4, 3, "f7+l7", False) == 2 * (2 * 576 * 4 + 4) * 3
    assert estimates.reft_params(576, 4, 3, "f7+l7", True) == (2 * 576 * 4 + 4) * 3
    assert StageSettings(batch_size=8).optimizer_steps(64) == 8
    assert StageSettings(epochs=2, batch_size=16, grad_accum=2).optimizer_steps(9427) == 590
    text = forms.estimate_markdown(forms.preset_form(forms.PRESET_QUICK))
    assert "460,800" in text and "13,836" in text and "**4 epochs**" in text
    assert "128 × 3" in text and "128 × 1" in text


def test_model_shape_reads_a_local_model(tiny_model):
    shape = estimates.model_shape(tiny_model)
    assert shape["num_layers"] == 4 and shape["hidden_size"] == 64
    assert shape["linear"]["q_proj"] == (64, 64) and shape["linear"]["k_proj"] == (64, 32)
    form = dict(forms.default_form(), model=tiny_model, **{"reft.layers": "0,1"})
    assert "| HEFT | lora |" in forms.estimate_markdown(form)


def test_estimate_reports_unreadable_model(tmp_path):
    text = forms.estimate_markdown(dict(forms.default_form(), model=str(tmp_path / "nope")))
    assert text.startswith("*Estimate unavailable:*") and "Model problem" in text


# --------------------------------------------------------------------------- tables, charts, compare


def fake_run(run_id, method="heft", status="completed", signature="sig", accuracy=0.75, **extra):
    config = RunConfig(method=method).to_dict()
    values = dict(
        id=run_id, name=f"run {run_id}", status=status, method=method, base_model="embedded", data_source="synthetic",
        eval_signature=signature, config=config, accuracy=accuracy, accuracy_low=accuracy - 0.1 if accuracy else None,
        accuracy_high=accuracy + 0.1 if accuracy else None, eval_n=20, trainable_params=1000, train_seconds=12.0,
        tokens_per_second=100.0, created_at=None, started_at=None, finished_at=None, progress={}, error=None,
        cancel_requested=False, trainable_params_by_stage={"lora": 600, "reft": 400}, artifact_dir=None,
    )
    values.update(extra)
    return SimpleNamespace(**values)


def test_runs_frame_and_progress():
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    running = fake_run(2, status="running", accuracy=None, started_at=now - timedelta(seconds=90), created_at=now,
                       progress={"stage": "reft", "epoch": 1.5, "step": 6, "total_steps": 8, "eta_seconds": 30,
                                 "loss": 0.5})
    frame = present.runs_frame([running, fake_run(1, method="lora")], now=now)
    assert list(frame.columns) == present.RUN_COLUMNS and list(frame["id"]) == [2, 1]
    assert frame.iloc[1]["accuracy [95% CI]"] == "75.0% [65.0, 85.0] (logits)"
    assert frame.iloc[0]["duration"] == "1 min 30 s"
    generation = fake_run(3, method="lora", config={"scoring": "generation"})
    assert present.runs_frame([generation])["accuracy [95% CI]"][0] == "75.0% [65.0, 85.0] (generation)"
    assert frame.iloc[0]["epochs"] == "1+1" and frame.iloc[1]["epochs"] == "1"
    text = present.progress_markdown(running, now=now)
    assert "step 6/8 (75%)" in text and "ETA 30 s" in text and "stage **reft**" in text
    failed = fake_run(3, status="failed", error="DataError: no such file")
    assert "no such file" in present.progress_markdown(failed)
    assert service.filter_args("all", "heft", "  x ") == {"status": None, "method": "heft", "text": "x"}


def test_chart_frames():
    metrics = [{"id": i, "step": i, "loss": 1.0 / i, "stage": "lora" if i < 3 else "reft"} for i in range(1, 5)]
    frame = present.loss_frame(metrics + [{"id": 9, "step": 9, "loss": None, "stage": "reft"}])
    assert list(frame.columns) == ["step", "loss", "stage"] and len(frame.dropna()) == 4
    evals = [{"stage": "lora", "epoch": 1, "cumulative_epoch": 1.0, "accuracy": 0.6, "accuracy_low": 0.5,
              "accuracy_high": 0.7}]
    assert present.eval_frame(evals).dropna().iloc[0].tolist() == [1.0, 60.0, "lora", 50.0, 70.0, "logits"]
    by_generation = [dict(evals[0], scoring="generation")]  # the tooltip says which scoring made the point
    assert present.eval_frame(by_generation).dropna().iloc[0]["scoring"] == "generation"
    big = [{"id": i, "step": i, "loss": 1.0, "stage": "lora"} for i in range(1, 5001)]
    thinned = present.loss_frame(big)
    assert len(thinned.dropna()) <= 2001 and thinned.iloc[-1]["step"] == 5000
    # A run in its LoRA stage already names "reft" (no value): Gradio fixes a plot's colours at its
    # first render, and a stage first seen in an update (or in another run) would not be drawn.
    early = present.loss_frame(metrics[:2])
    assert list(early["stage"]) == ["lora", "reft", "lora", "lora"]
    assert early["loss"].isna().tolist() == [True, True, False, False]
    assert list(present.eval_frame(evals)["stage"]) == ["base", "lora", "reft", "lora"]
    assert present.loss_frame([]).empty


def test_compare_runs_verdicts():
    uids = [f"q{i}" for i in range(40)]
    heft = {u: i % 5 != 0 for i, u in enumerate(uids)}  # 32 right
    lora = {u: i % 4 != 0 for i, u in enumerate(uids)}  # 30 right
    runs = [fake_run(1, "heft"), fake_run(2, "lora"), fake_run(3, "reft", signature="other")]
    metrics = {1: [{"step": 1, "loss": 0.7, "stage": "lora"}], 2: [{"step": 1, "loss": 0.8, "stage": "lora"}], 3: []}
    evals = {1: [{"stage": "lora", "epoch": 1, "cumulative_epoch": 1, "accuracy": 0.8, "accuracy_low": 0.7,
                  "accuracy_high": 0.9}]}
    result = present.compare_runs(runs, metrics, evals, {1: heft, 2: lora, 3: lora})
    comparison = paired_comparison(heft, lora)
    first = result["verdicts"][0]
    assert first.startswith("#1 HEFT (1+1 ep) vs #2 LoRA (1 ep): +5.0 points")
    assert f"{comparison.a_only} vs {comparison.b_only} discordant questions" in first and "McNemar p = " in first
    assert first.endswith("not significant")
    assert "not comparable" in result["verdicts"][1] and "not comparable" in result["verdicts"][2]
    assert len(result["pairs"]) == 3 and len(result["table"]) == 3
    assert set(result["loss"]["run"]) == {"#1 HEFT (1+1 ep)", "#2 LoRA (1 ep)"}
    figure = present.accuracy_figure(result["accuracy"], result["colors"])
    assert figure is not None
    # one error-bar series per run that has evaluations, in that run's colour
    assert figure.axes[0].get_legend_handles_labels()[1] == ["#1 HEFT (1+1 ep)"]
    assert "4 questions net" in present.paper_context() or "+4 questions" in present.paper_context()


def test_answer_cards_and_payloads(tmp_path):
    results = [{"slot": s, "title": s, "subtitle": "", "answer": "yes" if s != "reft" else "no", "p_yes": 0.7,
                "latency_seconds": 0.01}
               for s in ("base", "lora", "reft")] + [{"slot": "heft", "title": "HEFT", "error": "no HEFT run picked"}]
    page = present.answer_cards_html(results, gold=True)
    assert page.count("class='heft-card ") == 4 and page.count("✓") == 2 and page.count("✗") == 1
    assert "Gold answer: <b>yes</b>" in page
    assert len(service.parse_config_payload(json.dumps({"configs": [{"method": "lora"}, {"method": "reft"}]}))) == 2
    for bad, option in (("[1]", "config_json"), ("{", "config_json"), ('{"configs": []}', "configs"),
                        ('{"nope": 1}', "nope")):
        with pytest.raises(ConfigError) as info:
            service.parse_config_payload(bad)
        assert info.value.option == option
    source = tmp_path / "mine.csv"
    source.write_text("question,passage,answer\nq,p,true\n")
    stored = service.save_upload(str(source), tmp_path / "uploads")
    assert stored.parent == tmp_path / "uploads" and stored.read_text() == source.read_text()
    with pytest.raises(ValueError):
        service.save_upload(str(tmp_path / "x.txt"), tmp_path / "uploads")


# --------------------------------------------------------------------------- the API through gradio_client


def tiny_config(model: str, data: str, method: str = "lora") -> dict:
    return {
        "method": method, "model": model, "data": data, "train_size": 16, "eval_size": 16, "max_length": 64, "seed": 1,
        "lora": {"rank": 2, "target_modules": ["q_proj", "v_proj"]},
        "reft": {"rank": 2, "layers": [1, 2], "positions": "l1"},
        "lora_stage": {"epochs": 1, "learning_rate": 0.01, "batch_size": 4},
        "reft_stage": {"epochs": 1, "learning_rate": 0.01, "batch_size": 4},
    }


def test_api_queue_list_detail_cancel(app_client, tiny_model, data_dir):
    client, engine, _ = app_client
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/start_run", "/cancel_run", "/list_runs", "/run_detail", "/ask"} <= set(endpoints)
    started = client.predict(json.dumps(tiny_config(tiny_model, data_dir)), api_name="/start_run")
    assert list(started) == ["run_ids"] and len(started["run_ids"]) == 1
    batch = {"configs": [tiny_config(tiny_model, data_dir, m) for m in ("lora", "reft", "heft")]}
    batch_ids = client.predict(json.dumps(batch), api_name="/start_run")["run_ids"]
    assert len(batch_ids) == 3
    runs = client.predict("", api_name="/list_runs")
    assert [r["id"] for r in runs] == sorted(batch_ids + started["run_ids"], reverse=True)
    assert {r["status"] for r in runs} == {"queued"} and len({r["batch_id"] for r in runs if r["id"] in batch_ids}) == 1
    assert client.predict("completed", api_name="/list_runs") == []
    bad_filter = client.predict("bogus", api_name="/list_runs")  # one error shape for every endpoint
    assert isinstance(bad_filter, dict) and list(bad_filter) == ["error"]
    assert "unknown status 'bogus'" in bad_filter["error"]
    detail = client.predict(started["run_ids"][0], api_name="/run_detail")
    assert detail["status"] == "queued" and detail["config"]["model"] == tiny_model and detail["metrics"] == []
    # Errors are messages, never tracebacks.
    assert client.predict("abc", api_name="/cancel_run") == {"error": "run id must be a positive integer, got 'abc'"}
    assert client.predict(9999, api_name="/cancel_run")["error"] == "run 9999 does not exist"
    assert "error" in client.predict(-1, api_name="/run_detail")
    bad_config = dict(tiny_config(tiny_model, data_dir), reft={"layers": [7]}, method="reft")
    bad = client.predict(json.dumps(bad_config), api_name="/start_run")
    assert "reft.layers" in bad["error"] and "0..3" in bad["error"]
    no_model = client.predict(json.dumps(tiny_config("/no/such/model", data_dir)), api_name="/start_run")
    assert "no such local directory" in no_model["error"]
    first = started["run_ids"][0]
    assert client.predict(first, api_name="/cancel_run") == {"run_id": first, "status": "cancelled"}
    assert "error" in client.predict("p", "q", "[9999]", api_name="/ask")
    assert "queued" in client.predict("p", "q", json.dumps([batch_ids[0]]), api_name="/ask")["error"]


def test_api_trains_and_answers(app_client, tiny_model, data_dir):
    from app.worker import Worker

    client, engine, home = app_client
    worker = Worker(home / "heft.db", slots=[None], poll_seconds=0.2, heartbeat_seconds=1.0)
    thread = worker.start_in_thread()
    try:
        ids = client.predict(json.dumps(tiny_config(tiny_model, data_dir, "heft")), api_name="/start_run")["run_ids"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses = {r["id"]: r["status"] for r in client.predict("", api_name="/list_runs")}
            if all(statuses[i] in TERMINAL_STATUSES for i in ids):
                break
            time.sleep(0.5)
        assert [statuses[i] for i in ids] == ["completed"]
        detail = client.predict(ids[0], api_name="/run_detail")
        assert detail["accuracy"] is not None and detail["metrics"]
        assert [e["stage"] for e in detail["evals"]] == ["lora", "reft"]
        answer = client.predict("the river town", "is the bird red", json.dumps({"heft": ids[0]}), api_name="/ask")
        assert [a["slot"] for a in answer["answers"]] == ["base", "heft"] and answer["answers"][1]["run_id"] == ids[0]
        by_list = client.predict("the river town", "is the bird red", json.dumps([ids[0]]), api_name="/ask")
        assert by_list["answers"][1]["slot"] == "heft"
        assert all(a["answer"] in ("yes", "no") and 0 <= a["p_yes"] <= 1 for a in answer["answers"])
        assert "enter a question" in client.predict("p", "", "[]", api_name="/ask")["error"]
    finally:
        worker.stop()
        thread.join(timeout=30)


def test_auth_from_environment():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("heft_app_main", Path(__file__).resolve().parent.parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_auth(None) is None and module.parse_auth(" ") is None
    assert module.parse_auth("ann:pw1, bob:p:w") == [("ann", "pw1"), ("bob", "p:w")]
    with pytest.raises(SystemExit):
        module.parse_auth("nopassword")
