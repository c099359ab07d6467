"""Checkpoints: what a run needs to continue exactly where it stopped, written so a crash never corrupts one.

Layout inside a run directory::

    run_config.json               the run's config, written when training starts (so any run can resume)
    checkpoints/
        LATEST                    name of the newest complete checkpoint (replaced atomically)
        step-00000012/
            manifest.json         format, position, environment, sha256 and size of every other file (written last)
            state.json            counters, data-order RNG state, steps, evaluations and last predictions so far
            lora.safetensors      LoRA adapter tensors (LoRA runs; HEFT: the finished stage-1 LoRA in stage 2)
            reft.safetensors      ReFT intervention state (ReFT runs, HEFT stage 2)
            optimizer.pt          optimizer, scheduler (and fp16 loss-scaler) state of the stage in progress
            rng.pt                torch CPU and CUDA RNG states, one entry per process

No base weights are stored. A checkpoint is written into ``step-N.tmp``, every file is fsynced, the
directory is renamed to ``step-N`` and only then ``LATEST`` is replaced; older checkpoints are deleted
after that (epoch-end ones are kept when asked). A checkpoint whose manifest is missing or whose files do
not match their checksums is never loaded: the next older one is tried, else the run starts from step 0.

Importing this module does not import torch (the app and the CLI read configs and summaries with it);
``torch`` and ``safetensors`` are imported when a checkpoint is written or loaded (heavy: deferred).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from heft_common.errors import ConfigError
from heft_common.hashing import file_sha256
from heft_core.callbacks import EvalEvent, StepEvent

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "LATEST"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
LORA_FILE = "lora.safetensors"
REFT_FILE = "reft.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
RUN_CONFIG_FILE = "run_config.json"
FORMAT_VERSION = 1

# Options that change how often or what is kept, never the result: they may differ on resume.
RESUME_FREE_OPTIONS = frozenset({"name", "checkpoint_minutes", "keep_epoch_checkpoints", "report"})

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Environment:
    """What a checkpoint's numbers depend on beyond the config; a mismatch refuses the resume."""

    precision: str  # accelerate's mixed precision as resolved: "no", "bf16" or "fp16"
    device_type: str  # "cpu", "cuda", "mps", ...
    num_processes: int

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "device_type": self.device_type, "num_processes": self.num_processes}


@dataclass
class Checkpoint:
    """A run's position and state at an optimizer-step boundary.

    ``stage`` is the stage in progress (or just finished when ``stage_epochs_done`` equals its epochs);
    ``data_rng_state`` is the batch-order RNG as it was when the current epoch's batches were drawn,
    so a resume draws the same batches and skips the first ``batches_done``.
    """

    step: int
    stage: str
    stage_epochs_done: int
    batches_done: int
    cumulative_epoch: int
    train_seconds: float
    train_tokens: int
    data_rng_state: Any
    environment: Environment
    config: dict[str, Any]
    epoch_end: bool = False  # written after an epoch's evaluation (kept with keep_epoch_checkpoints)
    steps: list[StepEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # uid, label, p_yes of the last evaluation
    lora_state: dict[str, Any] | None = None  # name -> tensor
    reft_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None  # {"optimizer": ..., "scheduler": ..., "scaler": ...}
    rng_states: list[dict[str, Any]] | None = None  # per process: {"cpu": ByteTensor, "cuda": [ByteTensor, ...]}
    path: Path | None = None  # where it was loaded from

    @property
    def last_epoch(self) -> float:
        """The stage epoch reached, fractional mid-epoch (the epoch of the last recorded step)."""
        return self.steps[-1].epoch if self.steps else float(self.stage_epochs_done)


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    size_bytes: int
    seconds: float


# --------------------------------------------------------------------------- run config record


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Record the run's config in its directory (atomically), so an interrupted run can be resumed from it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RUN_CONFIG_FILE
    payload = json.dumps({"format": FORMAT_VERSION, "config": config}, indent=2, sort_keys=True)
    _write_bytes_atomically(target, payload.encode())
    return target


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config recorded by :func:`write_run_config`, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = payload.get("config") if isinstance(payload, dict) else None
    return config if isinstance(config, dict) else None


# --------------------------------------------------------------------------- checks on resume


def check_environment(saved: Environment, current: Environment) -> None:
    """Refuse to continue under a precision, device type or process count other than the checkpoint's."""
    for option, was, now, why in (
        ("precision", saved.precision, current.precision, "mixed precision changes every later number"),
        ("device", saved.device_type, current.device_type, "results would differ from the part already trained"),
        ("num_processes", saved.num_processes, current.num_processes,
         "the batches per process and the optimizer steps would change"),
    ):
        if was != now:
            raise ConfigError(
                option,
                f"the checkpoint was written with {option} {was!r} but this run has {now!r}; {why}. "
                f"Resume it where it ran ({saved.device_type}, precision {saved.precision}, "
                f"{saved.num_processes} process{'es' if saved.num_processes != 1 else ''}), "
                "or re-queue it as a new run",
            )


def check_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another configuration (only options that change results count)."""
    differences = _differences(saved, current)
    if differences:
        option, was, now = differences[0]
        raise ConfigError(
            option,
            f"the checkpoint was written with {was!r} but the run now has {now!r}; "
            "a checkpoint continues only the configuration it was written for (start a new run instead)",
        )


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            if not prefix and key in RESUME_FREE_OPTIONS:
                continue
            found += _differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return [] if list(saved) == list(current) else [(prefix, saved, current)]
    return [] if saved == current else [(prefix, saved, current)]


# --------------------------------------------------------------------------- trainable state


def lora_tensors(model: Any) -> dict[str, Any]:
    """The LoRA adapter tensors of a peft model (no base weights), on the CPU, by state-dict name."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if "lora_" in name}


def load_lora_tensors(model: Any, state: dict[str, Any]) -> None:
    """Copy saved LoRA tensors into ``model`` bit for bit; every adapter tensor must be there."""
    from heft_common.errors import RunLoadError

    expected = set(lora_tensors(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RunLoadError(
            f"checkpoint LoRA tensors do not fit this model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- torch RNG


def capture_torch_rng() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every CUDA device when CUDA is in use)."""
    import torch  # heavy: deferred

    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_torch_rng(state: dict[str, Any]) -> None:
    import torch  # heavy: deferred

    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def python_rng_state(rng: random.Random) -> list[Any]:
    """``rng``'s state as JSON-able lists (``random.Random.getstate`` returns nested tuples)."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def set_python_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss_next = state
    rng.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------- writing


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_bytes_atomically(target: Path, payload: bytes) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)



def _state_payload(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "step": checkpoint.step, "stage": checkpoint.stage, "stage_epochs_done": checkpoint.stage_epochs_done,
        "batches_done": checkpoint.batches_done, "cumulative_epoch": checkpoint.cumulative_epoch,
        "train_seconds": checkpoint.train_seconds, "train_tokens": checkpoint.train_tokens,
        "data_rng_state": checkpoint.data_rng_state, "epoch_end": checkpoint.epoch_end,
        "environment": checkpoint.environment.to_dict(), "config": checkpoint.config,
        "steps": [s.to_dict() for s in checkpoint.steps], "evals": [e.to_dict() for e in checkpoint.evals],
        "predictions": checkpoint.predictions,
    }


def save_checkpoint(
    run_dir: str | Path, checkpoint: Checkpoint, *, keep_epoch_checkpoints: bool = False
) -> SavedCheckpoint:
    """Write ``checkpoint`` atomically, make it ``LATEST``, then delete the older ones no longer wanted."""
    import torch  # heavy: deferred
    from safetensors.torch import save_file

    started = time.perf_counter()
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = _step_dir_name(checkpoint.step)
    final = root / name
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a crash during an earlier write at this step
    tmp.mkdir()
    (tmp / STATE_FILE).write_text(json.dumps(_state_payload(checkpoint)))
    if checkpoint.lora_state is not None:
        save_file(checkpoint.lora_state, str(tmp / LORA_FILE))
    if checkpoint.reft_state is not None:
        save_file(checkpoint.reft_state, str(tmp / REFT_FILE))
    if checkpoint.optimizer_state is not None:
        torch.save(checkpoint.optimizer_state, tmp / OPTIMIZER_FILE)
    if checkpoint.rng_states is not None:
        torch.save(checkpoint.rng_states, tmp / RNG_FILE)
    files = {}
    for path in sorted(tmp.iterdir()):
        _fsync_file(path)
        files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "format": FORMAT_VERSION, "step": checkpoint.step, "stage": checkpoint.stage,
        "stage_epochs_done": checkpoint.stage_epochs_done, "batches_done": checkpoint.batches_done,
        "cumulative_epoch": checkpoint.cumulative_epoch, "epoch": checkpoint.last_epoch,
        "train_seconds": checkpoint.train_seconds, "epoch_end": checkpoint.epoch_end,
        "environment": checkpoint.environment.to_dict(), "files": files,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(tmp / MANIFEST_FILE, "w") as handle:  # last: a directory without it is never loaded
        handle.write(json.dumps(manifest, indent=2, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (an epoch end right after a resume) or a stale attempt
        aside = root / f"{name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)  # pruned below, once the new one is in place
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_bytes_atomically(root / LATEST_FILE, (name + "\n").encode())
    _prune(root, keep=final, keep_epoch_checkpoints=keep_epoch_checkpoints)
    size = sum(entry["bytes"] for entry in files.values()) + (final / MANIFEST_FILE).stat().st_size
    return SavedCheckpoint(final, size, time.perf_counter() - started)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories (``step-N``, no ``.tmp``), newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _prune(root: Path, *, keep: Path | None, keep_epoch_checkpoints: bool) -> None:
    """Remove every entry of ``root`` but ``keep``, ``LATEST`` and (if asked) complete epoch-end checkpoints."""
    for path in root.iterdir():
        if path == keep or path.name == LATEST_FILE:
            continue
        if path.is_dir() and _STEP_DIR_RE.match(path.name) and keep_epoch_checkpoints:
            manifest = _read_manifest(path)
            if manifest is not None and manifest.get("epoch_end"):
                continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove every checkpoint of a run directory (a fresh start must never pick up an old one)."""
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)


def prune_finished(run_dir: str | Path, *, keep_epoch_checkpoints: bool) -> None:
    """After a run completed: drop the checkpoints (its results are saved), except epoch-end ones if asked."""
    root = checkpoints_dir(run_dir)
    if keep_epoch_checkpoints and root.is_dir():
        _prune(root, keep=None, keep_epoch_checkpoints=True)
    else:
        clear_checkpoints(run_dir)


# --------------------------------------------------------------------------- reading


def verify_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The manifest of a complete, undamaged checkpoint directory, or (None, what is wrong)."""
    manifest = _read_manifest(path)
    if manifest is None:
        return None, f"{MANIFEST_FILE} is missing or unreadable (the write did not finish)"
    if manifest.get("format") != FORMAT_VERSION:
        return None, f"format {manifest.get('format')!r} is not supported (expected {FORMAT_VERSION})"
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        return None, f"{MANIFEST_FILE} lists no {STATE_FILE}"
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST_FILE}
    if on_disk != set(files):
        return None, f"files differ from the manifest ({', '.join(sorted(on_disk ^ set(files)))})"
    for name, entry in sorted(files.items()):
        file_path = path / name
        size = file_path.stat().st_size
        if size != entry.get("bytes"):
            return None, f"{name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated?)"
        if file_sha256(file_path) != entry.get("sha256"):
            return None, f"{name} does not match its sha256 checksum"
    return manifest, ""


def latest_checkpoint_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of the newest checkpoint that looks complete, without checking the checksums (cheap).

    For displays ("resume continues from step N"); loading verifies everything.
    """
    for _step, path in _ordered_candidates(checkpoints_dir(run_dir)):
        manifest = _read_manifest(path)
        if manifest is not None and manifest.get("format") == FORMAT_VERSION:
            return manifest
    return None


def _ordered_candidates(root: Path) -> list[tuple[int, Path]]:
    """``LATEST``'s checkpoint first, then every other by step, newest first."""
    candidates = _step_dirs(root)
    try:
        latest = (root / LATEST_FILE).read_text().strip()
    except OSError:
        latest = ""
    first = [item for item in candidates if item[1].name == latest]
    return first + [item for item in candidates if item[1].name != latest]


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Checkpoint | None, str]:
    """The newest checkpoint that verifies, and a message saying what was found (and what was skipped).

    Reads only: a damaged checkpoint stays on disk until a save at its step replaces it or pruning
    removes it. Returns (None, message) when there is nothing usable.
    """
    root = checkpoints_dir(run_dir)
    candidates = _ordered_candidates(root)
    if not candidates:
        return None, f"no checkpoint in {root}"
    skipped: list[str] = []
    for _step, path in candidates:
        manifest, problem = verify_checkpoint(path)
        if manifest is None:
            skipped.append(f"{path.name} ({problem})")
            logger.warning("checkpoint %s is not usable: %s", path, problem)
            continue
        checkpoint = _load(path)
        note = f"; skipped damaged {', '.join(skipped)}" if skipped else ""
        return checkpoint, f"checkpoint {path.name} (step {checkpoint.step}){note}"
    return None, f"no usable checkpoint in {root}: {'; '.join(skipped)}"


def _load(path: Path) -> Checkpoint:
    import torch  # heavy: deferred
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    env = state["environment"]
    checkpoint = Checkpoint(
        step=state["step"], stage=state["stage"], stage_epochs_done=state["stage_epochs_done"],
        batches_done=state["batches_done"], cumulative_epoch=state["cumulative_epoch"],
        train_seconds=state["train_seconds"], train_tokens=state["train_tokens"],
        data_rng_state=state["data_rng_state"],
        environment=Environment(env["precision"], env["device_type"], env["num_processes"]), config=state["config"],
        epoch_end=state.get("epoch_end", False), steps=[StepEvent(**s) for s in state["steps"]],
        evals=[EvalEvent(**e) for e in state["evals"]], predictions=state["predictions"], path=path,
    )
    if (path / LORA_FILE).exists():
        checkpoint.lora_state = load_file(str(path / LORA_FILE))
    if (path / REFT_FILE).exists():
        checkpoint.reft_state = load_file(str(path / REFT_FILE))
    if (path / OPTIMIZER_FILE).exists():
        checkpoint.optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    if (path / RNG_FILE).exists():
        checkpoint.rng_states = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)
    return checkpoint


def load_stage_end_checkpoint(run_dir: str | Path, stage: str, epochs_done: int) -> Checkpoint | None:
    """The verified epoch-end checkpoint written when ``stage`` had finished ``epochs_done`` epochs (a run keeps
    them with ``keep_epoch_checkpoints``), or None. A study starts another run's next stage from it."""
    for _step, path in sorted(_step_dirs(checkpoints_dir(run_dir)), reverse=True):
        manifest, _problem = verify_checkpoint(path)
        if (manifest is not None and manifest.get("epoch_end") and manifest.get("stage") == stage
                and manifest.get("stage_epochs_done") == epochs_done):
            return _load(path)
    return None

