"""Checkpoints and resume: runs killed with SIGKILL continue to the same weights, predictions and history.

The tiny random Llama on CPU in fp32 is deterministic, so "the same" is bit for bit: adapter and
intervention tensors, per-question P(yes), every step's loss and learning rate, every evaluation.
Dropout is on in both stages, so the torch RNG state must be restored too. With ReFT prefix reuse
(positions ``lN`` only) the frozen host's prefix states kept in memory are rebuilt on resume by replaying
the host passes that made them, so that case is bit for bit too (``test_prefix_reuse_resumes_bit_for_bit``).

Kills are real: ``tests/resume_helper.py`` SIGKILLs its own process at a chosen step, and the
worker tests SIGKILL a real worker process and its children.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heft_common.errors import ConfigError
from heft_common.hashing import file_sha256
from heft_core import checkpoint as ckpt
from heft_core.callbacks import TrainerCallback
from heft_core.config import LoraSettings, ReftSettings, StageSettings
from heft_core.train import train
from tests.conftest import write_jsonl_splits
from tests.resume_helper import RESUME_PREFIX
from tests.tiny import Recorder, make_config
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
EVERY_STEP = 1e-6  # checkpoint_minutes: 60 microseconds, i.e. after every optimizer step in practice
TRAIN_SIZE = 64
STEPS_PER_EPOCH = 8  # 64 training examples in batches of 8
# One thread per training process: the machines that run the suite are small and shared, and torch's
# thread pool spinning against other processes slows a tiny model's steps twentyfold.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_source(tmp_path_factory, easy_data) -> str:
    return str(write_jsonl_splits(tmp_path_factory.mktemp("data"), easy_data))


def resume_config(model: str, data: str, method: str, **overrides):
    settings = dict(
        data=data, checkpoint_minutes=EVERY_STEP, train_size=TRAIN_SIZE, eval_size=32,
        lora=LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=["all-linear"]),
        reft=ReftSettings(rank=4, layers="all", positions="f2+l2", dropout=0.1),
    )
    settings.update(overrides)
    return make_config(model, method, **settings)


# --------------------------------------------------------------------------- helpers


def run_helper(config, out: Path, kill_at: int | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    config_path = out.parent / f"{out.name}-config.json"
    config_path.write_text(config.to_json())
    command = [sys.executable, "-m", "tests.resume_helper", str(config_path), str(out)]
    if kill_at is not None:
        command += ["--kill-at-step", str(kill_at)]
    if resume:
        command.append("--resume")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    if kill_at is not None:
        assert done.returncode == -9, done.stdout + done.stderr  # killed by SIGKILL, not finished
    else:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def resume_events(output: str) -> list[dict]:
    return [json.loads(line[len(RESUME_PREFIX):]) for line in output.splitlines() if line.startswith(RESUME_PREFIX)]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Bit for bit: weights, predictions, the history of steps and evaluations (timings excluded)."""
    for name in ("lora/adapter_model.safetensors", "reft.safetensors"):
        assert (resumed / name).exists() == (reference / name).exists(), name
        if (reference / name).exists():
            a, b = tensors(resumed / name), tensors(reference / name)
            assert a.keys() == b.keys() and a
            different = [key for key in a if not torch.equal(a[key], b[key])]
            assert not different, f"{name}: {different}"
    predictions = {p["uid"]: p["p_yes"] for p in jsonl(resumed / "predictions.jsonl")}
    assert predictions == {p["uid"]: p["p_yes"] for p in jsonl(reference / "predictions.jsonl")}
    steps, reference_steps = jsonl(resumed / "metrics.jsonl"), jsonl(reference / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, len(reference_steps) + 1))  # no gap, no duplicate
    untimed = ("stage", "epoch", "step", "total_steps", "loss", "learning_rate")
    assert [[s[k] for k in untimed] for s in steps] == [[s[k] for k in untimed] for s in reference_steps]
    assert json.loads((resumed / "evals.json").read_text()) == json.loads((reference / "evals.json").read_text())


def crash(config, out: Path, at: int, data) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(config, out, callbacks=[Recorder(crash_at=at)], data=data)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ckpt.CHECKPOINTS_DIR).iterdir() if p.is_dir())


# --------------------------------------------------------------------------- SIGKILL, then resume


@pytest.fixture(scope="module")
def references(tiny_model, data_source, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, each in its own process like the interrupted ones."""
    root = tmp_path_factory.mktemp("references")
    out = {}
    for method in ("lora", "heft"):
        out[method] = root / method
        run_helper(resume_config(tiny_model, data_source, method), out[method])
    return out


def test_lora_killed_mid_epoch_resumes_from_the_cli_to_the_same_run(tiny_model, data_source, references, tmp_path):
    out = tmp_path / "lora"
    kill_at = STEPS_PER_EPOCH + 3  # the middle of the second epoch
    run_helper(resume_config(tiny_model, data_source, "lora"), out, kill_at=kill_at)
    assert not (out / "run.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "heft_core", "train", "--resume", str(out), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["status"] == "completed"
    # step kill_at was trained but its checkpoint never written: the run continues after step kill_at - 1
    assert f"resumed from step {kill_at - 1} (lora epoch 1.25)" in resumed.stderr
    assert "saved ~" in resumed.stderr
    assert_same_run(out, references["lora"])
    assert not (out / ckpt.CHECKPOINTS_DIR).exists()  # a completed run keeps no checkpoint


@pytest.mark.parametrize("kill_at, stage", [(5, "lora"), (2 * STEPS_PER_EPOCH + 5, "reft")])
def test_heft_killed_in_either_stage_resumes_to_the_same_run(
    tiny_model, data_source, references, tmp_path, kill_at, stage
):
    out = tmp_path / "heft"
    config = resume_config(tiny_model, data_source, "heft")
    run_helper(config, out, kill_at=kill_at)
    resumed = run_helper(config, out, resume=True)
    (event,) = resume_events(resumed.stdout)
    assert event["from_step"] == kill_at - 1 and event["stage"] == stage
    assert event["saved_seconds"] > 0
    if stage == "reft":  # the finished stage-1 LoRA comes from the checkpoint and is never retrained
        assert "stage lora: finished before the interruption" in resumed.stdout
    assert json.loads((out / "run.json").read_text())["lora_unchanged_by_stage2"] is True
    assert_same_run(out, references["heft"])


# --------------------------------------------------------------------------- damaged or missing checkpoints


@pytest.fixture(scope="module")
def lora_reference(tiny_model, easy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-reference") / "run"
    train(resume_config(tiny_model, "test:easy", "lora"), out, data=easy_data)
    return out


def test_truncated_checkpoint_is_never_loaded_the_previous_one_is(tiny_model, easy_data, lora_reference, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora", keep_epoch_checkpoints=True)
    crash_at = STEPS_PER_EPOCH + 3
    crash(config, out, at=crash_at, data=easy_data)
    epoch_end, latest = step_name(STEPS_PER_EPOCH), step_name(crash_at - 1)
    assert step_dirs(out) == [epoch_end, latest]  # the epoch end (kept, as asked) and the latest
    damaged = out / ckpt.CHECKPOINTS_DIR / latest / ckpt.LORA_FILE
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a crash mid-write
    # and a write that never finished at all: no manifest, never renamed
    (out / ckpt.CHECKPOINTS_DIR / f"{step_name(crash_at)}.tmp").mkdir()
    (out / ckpt.CHECKPOINTS_DIR / f"{step_name(crash_at)}.tmp" / ckpt.STATE_FILE).write_text("{")

    loaded, message = ckpt.load_latest_checkpoint(out)
    assert loaded.step == STEPS_PER_EPOCH and latest in message and "truncated" in message
    recorder = Recorder()
    train(config, out, callbacks=[recorder], data=easy_data, resume=True)
    (event,) = recorder.resumes
    assert event.from_step == STEPS_PER_EPOCH and latest in event.message and "truncated" in event.message
    assert_same_run(out, lora_reference)
    assert step_dirs(out) == [epoch_end, step_name(2 * STEPS_PER_EPOCH)]  # epoch ends only, as asked


def test_damaged_only_checkpoint_restarts_from_step_0_and_says_so(tiny_model, easy_data, lora_reference, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora")
    crash(config, out, at=STEPS_PER_EPOCH + 3, data=easy_data)
    assert step_dirs(out) == [step_name(STEPS_PER_EPOCH + 2)]  # only the latest is kept
    damaged = out / ckpt.CHECKPOINTS_DIR / step_name(STEPS_PER_EPOCH + 2) / ckpt.OPTIMIZER_FILE
    payload = bytearray(damaged.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # same size, one flipped byte
    damaged.write_bytes(bytes(payload))
    recorder = Recorder()
    train(config, out, callbacks=[recorder], data=easy_data, resume=True)
    (event,) = recorder.resumes
    assert event.from_step == 0 and event.saved_seconds == 0
    assert "sha256" in event.message and "step 0" in event.message
    assert any("step 0" in line and "sha256" in line for line in recorder.logs)
    assert_same_run(out, lora_reference)


def test_resume_without_a_checkpoint_restarts_from_step_0_and_says_so(tiny_model, easy_data, lora_reference, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora", checkpoint_minutes=0)  # epoch ends only
    crash(config, out, at=3, data=easy_data)
    assert not (out / ckpt.CHECKPOINTS_DIR).exists() and ckpt.read_run_config(out) == config.to_dict()
    recorder = Recorder()
    train(config, out, callbacks=[recorder], data=easy_data, resume=True)
    (event,) = recorder.resumes
    assert event.from_step == 0 and "no checkpoint" in event.message and "step 0" in event.message
    assert_same_run(out, lora_reference)


@pytest.mark.parametrize("crash_at", [2 * STEPS_PER_EPOCH + 3, 3 * STEPS_PER_EPOCH + 3])  # ReFT epoch 1, epoch 2
def test_prefix_reuse_resumes_bit_for_bit(tiny_model, easy_data, tmp_path, crash_at):
    prefix_reuse = ReftSettings(rank=4, layers="all", positions="l1", dropout=0.1)
    config = resume_config(tiny_model, "test:easy", "heft", reft=prefix_reuse)
    reference = tmp_path / "reference"
    train(config, reference, data=easy_data)
    out = tmp_path / "run"
    crash(config, out, at=crash_at, data=easy_data)
    recorder = Recorder()
    train(config, out, callbacks=[recorder], data=easy_data, resume=True)
    assert recorder.resumes[0].from_step == crash_at - 1 and recorder.resumes[0].stage == "reft"
    assert any("prompts kept" in line for line in recorder.logs)  # the prefix states were in use
    assert_same_run(out, reference)


def _rewrite_state(path: Path, change) -> None:
    """Edit a checkpoint's state.json and re-sign the manifest, as if it had been written that way."""
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    change(state)
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    state_file = path / ckpt.STATE_FILE
    manifest["files"][ckpt.STATE_FILE] = {"sha256": file_sha256(state_file), "bytes": state_file.stat().st_size}
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("option, field, value", [
    # fp16: an "auto" run resumes in the bf16 or fp32 it trained in (tests/test_precision.py), never in another
    ("device", "device_type", "cuda"), ("precision", "precision", "fp16"), ("num_processes", "num_processes", 2),
])
def test_resume_refuses_another_precision_device_or_process_count(
    tiny_model, easy_data, tmp_path, option, field, value
):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora")
    crash(config, out, at=5, data=easy_data)
    (latest,) = (out / ckpt.CHECKPOINTS_DIR).glob("step-*")

    def change(state):
        state["environment"][field] = value

    _rewrite_state(latest, change)
    with pytest.raises(ConfigError) as error:
        train(config, out, data=easy_data, resume=True)
    assert error.value.option == option and repr(value) in str(error.value)


def test_resume_refuses_a_changed_config_but_not_a_changed_checkpoint_interval(tiny_model, easy_data, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora")
    crash(config, out, at=5, data=easy_data)
    other_rank = LoraSettings(rank=8, alpha=8, dropout=0.1, target_modules=["all-linear"])
    changed = resume_config(tiny_model, "test:easy", "lora", lora=other_rank)
    with pytest.raises(ConfigError, match="lora.rank"):
        train(changed, out, data=easy_data, resume=True)
    recorder = Recorder()
    other_interval = resume_config(tiny_model, "test:easy", "lora", checkpoint_minutes=0)
    result = train(other_interval, out, callbacks=[recorder], data=easy_data, resume=True)
    assert recorder.resumes[0].from_step == 4 and result.status == "completed"


def test_fresh_start_ignores_and_removes_old_checkpoints(tiny_model, easy_data, lora_reference, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora")
    crash(config, out, at=5, data=easy_data)
    recorder = Recorder()
    train(config, out, callbacks=[recorder], data=easy_data)  # resume=False: start over
    assert recorder.resumes == []
    assert_same_run(out, lora_reference)


def test_cancelled_run_keeps_a_checkpoint_and_resumes_from_it(tiny_model, easy_data, lora_reference, tmp_path):
    class StopAt(TrainerCallback):
        last_step = 0

        def on_step(self, event) -> None:
            self.last_step = event.step

        def should_stop(self) -> bool:
            return self.last_step >= 9

    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "lora", checkpoint_minutes=0)
    assert train(config, out, callbacks=[StopAt()], data=easy_data).status == "cancelled"
    assert step_dirs(out) == [step_name(9)]  # written at the stop, though only epoch ends were asked for
    recorder = Recorder()
    assert train(config, out, callbacks=[recorder], data=easy_data, resume=True).status == "completed"
    assert recorder.resumes[0].from_step == 9
    assert_same_run(out, lora_reference)


def test_checkpoint_holds_no_base_weights(tiny_model, easy_data, tmp_path):
    out = tmp_path / "run"
    config = resume_config(tiny_model, "test:easy", "heft")
    crash(config, out, at=2 * STEPS_PER_EPOCH + 3, data=easy_data)
    (latest,) = (out / ckpt.CHECKPOINTS_DIR).glob("step-*")
    lora = tensors(latest / ckpt.LORA_FILE)
    assert lora and all("lora_" in name for name in lora)
    assert tensors(latest / ckpt.REFT_FILE)
    base_bytes = sum(p.stat().st_size for p in Path(tiny_model).glob("*.safetensors"))
    saved_bytes = sum(p.stat().st_size for p in latest.iterdir())
    assert saved_bytes < base_bytes
    summary = ckpt.latest_checkpoint_summary(out)
    assert summary["step"] == 2 * STEPS_PER_EPOCH + 2 and summary["stage"] == "reft"


@pytest.mark.parametrize("option, value", [("checkpoint_minutes", -1), ("checkpoint_minutes", "often"),
                                           ("checkpoint_minutes", 100_000), ("keep_epoch_checkpoints", "yes")])
def test_checkpoint_options_are_validated(tiny_model, option, value):
    with pytest.raises(ConfigError) as error:
        make_config(tiny_model, "lora", **{option: value})
    assert error.value.option == option


# --------------------------------------------------------------------------- the database, the child, the worker


def queue_run(engine, config, name: str):
    from storage import queries

    return queries.create_run(engine, name=name, method=config.method, config=config.to_dict(), base_model=config.model,
                              data_source=config.data, total_epochs=config.total_epochs)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie whose parent is gone counts as gone
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def worker_config(model: str, data: str, **overrides):
    """LoRA, 10 epochs of 8 steps, a checkpoint at each epoch end only: a kill loses the current epoch's steps."""
    ten_epochs = StageSettings(epochs=10, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0)
    settings = dict(checkpoint_minutes=0, lora_stage=ten_epochs)
    settings.update(overrides)
    return resume_config(model, data, "lora", **settings)


def steps_of(engine, run_id) -> list[int]:
    from storage import queries

    return [m["step"] for m in queries.metrics_since(engine, run_id)]


@pytest.fixture
def child_env(home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the worker's training children
    return home


def test_worker_killed_mid_run_auto_resumes_it_from_its_checkpoint_once(tiny_model, data_source, child_env):
    from app.logs import LOG_FILE
    from app.worker import Worker
    from storage import queries
    from storage.db import open_db

    db = child_env / "heft.db"
    engine = open_db(db)
    config = worker_config(tiny_model, data_source)
    interrupted, twin = queue_run(engine, config, "interrupted"), queue_run(engine, config, "uninterrupted twin")
    total = 10 * STEPS_PER_EPOCH
    command = [sys.executable, "-m", "app.worker", "--db", str(db), "--poll-seconds", "0.1", "--no-auto-resume"]
    worker = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(steps_of(engine, interrupted.id)) >= 2 * STEPS_PER_EPOCH + 3)
        child_pid = queries.get_run(engine, interrupted.id).child_pid
        worker.kill()
        worker.wait()
        wait_for(lambda: not alive(child_pid), timeout=30)  # the child ends itself once its worker is gone
    finally:
        if worker.poll() is None:
            worker.kill()
    recorded_before = steps_of(engine, interrupted.id)
    assert len(recorded_before) < total and queries.get_run(engine, twin.id).started_at is None

    restarted = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5, auto_resume=True)
    thread = restarted.start_in_thread()
    try:
        wait_for(lambda: all(queries.get_run(engine, r.id).status in ("completed", "failed")
                             for r in (interrupted, twin)))
    finally:
        restarted.stop()
        thread.join(timeout=60)
    done, twin_done = queries.get_run(engine, interrupted.id), queries.get_run(engine, twin.id)
    assert done.status == twin_done.status == "completed", (done.error, twin_done.error)
    (resume,) = done.resumes
    from_step = resume["from_step"]
    assert resume["by"] == "worker" and resume["stage"] == "lora"
    assert from_step % STEPS_PER_EPOCH == 0 and 2 * STEPS_PER_EPOCH <= from_step < total  # an epoch-end checkpoint
    assert resume["saved_seconds"] > 0 and resume["replaced_steps"] == len(recorded_before) - from_step
    assert steps_of(engine, done.id) == list(range(1, total + 1))  # each step exactly once
    assert [e["cumulative_epoch"] for e in queries.evaluations(engine, done.id)] == list(range(1, 11))
    log = (Path(done.artifact_dir) / LOG_FILE).read_text()
    assert log.count(f"resumed from step {from_step} (lora epoch {from_step // STEPS_PER_EPOCH})") == 1
    for step in range(1, from_step + 1):  # what the checkpoint kept was trained once
        assert log.count(f"step {step}/{total} ") == 1, step
    twin_log = (Path(twin_done.artifact_dir) / LOG_FILE).read_text()
    assert twin_log.count(f"step {total}/{total} ") == 1 and "resumed" not in twin_log and twin_done.resumes == []
    assert_same_run(Path(done.artifact_dir), Path(twin_done.artifact_dir))  # as if never interrupted


def test_user_resumes_a_run_whose_child_was_killed(tiny_model, data_source, child_env):
    import signal

    from app.logs import LOG_FILE
    from app.worker import Worker
    from storage import queries
    from storage.db import open_db

    db = child_env / "heft.db"
    engine = open_db(db)
    run = queue_run(engine, worker_config(tiny_model, data_source), "killed child")
    total = 10 * STEPS_PER_EPOCH
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5, auto_resume=False)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: len(steps_of(engine, run.id)) >= STEPS_PER_EPOCH + 3)
        os.kill(queries.get_run(engine, run.id).child_pid, signal.SIGKILL)  # e.g. out of memory
        failed = wait_for(lambda: (r := queries.get_run(engine, run.id)).status == "failed" and r)
        assert failed.failure_kind == "crash" and "signal 9" in failed.error
        assert queries.resume_blocker(failed) is None
        resumed = queries.resume_run(engine, run.id)
        assert resumed.id == run.id and resumed.status == "queued" and resumed.error is None
        with pytest.raises(ValueError, match="queued"):
            queries.resume_run(engine, run.id)  # a second click does nothing
        wait_for(lambda: queries.get_run(engine, run.id).status in ("completed", "failed"))
    finally:
        worker.stop()
        thread.join(timeout=60)
    done = queries.get_run(engine, run.id)
    assert done.status == "completed", done.error
    assert steps_of(engine, run.id) == list(range(1, total + 1))
    (resume,) = done.resumes
    assert resume["by"] == "user" and resume["from_step"] % STEPS_PER_EPOCH == 0
    assert resume["from_step"] >= STEPS_PER_EPOCH
    assert "resumed from step" in (Path(done.artifact_dir) / LOG_FILE).read_text()


def test_sigterm_ends_the_child_at_a_step_with_a_checkpoint_there(tiny_model, data_source, child_env):
    """The worker's shutdown, a container or Space restart: SIGTERM costs no training (checkpoints
    are only written at epoch ends here, so a checkpoint mid-epoch is the SIGTERM one)."""
    import signal

    from app.worker import Worker
    from storage import queries
    from storage.db import open_db

    db = child_env / "heft.db"
    engine = open_db(db)
    run = queue_run(engine, worker_config(tiny_model, data_source), "stopped child")
    total = 10 * STEPS_PER_EPOCH
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5, auto_resume=False)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: len(steps_of(engine, run.id)) >= STEPS_PER_EPOCH + 3)
        os.kill(queries.get_run(engine, run.id).child_pid, signal.SIGTERM)
        stopped = wait_for(lambda: (r := queries.get_run(engine, run.id)).status == "interrupted" and r)
        assert "SIGTERM" in stopped.error and "checkpoint" in stopped.error
        recorded = steps_of(engine, run.id)
        queries.resume_run(engine, run.id)
        wait_for(lambda: queries.get_run(engine, run.id).status in ("completed", "failed"))
    finally:
        worker.stop()
        thread.join(timeout=60)
    done = queries.get_run(engine, run.id)
    assert done.status == "completed", done.error
    (resume,) = done.resumes
    assert resume["from_step"] == recorded[-1] and resume["replaced_steps"] == 0  # nothing trained twice
    assert steps_of(engine, run.id) == list(range(1, total + 1))


def test_resume_of_a_run_that_never_checkpointed_restarts_from_step_0_and_says_so(tiny_model, data_source, child_env):
    from app.logs import LOG_FILE
    from app.worker import Worker
    from storage import queries
    from storage.db import open_db

    db = child_env / "heft.db"
    engine = open_db(db)
    one_epoch = worker_config(tiny_model, data_source, lora_stage=StageSettings(epochs=1, batch_size=8))
    run = queue_run(engine, one_epoch, "never started")
    assert queries.request_cancel(engine, run.id) == "cancelled"  # cancelled while queued: nothing trained
    queries.resume_run(engine, run.id)
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5, auto_resume=False)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: queries.get_run(engine, run.id).status in ("completed", "failed"))
    finally:
        worker.stop()
        thread.join(timeout=60)
    done = queries.get_run(engine, run.id)
    assert done.status == "completed", done.error
    assert steps_of(engine, run.id) == list(range(1, STEPS_PER_EPOCH + 1))
    (resume,) = done.resumes
    assert resume["from_step"] == 0 and "no checkpoint" in resume["message"]
    assert "starting over from step 0" in (Path(done.artifact_dir) / LOG_FILE).read_text()


def test_resume_rules_in_the_database(child_env):
    from storage import queries
    from storage.db import open_db

    engine = open_db(child_env / "heft.db")
    config = make_config("embedded", "lora")

    def started(name):
        run = queue_run(engine, config, name)
        assert queries.claim_next_run(engine, os.getpid()).id == run.id
        return run

    running = started("running")
    with pytest.raises(ValueError, match="is running; only"):
        queries.resume_run(engine, running.id)
    queries.finish_run(engine, running.id, "completed")
    with pytest.raises(ValueError, match="is completed; only"):
        queries.resume_run(engine, running.id)
    bad_input = started("bad input")
    queries.finish_run(engine, bad_input.id, "failed", error="reft.layers: [40] outside the model's depth",
                       failure_kind="bad_input")
    with pytest.raises(ValueError, match="configuration, data or model"):
        queries.resume_run(engine, bad_input.id)
    with pytest.raises(ValueError, match="failure_kind"):
        queries.finish_run(engine, bad_input.id, "failed", failure_kind="oops")

    run = started("crashed")
    queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 1.0} for s in range(1, 11)])
    queries.add_epoch_eval(engine, run.id, {"stage": "lora", "epoch": 1, "cumulative_epoch": 1, "accuracy": 0.5})
    queries.add_epoch_eval(engine, run.id, {"stage": "lora", "epoch": 2, "cumulative_epoch": 2, "accuracy": 0.6})
    queries.finish_run(engine, run.id, "failed", error="killed by signal 9", failure_kind="crash")
    again = queries.resume_run(engine, run.id)
    assert (again.id, again.status, again.error, again.failure_kind) == (run.id, "queued", None, None)
    assert again.finished_at is None
    assert [entry["by"] for entry in again.resumes] == ["user"]
    assert queries.delete_metrics_after(engine, run.id, 6, cumulative_epoch=1) == (4, 1)
    assert [m["step"] for m in queries.metrics_since(engine, run.id)] == [1, 2, 3, 4, 5, 6]
    assert [e["epoch"] for e in queries.evaluations(engine, run.id)] == [1]
    assert queries.record_resume(engine, run.id, {"from_step": 6, "saved_seconds": 1.5})
    assert queries.get_run(engine, run.id).resumes == [{**again.resumes[0], "from_step": 6, "saved_seconds": 1.5}]
    with pytest.raises(ValueError, match="unknown resume record"):
        queries.record_resume(engine, run.id, {"from_step": 6, "oops": 1})
    with pytest.raises(ValueError, match="is queued; only"):
        queries.resume_run(engine, run.id)


def test_auto_resume_setting(monkeypatch, tmp_path):
    from app import worker
    from storage import archive

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("HEFT_ARCHIVE", raising=False)
    for value, expected in (("1", True), ("0", False), ("true", True), ("off", False)):
        monkeypatch.setenv(worker.AUTO_RESUME_ENV, value)
        assert worker.auto_resume_default() is expected
    monkeypatch.delenv(worker.AUTO_RESUME_ENV)
    assert worker.auto_resume_default() is False  # not a Space
    monkeypatch.setenv("SPACE_ID", "someone/heft-studio")
    bucket = tmp_path / "bucket"
    monkeypatch.setattr(archive, "SPACE_BUCKET", bucket)
    assert worker.auto_resume_default() is False and archive.archive_root() is None  # a Space without a bucket
    bucket.mkdir()
    assert worker.auto_resume_default() is True  # a bucket at /data: the archive, and runs resume from it
    assert archive.archive_root() == bucket / "heft-archive"
    monkeypatch.setenv("HEFT_ARCHIVE", "off")
    assert archive.archive_root() is None and worker.auto_resume_default() is False
    monkeypatch.setenv("HEFT_ARCHIVE", str(tmp_path / "elsewhere"))
    assert archive.archive_root() == tmp_path / "elsewhere" and worker.auto_resume_default() is True


# --------------------------------------------------------------------------- the app: Resume, the API, the run view


def test_resume_action_api_and_run_view(child_env, tmp_path):
    from app import present, service
    from heft_core.callbacks import StepEvent
    from storage import queries
    from storage.db import open_db

    engine = open_db(child_env / "heft.db")
    config = make_config("embedded", "lora")
    run = queue_run(engine, config, "api")
    assert service.run_actions(run).resume is False  # queued
    assert "is queued; only" in service.resume_run_payload(engine, run.id)["error"]
    assert service.resume_run_payload(engine, "abc") == {"error": "run id must be a positive integer, got 'abc'"}
    assert service.resume_run_payload(engine, 9999)["error"] == "run 9999 does not exist"
    queries.claim_next_run(engine, os.getpid())
    run_dir = tmp_path / "run"
    queries.set_artifact_dir(engine, run.id, run_dir)
    queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 2.0 / s} for s in range(1, 13)])
    queries.finish_run(engine, run.id, "interrupted", error="Interrupted: worker gone")
    interrupted = queries.get_run(engine, run.id)
    assert service.run_actions(interrupted).resume is True and service.run_actions(interrupted).requeue is True
    # a checkpoint on disk, as the trainer leaves it (only its manifest matters here)
    saved = ckpt.Checkpoint(step=8, stage="lora", stage_epochs_done=1, batches_done=0, cumulative_epoch=1,
                            train_seconds=95.0, train_tokens=1000, data_rng_state=[3, [1, 2], None],
                            environment=ckpt.Environment("no", "cpu", 1), config=config.to_dict(), epoch_end=True,
                            steps=[StepEvent("lora", 1.0, 8, 16, 0.5, 1e-4, 100.0, 95.0)])
    ckpt.save_checkpoint(run_dir, saved)

    answer = service.resume_run_payload(engine, run.id)
    assert answer["run_id"] == run.id and answer["status"] == "queued"
    assert {k: answer["checkpoint"][k] for k in ("step", "stage", "epoch", "train_seconds")} == {
        "step": 8, "stage": "lora", "epoch": 1.0, "train_seconds": 95.0}
    assert "is queued; only" in service.resume_run_payload(engine, run.id)["error"]  # once
    message = present.resume_message(run.id, answer["checkpoint"])
    assert f"Run #{run.id} queued again to resume from step 8 (lora epoch 1)" in message and "1 min 35 s" in message
    assert "restarts from step 0" in present.resume_message(run.id, None)

    # what the training child records when it continues, and how the run view shows it
    queries.record_resume(engine, run.id, {"from_step": 8, "stage": "lora", "from_epoch": 1.0, "cumulative_epoch": 1,
                                           "saved_seconds": 95.0, "replaced_steps": 4, "message": "resumed"})
    resumed = queries.get_run(engine, run.id)
    assert service.run_summary(resumed)["resumes"][0]["from_step"] == 8
    text = present.progress_markdown(resumed)
    assert "Resumed from step 8** (lora epoch 1) by hand" in text and "saved 1 min 35 s of training" in text
    view = service.live_view(engine, run.id, None, full=True)
    assert view.loss_title == "Training loss per step (↻ resumed from step 8)"
    rule = view.loss[view.loss["stage"] == present.RESUME_SERIES].dropna()
    assert rule["step"].tolist() == [8, 8] and rule["loss"].tolist() == [2.0 / 12, 2.0]  # lowest to highest loss
    assert present.loss_title([]) == present.RUN_LOSS_TITLE
    assert present.RESUME_SERIES not in set(present.loss_frame([{"step": 1, "loss": 1.0, "stage": "lora"}])["stage"])
    restarted = present.resume_lines([{"at": "2025-01-01T10:00:00+00:00", "by": "worker", "from_step": 0}])
    assert restarted == [restarted[0]] and "no usable checkpoint: it restarted from step 0" in restarted[0]


def test_the_api_names_resume_run(child_env):
    from app.ui import build_demo
    from storage.db import open_db

    demo = build_demo(open_db(child_env / "heft.db"))
    try:
        names = {dep.api_name for dep in demo.fns.values() if getattr(dep, "api_name", None)}
        assert "resume_run" in names
        assert "runs.resume" in demo.heft_components
    finally:
        demo.heft_ask_service.close()
