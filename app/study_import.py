"""Import a study directory written by ``python -m heft_core study`` into the app's registry.

``python -m app.study_import DIR`` (also ``python -m heft_core study-import DIR``, which delegates
here), the Studies tab's "Import study" (a zip of the directory) and the ``import_study`` API
endpoint all go through :func:`import_study`: the directory is verified
(``heft_core.study_manifest``: whole, unaltered, this version), then ``storage.imports`` writes
the study, its runs, metrics, evaluations and copied run directories (predictions, weights) in one
transaction. The runs then show in Runs, Compare, Studies and Ask like runs trained here, marked
"imported from <study> (<dir name>)". In public mode only owners may import (app.permissions).
"""
from __future__ import annotations

import argparse
import logging
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from app import service
from app.forms import error_text
from app.permissions import ANONYMOUS, LOCAL, Action, Actor
from heft_common.errors import HeftError, StudyDirError
from heft_common.home import data_home
from heft_core.study_manifest import verify_study_dir
from heft_core.study_runner import STUDY_INDEX_FILE
from storage.imports import ImportedStudy, import_study_dir

logger = logging.getLogger(__name__)

MAX_ZIP_BYTES = 2 * 1024 ** 3  # unpacked: a study with weights is tens of MB; refuse a zip bomb


def import_study(engine: Any, directory: str | Path, actor: Actor | None = ANONYMOUS) -> ImportedStudy:
    """Verify ``directory`` and import it whole (or raise StudyDirError / PermissionRefused: nothing written)."""
    service.authorize(actor, Action.IMPORT)
    directory = Path(directory)
    if not directory.is_dir():
        raise StudyDirError(f"{directory} is not a directory")
    spec, entries = verify_study_dir(directory)
    return import_study_dir(engine, data_home(), directory, name=spec.name, spec=spec.to_dict(), entries=entries)


def _study_root(extracted: Path) -> Path:
    """The folder of an unpacked zip that holds study.json: the zip's root or its one top-level folder."""
    if (extracted / STUDY_INDEX_FILE).is_file():
        return extracted
    folders = [path for path in extracted.iterdir() if path.is_dir() and not path.name.startswith("__MACOSX")]
    if len(folders) == 1 and (folders[0] / STUDY_INDEX_FILE).is_file():
        return folders[0]
    raise StudyDirError(f"the zip holds no study directory ({STUDY_INDEX_FILE} at its root or in its one folder)")


def _is_link(member: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(member.external_attr >> 16)  # a Unix zip (zip -y) keeps the link's mode here


def _unpack_links(archive: zipfile.ZipFile, links: list[zipfile.ZipInfo], scratch: Path, zip_name: str) -> None:
    """Recreate the zip's symbolic links (zipfile would write each as a file holding its target): only links that
    stay inside the zip by a relative path; where they lead is checked again with the study (check_links)."""
    for member in links:
        target = archive.read(member).decode("utf-8", errors="replace")
        landing = posixpath.normpath(posixpath.join(posixpath.dirname(member.filename.rstrip("/")), target))
        if posixpath.isabs(target) or target.startswith("\\") or landing == ".." or landing.startswith("../"):
            raise StudyDirError(f"{zip_name}: {member.filename} is a link that points outside the study directory "
                                f"({target})")
        path = scratch / member.filename.rstrip("/")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, path)
        except OSError as exc:  # e.g. a folder of the zip with the link's name
            raise StudyDirError(f"{zip_name}: {member.filename} cannot be unpacked as a link ({exc})") from None


def import_study_zip(engine: Any, zip_path: str | Path, actor: Actor | None = ANONYMOUS) -> ImportedStudy:
    """Unpack a zip of a study directory into a scratch folder and import it (:func:`import_study`); symbolic
    links in it (a study bundle's identical files) are kept when they stay inside it."""
    service.authorize(actor, Action.IMPORT)  # before unpacking anything a visitor sent
    zip_path = Path(zip_path)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise StudyDirError(f"{zip_path.name} is not a zip file ({exc})") from None
    with archive, tempfile.TemporaryDirectory(prefix="heft-import-") as scratch:
        members = archive.infolist()
        if sum(member.file_size for member in members) > MAX_ZIP_BYTES:
            raise StudyDirError(f"{zip_path.name} unpacks to more than {MAX_ZIP_BYTES // 1024 ** 3} GB")
        for member in members:
            parts = Path(member.filename).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts:
                raise StudyDirError(f"{zip_path.name}: {member.filename} points outside the study directory")
        links = [member for member in members if _is_link(member)]
        archive.extractall(scratch, members=[member for member in members if not _is_link(member)])
        _unpack_links(archive, links, Path(scratch), zip_path.name)
        root = _study_root(Path(scratch))
        # The directory's own name is part of the origin: a zip of "demo/" keeps it; a zip of its contents
        # is named after the zip file.
        if root == Path(scratch):
            named = Path(scratch) / zip_path.stem
            named.mkdir()
            for child in list(root.iterdir()):
                if child != named:
                    shutil.move(str(child), named / child.name)
            root = named
        return import_study(engine, root, actor)


def import_study_payload(engine: Any, zip_path: Any, actor: Actor | None = ANONYMOUS) -> dict[str, Any]:
    """The import_study API: {"study_id", "run_ids", "origin"} or {"error"}."""
    try:
        path = zip_path.get("path") if isinstance(zip_path, dict) else getattr(zip_path, "path", zip_path)
        if not path:
            raise StudyDirError("send a zip of a study directory")
        imported = import_study_zip(engine, path, actor)
    except HeftError as exc:  # PermissionRefused, StudyDirError
        return {"error": error_text(exc)}
    except Exception as exc:  # a bug: logged; the client gets one line
        logger.exception("import_study failed")
        return {"error": error_text(exc)}
    return {"study_id": imported.study_id, "run_ids": imported.run_ids, "origin": imported.origin}


# ---------------------------------------------------------------------- the bundled demo

DEMO_ENV = "HEFT_DEMO"
DEMO_DIR_ENV = "HEFT_DEMO_DIR"
# The trained demo study (a study directory with its manifest, weights in bf16 safetensors; how to rebuild it:
# the README, "Hugging Face Space").
DEFAULT_DEMO_DIR = Path(__file__).resolve().parent / "demo_study"
DEMO_MARKER = "demo-imported"  # in the data home: the demo was imported here once


def import_bundled_demo(engine: Any, directory: str | Path | None = None) -> ImportedStudy | None:
    """At start-up: import the bundled demo study unless ``HEFT_DEMO=0``, once per data home.

    It is imported when the data home has no ``DEMO_MARKER`` (written after an import) and the registry holds
    no run of the demo: a first start, and every start on a Space's ephemeral disk (where runs restored from
    the archive do not bring the demo back); a user who deleted the demo's runs on a kept disk is not given
    them again. ``directory`` (default ``HEFT_DEMO_DIR`` or ``app/demo_study``) that does not exist is skipped
    with a log line; a damaged one is logged and skipped too (the app still starts without it)."""
    if os.environ.get(DEMO_ENV, "1").strip() == "0":
        return None
    target = Path(directory or os.environ.get(DEMO_DIR_ENV) or DEFAULT_DEMO_DIR)
    if not (target / STUDY_INDEX_FILE).is_file():
        logger.info("no bundled demo study at %s; starting without one", target)
        return None
    marker = data_home() / DEMO_MARKER
    if marker.exists():
        return None
    try:
        imported = import_study(engine, target, LOCAL)
    except StudyDirError as exc:
        if "was imported before" in str(exc):  # already in the registry (e.g. a home copied without its marker)
            marker.write_text(str(target) + "\n")
            return None
        logger.error("the bundled demo study was not imported: %s", exc)
        return None
    except HeftError as exc:
        logger.error("the bundled demo study was not imported: %s", exc)
        return None
    marker.write_text(str(target) + "\n")
    logger.info("imported the bundled demo study as study #%d (%d runs)", imported.study_id, len(imported.run_ids))
    return imported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.study_import",
        description="Import a study directory written by `python -m heft_core study` (or a zip of one) into the "
                    "app's registry (HEFT_HOME's heft.db): its runs, evaluations, predictions and weights.")
    parser.add_argument("directory", help="the study directory (spec.yaml, study.json, manifest.json, runs/), or a zip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = service.open_engine()
        source = Path(args.directory)
        if source.is_file():
            imported = import_study_zip(engine, source, LOCAL)
        else:
            imported = import_study(engine, source, LOCAL)
    except HeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Imported as study #{imported.study_id} with runs {', '.join(f'#{i}' for i in imported.run_ids)} "
          f"({imported.origin}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

