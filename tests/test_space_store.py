"""Runs that survive today's Spaces (issue 25): re-index at start-up, WAL checkpoints, backups, the archive.

Real SQLite files and real processes: the worker runs as ``python -m app.worker`` and is stopped with real
signals; runs train the tiny Llama in real child processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app import service
from app.worker import Worker
from heft_common.vocabulary import TERMINAL_STATUSES
from storage import archive, queries
from storage.db import checkpoint_wal, open_db
from storage.lifecycle import prepare_registry
from tests.test_restarts import child_env, config, status_of
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


def run_count(db_file: Path) -> int:
    """Runs in ``db_file`` read by plain sqlite3, from a copy of the main file alone (no -wal, no -shm)."""
    alone = db_file.with_name("alone-" + db_file.name)
    shutil.copyfile(db_file, alone)
    try:
        with sqlite3.connect(alone) as conn:
            return conn.execute("SELECT count(*) FROM run").fetchone()[0]
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(alone) + suffix).unlink(missing_ok=True)


def fake_finished_run_dirs(home: Path, count: int) -> None:
    """Run directories as a finished run leaves them (registry.json, run.json with results)."""
    for index in range(1, count + 1):
        run_dir = home / "runs" / f"{index:06d}-abcdef{index:02d}"
        run_dir.mkdir(parents=True)
        cfg = {"method": "lora", "model": "tiny", "data": "synthetic", "name": f"run {index}"}
        (run_dir / "registry.json").write_text(json.dumps({"id": index, "name": f"run {index}", "config": cfg}))
        (run_dir / "run.json").write_text(json.dumps({"config": cfg, "result": {
            "accuracy": 0.5 + index / 100, "accuracy_ci": [0.4, 0.6], "eval_n": 32}}))


def test_a_new_or_header_only_database_is_reindexed_from_the_run_directories(home):
    fake_finished_run_dirs(home, 10)
    db = home / "heft.db"
    report = prepare_registry(db)  # what the app and the worker do when they start
    assert len(report.reindexed.restored) == 10
    assert "10 run(s) were re-indexed" in report.notice
    engine = open_db(db)
    runs = {r.id: r for r in queries.list_runs(engine)}
    assert sorted(runs) == list(range(1, 11)) and runs[3].accuracy == 0.53 and runs[3].status == "completed"
    assert prepare_registry(db).reindexed is None  # a database with runs is left alone

    # heft.db present but holding only a header page (its WAL lost): re-indexed as well.
    engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    assert db.stat().st_size <= 4096
    assert len(prepare_registry(db).reindexed.restored) == 10
    assert len(queries.list_runs(open_db(db))) == 10


def test_a_checkpointed_database_file_alone_holds_every_run(home):
    db = home / "heft.db"
    engine = open_db(db)
    for index in range(30):
        run = queries.create_run(engine, name=f"run {index}", method="lora", config={"pad": "x" * 2000},
                                 base_model="m", data_source="s")
        queries.add_step_metrics(engine, run.id, [{"stage": "lora", "step": s, "loss": 0.5} for s in range(50)])
    assert Path(str(db) + "-wal").stat().st_size > 0  # the runs sit in the WAL so far
    assert checkpoint_wal(db, "TRUNCATE")
    assert Path(str(db) + "-wal").stat().st_size == 0
    assert run_count(db) == 30


def test_backup_writes_one_consistent_file_while_the_database_is_open(home, tmp_path):
    db = home / "heft.db"
    engine = open_db(db)
    for index in range(5):
        queries.create_run(engine, name=f"run {index}", method="lora", config={}, base_model="m", data_source="s")
    assert Path(str(db) + "-wal").stat().st_size > 0
    destination = tmp_path / "backups" / "copy.db"
    result = subprocess.run([sys.executable, "-m", "storage.backup", str(destination)], cwd=ROOT,
                            env=child_env(home), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not Path(str(destination) + "-wal").exists()
    with sqlite3.connect(destination) as conn:
        assert conn.execute("SELECT count(*) FROM run").fetchone()[0] == 5
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    again = subprocess.run([sys.executable, "-m", "storage.backup", str(destination)], cwd=ROOT,
                           env=child_env(home), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_half_copied_archive_directories_are_ignored_and_reported(tmp_path, caplog):
    source = tmp_path / "home" / "runs" / "000001-aaaa0001"
    (source / "checkpoints" / "step-4").mkdir(parents=True)
    (source / "run.json").write_text("{}")
    (source / "checkpoints" / "step-4" / "lora.safetensors").write_bytes(b"x" * 1000)
    (source / "checkpoints" / "step-6.tmp").mkdir()  # a checkpoint being written is not copied
    root = tmp_path / "archive"
    root.mkdir()
    archived = archive.archive_run(source, root)
    assert archived == root / source.name and archive.check_copy(archived) is None
    assert not (archived / "checkpoints" / "step-6.tmp").exists()
    shutil.copytree(source, root / ".partial-000002-bbbb0002-1234abcd")  # never renamed: cut off half-way
    truncated = root / "000003-cccc0003"
    shutil.copytree(archived, truncated)
    (truncated / "checkpoints" / "step-4" / "lora.safetensors").write_bytes(b"x" * 10)  # shorter than its manifest
    no_manifest = root / "000004-dddd0004"
    shutil.copytree(source, no_manifest, ignore=shutil.ignore_patterns(archive.MANIFEST_FILE))

    home = tmp_path / "fresh"
    report = archive.restore(home, root)
    assert report.restored == [source.name]
    assert set(report.ignored) == {".partial-000002-bbbb0002-1234abcd", truncated.name, no_manifest.name}
    assert "lora.safetensors has 10 bytes" in report.ignored[truncated.name]
    assert sorted(p.name for p in (home / "runs").iterdir()) == [source.name]
    assert any("ignored 000003-cccc0003" in record.message for record in caplog.records)


def _start_worker(home: Path, log: Path, archive_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.worker", "--poll-seconds", "0.1"], cwd=ROOT,
                            env=child_env(home, HEFT_ARCHIVE=str(archive_dir), HEFT_AUTO_RESUME="1"),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_runs_come_back_from_the_archive_after_a_sigkill_and_a_wiped_home(home, tiny_model, data_dir, tmp_path):
    archive_dir = tmp_path / "bucket"
    db = home / "heft.db"
    engine = open_db(db)
    done, long = service.submit_runs(engine, [config(tiny_model, data_dir),
                                              config(tiny_model, data_dir, epochs=40, checkpoint_minutes=0)])
    log = tmp_path / "worker.log"
    worker = _start_worker(home, log, archive_dir)
    try:
        wait_for(lambda: status_of(engine, done.id) in TERMINAL_STATUSES, timeout=300)
        finished = queries.get_run(engine, done.id)
        assert finished.status == "completed", finished.error

        def archived_long() -> list[Path]:
            return [p for p in archive_dir.glob(f"{long.id:06d}-*")
                    if (p / "checkpoints" / "LATEST").exists() and archive.check_copy(p) is None]

        wait_for(lambda: archived_long() and (archive_dir / Path(finished.artifact_dir).name).is_dir(), timeout=300)
        child = queries.get_run(engine, long.id).child_pid
        worker.send_signal(signal.SIGKILL)  # the Space's container goes: no shutdown code runs
        worker.wait(timeout=30)
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        if worker.poll() is None:
            worker.kill()
    metrics = [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, done.id)]
    engine.dispose()
    shutil.rmtree(home)  # an ephemeral disk after the restart: nothing local is left
    home.mkdir()
    # A copy cut off half-way when the container went: ignored and reported, never taken for a run.
    (archive_dir / ".partial-000009-deadbeef-00000000").mkdir()
    (archive_dir / ".partial-000009-deadbeef-00000000" / "run.json").write_text("{")

    worker = _start_worker(home, log, archive_dir)
    try:
        wait_for(lambda: db.exists() and len(queries.list_runs(open_db(db))) == 2, timeout=120)
        engine = open_db(db)
        back = queries.get_run(engine, done.id)
        assert back.status == "completed" and back.accuracy == finished.accuracy
        assert back.accuracy_low == finished.accuracy_low and back.eval_n == finished.eval_n
        assert [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, done.id)] == metrics
        # The interrupted run is resumed from its archived checkpoint (auto-resume), not started over.
        wait_for(lambda: any("from_step" in entry for entry in queries.get_run(engine, long.id).resumes), timeout=300)
        resumed = queries.get_run(engine, long.id).resumes[-1]
        assert resumed["by"] == "worker" and resumed["from_step"] > 0, resumed
    finally:
        worker.send_signal(signal.SIGTERM)  # a clean stop this time
        worker.wait(timeout=90)
    output = log.read_text()
    assert "ignored .partial-000009-deadbeef-00000000" in output, output[-3000:]
    assert "re-indexed 2 run(s)" in output, output[-3000:]
    assert worker.returncode == 0, output[-3000:]
    # After the clean shutdown the main file alone (copied without -wal/-shm) opens with every run in it.
    assert run_count(db) == 2
    # The interrupted run's last state is in the archive again, for the next restart.
    assert status_of(engine, long.id) == "interrupted"


# --------------------------------------------------------------------------- the archive in a hub dataset repo


class FakeHub:
    """A stand-in for ``huggingface_hub.HfApi`` keeping each repo as a local folder.

    The real hub is not reachable from CI (nor from the machines these tests run on), so the hub archive is
    tested against this. It keeps the semantics the archive relies on: ``upload_folder`` with
    ``delete_patterns="*"`` replaces the folder's files in one commit (files not uploaded are gone), a missing
    repo raises ``RepositoryNotFoundError``, and ``snapshot_download`` fetches only the files ``allow_patterns``
    select, with huggingface_hub's own filter. ``down`` makes every call fail as an unreachable hub does.
    """

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[str] = []
        self.downloaded: list[str] = []
        self.down = False

    def _repo(self, repo_id: str, repo_type: str | None) -> Path:
        if self.down:
            raise ConnectionError("huggingface.co cannot be reached")
        assert repo_type == "dataset"
        return self.root / repo_id

    def _missing(self, repo_id: str):
        import httpx
        from huggingface_hub.errors import RepositoryNotFoundError

        request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
        return RepositoryNotFoundError(f"404: {repo_id}", response=httpx.Response(404, request=request))

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False):
        repo = self._repo(repo_id, repo_type)
        assert private is True and exist_ok is True
        repo.mkdir(parents=True, exist_ok=True)
        (repo / ".gitattributes").touch()

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, repo_type=None,
                      delete_patterns=None):
        repo = self._repo(repo_id, repo_type)
        if not repo.is_dir():
            raise self._missing(repo_id)
        assert delete_patterns == "*" and path_in_repo and "/" not in path_in_repo
        staged = repo / f".commit-{len(self.commits)}"
        shutil.copytree(folder_path, staged)
        shutil.rmtree(repo / path_in_repo, ignore_errors=True)
        staged.rename(repo / path_in_repo)  # the folder as uploaded, nothing left of the previous copy
        self.commits.append(commit_message)

    def list_repo_files(self, repo_id, *, repo_type=None):
        repo = self._repo(repo_id, repo_type)
        if not repo.is_dir():
            raise self._missing(repo_id)
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id, *, repo_type=None, local_dir=None, allow_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        repo = self._repo(repo_id, repo_type)
        for name in filter_repo_objects(self.list_repo_files(repo_id, repo_type=repo_type),
                                        allow_patterns=allow_patterns):
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, target)
            self.downloaded.append(name)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as the real one leaves it
        return str(local_dir)


REPO = "someone/heft-runs"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    """HEFT_ARCHIVE names a hub dataset repo, HF_TOKEN is set, and the archive's client is a FakeHub."""
    from storage import archive_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HEFT_ARCHIVE", f"hf://datasets/{REPO}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(archive_hub, "hub_client", lambda token: hub)
    return hub


def test_archive_locations_tell_a_hub_repo_from_a_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    parse = archive.parse_archive_location
    assert parse("hf://datasets/someone/heft-runs") == archive.ArchiveLocation("hub", "someone/heft-runs")
    assert parse("someone/heft-runs") == archive.ArchiveLocation("hub", "someone/heft-runs")  # no such path here
    (tmp_path / "someone" / "heft-runs").mkdir(parents=True)
    assert parse("someone/heft-runs") == archive.ArchiveLocation("directory", "someone/heft-runs")  # it exists
    assert parse("./backups/runs").kind == "directory" and parse("/data/heft-archive").kind == "directory"
    assert parse("a/b/c").kind == "directory" and parse("~/archive") == archive.ArchiveLocation(
        "directory", str(Path.home() / "archive"))
    for value in ("hf://someone/a-model", "hf://datasets/someone", "hf://datasets/a/b/c", "hf://spaces/a/b"):
        with pytest.raises(ValueError, match=r"HEFT_ARCHIVE=.* is not a hub dataset repo: write hf://datasets/"):
            parse(value)

    # A hub repo without a token: a warning, no archive, training goes on. The app's start-up opens the archive
    # and hands its report to the app's worker, so the warning is said once, not once by each.
    monkeypatch.setenv("HEFT_ARCHIVE", "hf://datasets/someone/heft-runs")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    registry = prepare_registry(tmp_path / "home" / "heft.db", tmp_path / "home")
    worker = Worker(tmp_path / "home" / "heft.db", slots=[None], registry=registry)
    assert registry.backend is None and worker.archiver is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["HEFT_ARCHIVE=hf://datasets/someone/heft-runs needs HF_TOKEN (a token with write access to "
                        "the repo; on a Space, a secret): runs are not archived"]
    assert archive.archive_root() is None  # not a directory
    monkeypatch.setenv("HEFT_ARCHIVE", "hf://someone/a-model")
    assert archive.archive_backend() is None and "only a dataset repo" in caplog.records[-1].getMessage()


def _fake_run_dir(home: Path, name: str = "000001-aaaa0001") -> Path:
    source = home / "runs" / name
    (source / "checkpoints" / "step-4").mkdir(parents=True)
    cfg = {"method": "lora", "model": "tiny", "data": "synthetic", "name": "run 1"}
    (source / "registry.json").write_text(json.dumps({"id": 1, "name": "run 1", "config": cfg}))
    (source / "checkpoints" / "step-4" / "lora.safetensors").write_bytes(b"x" * 1000)
    (source / "checkpoints" / "LATEST").write_text("step-4")
    return source


def test_a_hub_copy_is_one_commit_that_replaces_the_last_and_restores_only_whole_copies(fake_hub, tmp_path):
    source = _fake_run_dir(tmp_path / "home")
    backend = archive.archive_backend()
    assert backend.location == f"hf://datasets/{REPO}" and backend.store(source)
    repo = fake_hub.root / REPO
    assert archive.check_copy(repo / source.name) is None  # the directory archive's manifest, in the upload
    # The next checkpoint: step-4 pruned, step-6 written, step-8 being written (not a checkpoint yet).
    shutil.rmtree(source / "checkpoints" / "step-4")
    (source / "checkpoints" / "step-6").mkdir()
    (source / "checkpoints" / "step-6" / "lora.safetensors").write_bytes(b"y" * 1200)
    (source / "checkpoints" / "step-8.tmp").mkdir()
    (source / "checkpoints" / "LATEST").write_text("step-6")
    assert backend.store(source)
    assert fake_hub.commits == [f"HEFT Studio: run {source.name}"] * 2  # one commit per copy
    assert sorted(p.name for p in (repo / source.name / "checkpoints").iterdir()) == ["LATEST", "step-6"]
    # What the repo holds besides whole copies: never downloaded, never taken for a run.
    (repo / "README.md").write_text("HEFT Studio's run archive")
    (repo / "notes").mkdir()
    (repo / "notes" / "todo.txt").write_text("not a run")
    truncated = repo / "000002-bbbb0002"
    shutil.copytree(repo / source.name, truncated)
    (truncated / "checkpoints" / "step-6" / "lora.safetensors").write_bytes(b"y" * 10)

    home = tmp_path / "fresh"
    report = archive.archive_backend().restore(home)
    assert report.restored == [source.name] and report.error is None
    assert set(report.ignored) == {"notes", truncated.name}
    assert "has 10 bytes, not 1200" in report.ignored[truncated.name]
    assert not [name for name in fake_hub.downloaded if name.startswith(("README", "notes", ".gitattributes"))]
    restored = home / "runs" / source.name
    assert (restored / "checkpoints" / "step-6" / "lora.safetensors").read_bytes() == b"y" * 1200
    assert not (restored / archive.MANIFEST_FILE).exists() and not (restored / "checkpoints" / "step-8.tmp").exists()
    assert sorted(p.name for p in home.iterdir()) == ["runs"]  # the download folder is gone
    assert sorted(p.name for p in (home / "runs").iterdir()) == [source.name]
    # Restored already: not downloaded again (the damaged copy is: it is not in the data home).
    fake_hub.downloaded.clear()
    assert archive.archive_backend().restore(home).restored == []
    assert {name.split("/")[0] for name in fake_hub.downloaded} == {truncated.name}


def test_an_unreachable_hub_warns_once_and_archiving_never_stops(fake_hub, tmp_path, caplog):
    source = _fake_run_dir(tmp_path / "home")
    backend = archive.archive_backend()
    assert backend.restore(tmp_path / "fresh").restored == []  # the repo does not exist yet: an empty archive
    fake_hub.down = True
    archiver = archive.Archiver(backend)
    archiver.submit(source)
    assert archiver.drain(timeout=30)
    assert backend.store(source) is False  # the second failure in a row
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "could not upload 000001-aaaa0001 (ConnectionError" in warnings[0]
    assert "does HF_TOKEN have write access" in warnings[0]
    # At start-up: no runs from the archive, a notice saying why, and the registry still opens.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    report = prepare_registry(fresh / "heft.db", home=fresh)
    assert report.restored.error.startswith("ConnectionError") and "could not be read" in report.notice
    fake_hub.down = False
    archiver.submit(source)  # the same Archiver thread goes on: the hub answers again
    assert archiver.drain(timeout=30)
    assert (fake_hub.root / REPO / source.name / archive.MANIFEST_FILE).is_file()
    assert any("the hub answers again" in r.message for r in caplog.records)


def test_a_run_trained_with_a_hub_archive_comes_back_into_a_wiped_home(fake_hub, home, tiny_model, data_dir):
    from tests.servers import worker_thread

    db = home / "heft.db"
    engine = open_db(db)
    run = service.submit_runs(engine, [config(tiny_model, data_dir)])[0]
    with worker_thread(db):  # the app's worker, with the archive it finds in HEFT_ARCHIVE
        wait_for(lambda: status_of(engine, run.id) in TERMINAL_STATUSES, timeout=300)
        finished = queries.get_run(engine, run.id)
        assert finished.status == "completed", finished.error
        name = Path(finished.artifact_dir).name
        copy = fake_hub.root / REPO / name
        wait_for(lambda: (copy / "run.json").is_file() and archive.check_copy(copy) is None, timeout=120)
    metrics = [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, run.id)]
    engine.dispose()
    shutil.rmtree(home)  # a Space's restart: nothing local is left
    home.mkdir()

    report = prepare_registry(db)  # what the app and the worker do when they start
    assert report.restored.restored == [name] and list(report.reindexed.restored) == [run.id]
    assert f"restored from the archive hf://datasets/{REPO}" in report.notice
    engine = open_db(db)
    back = queries.get_run(engine, run.id)
    assert back.status == "completed" and back.accuracy == finished.accuracy and back.eval_n == finished.eval_n
    assert [(m["stage"], m["step"], m["loss"]) for m in queries.metrics_since(engine, run.id)] == metrics
    assert (home / "runs" / name / "lora" / "adapter_model.safetensors").is_file()

    # The app shows what its start-up did at the top of the Runs tab, escaped.
    from app.ui import build_demo

    demo = build_demo(engine, startup_notice=report.notice)
    try:
        shown = demo.heft_components["runs.startup_notice"]
        assert shown.visible and shown.value.startswith("**At start-up:** The data home was empty: 1 run(s)")
        assert f"restored from the archive hf://datasets/{REPO}." in shown.value
    finally:
        demo.heft_ask_service.close()
    quiet = build_demo(engine)
    try:
        assert not quiet.heft_components["runs.startup_notice"].visible
    finally:
        quiet.heft_ask_service.close()
