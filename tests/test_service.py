"""What the UI and the API do, on a real database without a browser: the live view's re-render
decisions, the runs table, which run a page opens, Compare and Ask selections, and the payloads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from app import present, service
from app.logs import LOG_FILE
from storage import queries
from storage.db import open_db


@pytest.fixture
def engine(home):
    return open_db(home / "heft.db")


def queue(engine, name="r", method="lora", batch_id=None, **fields):
    return queries.create_run(engine, name=name, method=method, config={"lora_stage": {"epochs": 1}},
                              base_model="embedded", data_source="synthetic", batch_id=batch_id, **fields)


def step(n, stage="lora"):
    return {"stage": stage, "epoch": n / 10, "step": n, "loss": 1.0 / n, "learning_rate": 1e-3,
            "tokens_per_second": 100.0, "elapsed_seconds": float(n)}


def test_live_view_sends_only_what_changed(engine):
    run = queue(engine)
    queries.claim_next_run(engine, worker_pid=1)
    first = service.live_view(engine, run.id, None, full=True)
    assert first.send_loss and first.send_accuracy and first.send_config and first.send_log and first.keep_polling
    assert first.loss is None and first.accuracy is None  # no points yet: the plots' empty state
    assert first.actions == service.Actions(cancel=True, requeue=False, delete=False, download=False)
    # Nothing new: nothing re-rendered (a re-render resets zoom and scroll), the buttons left alone.
    quiet = service.live_view(engine, run.id, first.state, full=False)
    assert not (quiet.send_loss or quiet.send_accuracy or quiet.send_config) and quiet.actions is None
    assert quiet.state == first.state and quiet.keep_polling
    queries.add_step_metrics(engine, run.id, [step(1), step(2)])
    stepped = service.live_view(engine, run.id, quiet.state, full=False)
    assert stepped.send_loss and list(stepped.loss.dropna()["step"]) == [1, 2] and stepped.actions is None
    # The first evaluation changes the chart's limits: the chart is sent, and once more on the next tick.
    queries.add_epoch_eval(engine, run.id, {"stage": "lora", "epoch": 1, "cumulative_epoch": 1.0, "accuracy": 0.6,
                                            "accuracy_low": 0.5, "accuracy_high": 0.7, "n": 20})
    evaluated = service.live_view(engine, run.id, stepped.state, full=False)
    assert evaluated.send_accuracy and evaluated.accuracy_limits == ((0.0, 1.5), (45.0, 75.0))
    assert evaluated.state["resend_eval"]
    queries.finish_run(engine, run.id, "completed")
    resent = service.live_view(engine, run.id, evaluated.state, full=False)
    assert resent.send_accuracy and not resent.state["resend_eval"]
    assert resent.actions == service.Actions(cancel=False, requeue=False, delete=True, download=False)
    assert resent.keep_polling is False  # finished, and the chart is up to date: the timer stops
    # Another run is a full re-render, a missing one an explanation.
    other = queue(engine, name="other")
    assert service.live_view(engine, other.id, resent.state, full=False).send_config
    gone = service.live_view(engine, 999, resent.state, full=False)
    assert gone.progress == present.missing_run_message(999) and gone.state == service.EMPTY_LIVE_STATE
    assert not gone.keep_polling and gone.actions == service.Actions()


def test_run_log_tail_or_a_note(engine, tmp_path):
    run = queries.start_external_run(engine, worker_pid=1, name="outside", method="base", config={}, base_model="m",
                                     data_source="d")
    queries.set_artifact_dir(engine, run.id, tmp_path)
    queries.finish_run(engine, run.id, "completed")
    assert "trained outside the app's worker" in service.run_log(queries.get_run(engine, run.id))
    (tmp_path / LOG_FILE).write_text("\n".join(f"line {i}" for i in range(40)))
    text = service.run_log(queries.get_run(engine, run.id))
    assert text.splitlines() == [f"line {i}" for i in range(40 - service.LOG_LINES, 40)]


def test_runs_table_and_the_run_a_page_opens(engine):
    assert service.run_to_open(engine, None) == (None, False)
    first, second = queue(engine, "first run"), queue(engine, "second run")
    frame, signature, active = service.runs_table(engine, "all", "all", "", None)
    assert list(frame["id"]) == [second.id, first.id] and active
    assert service.runs_table(engine, "all", "all", "", signature)[0] is None  # unchanged: not re-sent
    assert service.runs_table(engine, "queued", "lora", " second ", signature)[0]["name"].tolist() == ["second run"]
    assert service.run_to_open(engine, str(first.id)) == (first.id, True)
    assert service.run_to_open(engine, "abc") == (second.id, False)  # newest
    queries.claim_next_run(engine, worker_pid=1)  # runs the oldest
    assert service.run_to_open(engine, None) == (first.id, False)  # the running one


def test_actions_by_status(tmp_path):
    def run(status, artifact_dir=None, failure_kind=None):
        return SimpleNamespace(id=1, status=status, artifact_dir=artifact_dir, failure_kind=failure_kind)

    assert service.run_actions(run("queued")) == service.Actions(cancel=True, delete=True)
    assert service.run_actions(run("running")) == service.Actions(cancel=True)
    for status in ("failed", "cancelled", "interrupted"):
        assert service.run_actions(run(status, str(tmp_path))) == service.Actions(requeue=True, resume=True,
                                                                                  delete=True, download=True)
    # a run that failed on its own options would fail the same way again: re-queue (edited) only, no resume
    assert service.run_actions(run("failed", str(tmp_path), "bad_input")) == service.Actions(requeue=True, delete=True,
                                                                                             download=True)
    assert service.run_actions(run("completed", str(tmp_path / "gone"))) == service.Actions(delete=True)
    assert service.run_actions(None) == service.Actions()


def fake(run_id, batch=None, signature=None, method="lora", model="embedded", data="synthetic"):
    return SimpleNamespace(id=run_id, batch_id=batch, eval_signature=signature, method=method, base_model=model,
                           data_source=data)


def test_compare_default_selection():
    runs = [fake(5, signature="s"), fake(4, batch="b"), fake(3, batch="b", signature="s"), fake(2)]
    assert service.latest_batch(runs) == [3, 5]  # the newest has no batch: same questions as the newest
    assert service.latest_batch([fake(3, "x"), fake(2, "x"), fake(1)]) == [2, 3]
    assert service.latest_batch([fake(9), fake(4, "b"), fake(3, "b")]) == [3, 4]
    assert service.latest_batch([fake(1)]) == [] and service.latest_batch([]) == []
    choices = [("five", 5), ("four", 4)]
    assert service.compare_selection([4, 7], choices, runs) == [4]  # 7 is gone
    assert service.compare_selection([7], choices, runs) == [3, 5]


def test_compare_loads_what_it_can(engine, tmp_path):
    runs = []
    for name in ("a", "b"):
        run = queries.start_external_run(engine, worker_pid=1, name=name, method="lora", config={},
                                         base_model="m", data_source="d")
        queries.finish_run(engine, run.id, "completed", results={"eval_signature": "same", "accuracy": 0.5})
        runs.append(run)
    queries.set_artifact_dir(engine, runs[1].id, tmp_path)  # a directory without run.json
    assert service.compare(engine, [runs[0].id]) is None and service.compare(engine, ["x", None]) is None
    result = service.compare(engine, [runs[0].id, str(runs[1].id), "junk"])
    assert len(result["table"]) == 2 and len(result["pairs"]) == 1
    assert result["verdicts"][0].endswith("not comparable: no artifact directory")
    reasons = service._correctness(queries.get_run(engine, runs[1].id))
    assert isinstance(reasons, str) and "predictions cannot be read" in reasons


def test_ask_picks_and_examples():
    runs = [fake(6, method="heft", model="/m/other"), fake(5, method="heft"), fake(4, method="reft"),
            fake(3, method="lora", model="Embedded"), fake(2, method="base")]
    for run in runs:
        run.accuracy, run.config = None, {}
    assert service.ask_defaults(runs) == {"heft": 6}  # all on the newest trained run's model
    assert service.ask_defaults(runs[1:]) == {"heft": 5, "reft": 4, "lora": 3}
    picks = service.ask_picks(runs[1:], {"heft": 5, "reft": 99, "lora": None})
    assert picks["heft"][1] == 5 and picks["reft"][1] == 4 and picks["lora"][1] == 3
    assert picks["lora"][0][0] == service.NO_RUN and [value for _, value in picks["heft"][0]] == [0, 5]
    sources = service.example_sources([fake(1, data="/x/mine.csv"), fake(2, data="synthetic")])
    assert sources[0] == "synthetic" and sources[-2:] == ["hub", "/x/mine.csv"]
    gold = {"passage": "p", "question": "q", "answer": True}
    assert service.gold_for(gold, "p", "q") is True and service.gold_for(gold, "p", "edited") is None
    assert service.gold_for(None, "p", "q") is None


def test_payloads(engine):
    run = queue(engine)
    assert service.cancel_run_payload(engine, "abc") == {"error": "run id must be a positive integer, got 'abc'"}
    assert service.run_detail_payload(engine, 42) == {"error": "run 42 does not exist"}
    assert "unknown status" in service.list_runs_payload(engine, "nope")["error"]
    assert [r["id"] for r in service.list_runs_payload(engine, "QUEUED")] == [run.id]
    assert service.start_run_payload(engine, "{")["error"].startswith("Invalid option config_json — not valid JSON")
    assert service.cancel_run_payload(engine, run.id) == {"run_id": run.id, "status": "cancelled"}
    detail = service.run_detail_payload(engine, run.id)
    assert detail["status"] == "cancelled" and detail["metrics"] == [] and detail["config"] == run.config
