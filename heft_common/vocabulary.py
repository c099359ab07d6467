"""One definition of each word the layers share: methods, their titles, run statuses.

Everything else (storage's checks, the engine's config validation, the UI's labels and
filters, the API) imports these names instead of spelling the values again.
"""
from __future__ import annotations

from enum import StrEnum

METHODS: tuple[str, ...] = ("base", "lora", "reft", "heft")
"""Run methods. "base" is a zero-shot evaluation run (nothing trained)."""
TRAINED_METHODS: tuple[str, ...] = ("lora", "reft", "heft")

METHOD_TITLES: dict[str, str] = {"base": "Base", "lora": "LoRA", "reft": "ReFT", "heft": "HEFT"}
"""Short titles for tables, cards and run names."""
METHOD_DESCRIPTIONS: dict[str, str] = {
    "base": "Base (zero-shot)",
    "lora": "LoRA (weight space)",
    "reft": "ReFT (representation space)",
    "heft": "HEFT (LoRA, then ReFT)",
}


class RunStatus(StrEnum):
    """Run lifecycle: queued -> running -> completed | failed | cancelled | interrupted.

    A queued run may also go straight to cancelled. Terminal states never change again;
    re-queueing creates a new run.
    """

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


ACTIVE_STATUSES: tuple[str, ...] = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
TERMINAL_STATUSES: tuple[str, ...] = (
    RunStatus.COMPLETED.value,
    RunStatus.FAILED.value,
    RunStatus.CANCELLED.value,
    RunStatus.INTERRUPTED.value,
)
REQUEUEABLE_STATUSES: tuple[str, ...] = (
    RunStatus.FAILED.value,
    RunStatus.CANCELLED.value,
    RunStatus.INTERRUPTED.value,
)
STATUSES: tuple[str, ...] = ACTIVE_STATUSES + TERMINAL_STATUSES

# Data sources: the two reserved words; anything else is a hub id ("hub:<id>") or a local path.
SYNTHETIC_DATA = "synthetic"
HUB_DATA = "hub"
HUB_PREFIX = "hub:"
DEFAULT_HUB_DATASET = "google/boolq"
EMBEDDED_MODEL = "embedded"
