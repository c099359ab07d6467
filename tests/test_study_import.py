"""Study import: a study directory trained by the CLI's runner enters the app's registry whole, or not at all."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import service, studies, study_import
from app.ask import AskService
from app.permissions import LOCAL, PermissionRefused
from heft_common.errors import StudyDirError
from heft_core.study import StudySpec
from heft_core.study_manifest import MANIFEST_FILE
from heft_core.study_report import study_report
from heft_core.study_runner import load_study_dir, run_study_in_process
from storage import queries
from storage.db import open_db
from tests.conftest import ROOT, write_jsonl_splits

ARMS = [{"method": "base"}, {"method": "lora", "lora_epochs": 1},
        {"method": "heft", "lora_epochs": 1, "reft_epochs": 1}]
PASSAGE, QUESTION = "the river town road", "is the bird red"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_model, easy_data) -> Path:
    """A three-arm, one-seed study written by heft_core's runner (what `python -m heft_core study` does)."""
    root = tmp_path_factory.mktemp("import-study")
    data_dir = write_jsonl_splits(root / "data", easy_data)
    spec = StudySpec.from_dict({
        "name": "tiny import", "arms": ARMS, "seeds": [1],
        "base": {"model": tiny_model, "data": str(data_dir), "train_size": 16, "eval_size": 16, "max_length": 48,
                 "precision": "no", "lora.rank": 2, "lora.target_modules": ["q_proj", "v_proj"], "reft.rank": 2,
                 "reft.layers": [1, 2], "reft.positions": "l1", "lora_stage.batch_size": 4,
                 "reft_stage.batch_size": 4},
    })
    run_study_in_process(spec, root / "tiny-study", progress=False, resamples=200)
    return root / "tiny-study"


def _registry(engine, home: Path) -> tuple:
    runs = [(r.id, r.name, r.status, r.artifact_dir) for r in queries.list_runs(engine, limit=None)]
    studies_ = [(s.id, s.name) for s in queries.list_studies(engine)]
    return runs, studies_, sorted(p.name for p in (home / "runs").iterdir()) if (home / "runs").exists() else []


def _comparable(report: dict) -> dict:
    """A report without what names where its runs live (directories and registry ids differ by design); wall
    seconds come back from the registry's start and finish times, to the microsecond."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("run_dir", "run_id", "charts")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return round(value, 4) if isinstance(value, float) else value
    return strip(report)


def test_cli_import_gives_the_same_report_and_ask_answers(study_dir, home, tmp_path) -> None:
    manifest = json.loads((study_dir / MANIFEST_FILE).read_text())
    assert "study.json" in manifest["files"] and any(name.endswith("/run.json") for name in manifest["files"])
    env = {**os.environ, "HEFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "heft_core", "study-import", str(study_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Imported as study #1 with runs #1, #2, #3 (imported from tiny import (tiny-study))" in done.stdout
    engine = open_db(home / "heft.db")
    runs = queries.study_runs(engine, 1)
    assert [(r.method, r.status, r.arm, r.seed) for r in runs] == [
        ("base", "completed", "Base", 1), ("lora", "completed", "LoRA 1", 1), ("heft", "completed", "HEFT 1+1", 1)]
    assert all(r.name.endswith("· imported from tiny import (tiny-study)") and r.executor == "import" for r in runs)
    sources = sorted((study_dir / "runs").iterdir())  # NNN-arm-sSEED: the index's order, as the run ids
    for run, source in zip(runs, sources):  # the run directories were copied into the data home, weights included
        copied = Path(run.artifact_dir)
        assert copied.parent == home / "runs" and (copied / "registry.json").exists()
        assert (copied / "predictions.jsonl").read_bytes() == (source / "predictions.jsonl").read_bytes()
        assert queries.evaluations(engine, run.id)
        assert run.method == "base" or queries.metrics_since(engine, run.id, 0)
        assert "imported (imported from tiny import (tiny-study))" in service.run_log(run)  # why no train.log
    assert (Path(runs[1].artifact_dir) / "lora").is_dir() and (Path(runs[2].artifact_dir) / "reft.safetensors").exists()
    # The same report as the directory's own, built from the registry as the Studies tab builds it.
    spec, outcomes = load_study_dir(study_dir)
    got, _ = studies.build_report(engine, 1)
    assert _comparable(study_report(spec, outcomes).to_dict()) == _comparable(got.to_dict())
    # The same Ask answers as the directory's run directories give.
    asker = AskService(engine)
    try:
        answered = asker.answer(PASSAGE, QUESTION, {"lora": runs[1].id, "heft": runs[2].id})
    finally:
        asker.close()
    assert {a["slot"]: (a["answer"], round(a["p_yes"], 4)) for a in answered["answers"]} == _direct_answers(study_dir)
    # Importing it again is refused: it is there already.
    again = subprocess.run([sys.executable, "-m", "app.study_import", str(study_dir)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "was imported before, as study #1" in again.stderr


def _direct_answers(study_dir: Path) -> dict:
    """Base, LoRA and HEFT answers straight from the study directory (heft_core.inference, no registry)."""
    from heft_core.artifacts import load_run
    from heft_core.inference import SideBySide

    dirs = sorted((study_dir / "runs").iterdir())
    config = load_run(dirs[1]).config
    server = SideBySide(config.model, template=config.template)
    server.add_run("lora", str(dirs[1]))
    server.add_run("heft", str(dirs[2]))
    answers = server.answer_all(PASSAGE, QUESTION)
    return {slot: (answer.answer, round(answer.p_yes, 4)) for slot, answer in answers.items()}


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is incomplete: runs/"),
    ("altered", "was changed after the study was written"),
    ("added", "is not in manifest.json (added after the study was written)"),
    ("version", "was written by an incompatible HEFT Studio"),
    ("no manifest", "has no manifest.json"),
    ("unfinished", "is incomplete: run runs/"),
])
def test_an_incomplete_altered_or_foreign_study_is_refused_and_nothing_is_imported(
        study_dir, home, tmp_path, damage, message) -> None:
    engine = open_db(home / "heft.db")
    queries.create_run(engine, name="already here", method="base", config={"method": "base"}, base_model="m",
                       data_source="synthetic")
    before = _registry(engine, home)
    copy = tmp_path / "tiny-study"
    shutil.copytree(study_dir, copy)
    lora_dir = sorted((copy / "runs").iterdir())[1]
    if damage == "truncated":
        (lora_dir / "evals.json").unlink()
    elif damage == "altered":
        text = (lora_dir / "predictions.jsonl").read_text()  # one answer's probability edited
        digit = next(i for i, c in enumerate(text) if c.isdigit())
        (lora_dir / "predictions.jsonl").write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
    elif damage == "added":
        (lora_dir / "extra.bin").write_bytes(b"\0")
    elif damage == "version":
        manifest = json.loads((copy / MANIFEST_FILE).read_text())
        (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": 99}))
    elif damage == "no manifest":
        (copy / MANIFEST_FILE).unlink()
    elif damage == "unfinished":
        index = json.loads((copy / "study.json").read_text())
        index["runs"][2]["status"] = "planned"
        (copy / "study.json").write_text(json.dumps(index))
        manifest = json.loads((copy / MANIFEST_FILE).read_text())  # even with matching checksums
        import hashlib

        manifest["files"]["study.json"] = hashlib.sha256((copy / "study.json").read_bytes()).hexdigest()
        (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StudyDirError, match=message.replace("(", r"\(").replace(")", r"\)")):
        study_import.import_study(engine, copy, LOCAL)
    assert _registry(engine, home) == before
    # and as a zip, through the path the Studies tab and the API take
    archive = shutil.make_archive(str(tmp_path / "upload"), "zip", root_dir=tmp_path, base_dir="tiny-study")
    with pytest.raises(StudyDirError):
        study_import.import_study_zip(engine, archive, LOCAL)
    assert _registry(engine, home) == before


def test_a_failure_half_way_leaves_nothing_and_a_zip_imports(study_dir, home, tmp_path, monkeypatch) -> None:
    engine = open_db(home / "heft.db")
    before = _registry(engine, home)
    import storage.imports as imports

    calls = []
    real = imports.write_registry_record

    def fail_on_the_third(run_dir, run):
        calls.append(run.id)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(run_dir, run)

    monkeypatch.setattr(imports, "write_registry_record", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        study_import.import_study(engine, study_dir, LOCAL)
    assert _registry(engine, home) == before  # no rows, no copies (renamed ones were moved back and removed)
    monkeypatch.setattr(imports, "write_registry_record", real)
    # Visitors of a public deployment may not import; the owner's zip upload imports.
    archive = shutil.make_archive(str(tmp_path / "upload"), "zip", root_dir=study_dir.parent, base_dir=study_dir.name)
    monkeypatch.setenv("HEFT_PUBLIC", "1")
    with pytest.raises(PermissionRefused, match="importing studies is for its owners"):
        study_import.import_study_zip(engine, archive)
    assert _registry(engine, home) == before
    imported = study_import.import_study_zip(engine, archive, LOCAL)
    assert imported.origin == "imported from tiny import (tiny-study)" and len(imported.run_ids) == 3
    assert not [p for p in (home / "runs").iterdir() if p.name.startswith(".import-")]


def test_the_bundled_demo_is_imported_once_per_data_home_unless_heft_demo_is_0(study_dir, tmp_path,
                                                                               monkeypatch) -> None:
    from app import service

    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "off"))
    monkeypatch.setenv("HEFT_DEMO", "0")
    engine = open_db(tmp_path / "off" / "heft.db")
    assert study_import.import_bundled_demo(engine, study_dir) is None and service.list_runs_payload(engine) == []
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "on"))
    monkeypatch.delenv("HEFT_DEMO")
    engine = open_db(tmp_path / "on" / "heft.db")
    assert study_import.import_bundled_demo(engine, tmp_path / "no-such-demo") is None
    imported = study_import.import_bundled_demo(engine, study_dir)
    assert imported is not None
    assert [run["method"] for run in service.list_runs_payload(engine)] == ["heft", "lora", "base"]
    asker = AskService(engine)
    try:
        defaults = service.ask_defaults(service.list_runs(engine, status="completed"))
        answered = asker.answer(PASSAGE, QUESTION, defaults)
    finally:
        asker.close()
    assert [a["slot"] for a in answered["answers"]] == ["base", "lora", "heft"]
    assert study_import.import_bundled_demo(engine, study_dir) is None  # imported here once: nothing again
    assert len(service.list_runs_payload(engine)) == 3
    for run in service.list_runs_payload(engine):  # deleted by the user: not brought back at the next start
        service.delete_run(engine, run["id"])
    assert study_import.import_bundled_demo(engine, study_dir) is None and service.list_runs_payload(engine) == []
    # A Space's ephemeral disk: a new data home (no marker) gets the demo again
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "restarted"))
    engine = open_db(tmp_path / "restarted" / "heft.db")
    assert study_import.import_bundled_demo(engine, study_dir) is not None
    assert len(service.list_runs_payload(engine)) == 3


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory, tiny_model, easy_data) -> Path:
    """The bundled demo's shape on the tiny Llama: the cpu-demo preset's four arms (HEFT's stage 1 the LoRA run's,
    kept as an adapter), trained by the runner, then made small by ``heft_core.study_bundle``."""
    from heft_core import study_presets
    from heft_core.study_bundle import bundle_study

    root = tmp_path_factory.mktemp("demo-bundle")
    data_dir = write_jsonl_splits(root / "data", easy_data)
    spec = study_presets.cpu_demo(reft_epochs=1).to_dict()
    spec["arms"] = [{"method": "base"}, {"method": "lora", "lora_epochs": 1}, {"method": "reft", "reft_epochs": 1},
                    {"method": "heft", "lora_epochs": 1, "reft_epochs": 1}]
    spec["base"].update({"model": tiny_model, "data": str(data_dir), "train_size": 16, "eval_size": 16,
                         "max_length": 48, "precision": "no", "lora.layers": [1, 2], "reft.layers": [1, 2],
                         "reft.rank": 2})
    run_study_in_process(StudySpec.from_dict(spec), root / "demo-study", progress=False, resamples=200)
    return bundle_study(root / "demo-study", root / "bundle")


def test_the_demo_bundle_is_small_bf16_and_imports_four_variants_that_ask_answers(demo_bundle, tmp_path,
                                                                                monkeypatch) -> None:
    from safetensors.torch import load_file

    from app import service

    weights = sorted(demo_bundle.rglob("*.safetensors"))
    assert len(weights) == 4  # the LoRA run's adapter, HEFT's copy of it, ReFT's and HEFT's interventions
    tensors = [t for path in weights for t in load_file(str(path)).values()]
    assert all(str(t.dtype) == "torch.bfloat16" for t in tensors if t.is_floating_point())  # (int64: pyvene's counters)
    assert not list(demo_bundle.rglob("checkpoints")) and not list(demo_bundle.rglob("train.log"))
    # The report names its run directories relatively, not by where the runner wrote the study.
    assert {run["run_dir"] for run in json.loads((demo_bundle / "results.json").read_text())["runs"]} == {
        f"runs/{path.name}" for path in (demo_bundle / "runs").iterdir()}
    for name in ("results.json", "results.csv"):  # (the spec's data option is a path here: an option, kept)
        assert str(demo_bundle.parent / "demo-study") not in (demo_bundle / name).read_text(), name
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "off"))
    monkeypatch.setenv("HEFT_DEMO", "0")
    engine = open_db(tmp_path / "off" / "heft.db")
    assert study_import.import_bundled_demo(engine, demo_bundle) is None and service.list_runs_payload(engine) == []
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "on"))
    monkeypatch.delenv("HEFT_DEMO")
    engine = open_db(tmp_path / "on" / "heft.db")
    assert study_import.import_bundled_demo(engine, demo_bundle) is not None
    assert sorted(run["method"] for run in service.list_runs_payload(engine)) == ["base", "heft", "lora", "reft"]
    asker = AskService(engine)
    try:
        answered = asker.answer(PASSAGE, QUESTION, service.ask_defaults(service.list_runs(engine, status="completed")))
    finally:
        asker.close()
    assert sorted(a["slot"] for a in answered["answers"]) == ["base", "heft", "lora", "reft"]
    assert all(a.get("answer") in ("yes", "no") for a in answered["answers"]), answered


def test_the_committed_demo_is_whole_portable_and_imports(tmp_path, monkeypatch) -> None:
    """app/demo_study as committed: its manifest matches, its records name no path of the machine that trained
    it (adapters name the model option, the report names runs relatively), and it imports."""
    from app import service
    from heft_core.study_manifest import verify_study_dir

    demo = study_import.DEFAULT_DEMO_DIR
    _, entries = verify_study_dir(demo)
    for config_file in sorted(demo.glob("runs/*/lora/adapter_config.json")):
        model = json.loads((config_file.parent.parent / "run.json").read_text())["config"]["model"]
        assert json.loads(config_file.read_text())["base_model_name_or_path"] == model == "embedded"
        assert "/models/" not in (config_file.parent / "README.md").read_text()
    assert [run["run_dir"] for run in json.loads((demo / "results.json").read_text())["runs"]] == [
        entry["run_dir"] for entry in entries]
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEFT_DEMO", raising=False)
    engine = open_db(tmp_path / "home" / "heft.db")
    imported = study_import.import_bundled_demo(engine)
    assert imported is not None and len(imported.run_ids) == 4
    assert sorted(run["method"] for run in service.list_runs_payload(engine)) == ["base", "heft", "lora", "reft"]


def _zip_keeping_links(directory: Path, zip_path: Path) -> Path:
    """A zip of ``directory`` that stores its symbolic links as links (as ``zip -ry`` does), not their content."""
    import stat
    import zipfile

    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(directory.rglob("*")):
            name = f"{directory.name}/{path.relative_to(directory).as_posix()}"
            if path.is_symlink():
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, os.readlink(path))
            elif path.is_file():
                archive.write(path, name)
    return zip_path


def test_the_bundle_links_identical_files_and_imports_them_from_a_directory_or_a_zip(demo_bundle, tmp_path,
                                                                                    monkeypatch) -> None:
    runs = sorted((demo_bundle / "runs").iterdir())  # base, LoRA, ReFT, HEFT
    lora, heft = runs[1] / "lora", runs[3] / "lora"
    adapter = heft / "adapter_model.safetensors"
    assert adapter.is_symlink() and os.readlink(adapter) == f"../../{runs[1].name}/lora/adapter_model.safetensors"
    assert adapter.read_bytes() == (lora / "adapter_model.safetensors").read_bytes()
    assert not (lora / "adapter_model.safetensors").is_symlink()  # the first one stays a file
    assert not [p for p in demo_bundle.rglob("*") if p.is_symlink() and p.stat().st_size == 0]
    for upload in ("directory", "zip"):
        monkeypatch.setenv("HEFT_HOME", str(tmp_path / upload))
        engine = open_db(tmp_path / upload / "heft.db")
        if upload == "zip":
            imported = study_import.import_study_zip(engine, _zip_keeping_links(demo_bundle, tmp_path / "b.zip"), LOCAL)
        else:
            imported = study_import.import_study(engine, demo_bundle, LOCAL)
        copied = Path(queries.get_run(engine, imported.run_ids[3]).artifact_dir) / "lora" / "adapter_model.safetensors"
        assert not copied.is_symlink() and copied.read_bytes() == adapter.read_bytes()  # the data home holds files


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../outside.txt", "../../../../../../../../etc/passwd"])
def test_a_link_out_of_the_study_directory_is_refused(demo_bundle, home, tmp_path, target) -> None:
    import hashlib

    engine = open_db(home / "heft.db")
    before = _registry(engine, home)
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy, symlinks=True)
    (tmp_path / "outside.txt").write_text("a file of the machine, not of the study\n")
    evals = sorted((copy / "runs").iterdir())[1] / "evals.json"
    evals.unlink()
    evals.symlink_to(target)
    if evals.exists():  # the manifest made to agree, so only the link can refuse it
        manifest = json.loads((copy / MANIFEST_FILE).read_text())
        manifest["files"][evals.relative_to(copy).as_posix()] = hashlib.sha256(evals.read_bytes()).hexdigest()
        (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StudyDirError, match=r"evals.json is a link that points outside the study directory"):
        study_import.import_study(engine, copy, LOCAL)
    assert _registry(engine, home) == before
    with pytest.raises(StudyDirError, match=r"evals.json is a link that points outside the study directory"):
        study_import.import_study_zip(engine, _zip_keeping_links(copy, tmp_path / "upload.zip"), LOCAL)
    assert _registry(engine, home) == before


def test_check_links_accepts_relative_links_to_its_files_only(tmp_path) -> None:
    from heft_core.study_manifest import check_links

    study = tmp_path / "study"
    (study / "runs" / "a").mkdir(parents=True)
    (study / "runs" / "b").mkdir()
    (study / "runs" / "a" / "w.bin").write_bytes(b"w")
    (study / "runs" / "b" / "w.bin").symlink_to("../a/w.bin")
    check_links(study)  # a bundle's link between run directories
    cases = {"folder": ("../a", "only files may be linked"), "dangling": ("../a/none.bin", "does not exist"),
             "absolute": (str(study / "runs" / "a" / "w.bin"), "points outside the study directory")}
    for name, (target, message) in cases.items():
        link = study / "runs" / "b" / name
        link.symlink_to(target)
        with pytest.raises(StudyDirError, match=message):
            check_links(study)
        link.unlink()
