"""The run archive: copies of run directories outside the data home, so runs survive an ephemeral disk.

``HEFT_ARCHIVE`` names where (:func:`parse_archive_location`):

- ``hf://datasets/<owner>/<name>``: a Hugging Face dataset repo (:mod:`storage.archive_hub`; the token is
  ``HF_TOKEN``, with write access; the repo is created private if it does not exist);
- a bare ``<owner>/<name>`` is that repo too, but only when no such path exists here (write ``./a/b`` for a
  relative directory that is not there yet);
- anything else is a directory (an attached Storage Bucket's mount on a Space, a network share), created if
  missing;
- ``off`` (or 0, none, no, false) turns archiving off.

Without it, a Hugging Face Space (``SPACE_ID`` set) whose ``/data`` is a writable directory (the Storage
Bucket attached at ``/data``) archives to ``/data/heft-archive``. The database is never archived: it stays on
local disk and is rebuilt from the run directories.

A copy is written as ``<archive>/.partial-<run dir>-<random>/``, then a manifest (every file and its
size, ``.heft-archive.json``) is written last inside it, and only then it is renamed to
``<archive>/<run dir>``. A directory without a complete manifest, or whose files do not match it (a
copy cut off half-way, also on a mount whose rename is not atomic), is never taken for a run:
:func:`restore` ignores it and reports it. A hub repo gets the same manifest in each copy, and the copy is
one commit (atomic there); its restore downloads the copies and runs :func:`restore` on them, so both
kinds are checked alike. Archiving never stops training: a failed copy is logged and the run goes on.
Imports no torch.
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
from typing import Protocol

log = logging.getLogger(__name__)

ARCHIVE_ENV = "HEFT_ARCHIVE"
MANIFEST_FILE = ".heft-archive.json"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"
RESTORING_PREFIX = ".restoring-"
COPY_ATTEMPTS = 3  # a running run's checkpoint may be pruned while it is copied: try again
HUB_SCHEME = "hf://"
HUB_DATASETS = "hf://datasets/"


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


@dataclass(frozen=True)
class ArchiveLocation:
    """Where ``HEFT_ARCHIVE`` points: ``kind`` "directory" (``target`` a path) or "hub" (``target`` a repo id)."""

    kind: str
    target: str


def _is_repo_id(text: str) -> bool:
    """``owner/name`` as the hub accepts it (one slash, allowed characters)."""
    if text.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # deferred: only for repo-like values

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_archive_location(value: str) -> ArchiveLocation:
    """Tell a hub dataset repo from a directory as the module docstring says; ValueError for an ``hf://``
    value that is not a dataset repo id."""
    text = value.strip()
    if text.startswith(HUB_SCHEME):
        repo_id = text[len(HUB_DATASETS):].strip("/") if text.startswith(HUB_DATASETS) else None
        if repo_id is None or not _is_repo_id(repo_id):
            raise ValueError(f"{ARCHIVE_ENV}={value} is not a hub dataset repo: write {HUB_DATASETS}<owner>/<name> "
                             "(only a dataset repo can be the archive)")
        return ArchiveLocation("hub", repo_id)
    if not text.startswith((".", "/", "~")) and not Path(text).exists() and _is_repo_id(text):
        return ArchiveLocation("hub", text)
    return ArchiveLocation("directory", str(Path(text).expanduser()))


def archive_location(*, warn: bool = True) -> ArchiveLocation | None:
    """The configured archive (:func:`archive_setting`, :func:`parse_archive_location`), or None when there is
    none or the value names no usable place (a warning with ``warn``)."""
    configured = archive_setting()
    if not configured:
        return None
    try:
        return parse_archive_location(configured)
    except ValueError as error:
        if warn:
            log.warning("%s; runs are not archived", error)
        return None


def archive_root() -> Path | None:
    """The archive directory (created if missing), or None when none is configured or the archive is a hub
    repo (:func:`archive_backend` covers both)."""
    location = archive_location(warn=False)
    if location is None or location.kind != "directory":
        return None
    path = Path(location.target)
    path.mkdir(parents=True, exist_ok=True)
    return path


class ArchiveBackend(Protocol):
    """Where run copies go: :class:`DirectoryArchive` or :class:`storage.archive_hub.HubArchive`."""

    location: str  # for messages: the directory, or hf://datasets/<repo id>

    def store(self, run_dir: str | Path) -> bool:
        """Copy ``run_dir`` whole to the archive; False (logged) when it could not be copied."""

    def restore(self, home: Path) -> RestoreReport:
        """Copy every whole archived run directory not there yet into ``<home>/runs``."""


def archive_backend() -> ArchiveBackend | None:
    """The configured archive (:func:`archive_location`), or None when there is none or it cannot be used (a
    warning saying why; training goes on without an archive). Start-up opens it once
    (:class:`storage.lifecycle.StartupReport`) and the app's worker uses that one."""
    location = archive_location()
    if location is None:
        return None
    if location.kind == "hub":
        from storage.archive_hub import open_hub_archive  # deferred: huggingface_hub only for a hub archive

        return open_hub_archive(location.target)
    try:
        Path(location.target).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("%s=%s: the directory cannot be created (%s); runs are not archived", ARCHIVE_ENV,
                    location.target, error)
        return None
    return DirectoryArchive(Path(location.target))


def _ignore_in_flight(directory: str, names: list[str]) -> set[str]:
    # A checkpoint being written (step-N.tmp) or replaced (step-N.old) is not a checkpoint yet.
    return {name for name in names if name.endswith((".tmp", ".old")) or name == MANIFEST_FILE}


def _manifest(directory: Path) -> dict[str, int]:
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}


def write_copy(source: Path, target: Path) -> Path:
    """Copy the run directory ``source`` to ``target`` (which must not exist) without in-flight checkpoints,
    then write its manifest last; raises OSError / shutil.Error (a checkpoint pruned while copied)."""
    shutil.copytree(source, target, ignore=_ignore_in_flight)
    manifest = {"run_dir": source.name, "files": _manifest(target)}
    with open(target / MANIFEST_FILE, "w") as handle:  # last: without it the copy is not a run
        handle.write(json.dumps(manifest, indent=1, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    return target


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
    """Copy ``run_dir`` whole to the archive directory ``root`` (default :func:`archive_root`); returns the
    archived copy.

    None when no archive directory is configured or the copy failed (logged: archiving never stops training).
    """
    root = root if root is not None else archive_root()
    if root is None:
        return None
    source = Path(run_dir)
    target = root / source.name
    for attempt in range(1, COPY_ATTEMPTS + 1):
        partial = root / f"{PARTIAL_PREFIX}{source.name}-{uuid.uuid4().hex[:8]}"
        try:
            write_copy(source, partial)
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
    """What a restore copied back into the data home and what it ignored, and why; ``error`` when the archive
    itself could not be read (an unreachable hub)."""

    archive: Path | str
    restored: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def summary(self) -> str:
        lines = [f"Could not read the archive {self.archive}: {self.error}"] if self.error else []
        if self.restored or not self.error:
            lines += [f"Restored {len(self.restored)} run directory(ies) from the archive {self.archive}."]
        lines += [f"Ignored {name} in the archive: {reason}" for name, reason in sorted(self.ignored.items())]
        return "\n".join(lines)


def restore(home: Path, root: Path, *, move: bool = False, report: RestoreReport | None = None) -> RestoreReport:
    """Copy every whole archived run directory in ``root`` into ``<home>/runs`` (those not there already).

    Partial and incomplete copies are ignored, each with a warning and its reason in the report. ``move``
    renames the copies instead of copying them (a download on the data home's disk: no second copy);
    ``report`` (default a new one for ``root``) receives what was done.
    """
    report = report if report is not None else RestoreReport(root)
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
        if move:
            os.rename(entry, staging)
            (staging / MANIFEST_FILE).unlink()
        else:
            shutil.copytree(entry, staging, ignore=lambda _dir, names: {MANIFEST_FILE} & set(names))
        os.rename(staging, runs / entry.name)
        report.restored.append(entry.name)
    for name, reason in sorted(report.ignored.items()):
        log.warning("Archive %s: ignored %s: %s", report.archive, name, reason)
    return report


class DirectoryArchive:
    """The archive in a directory (:func:`archive_run`, :func:`restore`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def store(self, run_dir: str | Path) -> bool:
        return archive_run(run_dir, self.root) is not None

    def restore(self, home: Path) -> RestoreReport:
        return restore(home, self.root)


class Archiver:
    """Copies run directories to the archive in a background thread, so a large copy never delays the worker.

    :meth:`submit` queues a run directory (queued twice, it is copied once); :meth:`drain` waits for the
    queue to empty (at shutdown). ``backend`` is an :class:`ArchiveBackend` (a directory: its path will do).
    """

    def __init__(self, backend: ArchiveBackend | Path):
        self.backend: ArchiveBackend = DirectoryArchive(backend) if isinstance(backend, Path) else backend
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
                self.backend.store(path)
            except Exception:  # a bug in a backend must not end the thread: later runs are still archived
                log.exception("archiving %s failed", path)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float = 20.0) -> bool:
        """Wait until every submitted copy is written; False if ``timeout`` seconds were not enough."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)
