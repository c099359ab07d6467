"""One run in several processes: ``processes`` > 1 trains data-parallel through ``accelerate launch``.

On CPU the processes talk over gloo. Two processes with a batch of 4 each make the same global
batch as one process with a batch of 4 and two accumulation steps (the loop gives process r the
batches r, r + 2, ... of the same seeded order), so they must reach the same losses step by step.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from app import service
from app.launch import training_command
from app.logs import LOG_FILE
from app.worker import Worker
from heft_common.errors import ConfigError
from heft_core.config import RunConfig, StageSettings
from heft_core.train import train
from storage import queries
from storage.db import open_db
from tests.tiny import make_config
from tests.waiting import wait_for


def stage(grad_accum: int) -> StageSettings:
    return StageSettings(epochs=1, learning_rate=1e-2, batch_size=4, grad_accum=grad_accum, warmup_ratio=0.0)


def test_two_processes_reach_the_losses_of_one_with_the_same_global_batch_and_record_once(
        home, tiny_model, data_dir, tmp_path):
    # 96 questions: 24 batches of 4 per epoch, 12 global batches of 8 per stage.
    subset = {"data": data_dir, "train_size": 96, "eval_size": 32}
    one = make_config(tiny_model, "heft", lora_stage=stage(2), reft_stage=stage(2), **subset)
    reference = train(one, tmp_path / "one-process")
    two = make_config(tiny_model, "heft", lora_stage=stage(1), reft_stage=stage(1), processes=2, **subset)
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [two])
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: queries.get_run(engine, run.id).status not in ("queued", "running"))
    finally:
        worker.stop()
        thread.join(timeout=60)
    done = queries.get_run(engine, run.id)
    assert done.status == "completed", done.error
    metrics = queries.metrics_since(engine, run.id)
    # Recorded once, by the main process: 12 global batches of 8 in each of the two stages.
    assert [m["step"] for m in metrics] == list(range(1, 25)) == [s.step for s in reference.steps]
    assert [m["stage"] for m in metrics] == [s.stage for s in reference.steps]
    assert [m["loss"] for m in metrics] == pytest.approx([s.loss for s in reference.steps], rel=1e-4, abs=1e-5)
    evals = queries.evaluations(engine, run.id)
    assert [(e["stage"], e["n"]) for e in evals] == [(e.stage, e.n) for e in reference.evals]
    assert done.accuracy == pytest.approx(reference.accuracy.accuracy)
    log = (Path(done.artifact_dir) / LOG_FILE).read_text()
    assert log.count("step 24/24") == 1
    assert done.executor == "local" and done.devices == "cpu × 2 processes"


def test_a_run_asking_for_more_gpus_than_the_worker_has_fails_with_the_reason(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [make_config(tiny_model, "lora", data=data_dir, processes=3)])
    worker = Worker(db, slots=["0", "1"], poll_seconds=0.1)
    worker.tick()
    failed = queries.get_run(engine, run.id)
    assert failed.status == "failed"
    assert "processes=3 needs 3 GPUs" in failed.error and "has 2" in failed.error
    assert worker.running == {}


def test_the_launch_command_gives_each_process_a_share_and_cpu_runs_gloo():
    single, _ = training_command("app.child", ["7"], 1, on_gpus=True, environ={})
    assert single[1:] == ["-m", "app.child", "7"]
    on_gpus, gpu_env = training_command("app.child", ["7"], 4, on_gpus=True, environ={})
    assert on_gpus[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
    assert on_gpus[on_gpus.index("--num_processes") + 1] == "4" and on_gpus[-3:] == ["-m", "app.child", "7"]
    assert "ACCELERATE_USE_CPU" not in gpu_env
    _, cpu_env = training_command("app.child", ["7"], 2, on_gpus=False, environ={})
    assert cpu_env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("value", [0, 65, "2", 1.5])
def test_processes_is_validated(value):
    with pytest.raises(ConfigError, match="processes"):
        RunConfig(processes=value)
