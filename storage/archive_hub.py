"""The run archive in a Hugging Face dataset repo: ``HEFT_ARCHIVE=hf://datasets/<owner>/<name>``.

Each copy of a run directory is one commit: the directory is first copied to a local scratch folder with
the same manifest as a directory archive (:func:`storage.archive.write_copy`), then uploaded as the repo's
folder ``<run dir>/`` with ``upload_folder(..., delete_patterns="*")``, so files gone since the last copy
(pruned checkpoints) leave in the same commit. A commit is atomic on the hub: a reader sees the previous copy
or the new one, never half of one; unchanged files (earlier checkpoints) are not sent again, the hub already
holds their content. The restore lists the repo, downloads only the top-level folders that hold a manifest
and are not in the data home yet (not the repo's README or anything else) into a hidden folder of the data
home, and runs the directory restore (:func:`storage.archive.restore`) on it, so both kinds of archive are
checked alike.

The token is ``HF_TOKEN`` (a Space secret; it needs write access to the repo, which is created private at the
first copy if it does not exist). Without it, or with the hub unreachable, one warning is logged and training
goes on unarchived; a later copy that works again is logged too. The client is :class:`huggingface_hub.HfApi`
or anything with the same four methods (:class:`HubClient`): tests pass a fake, the hub not being reachable
from CI.
"""
from __future__ import annotations

import glob
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from storage.archive import (
    ARCHIVE_ENV,
    COPY_ATTEMPTS,
    HUB_DATASETS,
    MANIFEST_FILE,
    RestoreReport,
    restore,
    write_copy,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"
REPO_TYPE = "dataset"
DOWNLOAD_PREFIX = ".archive-download-"  # in the data home while a restore downloads (hidden: never a run)


class HubClient(Protocol):
    """The part of :class:`huggingface_hub.HfApi` the archive uses."""

    def create_repo(self, repo_id: str, *, repo_type: str | None = None, private: bool | None = None,
                    exist_ok: bool = False) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, path_in_repo: str | None = None,
                      commit_message: str | None = None, repo_type: str | None = None,
                      delete_patterns: list[str] | str | None = None) -> Any: ...

    def list_repo_files(self, repo_id: str, *, repo_type: str | None = None) -> list[str]: ...

    def snapshot_download(self, repo_id: str, *, repo_type: str | None = None, local_dir: str | Path | None = None,
                          allow_patterns: list[str] | str | None = None) -> str: ...


def hub_client(token: str) -> HubClient:
    """A real :class:`huggingface_hub.HfApi` with ``token``."""
    from huggingface_hub import HfApi  # deferred: only a hub archive needs it

    return HfApi(token=token, library_name="heft-studio")


def open_hub_archive(repo_id: str) -> HubArchive | None:
    """The archive in ``repo_id`` with ``HF_TOKEN``'s client, or None (a warning) without a token."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        log.warning("%s=%s%s needs %s (a token with write access to the repo; on a Space, a secret): runs are "
                    "not archived", ARCHIVE_ENV, HUB_DATASETS, repo_id, TOKEN_ENV)
        return None
    return HubArchive(repo_id, hub_client(token))


def _is_missing_repo(error: Exception) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    return isinstance(error, RepositoryNotFoundError)


class HubArchive:
    """Run copies in the dataset repo ``repo_id`` through ``client`` (the module docstring says how)."""

    def __init__(self, repo_id: str, client: HubClient):
        self.repo_id = repo_id
        self.client = client
        self.location = f"{HUB_DATASETS}{repo_id}"
        self._repo_ready = False
        self._failing = False  # warned that the hub failed; said again only once it works again

    def _failed(self, doing: str, error: Exception) -> None:
        message = (f"Archive {self.location}: could not {doing} ({type(error).__name__}: {error}); training goes on, "
                   f"but runs are not archived until the hub answers (is it reachable, does {TOKEN_ENV} have write "
                   "access?)")
        if self._failing:
            log.info("%s", message)  # warned already: one warning while the hub stays down
        else:
            log.warning("%s", message)
        self._failing = True

    def _answered(self) -> None:
        if self._failing:
            log.warning("Archive %s: the hub answers again; runs are archived again", self.location)
        self._failing = False

    def store(self, run_dir: str | Path) -> bool:
        """Upload ``run_dir`` as one commit; False (logged) when it could not be copied or uploaded."""
        source = Path(run_dir)
        for attempt in range(1, COPY_ATTEMPTS + 1):
            with tempfile.TemporaryDirectory(prefix="heft-archive-") as scratch:
                staged = Path(scratch) / source.name
                try:
                    write_copy(source, staged)
                except OSError as error:  # shutil.Error too: a checkpoint pruned while it was copied
                    if attempt == COPY_ATTEMPTS:
                        log.warning("Could not archive %s to %s: %s", source, self.location, error)
                    continue
                try:
                    if not self._repo_ready:
                        self.client.create_repo(self.repo_id, repo_type=REPO_TYPE, private=True, exist_ok=True)
                        self._repo_ready = True
                    self.client.upload_folder(repo_id=self.repo_id, repo_type=REPO_TYPE, folder_path=staged,
                                              path_in_repo=source.name, delete_patterns="*",
                                              commit_message=f"HEFT Studio: run {source.name}")
                except Exception as error:  # network, auth, quota: whatever it is, archiving never stops training
                    self._failed(f"upload {source.name}", error)
                    return False
            self._answered()
            log.info("Archived %s to %s", source, self.location)
            return True
        return False

    def restore(self, home: Path) -> RestoreReport:
        """Download the whole run copies not in ``<home>/runs`` yet and restore them (see the module docstring)."""
        report = RestoreReport(self.location)
        runs = Path(home) / "runs"
        try:
            files = self.client.list_repo_files(self.repo_id, repo_type=REPO_TYPE)
        except Exception as error:  # unreachable, no access: start without the archive's runs
            if _is_missing_repo(error):
                log.info("Archive %s does not exist yet (it is created with the first run copy)", self.location)
                return report
            report.error = f"{type(error).__name__}: {error}"
            self._failed("list the repo's files", error)
            return report
        folders: dict[str, bool] = {}  # top-level folder -> holds a manifest
        for name in files:
            top, _, rest = name.partition("/")
            if rest and not top.startswith("."):
                folders[top] = folders.get(top, False) or rest == MANIFEST_FILE
        for top, whole in sorted(folders.items()):
            if not whole:
                report.ignored[top] = f"it has no {MANIFEST_FILE} (not a run copy written by HEFT Studio)"
        wanted = sorted(top for top, whole in folders.items() if whole and not (runs / top).exists())
        if wanted:
            Path(home).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=DOWNLOAD_PREFIX, dir=home) as scratch:
                try:
                    self.client.snapshot_download(self.repo_id, repo_type=REPO_TYPE, local_dir=scratch,
                                                  allow_patterns=[f"{glob.escape(top)}/" for top in wanted])
                except Exception as error:  # cut off: nothing of the download is taken
                    report.error = f"{type(error).__name__}: {error}"
                    self._failed("download the run copies", error)
                    return report
                self._answered()
                return restore(home, Path(scratch), move=True, report=report)
        for name, reason in sorted(report.ignored.items()):
            log.warning("Archive %s: ignored %s: %s", self.location, name, reason)
        return report
