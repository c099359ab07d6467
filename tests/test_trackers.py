"""Tracker reporting: a tiny-Llama run logged to Trackio (local), TensorBoard, W&B (offline) and MLflow (file
store), read back through each tracker's own reader; a study grouped by study/arm/seed; failing trackers."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from heft_common.errors import ConfigError
from heft_core.config import ReportSettings
from heft_core.trackers import TRACKERS_FILE, read_trackers_file
from heft_core.train import train
from tests.conftest import quick_config

STEP_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate",
             "tokens_per_second": "train/tokens_per_second"}


@pytest.fixture
def tracker_homes(tmp_path, monkeypatch):
    """Every tracker's home and cache inside tmp_path."""
    import trackio.sqlite_storage
    import trackio.utils

    trackio_dir = tmp_path / "trackio"
    trackio_dir.mkdir()
    monkeypatch.setenv("TRACKIO_DIR", str(trackio_dir))
    # trackio reads TRACKIO_DIR when first imported: point the already imported modules there too.
    for module in (trackio.utils, trackio.sqlite_storage):
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", trackio_dir)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def _registry(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((run_dir / "evals.json").read_text())
    return steps, evals, json.loads((run_dir / "run.json").read_text())["result"]


def _eval_steps(steps: list[dict], evals: list[dict]) -> list[int]:
    """The step each evaluation is logged at: the last step of its epoch (the registry's cumulative epochs)."""
    per_stage_epoch_end = {}
    for step in steps:
        per_stage_epoch_end[(step["stage"], int(-(-step["epoch"] // 1)))] = step["step"]
    return [per_stage_epoch_end[(e["stage"], e["epoch"])] for e in evals]


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``), decoded with wandb's own protobuf schema.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of
    chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path) -> tuple[list[dict], object]:
    rows, run = [], None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "run":
            run = record.run
    return rows, run


def test_a_run_reports_the_registrys_numbers_to_every_tracker(tiny_model, easy_data, tracker_homes):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio import SQLiteStorage

    mlflow_uri = (tracker_homes / "mlruns").as_uri()
    report = ReportSettings(report_to=["trackio", "tensorboard", "wandb", "mlflow"], project="heft-tests",
                            wandb_mode="offline", mlflow_tracking_uri=mlflow_uri)
    # scoring "both": the final evaluation is also scored by generation, logged under its own name
    config = quick_config(tiny_model, "heft", name="tracked", report=report, scoring="both")
    run_dir = tracker_homes / "run"
    said: list[str] = []

    class Log:
        def __getattr__(self, name):
            return (lambda *a: said.append(a[0])) if name == "on_log" else (lambda *a: None)

    result = train(config, run_dir, data=easy_data, callbacks=[Log()])
    assert result.status == "completed"
    assert not [line for line in said if line.startswith("tracker")], said
    steps, evals, final = _registry(run_dir)
    assert len(steps) == 8 and [e["cumulative_epoch"] for e in evals] == [1, 2]
    assert all(e["yes_share"] is not None for e in evals)
    eval_steps = _eval_steps(steps, evals)
    state = read_trackers_file(run_dir)
    assert {name: entry["status"] for name, entry in state.items()} == dict.fromkeys(report.report_to, "closed")

    # TensorBoard: the event files through tensorboard's own reader.
    events = EventAccumulator(state["tensorboard"]["log_dir"])
    events.Reload()
    for key, tag in STEP_KEYS.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (s["step"], pytest.approx(s[key], rel=1e-6)) for s in steps]
    assert [e.value for e in events.Scalars("train/stage")] == [1.0 if s["stage"] == "lora" else 2.0 for s in steps]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [
        (step, pytest.approx(e["accuracy"])) for step, e in zip(eval_steps, evals)]
    assert [e.value for e in events.Scalars("eval/yes_share")] == [pytest.approx(e["yes_share"]) for e in evals]
    assert events.Scalars("final/accuracy")[0].value == pytest.approx(final["accuracy"])
    assert events.Scalars("final/trainable_params")[0].value == final["trainable_params"]
    [generation] = [e for e in evals if e.get("generation_accuracy") is not None]  # the final evaluation only
    assert [(e.step, e.value) for e in events.Scalars("eval/generation_accuracy")] == [
        (eval_steps[-1], pytest.approx(generation["generation_accuracy"]))]
    assert events.Scalars("final/generation_accuracy")[0].value == pytest.approx(generation["generation_accuracy"])
    assert events.Scalars("final/logits_accuracy")[0].value == pytest.approx(final["accuracy"])
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")

    # MLflow: MlflowClient on the file store.
    client = MlflowClient(tracking_uri=mlflow_uri)
    run_id = state["mlflow"]["id"]
    for key, tag in STEP_KEYS.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
        assert history == [(s["step"], pytest.approx(s[key])) for s in steps]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy_low")) == [
        (step, pytest.approx(e["low"])) for step, e in zip(eval_steps, evals)]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["lora.rank"] == "4" and mlflow_run.data.params["method"] == "heft"
    assert mlflow_run.data.metrics["final/accuracy"] == pytest.approx(final["accuracy"])
    assert 0 < mlflow_run.data.metrics["final/majority_accuracy"] <= 1

    # Trackio: its local SQLite store.
    logs = SQLiteStorage.get_logs("heft-tests", state["trackio"]["name"])
    train_logs = [row for row in logs if "train/loss" in row]
    assert [(row["step"], row["train/loss"]) for row in train_logs] == [
        (s["step"], pytest.approx(s["loss"])) for s in steps]
    assert [(row["step"], row["eval/accuracy"]) for row in logs if "eval/accuracy" in row] == [
        (step, pytest.approx(e["accuracy"])) for step, e in zip(eval_steps, evals)]
    assert SQLiteStorage.get_run_config("heft-tests", state["trackio"]["name"])["lora.rank"] == 4

    # W&B offline: the run file the offline run wrote.
    [run_file] = (tracker_homes / "wandb_dir").glob(f"wandb/offline-run-*-{state['wandb']['id']}/run-*.wandb")
    rows, wandb_run = wandb_history(run_file)
    train_rows = [row for row in rows if "train/loss" in row]
    assert [(row["global_step"], row["train/loss"]) for row in train_rows] == [
        (s["step"], pytest.approx(s["loss"])) for s in steps]
    assert [(row["global_step"], row["eval/accuracy"]) for row in rows if "eval/accuracy" in row] == [
        (step, pytest.approx(e["accuracy"])) for step, e in zip(eval_steps, evals)]
    assert [row["final/accuracy"] for row in rows if "final/accuracy" in row] == [pytest.approx(final["accuracy"])]
    assert wandb_run.display_name == "tracked"
    assert json.loads({item.key: item.value_json for item in wandb_run.config.update}["lora.rank"]) == 4


def test_failing_trackers_leave_the_run_completed_with_one_warning(tiny_model, easy_data, tracker_homes,
                                                                   monkeypatch, unused_port):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{unused_port}")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    report = ReportSettings(report_to=["wandb", "mlflow"], wandb_mode="online", mlflow_tracking_uri="bogus://nowhere")
    said: list[str] = []

    class Log:
        def __getattr__(self, name):
            return (lambda *a: said.append(a[0])) if name == "on_log" else (lambda *a: None)

    run_dir = tracker_homes / "run"
    result = train(quick_config(tiny_model, "lora", report=report), run_dir, data=easy_data, callbacks=[Log()])
    assert result.status == "completed" and result.accuracy is not None
    warnings = [line for line in said if line.startswith("tracker")]
    assert len([w for w in warnings if w.startswith("tracker wandb")]) == 1, warnings
    assert len([w for w in warnings if w.startswith("tracker mlflow")]) == 1, warnings
    state = json.loads((run_dir / TRACKERS_FILE).read_text())
    assert state["mlflow"]["status"] == state["wandb"]["status"] == "off"
    assert "bogus" in state["mlflow"]["warning"]


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_study_groups_its_runs_by_study_arm_and_seed(tiny_model, easy_data, tracker_homes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio import SQLiteStorage

    from heft_core.study_runner import run_study_in_process

    spec = _tiny_study(tiny_model, tracker_homes)
    run_study_in_process(spec, tracker_homes / "study", progress=False, data=easy_data, resamples=10)
    runs = sorted((tracker_homes / "study" / "runs").iterdir())
    assert len(runs) == 2
    for run_dir, seed in zip(runs, (1, 2)):
        state = read_trackers_file(run_dir)
        assert state["tensorboard"]["log_dir"] == str(tracker_homes / "tb" / "grouped" / run_dir.name)
        events = EventAccumulator(state["tensorboard"]["log_dir"])
        events.Reload()
        assert events.Scalars("train/loss")
        config = SQLiteStorage.get_run_config("heft-study", state["trackio"]["name"])
        cell = (config["_Group"], config["study"], config["arm"], config["seed"])
        assert cell == ("grouped", "grouped", spec.arms[0].name, str(seed))


def _tiny_study(tiny_model, tracker_homes):
    from heft_core.study import StudySpec

    base = {key: value for key, value in quick_config(tiny_model, "lora").to_dict().items()
            if key not in ("method", "seed", "name", "lora_stage", "reft_stage")}
    base["lora_stage"] = {"learning_rate": 1e-2, "batch_size": 8, "warmup_ratio": 0.0}
    base["report"] = {"report_to": ["trackio", "tensorboard"], "project": "heft-study",
                      "tensorboard_dir": str(tracker_homes / "tb")}
    return StudySpec.from_dict({"name": "grouped", "seeds": [1, 2], "arms": [{"method": "lora", "lora_epochs": 1}],
                                "base": base})


def test_a_bad_tracker_name_is_refused_naming_the_option():
    from heft_core import cli

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--report-to", "trackio,neptune", "-o", "out"])
    with pytest.raises(ConfigError) as info:
        cli.config_from_args(args)
    assert info.value.option == "report.report_to" and "neptune" in str(info.value)
    args = parser.parse_args(["train", "--report-to", "trackio,tensorboard", "--set", "report.project=mine", "-o", "o"])
    config = cli.config_from_args(args)
    assert (config.report.report_to, config.report.project) == (["trackio", "tensorboard"], "mine")
    with pytest.raises(ConfigError) as info:
        ReportSettings(wandb_mode="sometimes")
    assert info.value.option == "report.wandb_mode"


def test_the_form_refuses_a_bad_tracker_naming_the_option():
    from app import forms

    form = dict(forms.default_form(), **{"report.report_to": ["tensorboard", "neptune"]})
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(form)
    assert info.value.option == "report.report_to"
    assert "report.report_to" in forms.field_errors(form)["report.report_to"]
    [config] = forms.form_to_configs(dict(forms.default_form(), **{"report.report_to": ["trackio", "wandb"]}))
    assert config.report.report_to == ["trackio", "wandb"]


def test_the_run_view_keeps_a_tracker_warning_in_sight(tmp_path):
    from types import SimpleNamespace

    from app import service
    from app.logs import LOG_FILE

    (tmp_path / LOG_FILE).write_text("\n".join(f"step {i}" for i in range(100)))
    warning = "tracker mlflow is off for this run (MlflowException: bad URI); the run trains on without it"
    (tmp_path / TRACKERS_FILE).write_text(json.dumps({"mlflow": {"status": "off", "warning": warning}}))
    shown = service.run_log(SimpleNamespace(artifact_dir=str(tmp_path), status="running"))
    assert shown.splitlines()[0] == warning and shown.splitlines()[-1] == "step 99"


def test_a_resumed_run_continues_the_same_tracker_runs(tiny_model, easy_data, tracker_homes):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from heft_core.callbacks import TrainerCallback

    class StopAt(TrainerCallback):
        def __init__(self, step: int):
            self.step, self.at = 0, step

        def on_step(self, event):
            self.step = event.step

        def should_stop(self):
            return self.step == self.at

    mlflow_uri = (tracker_homes / "mlruns").as_uri()
    report = ReportSettings(report_to=["tensorboard", "wandb", "mlflow"], wandb_mode="offline",
                            mlflow_tracking_uri=mlflow_uri)
    config = quick_config(tiny_model, "lora", report=report)
    run_dir = tracker_homes / "run"
    assert train(config, run_dir, data=easy_data, callbacks=[StopAt(3)]).status == "cancelled"
    first = read_trackers_file(run_dir)
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(first["mlflow"]["id"]).info.status == "KILLED"
    assert train(config, run_dir, data=easy_data, resume=True).status == "completed"
    again = read_trackers_file(run_dir)
    assert (again["wandb"]["id"], again["mlflow"]["id"]) == (first["wandb"]["id"], first["mlflow"]["id"])
    assert {entry["status"] for entry in [*first.values(), *again.values()]} == {"closed"}
    steps, _, _ = _registry(run_dir)
    events = EventAccumulator(again["tensorboard"]["log_dir"])
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (s["step"], pytest.approx(s["loss"], rel=1e-6)) for s in steps]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(again["mlflow"]["id"]).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(again["mlflow"]["id"], "train/loss")} == {
        s["step"] for s in steps}
