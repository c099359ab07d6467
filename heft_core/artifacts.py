"""Run directories: written atomically, loaded into answer models that reproduce predictions.

Layout of a run directory::

    run.json            config, library versions, data, eval signature, results (written last)
    lora/               peft adapter (LoRA and HEFT), its base model named by the run's model option
    reft.safetensors    full intervention state (ReFT and HEFT); settings live in run.json
    metrics.jsonl       one line per optimizer step
    evals.json          one entry per epoch evaluation
    predictions.jsonl   uid, gold label, P(yes), prediction, correct

Files are staged in a hidden directory and moved into place; ``run.json`` goes last, so a
directory without it (a crash mid-write) never loads. The files do not name the run directory (readers know
where they found it) nor the model cache the base model was loaded from (:func:`name_adapter_base`); paths
the run was given as options stay as given, and ``data.source`` is where the data was read, next to its
portable ``label``. ``RunResult`` (what a run produced) lives here
because a run directory is its stored form; ``heft_core.train`` returns one. Importing this module
does not import torch: ``safetensors.torch`` is imported only when a ReFT state is written (heavy: deferred).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heft_common.errors import RunLoadError
from heft_core import __version__
from heft_core.callbacks import EvalEvent, StepEvent
from heft_core.config import RunConfig
from heft_core.stats import AccuracyResult

if TYPE_CHECKING:  # annotations only (adapters and evaluate import torch)
    from heft_core.adapters import ReftAnswerModel
    from heft_core.data import DatasetSplits
    from heft_core.evaluate import Prediction
    from heft_core.models import ModelInfo

RUN_FILE = "run.json"
FORMAT_VERSION = 1
_LIBRARIES = ("torch", "transformers", "peft", "pyreft", "pyvene", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    versions = {"heft_core": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


@dataclass
class RunResult:
    """What a run produced: final accuracy, per-question predictions, steps, evaluations, speed."""

    run_dir: str
    status: str  # "completed" or "cancelled"
    accuracy: AccuracyResult | None
    predictions: list[Prediction]
    train_seconds: float
    tokens_per_second: float
    trainable_params: dict[str, int]
    steps: list[StepEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    lora_unchanged_by_stage2: bool | None = None
    scoring: str = "logits"  # the primary scoring: what ``accuracy`` is
    # {"logits": {accuracy, low, high, n}, "generation": {..., "unparsed": k}}: the scorings computed
    accuracies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The one-line JSON the CLI prints."""
        acc = self.accuracy
        return {
            "status": self.status,
            "scoring": self.scoring,
            "accuracy": acc.accuracy if acc else None,
            "accuracies": self.accuracies,
            "accuracy_ci": [acc.low, acc.high] if acc else None,
            "eval_n": acc.n if acc else 0,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "trainable_params": sum(self.trainable_params.values()),
            "trainable_params_by_stage": self.trainable_params,
            "run_dir": self.run_dir,
        }


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_CARD = "README.md"  # peft's model card, written next to the adapter


def name_adapter_base(lora_dir: str | Path, model: str) -> bool:
    """Name a saved peft adapter's base model by the run's ``model`` option (``embedded``, a hub id, a path as
    given) instead of the local directory it was loaded from (a model cache of this machine), in
    ``adapter_config.json`` and peft's card; returns whether anything changed. Loading never reads the name
    (the app passes the base model itself) and exports rewrite it to a hub id (``heft_core.export``)."""
    config_path = Path(lora_dir) / ADAPTER_CONFIG
    adapter = json.loads(config_path.read_text())
    loaded_from = adapter.get("base_model_name_or_path")
    if not loaded_from or loaded_from == model:
        return False
    adapter["base_model_name_or_path"] = model
    config_path.write_text(json.dumps(adapter, indent=2, sort_keys=True))  # as peft writes it
    card = Path(lora_dir) / ADAPTER_CARD
    if card.is_file():
        card.write_text(card.read_text().replace(loaded_from, model))
    return True


def save_run(
    output_dir: str | Path, config: RunConfig, result: RunResult, *, data: DatasetSplits, eval_signature: str,
    model_info: ModelInfo, lora_model: Any = None, reft_model: ReftAnswerModel | None = None,
) -> Path:
    """Write the run directory atomically (``run.json`` last) and return its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_FILE).unlink(missing_ok=True)  # the directory is not loadable while rewritten
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        files = ["metrics.jsonl", "evals.json", "predictions.jsonl"]
        with open(staging / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(step.to_dict()) + "\n" for step in result.steps)
        _write_json(staging / "evals.json", [e.to_dict() for e in result.evals])
        with open(staging / "predictions.jsonl", "w") as fh:
            fh.writelines(json.dumps(p.to_dict()) + "\n" for p in result.predictions)
        if lora_model is not None:
            lora_model.save_pretrained(staging / "lora")
            name_adapter_base(staging / "lora", config.model)
            files.append("lora")
        if reft_model is not None:
            from safetensors.torch import save_file  # heavy: deferred (imports torch)

            save_file(reft_model.intervention_state(), str(staging / "reft.safetensors"))
            files.append("reft.safetensors")
        for name in files:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        summary = result.summary()
        meta = {
            "format": FORMAT_VERSION,
            "config": config.to_dict(),
            "versions": library_versions(),
            "data": {"source": data.source, "label": data.label, "is_synthetic": data.is_synthetic},
            "eval_signature": eval_signature,
            "model_info": {"num_layers": model_info.num_layers, "hidden_size": model_info.hidden_size},
            "result": {k: v for k, v in summary.items() if k != "run_dir"},
            "lora_unchanged_by_stage2": result.lora_unchanged_by_stage2,
            "files": files,
        }
        tmp = staging / RUN_FILE
        _write_json(tmp, meta)
        os.replace(tmp, output_dir / RUN_FILE)  # the commit point
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


@dataclass
class RunArtifacts:
    path: Path
    meta: dict[str, Any]

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    @property
    def eval_signature(self) -> str:
        return self.meta["eval_signature"]

    def predictions(self) -> list[dict[str, Any]]:
        with open(self.path / "predictions.jsonl") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def evals(self) -> list[dict[str, Any]]:
        return json.loads((self.path / "evals.json").read_text())

    def steps(self) -> list[dict[str, Any]]:
        with open(self.path / "metrics.jsonl") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def correctness(self) -> dict[str, bool]:
        return {p["uid"]: bool(p["correct"]) for p in self.predictions()}


def load_run(path: str | Path) -> RunArtifacts:
    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.exists():
        raise RunLoadError(
            f"{path} is not a finished run directory (no {RUN_FILE}; the run may still be writing or it crashed)"
        )
    try:
        meta = json.loads(run_file.read_text())
    except json.JSONDecodeError as error:
        raise RunLoadError(f"{path}: {RUN_FILE} is not valid JSON ({error.msg}); the directory is damaged") from error
    if meta.get("format") != FORMAT_VERSION:
        raise RunLoadError(f"{path}: run format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    missing = [name for name in meta.get("files", []) if not (path / name).exists()]
    if missing:
        raise RunLoadError(f"{path}: files missing from the run directory: {', '.join(missing)}")
    return RunArtifacts(path, meta)


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """``run.json`` of a run directory as written (config, eval signature, result), or None if absent.

    For supervisors that only need the recorded outcome (the app's worker): no format or file
    checks, nothing loaded but the JSON.
    """
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.exists():
        return None
    return json.loads(run_file.read_text())
