"""Run directories: written atomically, loaded into answer models that reproduce predictions.

Layout of a run directory::

    run.json            config, library versions, data, eval signature, results (written last)
    lora/               peft adapter (LoRA and HEFT)
    reft.safetensors    full intervention state (ReFT and HEFT); settings live in run.json
    metrics.jsonl       one line per optimizer step
    evals.json          one entry per epoch evaluation
    predictions.jsonl   uid, gold label, P(yes), prediction, correct

Files are staged in a hidden directory and moved into place; ``run.json`` goes last, so a
directory without it (a crash mid-write) never loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heft_core.config import RunConfig

if TYPE_CHECKING:
    from heft_core.adapters import ReftAnswerModel
    from heft_core.train import Prepared, RunResult

RUN_FILE = "run.json"
FORMAT_VERSION = 1
_LIBRARIES = ("torch", "transformers", "peft", "pyreft", "pyvene", "accelerate", "datasets")


class RunLoadError(RuntimeError):
    pass


def library_versions() -> dict[str, str]:
    from heft_core import __version__

    versions = {"heft_core": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


def save_run(output_dir: str | Path, prepared: "Prepared", result: "RunResult", *, lora_model: Any = None, reft_model: "ReftAnswerModel | None" = None) -> Path:
    from safetensors.torch import save_file

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
            files.append("lora")
        if reft_model is not None:
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
            "config": prepared.config.to_dict(),
            "versions": library_versions(),
            "data": {"source": prepared.data.source, "label": prepared.data.label, "is_synthetic": prepared.data.is_synthetic},
            "eval_signature": prepared.eval_signature,
            "model_info": {"num_layers": prepared.info.num_layers, "hidden_size": prepared.info.hidden_size},
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
        raise RunLoadError(f"{path} is not a finished run directory (no {RUN_FILE}; the run may still be writing or it crashed)")
    meta = json.loads(run_file.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise RunLoadError(f"{path}: run format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    missing = [name for name in meta.get("files", []) if not (path / name).exists()]
    if missing:
        raise RunLoadError(f"{path}: files missing from the run directory: {', '.join(missing)}")
    return RunArtifacts(path, meta)
