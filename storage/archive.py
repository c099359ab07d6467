"""The run archive: copies of run directories outside the data home, so runs survive an ephemeral disk.

``HEFT_ARCHIVE`` names a directory (an attached Storage Bucket's mount on a Space, a network share);
``HEFT_ARCHIVE=off`` turns archiving off. Without it, a Hugging Face Space (``SPACE_ID`` set) whose
``/data`` is a writable directory (the Storage Bucket attached at ``/data``) archives to
``/data/heft-archive``. Only a directory is supported for now; a hub dataset repo id as the archive is a
later step. The database is never archived: it stays on local disk and is rebuilt from the run directories.

A copy is written as ``<archive>/.partial-<run dir>-<random>/``, then a manifest (every file and its
size, ``.heft-archive.json``) is written last inside it, and only then it is renamed to
``<archive>/<run dir>``. A directory without a complete manifest, or whose files do not match it (a
copy cut off half-way, also on a mount whose rename is not atomic), is never taken for a run:
:func:`restore` ignores it and reports it. Imports no torch.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ARCHIVE_ENV = "HEFT_ARCHIVE"
MANIFEST_FILE = ".heft-archive.json"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"
RESTORING_PREFIX = ".restoring-"
COPY_ATTEMPTS = 3  # a running run's checkpoint may be pruned while it is copied: try again


SPACE_BUCKET = Path("/data")  # where a Space's Storage Bucket is attached by convention
OFF_VALUES = ("0", "off", "none", "no", "false")


def archive_setting() -> str | None:
    """The archive location as configured (nothing created): ``HEFT_ARCHIVE``, else on a Space with a
    writable ``/data`` (its bucket) ``/data/heft-archive``, else None (also for ``HEFT_ARCHIVE=off``)."""
    configured = os.environ.get(ARCHIVE_ENV, "").strip()
    if configured.lower() in OFF_VALUES:
        return None
    if configured:
        return configured
    if os.environ.get("SPACE_ID") and SPACE_BUCKET.is_dir() and os.access(SPACE_BUCKET, os.W_OK):
        return str(SPACE_BUCKET / "heft-archive")
    return None


def archive_root() -> Path | None:
    """The archive directory (created if missing), or None when none is configured (:func:`archive_setting`)."""
    configured = archive_setting()
    if not configured:
        return None
    path = Path(configured).expanduser()
    if not path.is_absolute() and not path.exists() and configured.count("/") == 1:
        log.warning("%s=%s looks like a hub repo id; only a directory is supported as the archive for now, "
                    "so runs are not archived", ARCHIVE_ENV, configured)
        return None
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ignore_in_flight(directory: str, names: list[str]) -> set[str]:
    # A checkpoint being written (step-N.tmp) or replaced (step-N.old) is not a checkpoint yet.
    return {name for name in names if name.endswith((".tmp", ".old")) or name == MANIFEST_FILE}


def _manifest(directory: Path) -> dict[str, int]:
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}


def check_copy(directory: Path) -> str | None:
    """Why an archived directory is not a whole copy (None: it is one)."""
    try:
        expected = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (a copy cut off half-way, or not written by HEFT Studio)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_FILE} cannot be read ({type(error).__name__}: {error})"
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing (a copy cut off half-way)"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size} (a copy cut off half-way)"
    return None


def archive_run(run_dir: str | Path, root: Path | None = None) -> Path | None:
    """Copy ``run_dir`` whole to the archive (default :func:`archive_root`); returns the archived copy.

    None when no archive is configured or the copy failed (logged: archiving never stops training).
    """
    root = root if root is not None else archive_root()
    if root is None:
        return None
    source = Path(run_dir)
    target = root / source.name
    for attempt in range(1, COPY_ATTEMPTS + 1):
        partial = root / f"{PARTIAL_PREFIX}{source.name}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, partial, ignore=_ignore_in_flight)
            manifest = {"run_dir": source.name, "files": _manifest(partial)}
            with open(partial / MANIFEST_FILE, "w") as handle:  # last: without it the copy is not a run
                handle.write(json.dumps(manifest, indent=1, sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            replaced = None
            if target.exists():
                replaced = root / f"{REPLACED_PREFIX}{source.name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, replaced)
            os.rename(partial, target)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            log.info("Archived %s to %s", source, target)
            return target
        except (OSError, shutil.Error) as error:
            shutil.rmtree(partial, ignore_errors=True)
            if attempt == COPY_ATTEMPTS:
                log.warning("Could not archive %s to %s: %s", source, root, error)
    return None


@dataclass
class RestoreReport:
    """What :func:`restore` copied back into the data home and what it ignored, and why."""

    archive: Path
    restored: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"Restored {len(self.restored)} run directory(ies) from the archive {self.archive}."]
        lines += [f"Ignored {name} in the archive: {reason}" for name, reason in sorted(self.ignored.items())]
        return "\n".join(lines)


def restore(home: Path, root: Path) -> RestoreReport:
    """Copy every whole archived run directory into ``<home>/runs`` (those not there already).

    Partial and incomplete copies are ignored, each with a warning and its reason in the report.
    """
    report = RestoreReport(root)
    runs = Path(home) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(PARTIAL_PREFIX):
            report.ignored[entry.name] = "a copy that was cut off half-way (it never got its final name)"
            continue
        if entry.name.startswith("."):
            continue  # a copy being replaced, or something that is not ours
        reason = check_copy(entry)
        if reason is not None:
            report.ignored[entry.name] = reason
            continue
        if (runs / entry.name).exists():
            continue
        staging = runs / f"{RESTORING_PREFIX}{entry.name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(entry, staging, ignore=lambda _dir, names: {MANIFEST_FILE} & set(names))
        os.rename(staging, runs / entry.name)
        report.restored.append(entry.name)
    for name, reason in sorted(report.ignored.items()):
        log.warning("Archive %s: ignored %s: %s", root, name, reason)
    return report


class Archiver:
    """Copies run directories to the archive in a background thread, so a large copy never delays the worker.

    :meth:`submit` queues a run directory (queued twice, it is copied once); :meth:`drain` waits for the
    queue to empty (at shutdown).
    """

    def __init__(self, root: Path):
        self.root = root
        self._queue: queue.Queue[Path] = queue.Queue()
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="heft-archiver", daemon=True)
        self._thread.start()

    def submit(self, run_dir: str | Path) -> None:
        path = Path(run_dir)
        with self._lock:
            if path in self._pending:
                return
            self._pending.add(path)
        self._queue.put(path)

    def _loop(self) -> None:
        while True:
            path = self._queue.get()
            with self._lock:
                self._pending.discard(path)
            try:
                archive_run(path, self.root)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float = 20.0) -> bool:
        """Wait until every submitted copy is written; False if ``timeout`` seconds were not enough."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)
