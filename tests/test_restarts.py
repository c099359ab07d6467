"""Restarts, races and damaged state, as an operator meets them (issue 13).

Real processes throughout: the worker and the app run as PID 1 of their own PID namespace
(``unshare --pid --fork --mount-proc``, as in a container) and are stopped with real signals; the
damaged database is a real, truncated SQLite file; logins go to a really launched app over HTTP.
Runs train the tiny Llama in real child processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from app import service
from app.launch import free_port
from heft_common.errors import AskError, ConfigError
from heft_common.vocabulary import TERMINAL_STATUSES
from heft_core.config import LoraSettings, ReftSettings, RunConfig, StageSettings
from heft_core.prompt import PromptTemplate
from storage import queries
from storage.db import get_engine, open_db
from storage.models import Run, utcnow
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def config(model: str, data: str, epochs: int = 1, **overrides) -> RunConfig:
    settings = dict(
        method="lora", model=model, data=data, train_size=None, eval_size=32, max_length=64, seed=1,
        template=PromptTemplate(after_question=""),
        lora=LoraSettings(rank=2, target_modules=["q_proj", "v_proj"]),
        reft=ReftSettings(rank=2, layers=[1, 2], positions="l1"),
        lora_stage=StageSettings(epochs=epochs, learning_rate=1e-2, batch_size=4),
        reft_stage=StageSettings(epochs=epochs, learning_rate=1e-2, batch_size=4),
    )
    settings.update(overrides)
    return RunConfig(**settings)


def status_of(engine, run_id: int) -> str:
    return queries.get_run(engine, run_id).status


def child_env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, HEFT_HOME=str(home), PYTHONUNBUFFERED="1", **extra)


# --------------------------------------------------------------------------- containers: PID 1, SIGTERM, SIGKILL


@pytest.fixture(scope="module")
def pid_namespaces():
    """Skip where this process may not create PID namespaces (needs root or user namespaces)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.strip()}")


def in_container(args: list[str], home: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    """Start ``args`` as PID 1 of a new PID namespace (with its own /proc), like a container's main process."""
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *args], cwd=ROOT,
                            env=child_env(home, **extra_env), stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def container_init(unshare: subprocess.Popen) -> int:
    """The host PID of the process that is PID 1 inside the namespace (unshare's forked child)."""
    def find() -> int | None:
        try:
            children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    pid = wait_for(find, timeout=30, interval=0.05)
    namespace_pids = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    assert namespace_pids[-1] == "1", namespace_pids  # it really is PID 1 in there
    return pid


def stop_container(unshare: subprocess.Popen, grace: float) -> bool:
    """``docker stop``: SIGTERM to PID 1, then SIGKILL after ``grace`` seconds. True if it ended by itself."""
    init = container_init(unshare)
    os.kill(init, signal.SIGTERM)
    try:
        unshare.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        os.kill(init, signal.SIGKILL)
        unshare.wait(timeout=30)
        return False


def test_container_restart_never_leaves_a_run_running(pid_namespaces, home, tiny_model, data_dir, tmp_path):
    """Worker as PID 1, killed hard with its run training; the restarted PID-1 worker interrupts that run."""
    db = home / "heft.db"
    engine = open_db(db)
    orphan, waiting = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50),
                                                   config(tiny_model, data_dir)])
    log = tmp_path / "worker.log"
    first = in_container([sys.executable, "-m", "app.worker", "--db", str(db), "--poll-seconds", "0.1"], home, log)
    try:
        wait_for(lambda: len(queries.metrics_since(engine, orphan.id)) >= 3)
        os.kill(container_init(first), signal.SIGKILL)  # the whole container goes, its training child too
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    left = queries.get_run(engine, orphan.id)
    assert left.status == "running" and left.worker_pid == 1  # as a restart finds it
    second = in_container([sys.executable, "-m", "app.worker", "--db", str(db), "--poll-seconds", "0.1",
                           "--stale-after-seconds", "10"], home, log)
    try:
        wait_for(lambda: status_of(engine, orphan.id) != "running", timeout=120)
        wait_for(lambda: status_of(engine, waiting.id) in TERMINAL_STATUSES, timeout=240)
    finally:
        stop_container(second, grace=30)
    interrupted, done = queries.get_run(engine, orphan.id), queries.get_run(engine, waiting.id)
    assert interrupted.status == "interrupted", interrupted.error
    # Either the new PID 1 sees that the old one is gone (its namespace's number was reused, its start time
    # differs), or it cannot see it and the silent heartbeat decides.
    assert "worker process 1 is no longer running" in interrupted.error or "no heartbeat" in interrupted.error
    assert done.status == "completed", done.error
    # Both workers were PID 1; their worker ids tell them apart.
    assert done.worker_pid == interrupted.worker_pid == 1
    assert done.worker_id and interrupted.worker_id and done.worker_id != interrupted.worker_id


def test_app_as_pid1_stops_on_sigterm_and_marks_its_run_interrupted(pid_namespaces, home, tiny_model, data_dir,
                                                                     tmp_path):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50)])
    port = free_port()
    log = tmp_path / "app.log"
    app = in_container([sys.executable, "app.py"], home, log, GRADIO_SERVER_PORT=str(port))
    try:
        wait_for(lambda: len(queries.metrics_since(engine, run.id)) >= 3, timeout=300)
        wait_for(lambda: _port_open(port), timeout=300)  # serving, with its worker training the run
        ended_by_itself = stop_container(app, grace=40)
    finally:
        if app.poll() is None:
            app.kill()
    stopped = queries.get_run(engine, run.id)
    assert ended_by_itself, "the app ignored SIGTERM as PID 1 and had to be killed:\n" + log.read_text()[-3000:]
    assert stopped.status == "interrupted", stopped.status
    assert "shut down" in stopped.error


def test_worker_cli_stops_on_sigterm_and_marks_its_run_interrupted(pid_namespaces, home, tiny_model, data_dir,
                                                                    tmp_path):
    db = home / "heft.db"
    engine = open_db(db)
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50)])
    worker = in_container([sys.executable, "-m", "app.worker", "--db", str(db), "--poll-seconds", "0.1"], home,
                          tmp_path / "worker.log")
    try:
        wait_for(lambda: len(queries.metrics_since(engine, run.id)) >= 3)
        assert stop_container(worker, grace=40)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0
    assert status_of(engine, run.id) == "interrupted"


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_dockerfile_runs_the_app_under_an_init():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "tini" in dockerfile.split("apt-get install", 1)[1].split("\n")[0]
    entrypoints = [line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT")]
    assert entrypoints and json.loads(entrypoints[-1].split(None, 1)[1]) == ["/usr/bin/tini", "--"]


# --------------------------------------------------------------------------- the worker loop


def test_running_worker_interrupts_a_stale_run_without_restarting(home):
    from app.worker import Worker

    db = home / "heft.db"
    engine = open_db(db)
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.2, stale_after_seconds=5)
    thread = worker.start_in_thread()
    try:
        time.sleep(1.0)  # the worker's start-up check has run; what follows happens while it runs
        run = queries.start_external_run(engine, worker_pid=4242, name="left behind", method="lora", config={},
                                         base_model="m", data_source="s")
        # As another container's worker that died would leave it: running, its heartbeat long silent.
        with engine.begin() as conn:
            conn.execute(update(Run.__table__).where(Run.__table__.c.id == run.id).values(
                worker_id="boot:another-host:1:4242:1:x", heartbeat_at=utcnow() - timedelta(minutes=10)))
        wait_for(lambda: status_of(engine, run.id) != "running", timeout=60)
    finally:
        worker.stop()
        thread.join(timeout=30)
    stopped = queries.get_run(engine, run.id)
    assert stopped.status == "interrupted" and "no heartbeat" in stopped.error


# --------------------------------------------------------------------------- start-up imports


def test_startup_imports_the_engine_before_the_warmup_thread_and_requests(tmp_path, tiny_model):
    script = f"""
import json, sys, threading
from storage.db import open_db
import app.ui

seen = {{}}
original_start = threading.Thread.start
def start(self):
    if self.name == "heft-warm":
        transformers = sys.modules.get("transformers")
        seen["ready"] = transformers is not None and all(
            name in vars(transformers) for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"))
    original_start(self)
threading.Thread.start = start

demo = app.ui.build_demo(open_db({str(tmp_path / "heft.db")!r}))
errors = []
def request():  # what a first estimate or a first queued run does while the warm-up runs
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from heft_core.models import load_tokenizer, model_info
        model_info({tiny_model!r}); load_tokenizer({tiny_model!r})
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=request) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({{"ready": seen.get("ready"), "errors": errors}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(tmp_path / "home"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"ready": True, "errors": []}


# --------------------------------------------------------------------------- a damaged database


def _truncate_half(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def test_damaged_database_stops_worker_and_app_and_the_registry_is_rebuilt(home, tiny_model, data_dir, tmp_path,
                                                                           monkeypatch):
    from app.worker import Worker

    db = home / "heft.db"
    engine = open_db(db)
    doomed_data = tmp_path / "doomed"
    shutil.copytree(data_dir, doomed_data)
    good, bad, never = service.submit_runs(engine, [config(tiny_model, data_dir), config(tiny_model, str(doomed_data)),
                                                    config(tiny_model, data_dir)])
    service.cancel_run(engine, never.id)  # cancelled while queued: it has no run directory
    shutil.rmtree(doomed_data)  # the second run fails in its child: its data is gone
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: all(status_of(engine, r.id) in TERMINAL_STATUSES for r in (good, bad)), timeout=300)
    finally:
        worker.stop()
        thread.join(timeout=30)
    before = {r.id: r for r in queries.list_runs(engine)}
    assert before[good.id].status == "completed" and before[bad.id].status == "failed"
    metrics = {rid: [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, rid)] for rid in before}
    evals = {rid: [(e["stage"], e["epoch"], e["accuracy"]) for e in queries.evaluations(engine, rid)] for rid in before}
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    queries.set_child_pid(engine, good.id, None)  # one more write: the WAL is not empty

    # The machine lost power mid-write (this process still holds the database open): the data home as it was
    # left, moved to a new place, with half of heft.db gone and its WAL still there.
    home = tmp_path / "restored-home"
    shutil.copytree(tmp_path / "home", home)
    monkeypatch.setenv("HEFT_HOME", str(home))
    db = home / "heft.db"
    assert (home / "heft.db-wal").stat().st_size > 0
    _truncate_half(db)
    damaged_bytes = db.read_bytes()
    for command in ([sys.executable, "-m", "app.worker", "--db", str(db)], [sys.executable, "app.py"]):
        result = subprocess.run(command, cwd=ROOT, env=child_env(home, GRADIO_SERVER_PORT=str(free_port())),
                                capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert "damaged" in output and "python -m storage.rebuild --move-aside" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    assert db.read_bytes() == damaged_bytes  # nothing was written into it

    refused = subprocess.run([sys.executable, "-m", "storage.rebuild"], cwd=ROOT, env=child_env(home),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--move-aside" in refused.stderr
    rebuilt = subprocess.run([sys.executable, "-m", "storage.rebuild", "--move-aside"], cwd=ROOT, env=child_env(home),
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "with 2 run(s)" in rebuilt.stdout
    kept = [p for p in home.iterdir() if p.name.startswith("heft.db.damaged-")]
    assert any(p.read_bytes() == damaged_bytes for p in kept)

    engine = open_db(db)
    after = {r.id: r for r in queries.list_runs(engine)}
    assert set(after) == {good.id, bad.id}  # same ids; the run that never started left nothing to rebuild
    for rid, old in ((good.id, before[good.id]), (bad.id, before[bad.id])):
        new = after[rid]
        for column in ("name", "method", "status", "config_json", "base_model", "data_source", "batch_id",
                       "accuracy", "accuracy_low", "accuracy_high", "eval_n", "eval_signature"):
            assert getattr(new, column) == getattr(old, column), (rid, column)
        assert Path(new.artifact_dir) == home / "runs" / Path(old.artifact_dir).name  # found in the moved home
    assert after[bad.id].error == before[bad.id].error.split("\n\nLast log lines:")[0]
    assert [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, good.id)] == metrics[good.id]
    assert [(e["stage"], e["epoch"], e["accuracy"]) for e in queries.evaluations(engine, good.id)] == evals[good.id]
    # New runs never take a rebuilt run's id.
    new = queries.create_run(engine, name="after", method="lora", config={}, base_model="m", data_source="s")
    assert new.id > max(after)


def test_damaged_database_without_wal_is_refused_with_the_same_message(home, tmp_path):
    db = home / "heft.db"
    engine = open_db(db)
    for i in range(20):
        run = queries.create_run(engine, name=f"run {i}", method="lora", config={"pad": "x" * 4000}, base_model="m",
                                 data_source="s")
        queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 0.5} for s in range(100)])
    engine.dispose()
    get_engine(db).dispose()
    assert not (home / "heft.db-wal").exists()
    _truncate_half(db)
    result = subprocess.run([sys.executable, "-m", "app.worker", "--db", str(db)], cwd=ROOT, env=child_env(home),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "damaged" in output and "Traceback" not in output, output[-3000:]


# --------------------------------------------------------------------------- run directories


def test_recreated_database_never_reuses_an_old_run_directory(home, tiny_model, data_dir):
    from app.worker import Worker

    old_dir = home / "runs" / "000001"
    old_dir.mkdir(parents=True)
    (old_dir / "train.log").write_text("OLD LOG LINE from a previous database\n")
    (old_dir / "error.txt").write_text("stale error from a previous database")
    db = home / "heft.db"
    engine = open_db(db)  # a new database on an existing data home: ids start at 1 again
    (run,) = service.submit_runs(engine, [config(tiny_model, data_dir, epochs=50)])
    assert run.id == 1
    worker = Worker(db, slots=[None], poll_seconds=0.1, heartbeat_seconds=0.5)
    thread = worker.start_in_thread()
    try:
        wait_for(lambda: len(queries.metrics_since(engine, run.id)) >= 3)
        os.kill(queries.get_run(engine, run.id).child_pid, signal.SIGKILL)  # an operator's kill
        wait_for(lambda: status_of(engine, run.id) != "running")
    finally:
        worker.stop()
        thread.join(timeout=30)
    failed = queries.get_run(engine, run.id)
    assert Path(failed.artifact_dir).resolve() != old_dir.resolve()
    assert Path(failed.artifact_dir).parent == home / "runs" and Path(failed.artifact_dir).name.startswith("000001-")
    assert (old_dir / "train.log").read_text() == "OLD LOG LINE from a previous database\n"
    assert "OLD LOG LINE" not in (Path(failed.artifact_dir) / "train.log").read_text()
    assert failed.status == "failed"
    assert "stale error" not in failed.error
    # An operator's SIGKILL is not an out-of-memory kill (the cgroup's OOM counter did not move).
    assert "killed by signal 9 (SIGKILL)" in failed.error and "out of memory" not in failed.error
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT artifact_dir FROM run WHERE id=?", (run.id,)).fetchone()[0]
    assert stored == f"runs/{Path(failed.artifact_dir).name}"  # relative to the data home


def test_out_of_memory_is_reported_only_when_the_oom_counter_moved():
    from app.worker import kill_reason

    assert "out of memory" in kill_reason(-signal.SIGKILL, oom_kills_before=3, oom_kills_after=4)
    for before, after in ((3, 3), (None, None), (None, 4)):
        reason = kill_reason(-signal.SIGKILL, oom_kills_before=before, oom_kills_after=after)
        assert reason == "training process was killed by signal 9 (SIGKILL)", reason
    assert kill_reason(-signal.SIGTERM, 0, 0) == "training process was killed by signal 15 (SIGTERM)"


def test_oom_counter_is_read_from_cgroup_v1_and_v2_files(tmp_path):
    from heft_common.process import oom_kill_count

    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 7\noom_group_kill 0\n")
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert oom_kill_count([tmp_path / "missing", v2]) == 7
    assert oom_kill_count([v1]) == 3
    assert oom_kill_count([tmp_path / "missing"]) is None


# --------------------------------------------------------------------------- API edges


BAD_VALUES = [
    ({"lora_stage": {"epochs": True}}, "lora_stage.epochs"),
    ({"lora": {"rank": True}}, "lora.rank"),
    ({"max_length": 64.0}, "max_length"),
    ({"seed": False}, "seed"),
    ({"train_size": True}, "train_size"),
    ({"eval_batch_size": "16"}, "eval_batch_size"),
    ({"prefix_cache_mb": True}, "prefix_cache_mb"),
    ({"lora_stage": {"learning_rate": "1e-3"}}, "lora_stage.learning_rate"),
    ({"lora": {"alpha": "16"}}, "lora.alpha"),
    ({"lora": {"dropout": True}}, "lora.dropout"),
    ({"lora_stage": {"max_grad_norm": float("inf")}}, "lora_stage.max_grad_norm"),
    ({"lora_stage": {"warmup_ratio": float("nan")}}, "lora_stage.warmup_ratio"),
    ({"reft": {"share_weights": "false"}}, "reft.share_weights"),
    ({"eval_every_epoch": "yes"}, "eval_every_epoch"),
    ({"reft": {"positions": 5}}, "reft.positions"),
    ({"reft": {"layers": [True, 1]}}, "reft.layers"),
    ({"lora": {"layers": [1.5]}}, "lora.layers"),
    ({"lora": {"target_modules": 5}}, "lora.target_modules"),
    ({"lora": {"target_modules": ["q_proj", 3]}}, "lora.target_modules"),
    ({"lora_stage": 5}, "lora_stage"),
    ({"template": "Passage:"}, "template"),
    ({"template": {"before_passage": 3}}, "template.before_passage"),
    ({"name": 12}, "name"),
    ({"heft_stage2_mode": ["adapter"]}, "heft_stage2_mode"),
]


@pytest.mark.parametrize("change, option", BAD_VALUES, ids=[option for _, option in BAD_VALUES])
def test_wrong_types_are_refused_when_queued_naming_the_option(home, change, option):
    payload = {"method": "heft", "model": "embedded", "data": "synthetic", **change}
    engine = open_db(home / "heft.db")
    with pytest.raises(ConfigError) as caught:
        service.parse_config_payload(json.dumps(payload))
    assert caught.value.option == option, str(caught.value)
    assert str(caught.value).startswith(f"{option}: ")
    reply = service.start_run_payload(engine, json.dumps(payload))
    assert list(reply) == ["error"] and option in reply["error"]
    assert queries.list_runs(engine) == []


def test_numbers_that_are_numbers_still_pass():
    config = RunConfig.from_dict({"lora_stage": {"learning_rate": 1, "max_grad_norm": 0}, "lora": {"alpha": 16},
                                  "reft": {"layers": "0,2-3"}, "max_length": 64})
    assert config.lora_stage.learning_rate == 1 and config.reft.layers == [0, 2, 3]


def test_yaml_config_reads_1e_minus_4_as_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nlora_stage:\n  learning_rate: 1e-4\n")
    assert RunConfig.from_file(path).lora_stage.learning_rate == 1e-4


def test_template_too_long_for_max_length_is_refused_when_queued(home, tiny_model, data_dir):
    engine = open_db(home / "heft.db")
    long_template = PromptTemplate(before_passage="the river town bird stone lake " * 20, after_question="")
    with pytest.raises(ConfigError, match="max_length"):
        service.submit_runs(engine, [config(tiny_model, data_dir, template=long_template)])
    two_tokens = PromptTemplate(after_question="", yes=" yes yes")
    with pytest.raises(ConfigError, match="template.yes"):
        service.submit_runs(engine, [config(tiny_model, data_dir, template=two_tokens)])
    assert queries.list_runs(engine) == []


ODD_RUN_IDS = [True, False, 0, -3, 1.5, float("nan"), float("inf"), 1e300, 10**30, 2**63, "9" * 5000, "1e3", "",
               None, [1], {"id": 1}, b"1", "١"]


@pytest.mark.parametrize("value", ODD_RUN_IDS, ids=[repr(v)[:20] for v in ODD_RUN_IDS])
def test_odd_run_ids_get_the_usual_message(home, value):
    engine = open_db(home / "heft.db")
    with pytest.raises(ValueError, match="run id must be a positive integer"):
        queries.validate_run_id(value)
    for reply in (service.cancel_run_payload(engine, value), service.run_detail_payload(engine, value)):
        assert list(reply) == ["error"] and "run id must be a positive integer" in reply["error"]
        assert len(reply["error"]) < 200  # a huge value is not echoed whole
    assert service.find_run(engine, value) is None


# --------------------------------------------------------------------------- a launched app: login and run_detail


@pytest.fixture
def launched_app(home):
    from gradio_client import Client

    from app.login import login_options
    from app.ui import build_demo, launch_kwargs

    engine = open_db(home / "heft.db")
    demo = build_demo(engine)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs(),
                **login_options([("alice", "secret")]))
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, Client(url + "/", auth=("alice", "secret"), verbose=False), engine
    finally:
        demo.heft_ask_service.close()
        demo.close()


def test_launched_app_throttles_failed_logins_and_run_detail_sends_only_newer_steps(launched_app):
    import httpx

    url, client, engine = launched_app
    attacker = {"X-Forwarded-For": "203.0.113.7"}  # uvicorn trusts forwarded addresses from 127.0.0.1
    with httpx.Client(base_url=url) as http:
        for _ in range(5):
            wrong = http.post("/login", data={"username": "alice", "password": "guess"}, headers=attacker)
            assert wrong.status_code == 400
        refused = http.post("/login", data={"username": "alice", "password": "secret"}, headers=attacker)
        assert refused.status_code == 429, refused.text
        assert "try again" in refused.json()["detail"] and int(refused.headers["Retry-After"]) > 0
        # Another client is not locked out by the attacker's failures.
        assert http.post("/login", data={"username": "alice", "password": "secret"}).status_code == 200

    run = queries.create_run(engine, name="polled", method="lora", config={}, base_model="m", data_source="s")
    queries.claim_next_run(engine, os.getpid())
    queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 1.0 / s} for s in range(1, 11)])
    full = client.predict(run.id, api_name="/run_detail")  # the old call form
    assert [m["step"] for m in full["metrics"]] == list(range(1, 11))
    newer = client.predict(run.id, 7, api_name="/run_detail")
    assert [m["step"] for m in newer["metrics"]] == [8, 9, 10] and newer["status"] == "running"
    assert client.predict(run.id, 10, api_name="/run_detail")["metrics"] == []
    assert "after_step" in client.predict(run.id, -1, api_name="/run_detail")["error"]


def test_login_throttle_refuses_the_right_password_while_locked_out():
    from app.login import LoginRefused, LoginThrottle, ThrottledLogin

    now = [1000.0]
    login = ThrottledLogin([("alice", "secret"), ("bob", "hunter2")], LoginThrottle(clock=lambda: now[0]))
    assert login("alice", "secret") is True
    for _ in range(5):
        assert login("alice", "wrong") is False
    with pytest.raises(LoginRefused) as refused:
        login("alice", "secret")
    assert refused.value.status_code == 429 and "try again in 60 s" in refused.value.detail
    now[0] += 61
    assert login("alice", "secret") is True  # the back-off is over
    for _ in range(5):
        login("alice", "wrong")
    now[0] += 61
    for _ in range(5):  # locked out again: the back-off doubles
        login("alice", "wrong")
    with pytest.raises(LoginRefused, match="120 s"):
        login("alice", "secret")
    assert login("bob", "hunter2") is True  # without the middleware, failures count per user name


# --------------------------------------------------------------------------- Ask


def test_ask_error_about_an_unreadable_run_directory_names_the_run(home, tiny_model, tmp_path):
    from app.ask import AskService

    engine = open_db(home / "heft.db")
    run = queries.create_run(engine, name="broken heft", method="heft", config={}, base_model=tiny_model,
                             data_source="s")
    queries.claim_next_run(engine, os.getpid())
    broken = home / "runs" / "000001-broken"
    broken.mkdir(parents=True)
    queries.finish_run(engine, run.id, "completed", results={"artifact_dir": broken})
    asker = AskService(engine)
    try:
        with pytest.raises(AskError) as caught:
            asker.answer("the river town", "is the bird red", [run.id])
    finally:
        asker.close()
    assert f"run #{run.id}" in str(caught.value) and "broken heft" in str(caught.value)
