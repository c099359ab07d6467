"""Run records that travel (issue 25): a run directory names no path of the machine that trained it.

The embedded model is loaded from its cache under the data home (an absolute path of this machine); here
that cache is the tiny Llama copied where the embedded model's cache lives, so the run's ``model`` option
is ``embedded`` and the directory it is loaded from lies under ``tmp_path`` like the run directory itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from heft_core.artifacts import load_run, name_adapter_base
from tests.conftest import quick_config


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Path:
    """This machine's paths in these tests: the data home (with the model cache) and the run directories."""
    return tmp_path_factory.mktemp("machine")


@pytest.fixture(scope="module")
def embedded_runs(tiny_model, easy_data, machine) -> dict[str, Path]:
    """A LoRA and a HEFT run of ``embedded`` (the tiny Llama in the embedded model's cache under ``machine``)."""
    from heft_core import models
    from heft_core.config import ReftSettings
    from heft_core.train import train

    shutil.copytree(tiny_model, machine / "home" / "models" / models._CACHE_NAME)
    models.model_info.cache_clear()  # "embedded" names another model in this module
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HEFT_HOME", str(machine / "home"))
            reft = ReftSettings(rank=2, layers=[1, 2], positions="l1", dropout=0.0)
            return {method: Path(train(quick_config("embedded", method, reft=reft), machine / method,
                                       data=easy_data).run_dir) for method in ("lora", "heft")}
    finally:
        models.model_info.cache_clear()


def test_a_freshly_trained_runs_records_name_no_path_of_the_machine(embedded_runs, machine) -> None:
    for method, run_dir in embedded_runs.items():
        assert str(run_dir).startswith(str(machine))
        records = {name: (run_dir / name).read_text()
                   for name in ("run.json", "lora/adapter_config.json", "lora/README.md")}
        for name, text in records.items():
            assert str(machine) not in text, f"{method}: {name} names a path of this machine"
        adapter = json.loads(records["lora/adapter_config.json"])
        assert adapter["base_model_name_or_path"] == "embedded"  # the run's model option, as the config says
        assert "base_model: embedded" in records["lora/README.md"]
        assert load_run(run_dir).config.model == "embedded"


def test_old_records_with_absolute_paths_and_new_ones_read_alike(embedded_runs, machine, tmp_path,
                                                                 monkeypatch) -> None:
    """An adapter written before (its base named by the cache path) exports and loads like a new one."""
    from heft_core import export

    monkeypatch.setenv("HEFT_HOME", str(machine / "home"))
    new = embedded_runs["lora"]
    old = tmp_path / "old-lora"
    shutil.copytree(new, old)
    config_path = old / "lora" / "adapter_config.json"
    adapter = json.loads(config_path.read_text())
    cache = str(machine / "home" / "models" / "smollm2-135m-instruct")
    config_path.write_text(json.dumps({**adapter, "base_model_name_or_path": cache}, indent=2))
    assert name_adapter_base(old / "lora", "embedded") is True  # how committed records were rewritten
    assert json.loads(config_path.read_text()) == adapter
    config_path.write_text(json.dumps({**adapter, "base_model_name_or_path": cache}, indent=2))
    for run_dir in (new, old):
        out = export.export_run(run_dir, tmp_path / f"export-{run_dir.name}", "adapter")
        exported = json.loads((out / "adapter_config.json").read_text())
        assert exported["base_model_name_or_path"] == export.EMBEDDED_HUB_ID  # the hub id, either way
    # and Ask serves both (peft is handed the base model: the name in the adapter's config is not read)
    from heft_core.inference import SideBySide

    server = SideBySide("embedded", template=load_run(new).config.template, max_length=64)
    server.add_run("new", str(new))
    server.add_run("old", str(old))
    answers = server.answer_all("the river town road", "is the bird red")
    assert answers["new"].p_yes == pytest.approx(answers["old"].p_yes)
