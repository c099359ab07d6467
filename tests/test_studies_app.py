"""Studies in the app: plan before launch, queue through the API, train with the real worker, report from the rows."""
from __future__ import annotations

import html
import json
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from scipy.stats import binomtest

from app import studies
from heft_core.stats import one_class
from heft_core.study import StudySpec
from storage import queries
from storage.db import open_db

ARMS = [
    {"method": "base"}, {"method": "lora", "lora_epochs": 1}, {"method": "heft", "lora_epochs": 1, "reft_epochs": 1},
]


def tiny_spec(model: str, data: str, **fields) -> dict:
    spec = {
        "name": "tiny <app> study", "arms": ARMS, "seeds": [1, 2],
        "base": {
            "model": model, "data": data, "train_size": 16, "eval_size": 16, "max_length": 48, "precision": "no",
            "lora.rank": 2, "lora.target_modules": ["q_proj", "v_proj"], "reft.rank": 2, "reft.layers": [1, 2],
            "reft.positions": "l1", "lora_stage.learning_rate": 3e-3, "reft_stage.learning_rate": 3e-3,
            "lora_stage.batch_size": 4, "reft_stage.batch_size": 4,
        },
    }
    spec.update(fields)
    return spec


def test_presets_fill_the_editor_and_the_plan_warns_when_the_evaluation_is_small() -> None:
    for title in studies.PRESET_TITLES:
        text = studies.preset_text(title)
        assert StudySpec.from_text(text).to_dict() == yaml.safe_load(text)
    plan = studies.plan_markdown(studies.preset_text("CPU: learns on BoolQ"))
    assert "**3 runs** planned: 3 arms × 1 seed." in plan and "500 evaluation questions" in plan
    assert "⚠️" in plan and "4.0 points" in plan  # 500 questions cannot see a 3-point difference
    assert "All runs one after another: **about" in plan and "estimated from the model" in plan  # nothing measured yet
    small = dict(yaml.safe_load(studies.preset_text("Equal budget")), base={"data": "hub", "eval_size": 3000})
    assert "⚠️" not in studies.plan_markdown(json.dumps(small))
    bad = html.unescape(studies.plan_markdown("name: x\narms: [{method: lora}]\nseeds: [1]"))
    assert bad.startswith("⚠️") and "arms[0].lora_epochs" in bad
    assert "seeds" in studies.plan_markdown("name: x\narms: [{method: base}]\nseeds: []")
    named = studies.plan_markdown("name: x\narms: [{method: base, name: 'b <i>'}]")
    assert "<i>" not in named and "b <i>" in html.unescape(named)


def test_the_plan_estimate_rests_on_this_machines_finished_runs(tmp_path) -> None:
    from heft_core.config import RunConfig

    engine = open_db(tmp_path / "heft.db")
    text = studies.preset_text("CPU: learns on BoolQ")
    assumed = studies.plan_summary(StudySpec.from_text(text))["seconds"]
    config = RunConfig.from_dict({"method": "lora", "model": "embedded"})
    run = queries.create_run(engine, name="measured", method="lora", config=config.to_dict(), base_model="embedded",
                             data_source="synthetic", total_epochs=1)
    assert queries.claim_next_run(engine, worker_pid=1) is not None
    queries.finish_run(engine, run.id, "completed", results={"tokens_per_second": 30.0, "train_seconds": 60.0})
    plan = html.unescape(studies.plan_markdown(text, engine))
    assert f"from this machine's measured speeds (runs #{run.id})" in plan
    from app import timing

    measured = studies.plan_summary(StudySpec.from_text(text), timing.measured_speeds(engine, "embedded"))["seconds"]
    assert measured > assumed  # LoRA measured at a quarter of the assumed 120 tokens/s


def test_bad_specs_queue_nothing(tmp_path, tiny_model, data_dir) -> None:
    engine = open_db(tmp_path / "heft.db")
    for spec, field in (
        (tiny_spec(tiny_model, data_dir, grid={"lora.rnak": [2, 4]}), "grid.lora.rnak"),
        (tiny_spec(tiny_model, data_dir, seeds=[]), "seeds"),
        (dict(tiny_spec(tiny_model, data_dir), base={**tiny_spec(tiny_model, data_dir)["base"], "reft.layers": [9]}),
         "reft.layers"),
        (tiny_spec(tiny_model, "/no/such/data"), "data"),
    ):
        answer = studies.start_study_payload(engine, json.dumps(spec))
        assert list(answer) == ["error"] and field in answer["error"], (field, answer)
    assert studies.start_study_payload(engine, "{not yaml: [")["error"].startswith("Invalid option spec")
    assert queries.list_studies(engine) == [] and queries.list_runs(engine) == []
    assert studies.study_report_payload(engine, 99) == {"error": "Error — study 99 does not exist"}
    assert "error" in studies.cancel_study_payload(engine, "x")


def test_matrix_and_cancel_before_the_worker_starts(tmp_path, tiny_model, data_dir) -> None:
    engine = open_db(tmp_path / "heft.db")
    study, run_ids = studies.start_study(engine, yaml.safe_dump(tiny_spec(tiny_model, data_dir)), "renamed")
    assert study.name == "renamed" and len(run_ids) == 6
    view = studies.study_view(engine, study.id)
    assert view["active"] and list(view["matrix"].columns) == ["arm", "seed 1", "seed 2"]
    assert view["matrix"]["arm"].tolist() == ["Base", "LoRA 1", "HEFT 1+1"]
    assert set(view["matrix"].iloc[:, 1:].values.ravel()) == {"… queued"}
    outcome = studies.cancel_study_payload(engine, study.id)
    assert set(outcome["runs"].values()) == {"cancelled"} and len(outcome["runs"]) == 6
    view = studies.study_view(engine, study.id)
    assert not view["active"] and "cancelled by the user" in view["status"]
    report = studies.study_report_payload(engine, study.id)
    assert report["finished_runs"] == 0 and len(report["missing"]) == 6


# --------------------------------------------------------------------------- through the API and the real worker


def _predictions(run) -> list[dict]:
    with open(Path(run.artifact_dir) / "predictions.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_a_study_through_the_api_and_the_worker_reports_the_stored_numbers(app_client, tiny_model, data_dir):
    from app.worker import Worker

    client, engine, home = app_client
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/start_study", "/study_report", "/cancel_study"} <= set(endpoints)
    bad = client.predict(json.dumps(tiny_spec(tiny_model, data_dir, seeds=[0, 0])), api_name="/start_study")
    assert "seeds" in bad["error"]
    started = client.predict(yaml.safe_dump(tiny_spec(tiny_model, data_dir)), api_name="/start_study")
    assert set(started) == {"study_id", "run_ids"} and len(started["run_ids"]) == 6
    study_id = started["study_id"]
    worker = Worker(home / "heft.db", slots=[None], poll_seconds=0.2, heartbeat_seconds=1.0)
    thread = worker.start_in_thread()
    try:
        deadline = time.monotonic() + 600
        while studies.study_view(engine, study_id)["active"]:
            assert time.monotonic() < deadline, queries.study_status_counts(engine, study_id)
            time.sleep(0.5)
    finally:
        worker.stop()
        thread.join(timeout=60)

    rows = queries.study_runs(engine, study_id)
    assert [r.id for r in rows] == started["run_ids"] and {r.status for r in rows} == {"completed"}, \
        [(r.id, r.status, r.error) for r in rows]
    assert {(r.arm, r.seed) for r in rows} == {(a, s) for a in ("Base", "LoRA 1", "HEFT 1+1") for s in (1, 2)}
    matrix = studies.study_view(engine, study_id)["matrix"]
    assert all(cell.startswith("✓ ") and cell.endswith("%") for cell in matrix.iloc[:, 1:].values.ravel())

    report = client.predict(study_id, api_name="/study_report")
    assert report["planned_runs"] == report["finished_runs"] == 6 and report["missing"] == []
    assert report["status_counts"] == {"completed": 6}
    # Recompute from the stored predictions: accuracy, majority answer, each run against it (exact McNemar).
    stored = {r.id: _predictions(r) for r in rows}
    gold = {p["uid"]: p["label"] for p in stored[rows[0].id]}
    assert all({p["uid"]: p["label"] for p in preds} == gold for preds in stored.values()) and len(gold) == 16
    yes = sum(gold.values())
    majority_answer = 1 if yes >= len(gold) - yes else 0
    assert report["majority"]["correct"] == max(yes, len(gold) - yes)
    by_id = {r["run_id"]: r for r in report["runs"]}
    for run in rows:
        preds, row = stored[run.id], by_id[run.id]
        assert row["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 16)
        assert row["accuracy"] == pytest.approx(run.accuracy)
        run_only = sum(1 for p in preds if p["correct"] and p["label"] != majority_answer)
        majority_only = sum(1 for p in preds if not p["correct"] and p["label"] == majority_answer)
        discordant = run_only + majority_only
        expected = binomtest(min(run_only, majority_only), discordant).pvalue if discordant else 1.0
        assert row["vs_majority_p"] == pytest.approx(expected)
        assert row["yes_share"] == pytest.approx(sum(p["predicted"] for p in preds) / 16)
    for arm in report["arms"]:
        accuracies = [by_id[r.id]["accuracy"] for r in rows if r.arm == arm["arm"]]
        assert arm["seeds_finished"] == 2 and arm["accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    assert {(c["a"], c["b"]) for c in report["contrasts"]} == {("HEFT 1+1", "LoRA 1")}
    assert all(c["verdict"] for c in report["contrasts"])
    # Work done once: each HEFT run trained stage 2 on its seed's LoRA run (same stage 1), in the worker's path too.
    lora_dirs = {r.seed: Path(r.artifact_dir).name for r in rows if r.method == "lora"}
    for run in (r for r in rows if r.method == "heft"):
        shared = json.loads((Path(run.artifact_dir) / "shared_stage1.json").read_text())
        assert shared["from"] == lora_dirs[run.seed] and shared["stage1_seconds"] > 0
        assert by_id[run.id]["stage1_from"] == lora_dirs[run.seed]
        assert "training stage 2 only" in (Path(run.artifact_dir) / "train.log").read_text()

    # The report directory under the data home, and its zip, hold the tables, charts and predictions.
    directory = Path(report["report_dir"])
    assert directory == home / "studies" / str(study_id) / "report"
    archive = studies.zip_report(directory, study_id)
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"results.md", "results.csv", "results.json", "spec.yaml", "predictions.csv",
            "accuracy_vs_epochs.png", "frontier_flops.png"} <= names
    assert queries.get_study(engine, study_id).report_dir == str(directory)
    cancelled = client.predict(study_id, api_name="/cancel_study")
    assert cancelled["runs"] == {str(i): "completed" for i in started["run_ids"]}  # finished runs keep their status
    assert "error" in client.predict(12345, api_name="/cancel_study")

    # Compare: the majority baseline as a row and a line; one-class runs flagged there and in the Runs table.
    from app import present, service

    flagged = {r.id: one_class([p["predicted"] for p in stored[r.id]]) for r in rows}
    compared = service.compare(engine, [r.id for r in rows])
    table = compared["table"]
    assert len(table) == 7 and table["run"].iloc[-1] == f"majority answer “{report['majority']['answer']}”"
    assert table["accuracy [95% CI]"].iloc[-1].startswith(f"{report['majority']['accuracy'] * 100:.1f}%")
    for index, run in enumerate(rows):
        assert ("⚠" in table["accuracy [95% CI]"].iloc[index]) == bool(flagged[run.id])
    figure = present.accuracy_figure(compared["accuracy"], compared["colors"], compared["majority"])
    assert any(list(line.get_ydata()) == [report["majority"]["accuracy"] * 100] * 2 for line in figure.axes[0].lines)
    frame, _, _ = service.runs_table(engine, "all", "all", "", None)
    marks = dict(zip(frame["id"], frame["accuracy [95% CI]"]))
    assert all(("⚠" in marks[r.id]) == bool(flagged[r.id]) for r in rows)
