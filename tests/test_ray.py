"""The Ray executor on a real two-node Ray cluster on this machine (127.0.0.1 only).

The cluster starts once per test run (``ray_cluster``, Ray's own multi-node test utility) and the
worker runs in this process, connected to it: runs of a study train as Ray tasks on both nodes and
report through the worker's channel actor into a real SQLite file. The last test removes a node
mid-run. Deselect those with ``-m "not ray"``; the replay, packing and health-line tests need no cluster.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import present, service
from app.launch import free_port
from app.logs import LOG_FILE
from app.ray_executor import (
    STALE_HEALTH_SECONDS,
    ClusterSummary,
    ClusterUnavailable,
    RayExecutor,
    RunRecorder,
    executor_line,
    ray_health,
    read_health,
    write_health,
)
from app.ray_task import ChannelCallback, pack_run_dir, unpack_checkpoint, unpack_run_dir
from app.worker import Worker
from heft_core.config import LoraSettings, RunConfig, StageSettings
from heft_core.prompt import PromptTemplate
from storage import queries
from storage.db import open_db
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes (one CPU each) on the loopback, started once for the whole test run."""
    with pytest.MonkeyPatch.context() as patch:
        # Ray replaces 127.0.0.1 by the machine's outward address unless told this is a one-machine
        # cluster; with it every Ray process and address stays on the loopback.
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args=dict(NODE_ARGS, include_dashboard=False))
        cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def two_nodes(ray_cluster):
    """The cluster with both nodes alive (a test that removed one gets a fresh one here)."""
    while len(ray_cluster.list_all_nodes()) < 2:
        ray_cluster.add_node(**NODE_ARGS)
        ray_cluster.wait_for_nodes()
    return ray_cluster


def config(model: str, data: str, epochs: int = 1, seed: int = 1) -> RunConfig:
    return RunConfig(
        method="lora", model=model, data=data, train_size=None, eval_size=32, max_length=64, seed=seed,
        template=PromptTemplate(after_question=""), lora=LoraSettings(rank=2, target_modules=["q_proj", "v_proj"]),
        lora_stage=StageSettings(epochs=epochs, learning_rate=1e-2, batch_size=8),
    )


def start_worker(db: Path, address: str, **options) -> Worker:
    executor = RayExecutor(address, **options)
    worker = Worker(db, executor=executor, poll_seconds=0.1, heartbeat_seconds=0.5)
    worker.thread = worker.start_in_thread()
    return worker


def stop_worker(worker: Worker) -> None:
    worker.stop()
    worker.thread.join(timeout=60)


def status_of(engine, run_id: int) -> str:
    return queries.get_run(engine, run_id).status


@pytest.mark.ray
def test_a_study_trains_on_the_cluster_once_per_run_with_metrics_artifacts_and_nodes(
        two_nodes, home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    study = queries.create_study(engine, name="ray study", spec={"arms": ["lora"], "seeds": [1, 2, 3]}, runs=[
        {"name": f"lora seed {seed}", "method": "lora", "config": config(tiny_model, data_dir, seed=seed).to_dict(),
         "base_model": tiny_model, "data_source": data_dir, "arm": "lora", "seed": seed} for seed in (1, 2, 3)])
    runs = queries.study_runs(engine, study.id)
    worker = start_worker(db, two_nodes.address)
    try:
        assert "2 nodes" in executor_line() and "2 CPUs" in executor_line()  # the Runs view's health line
        wait_for(lambda: all(status_of(engine, run.id) not in ("queued", "running") for run in runs))
    finally:
        stop_worker(worker)
    node_ids = {node.node_id[:12] for node in two_nodes.list_all_nodes()}
    for run in runs:
        done = queries.get_run(engine, run.id)
        assert done.status == "completed", done.error
        steps = [m["step"] for m in queries.metrics_since(engine, run.id)]
        # 160 examples / batch 8: every step once, in order
        assert steps == list(range(1, 21)) == list(range(1, done.progress["total_steps"] + 1))
        assert [e["stage"] for e in queries.evaluations(engine, run.id)] == ["lora"]
        run_dir = Path(done.artifact_dir)
        assert run_dir.parent == home / "runs"
        assert json.loads((run_dir / "run.json").read_text())["result"]["status"] == "completed"
        assert (run_dir / "lora").is_dir() and (run_dir / "predictions.jsonl").stat().st_size > 0
        log = (run_dir / LOG_FILE).read_text()
        assert log.count("step 20/20") == 1  # trained exactly once; the node's log lines arrived
        assert done.executor == "ray" and done.devices == "cpu"
        assert "127.0.0.1" in done.node and done.node.split("Ray node ")[1].rstrip(")") in node_ids
        assert present.escape(done.node) in present.progress_markdown(done)  # the run view names the node
        assert service.run_detail_payload(engine, run.id)["node"] == done.node
    assert read_health()["reachable"] is True


@pytest.mark.ray
def test_a_study_heft_run_waits_for_its_lora_twin_and_trains_stage_2_only_on_the_cluster(
        two_nodes, home, tiny_model, data_dir):
    """Two free nodes would start the LoRA run and the HEFT run with the same stage 1 side by side: the HEFT run
    waits, then its task gets the LoRA run's stage-boundary checkpoint and trains stage 2 only."""
    from heft_core.study import StudySpec
    from tests.test_shared_stages import _queue_study

    db = home / "heft.db"
    engine = open_db(db)
    spec = StudySpec.from_dict({
        "name": "ray shared", "seeds": [1],
        "arms": [{"method": "heft", "lora_epochs": 1, "reft_epochs": 1}, {"method": "lora", "lora_epochs": 1}],
        "base": {"model": tiny_model, "data": data_dir, "train_size": 32, "eval_size": 16, "max_length": 48,
                 "precision": "no", "reft.layers": [1], "reft.positions": "l1"},
    })
    _queue_study(engine, spec)
    heft, lora = queries.study_runs(engine, 1)
    worker = start_worker(db, two_nodes.address)
    try:
        wait_for(lambda: all(status_of(engine, run.id) not in ("queued", "running") for run in (heft, lora)))
    finally:
        stop_worker(worker)
    heft, lora = queries.get_run(engine, heft.id), queries.get_run(engine, lora.id)
    assert heft.status == lora.status == "completed", (heft.error, lora.error)
    assert heft.started_at >= lora.finished_at  # it waited for its twin
    run_dir = Path(heft.artifact_dir)
    assert json.loads((run_dir / "shared_stage1.json").read_text())["from"] == Path(lora.artifact_dir).name
    log = (run_dir / LOG_FILE).read_text()
    assert f"stage 1 is run #{lora.id}'s finished LoRA" in log and "training stage 2 only" in log
    assert {m["stage"] for m in queries.metrics_since(engine, heft.id)} == {"reft"}  # no LoRA step trained again
    assert (run_dir / "reft.safetensors").is_file() and (run_dir / "predictions.jsonl").stat().st_size > 0


@pytest.mark.ray
def test_cancel_stops_a_remote_run_and_keeps_what_it_did(two_nodes, home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=100)])
    worker = start_worker(db, two_nodes.address)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, run.id)) >= 3)
        assert service.cancel_run(engine, run.id) == "cancel_requested"
        wait_for(lambda: status_of(engine, run.id) != "running", timeout=60)
    finally:
        stop_worker(worker)
    cancelled = queries.get_run(engine, run.id)
    assert cancelled.status == "cancelled", cancelled.error
    steps = [m["step"] for m in queries.metrics_since(engine, run.id)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < cancelled.progress["total_steps"]
    saved = json.loads((Path(cancelled.artifact_dir) / "run.json").read_text())
    assert saved["result"]["status"] == "cancelled"  # stopped gracefully at a step: what it trained is kept


@pytest.mark.ray
def test_a_wrong_address_is_reported_at_start_and_nothing_is_claimed(home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir)])
    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterUnavailable, match=f"nothing answers at {nowhere}"):
        Worker(db, ray_address=nowhere)
    # The same through the command line and its environment variable, in a process of its own.
    env = dict(os.environ, HEFT_RAY_ADDRESS=nowhere, HEFT_HOME=str(home))
    result = subprocess.run([sys.executable, "-m", "app.worker", "--db", str(db)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"nothing answers at {nowhere}" in result.stderr
    still = queries.get_run(engine, run.id)
    assert still.status == "queued" and still.started_at is None and still.worker_pid is None
    health = read_health()
    assert health["reachable"] is False and nowhere in executor_line() and "not reachable" in executor_line()


@pytest.mark.ray
def test_a_node_that_dies_interrupts_its_run_naming_the_node_the_other_finishes_and_it_resumes(
        two_nodes, home, tiny_model, data_dir):
    db = home / "heft.db"
    engine = open_db(db)
    runs = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=3, seed=1),
                                        config(tiny_model, data_dir, epochs=3, seed=2)])
    head_id = two_nodes.head_node.node_id  # this process's node: it holds the worker's channel
    worker = start_worker(db, two_nodes.address)

    def checkpointed_run_on_the_other_node():
        for run in runs:
            row = queries.get_run(engine, run.id)
            if row.status == "running" and row.node and head_id[:12] not in row.node \
                    and (Path(row.artifact_dir) / "checkpoints" / "LATEST").exists():
                return row  # past its first epoch, whose checkpoint travelled here
        return None

    try:
        victim = wait_for(checkpointed_run_on_the_other_node)
        (doomed,) = [node for node in two_nodes.list_all_nodes() if node.node_id[:12] in victim.node]
        two_nodes.remove_node(doomed)
        wait_for(lambda: all(status_of(engine, run.id) not in ("queued", "running") for run in runs))
        interrupted = queries.get_run(engine, victim.id)
        assert interrupted.status == "interrupted"
        assert doomed.node_id[:12] in interrupted.error and "127.0.0.1" in interrupted.error
        (survivor,) = [queries.get_run(engine, run.id) for run in runs if run.id != victim.id]
        assert survivor.status == "completed", survivor.error
        assert head_id[:12] in survivor.node
        # Its checkpoint came back before the node died: Resume continues it on the node that is left.
        service.resume_run(engine, victim.id)
        wait_for(lambda: status_of(engine, victim.id) not in ("queued", "running"))
    finally:
        stop_worker(worker)
    resumed = queries.get_run(engine, victim.id)
    assert resumed.status == "completed", resumed.error
    assert head_id[:12] in resumed.node and resumed.resumes[0]["from_step"] >= 20
    steps = [m["step"] for m in queries.metrics_since(engine, victim.id)]
    assert steps == list(range(1, 61))  # what the dead node did before its checkpoint, then the rest, once each


def test_replayed_events_are_recorded_once_in_order_with_their_log_lines(home, tiny_model, data_dir):
    engine = open_db(home / "heft.db")
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir)])
    run_dir = home / "runs" / "r"
    run_dir.mkdir(parents=True)
    recorder = RunRecorder(engine, run.id, run_dir / LOG_FILE)

    def step(n: int) -> tuple[str, dict]:
        return ("step", {"stage": "lora", "epoch": n / 20, "step": n, "total_steps": 20, "loss": 1.0 / n,
                         "learning_rate": 1e-2, "tokens_per_second": 100.0, "elapsed_seconds": float(n)})

    evaluation = ("eval", {"stage": "lora", "epoch": 1, "cumulative_epoch": 1, "accuracy": 0.5, "low": 0.3,
                           "high": 0.7, "n": 32})
    begin = ("begin", {"method": "lora", "total_steps": 20, "train_examples": 160, "eval_examples": 32,
                       "data_label": "easy", "device": "cpu"})
    placement = {"node_id": "ab" * 28, "ip": "127.0.0.1", "hostname": "node-a", "gpus": [], "pid": 1}
    assert recorder.replay([("placement", placement), begin, step(1), step(2), ("log", "line one")]) == placement
    # A batch delivered twice, and a repeat inside one batch, are recorded once.
    recorder.replay([step(2), step(3), step(3), evaluation, ("log", "line two")])
    recorder.replay([step(3), evaluation])
    assert [m["step"] for m in queries.metrics_since(engine, run.id)] == [1, 2, 3]
    assert len(queries.evaluations(engine, run.id)) == 1
    assert queries.get_run(engine, run.id).progress["step"] == 3
    assert (run_dir / LOG_FILE).read_text() == "line one\nline two\n"


def test_run_directories_and_checkpoints_travel_whole_and_cannot_escape(tmp_path):
    node = tmp_path / "node"
    (node / "lora").mkdir(parents=True)
    (node / "lora" / "adapter.safetensors").write_bytes(b"weights")
    (node / "run.json").write_text("{}")
    (node / LOG_FILE).write_text("streamed already")
    here = tmp_path / "here"
    (here / "lora").mkdir(parents=True)
    (here / "lora" / "stale.bin").write_bytes(b"old")
    (here / LOG_FILE).write_text("the worker's log")
    assert sorted(unpack_run_dir(pack_run_dir(node), here)) == ["lora", "run.json"]
    assert sorted(p.name for p in (here / "lora").iterdir()) == ["adapter.safetensors"]  # replaced whole
    assert (here / LOG_FILE).read_text() == "the worker's log"

    # Each new checkpoint a run writes on its node travels once; the worker keeps the newest.
    root = node / "checkpoints"
    sender = ChannelCallback(channel=None, run_id=1, run_dir=node)
    for name in ("step-00000005", "step-00000010"):
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text(name)
        (root / "LATEST").write_text(name + "\n")
        (node / "run_config.json").write_text("{}")
        sender.queue_new_checkpoint()
        sender.queue_new_checkpoint()  # nothing new: nothing queued
    shipped = [payload for kind, payload in sender.pending if kind == "checkpoint"]
    assert len(shipped) == 2
    for payload in shipped:
        unpack_checkpoint(payload, here)
    assert (here / "checkpoints" / "LATEST").read_text().strip() == "step-00000010"
    assert sorted(p.name for p in (here / "checkpoints").iterdir()) == ["LATEST", "step-00000010"]
    assert (here / "run_config.json").exists()

    import io
    import tarfile

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as archive:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        unpack_run_dir(evil.getvalue(), here)
    assert not (tmp_path / "escaped.txt").exists()


def test_the_health_line_says_when_the_worker_stopped_refreshing_it(home):
    write_health(ray_health(ClusterSummary("127.0.0.1:6379", True, nodes=3, gpus=8, cpus=96)))
    assert executor_line() == "Ray cluster at 127.0.0.1:6379: 3 nodes, 8 GPUs, 96 CPUs"
    later = read_health()["written_at"] + STALE_HEALTH_SECONDS + 60
    assert "is the worker running?" in executor_line(now=later)
    write_health({"executor": "local", "slots": [None]})
    assert executor_line() == ""
