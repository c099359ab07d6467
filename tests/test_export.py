"""Export (heft_core.export): each format loads back with peft / transformers / pyreft alone.

Trained runs on the tiny random Llama are exported, then a fresh Python process that cannot
import heft_core loads every export with the libraries themselves and scores a few prompts;
its yes/no logit differences must equal the run's own predictions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from heft_common.errors import ExportError, HeftError
from heft_core import export
from heft_core.artifacts import load_run
from heft_core.cli import main
from heft_core.prompt import PromptEncoder

PROMPTS = 8  # validation questions scored by the fresh process


@pytest.fixture(scope="module")
def runs(quick_runs):
    """One short run per trained method (tests/conftest.py): ReFT with unshared first/last interventions, HEFT
    shared."""
    return quick_runs


EXPORTS = {  # name -> (run, format)
    "lora-adapter": ("lora", "adapter"),
    "lora-merged": ("lora", "merged"),
    "reft": ("reft", "reft"),
    "heft-adapter": ("heft", "adapter"),
    "heft-merged": ("heft", "merged"),
}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: export.export_run(runs[method], root / name, fmt) for name, (method, fmt) in EXPORTS.items()}


# The fresh process: transformers, peft and pyreft only, as the model card tells users to load them.
LOADER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, os, sys
    import torch
    from transformers import AutoModelForCausalLM
    from peft import AutoPeftModelForCausalLM, PeftModel
    import pyreft

    assert importlib.util.find_spec("heft_core") is None, "the loader must not see heft_core"
    spec = json.load(open(sys.argv[1]))

    def plain(model):
        return lambda ids: model(input_ids=torch.tensor([ids])).logits[0, -1]

    def with_interventions(host, reft_dir):
        config = json.load(open(os.path.join(reft_dir, "intervention_config.json")))
        reft_model = pyreft.ReftModel.load(reft_dir, host)
        for key, intervention in reft_model.interventions.items():  # ReftModel.load rebuilds them in bfloat16
            intervention.to(torch.float32).load_state_dict(torch.load(os.path.join(reft_dir, f"intkey_{key}.bin")))

        def locations(length):
            parts = {"first": [min(i, length - 1) for i in range(config["first_n"])],
                     "last": [max(length - config["last_n"] + i, 0) for i in range(config["last_n"])]}
            return [[[p for part in item["positions"] for p in parts[part]]] for item in config["interventions"]]

        def score(ids):
            unit_locations = {"sources->base": (None, locations(len(ids)))}
            _, output = reft_model({"input_ids": torch.tensor([ids])}, unit_locations=unit_locations)
            return output.logits[0, -1]
        return score

    def base_of(path):
        return json.load(open(path))["base_model_name_or_path"]

    results = {}
    for name, job in spec["jobs"].items():
        kind, path = job["kind"], job["path"]
        if kind == "base":
            score = plain(AutoModelForCausalLM.from_pretrained(path).eval())
        elif kind == "lora-adapter":  # the base model comes from the adapter's own config
            score = plain(AutoPeftModelForCausalLM.from_pretrained(path).eval())
        elif kind == "lora-merged":
            score = plain(AutoModelForCausalLM.from_pretrained(path).eval())
        elif kind == "reft":
            base = json.load(open(os.path.join(path, "intervention_config.json")))["base_model"]
            score = with_interventions(AutoModelForCausalLM.from_pretrained(base).eval(), path)
        elif kind == "heft-adapter":
            lora = os.path.join(path, "lora")
            base = AutoModelForCausalLM.from_pretrained(base_of(os.path.join(lora, "adapter_config.json")))
            host = PeftModel.from_pretrained(base, lora)
            score = with_interventions(host.merge_and_unload().eval(), os.path.join(path, "reft"))
        elif kind == "heft-merged":
            host = AutoModelForCausalLM.from_pretrained(os.path.join(path, "merged")).eval()
            score = with_interventions(host, os.path.join(path, "reft"))
        with torch.no_grad():
            results[name] = [float(score(ids)[spec["yes_id"]] - score(ids)[spec["no_id"]]) for ids in spec["prompts"]]

    # Each model card's "How to load" code, as written (path and question filled in).
    cards = {}
    for name, code in spec["cards"].items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, name, "exec"), {"__name__": "__card__"})
        cards[name] = printed.getvalue().split()[-2:]  # libraries may print notices first
    print(json.dumps({"diffs": results, "cards": cards}))
""")


def _card_code(path: Path, example) -> str:
    code = (path / "README.md").read_text().split("```python\n", 1)[1].split("\n```", 1)[0]
    code = code.replace('"path/to/this/export"', repr(str(path)))
    code = code.replace(
        'encode("Passage text ...", "is it true that ...")', f"encode({example.passage!r}, {example.question!r})"
    )
    assert repr(str(path)) in code and repr(example.passage) in code
    return code


@pytest.fixture(scope="module")
def reloaded(exports, runs, tiny_model, easy_data, tmp_path_factory):
    """Yes-minus-no logits of each export (and of the bare base model), and each card's code, run in a fresh process."""
    from transformers import AutoTokenizer

    run = load_run(runs["lora"])
    evaluated = {p["uid"] for p in run.predictions()}
    examples = [e for e in easy_data.validation if e.uid in evaluated][:PROMPTS]
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model), run.config.template, run.config.max_length)
    work = tmp_path_factory.mktemp("loader")
    jobs = {name: {"kind": name, "path": str(path)} for name, path in exports.items()}
    jobs["base"] = {"kind": "base", "path": tiny_model}
    spec = {
        "jobs": jobs,
        "prompts": [encoder.encode(e.passage, e.question) for e in examples],
        "yes_id": encoder.yes_id,
        "no_id": encoder.no_id,
        "cards": {name: _card_code(path, examples[-1]) for name, path in exports.items()},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, str(work / "loader.py"), str(work / "spec.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"uids": [e.uid for e in examples], **json.loads(done.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loaded_by_the_libraries_reproduces_the_run(name, reloaded, runs):
    method, _fmt = EXPORTS[name]
    saved = {p["uid"]: p for p in load_run(runs[method]).predictions()}
    diffs = reloaded["diffs"][name]
    for uid, diff in zip(reloaded["uids"], diffs):
        p_yes = saved[uid]["p_yes"]
        assert 1 / (1 + math.exp(-diff)) == pytest.approx(p_yes, abs=1e-4), (uid, diff, p_yes)
        assert (diff >= 0) == bool(saved[uid]["predicted"])
        if 1e-3 < p_yes < 1 - 1e-3:  # the logit difference itself, where P(yes) resolves it
            assert diff == pytest.approx(math.log(p_yes / (1 - p_yes)), abs=2e-3)
    # The export carries the trained weights: the bare base model scores differently.
    assert max(abs(a - b) for a, b in zip(diffs, reloaded["diffs"]["base"])) > 0.05


def test_model_card_code_runs_and_reproduces_the_run(reloaded, runs):
    """The card's own "How to load" code answers a question as the run did."""
    uid = reloaded["uids"][-1]
    for name, (method, _fmt) in EXPORTS.items():
        [saved] = [p for p in load_run(runs[method]).predictions() if p["uid"] == uid]
        answer, p_yes = reloaded["cards"][name]
        assert answer == ("yes" if saved["predicted"] else "no")
        assert float(p_yes) == pytest.approx(saved["p_yes"], abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "heft"])
def test_merged_and_unmerged_exports_agree(method, reloaded):
    adapter, merged = reloaded["diffs"][f"{method}-adapter"], reloaded["diffs"][f"{method}-merged"]
    assert merged == pytest.approx(adapter, abs=1e-4)


def test_export_layouts(exports, tiny_model):
    lora = exports["lora-adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "heft_export.json"} <= {
        p.name for p in lora.iterdir()
    }
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        Path(tiny_model).resolve()
    )
    merged = {p.name for p in exports["lora-merged"].iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= merged
    reft = exports["reft"]
    spec = json.loads((reft / "intervention_config.json").read_text())
    # Unshared f2+l2 on layers 1 and 3: a first-position and a last-position intervention per layer.
    assert [(i["layer"], i["positions"]) for i in spec["interventions"]] == [
        (1, ["first"]),
        (3, ["first"]),
        (1, ["last"]),
        (3, ["last"]),
    ]
    assert (spec["rank"], spec["layers"], spec["positions"], spec["share_weights"]) == (4, [1, 3], "f2+l2", False)
    assert spec["prompt_template"]["yes"] == " yes" and spec["component"] == "block_output"
    assert all((reft / i["file"]).is_file() for i in spec["interventions"]) and (reft / "config.json").is_file()
    for name, stage1 in (("heft-adapter", "lora"), ("heft-merged", "merged")):
        top = {p.name for p in exports[name].iterdir()}
        assert top == {stage1, "reft", "README.md", "heft_export.json"}, top
        assert json.loads((exports[name] / "reft" / "intervention_config.json").read_text())["host"].startswith(
            "the base model with the stage-1 LoRA merged"
        )
    manifest = export.read_manifest(exports["heft-merged"])
    assert (manifest["format"], manifest["method"]) == ("merged", "heft")
    assert sorted(manifest["files"]) == sorted(p.name for p in exports["heft-merged"].iterdir())


def test_model_card_metadata_and_body(exports, runs):
    from huggingface_hub import ModelCard

    from heft_core.stats import wilson_interval

    predictions = load_run(runs["heft"]).predictions()
    correct, n = sum(p["correct"] for p in predictions), len(predictions)
    yes = sum(p["label"] for p in predictions)
    low, high = wilson_interval(correct, n)
    for name, library in (
        ("lora-adapter", "peft"),
        ("lora-merged", "transformers"),
        ("reft", "pyreft"),
        ("heft-merged", "pyreft"),
    ):
        card = ModelCard.load(exports[name] / "README.md")
        assert card.data.library_name == library
        assert card.data.base_model is None  # a local base model is no hub id: named in the body instead
        assert card.data.datasets is None  # the easy test set is no hub dataset (and not BoolQ)
        assert "heft-studio" in card.data.tags
        [result] = card.data.eval_results
        assert result.metric_type == "accuracy" and 0 <= result.metric_value <= 1
    card = ModelCard.load(exports["heft-merged"] / "README.md")
    assert card.data.eval_results[0].metric_value == round(correct / n, 4)
    assert f"{correct / n * 100:.2f}%" in card.text and f"{low * 100:.2f}% to {high * 100:.2f}%" in card.text
    assert f"{max(yes, n - yes) / n * 100:.2f}%" in card.text and "Majority-class baseline" in card.text
    assert (
        "not* BoolQ" in card.text
        and "pyreft.ReftModel.load" in card.text
        and "base_model" not in card.text.split("## Training")[0]
    )
    assert "merge_and_unload()" in ModelCard.load(exports["heft-adapter"] / "README.md").text
    assert (
        json.loads(card.text.split("```json\n", 1)[1].split("\n```", 1)[0]) == load_run(runs["heft"]).config.to_dict()
    )


def _fake_run(source: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a run with run.json fields changed (``config_model=...``, ``data=...``, ``status=...``)."""
    copy = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(source, copy)
    meta = json.loads((copy / "run.json").read_text())
    if "config_model" in changes:
        meta["config"]["model"] = changes["config_model"]
    if "data" in changes:
        meta["data"] = changes["data"]
    if "status" in changes:
        meta["result"]["status"] = changes["status"]
    (copy / "run.json").write_text(json.dumps(meta))
    return copy


def test_embedded_and_hub_base_models_are_named_by_their_hub_id(runs, tmp_path):
    from huggingface_hub import ModelCard

    boolq = {"source": "hub:google/boolq", "label": "BoolQ (google/boolq, hub)", "is_synthetic": False}
    embedded = export.export_run(
        _fake_run(runs["lora"], tmp_path, config_model="embedded", data=boolq), tmp_path / "embedded"
    )
    adapter_config = json.loads((embedded / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard.load(embedded / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.datasets == ["google/boolq"]
    assert export.base_model_reference("embedded").local_path in card.text  # the local copy in the model cache
    hub = export.export_run(_fake_run(runs["lora"], tmp_path, config_model="some-org/some-model"), tmp_path / "hub")
    assert json.loads((hub / "adapter_config.json").read_text())["base_model_name_or_path"] == "some-org/some-model"
    assert ModelCard.load(hub / "README.md").data.base_model == "some-org/some-model"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_bad_input_is_refused_with_nothing_written(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["lora"], unfinished)
    (unfinished / "run.json").unlink()
    no_weights = tmp_path / "no-weights"
    shutil.copytree(runs["lora"], no_weights)
    (no_weights / "lora" / "adapter_model.safetensors").unlink()
    cancelled = _fake_run(runs["lora"], tmp_path, status="cancelled")
    before = _tree(tmp_path)
    cases = [
        (unfinished, "adapter", "not a finished run"),
        (no_weights, "adapter", "adapter_model.safetensors"),
        (cancelled, "adapter", "cancelled, not completed"),
        (runs["lora"], "onnx", "not an export format; choose one of adapter, merged, reft"),
        (runs["lora"], "reft", "does not apply to a LoRA run; a LoRA run exports as adapter or merged"),
        (runs["reft"], "merged", "a ReFT run exports as reft"),
    ]
    for run_dir, fmt, message in cases:
        with pytest.raises(ExportError, match=message):
            export.export_run(run_dir, tmp_path / "out" / "nested", fmt)
    assert _tree(tmp_path) == before  # not even the output directory
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and holds no previous export"):
        export.export_run(runs["lora"], occupied, "adapter")
    assert _tree(occupied) == {"notes.txt"}
    with pytest.raises(ExportError, match="inside the run directory"):
        export.export_run(runs["lora"], runs["lora"] / "export", "adapter")
    assert not (runs["lora"] / "export").exists()


def test_a_previous_export_is_replaced_and_a_failed_one_leaves_it_intact(runs, tmp_path, monkeypatch):
    out = export.export_run(runs["lora"], tmp_path / "out", "merged")
    assert (out / "model.safetensors").is_file()
    export.export_run(runs["lora"], out, "adapter")  # same directory, another format
    assert export.read_manifest(out)["format"] == "adapter"
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").is_file()
    # An edited manifest cannot make an export delete anything outside its directory.
    (tmp_path / "keep.txt").write_text("outside")
    manifest = json.loads((out / "heft_export.json").read_text())
    (out / "heft_export.json").write_text(
        json.dumps({**manifest, "files": [*manifest["files"], "..", "../keep.txt", "/"]})
    )
    export.export_run(runs["lora"], out, "adapter")
    assert (tmp_path / "keep.txt").read_text() == "outside" and export.read_manifest(out)["format"] == "adapter"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(runs["lora"], out, "merged")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no staging left, nothing changed
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(runs["lora"], tmp_path / "fresh" / "out", "adapter")
    assert not (tmp_path / "fresh").exists()


def test_archive_holds_the_export(runs, tmp_path):
    archive = export.export_archive(runs["lora"], tmp_path / "lora-adapter.zip", "adapter")
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
    assert {
        "lora-adapter/adapter_model.safetensors",
        "lora-adapter/README.md",
        "lora-adapter/heft_export.json",
    } <= names
    assert _tree(tmp_path) == {"lora-adapter.zip"}


class FakeHub:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: no environment variable, no logged-in CLI."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


def test_push_uploads_the_export_folder(exports, monkeypatch, caplog, no_token):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with caplog.at_level(logging.DEBUG):
        url = export.push_to_hub(exports["reft"], "someone/heft-reft", private=True, api=hub)
    assert url == "https://huggingface.co/someone/heft-reft"
    (create, create_args, create_kwargs), (upload, _, upload_kwargs) = hub.calls
    assert (create, create_args) == ("create_repo", ("someone/heft-reft",))
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert upload == "upload_folder" and upload_kwargs["repo_id"] == "someone/heft-reft"
    assert Path(upload_kwargs["folder_path"]) == exports["reft"].absolute()
    assert create_kwargs["token"] == upload_kwargs["token"] == "hf_secret_value"
    assert "hf_secret_value" not in caplog.text


def test_push_without_a_token_uploads_nothing(exports, no_token):
    hub = FakeHub()
    with pytest.raises(ExportError, match="no Hugging Face token.*nothing was uploaded"):
        export.push_to_hub(exports["reft"], "someone/heft-reft", private=False, api=hub)
    assert hub.calls == []


@pytest.mark.parametrize("repo_id", ["bad repo/..", "a/b/c", "", "-leading/dash"])
def test_push_rejects_repo_ids_the_hub_would_reject(exports, repo_id, monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with pytest.raises(ExportError, match="repo id"):
        export.push_to_hub(exports["reft"], repo_id, api=hub)
    assert hub.calls == []


def test_push_refuses_a_folder_that_is_no_export(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with pytest.raises(ExportError, match="not a finished export"):
        export.push_to_hub(tmp_path, "someone/model", api=hub)
    assert hub.calls == []


def test_push_failure_is_a_clear_error_without_the_token(exports, monkeypatch):
    class FailingHub(FakeHub):
        def upload_folder(self, *args, **kwargs):
            raise OSError(f"403 Forbidden for token {kwargs['token']}\nmore detail")

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with pytest.raises(ExportError, match=r"push to someone/model failed: 403 Forbidden") as caught:
        export.push_to_hub(exports["reft"], "someone/model", api=FailingHub())
    assert "hf_secret_value" not in str(caught.value)


def test_formats_are_defined_once_per_method():
    assert export.formats_for_method("lora") == ["adapter", "merged"]
    assert export.formats_for_method("heft") == ["adapter", "merged"]
    assert export.formats_for_method("reft") == ["reft"]
    assert export.formats_for_method("base") == []
    assert issubclass(ExportError, HeftError)
    with pytest.raises(ExportError, match="nothing trained to export"):
        export.check_format("adapter", "base")


def test_cli_export_prints_one_json_line(runs, tmp_path, capsys):
    assert main(["export", str(runs["reft"]), "--out", str(tmp_path / "cli")]) == 0  # default format of a ReFT run
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1  # one JSON line, no library notices
    payload = json.loads(printed)
    assert (
        payload["out"] == str((tmp_path / "cli").absolute())
        and payload["format"] == "reft"
        and payload["pushed"] is None
    )
    assert export.read_manifest(tmp_path / "cli")["method"] == "reft"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "onnx"], "not an export format"),
        (["--format", "reft"], "does not apply to a LoRA run"),
        (["--push", "bad repo/.."], "repo id"),
        (["--private"], "--private: applies to --push only"),
    ],
)
def test_cli_export_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, argv, message, no_token):
    out = tmp_path / "cli-out"
    assert main(["export", str(runs["lora"]), "--out", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1
    assert not out.exists()


def test_cli_push_without_token_exports_nothing(runs, tmp_path, capsys, no_token):
    assert main(["export", str(runs["lora"]), "--out", str(tmp_path / "o"), "--push", "someone/model"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
