"""A study directory's manifest: the sha256 of every file it was written with, checked before an import.

``run_study_in_process`` ends by writing ``manifest.json`` (:func:`write_manifest`) over the spec,
the index (``study.json``) and every file of the run directories; the report files are left out
because they are derived (``study-report`` rewrites them, the app rebuilds them from the runs).
:func:`verify_study_dir` refuses, with a message naming the file, a directory that has no manifest
or another format, misses a listed file, holds a file whose checksum differs or a run file the
manifest does not list, or whose study did not finish. Symbolic links are accepted when they lead, by a
relative path, to a file of the study directory (``heft_core.study_bundle`` links identical files across run
directories); any other link (outside the directory, absolute, to a folder, dangling) refuses the directory
before a file is read, so a directory or zip cannot bring in ``/etc/passwd`` as a run's file. No Gradio, no SQL.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from heft_common.errors import ConfigError, StudyDirError
from heft_common.hashing import file_sha256
from heft_core.artifacts import FORMAT_VERSION as RUN_FORMAT_VERSION
from heft_core.artifacts import RUN_FILE
from heft_core.study import StudySpec
from heft_core.study_report import SPEC_FILE
from heft_core.study_runner import RUNS_SUBDIR, STUDY_INDEX_FILE

MANIFEST_FILE = "manifest.json"
STUDY_FORMAT_VERSION = 1
FINISHED = ("completed", "cancelled", "failed")  # an index entry in any other state: the study did not finish



def _covered_files(directory: Path) -> list[str]:
    """The spec, the index and every file under runs/, as POSIX paths relative to ``directory``."""
    names = [name for name in (SPEC_FILE, STUDY_INDEX_FILE) if (directory / name).is_file()]
    runs = directory / RUNS_SUBDIR
    if runs.is_dir():
        names += sorted(path.relative_to(directory).as_posix() for path in runs.rglob("*") if path.is_file())
    return names


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_links(directory: str | Path) -> None:
    """Raise StudyDirError for a symbolic link in ``directory`` that does not lead, by a relative path that stays
    inside it, to one of its files (see the module docstring); linked folders are never entered."""
    directory = Path(directory)
    lexical_root, real_root = Path(os.path.abspath(directory)), directory.resolve()
    for folder, folders, files in os.walk(directory):  # followlinks=False: a link to a folder is seen, not walked
        for entry in folders + files:
            path = Path(folder) / entry
            if not path.is_symlink():
                continue
            relative, target = path.relative_to(directory).as_posix(), os.readlink(path)
            lexical = Path(os.path.abspath(os.path.join(path.parent, target)))  # the link's own path, no link followed
            outside = os.path.isabs(target) or not _within(lexical, lexical_root)
            try:
                resolved = path.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, or a loop
                resolved = None
            if outside or (resolved is not None and not _within(resolved, real_root)):
                raise StudyDirError(f"{directory.name}: {relative} is a link that points outside the study directory "
                                    f"({target}); a study directory may only link to its own files, by relative paths")
            if resolved is None:
                raise StudyDirError(f"{directory.name}: {relative} is a link to {target}, which does not exist in the "
                                    "study directory")
            if not resolved.is_file():
                raise StudyDirError(f"{directory.name}: {relative} is a link to {target}, which is not a file (only "
                                    "files may be linked)")


def write_manifest(directory: str | Path) -> Path:
    """Write ``manifest.json`` (format, run format, {file: sha256}) into a study directory; returns its path."""
    directory = Path(directory)
    payload = {"format": STUDY_FORMAT_VERSION, "run_format": RUN_FORMAT_VERSION,
               "files": {name: file_sha256(directory / name) for name in _covered_files(directory)}}
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temporary, directory / MANIFEST_FILE)
    return directory / MANIFEST_FILE


def verify_study_dir(directory: str | Path) -> tuple[StudySpec, list[dict[str, Any]]]:
    """The spec and the index entries of a study directory that is whole, unaltered and of this version.

    Raises StudyDirError with what is wrong otherwise (see the module docstring)."""
    directory = Path(directory)
    name = directory.name
    manifest_path = directory / MANIFEST_FILE
    if not (directory / STUDY_INDEX_FILE).is_file():
        raise StudyDirError(f"{name} is not a study directory (no {STUDY_INDEX_FILE}): import a directory written by "
                            "`python -m heft_core study SPEC --out DIR`")
    check_links(directory)  # before any file is read: a link must not lead the checks (or the copy) outside
    if not manifest_path.is_file():
        raise StudyDirError(f"{name} has no {MANIFEST_FILE}: it was written by an older HEFT Studio or copied "
                            f"without it. Run `python -m heft_core study {name}/{SPEC_FILE} --out {name} --resume` "
                            "(finished runs are kept) to write one.")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed: Mapping[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StudyDirError(f"{name}: {MANIFEST_FILE} cannot be read ({exc})") from None
    if manifest.get("format") != STUDY_FORMAT_VERSION or manifest.get("run_format") != RUN_FORMAT_VERSION:
        raise StudyDirError(
            f"{name} was written by an incompatible HEFT Studio (study format {manifest.get('format')!r}, run format "
            f"{manifest.get('run_format')!r}; this version reads {STUDY_FORMAT_VERSION} and {RUN_FORMAT_VERSION})")
    for required in (SPEC_FILE, STUDY_INDEX_FILE):
        if required not in listed:
            raise StudyDirError(f"{name}: {MANIFEST_FILE} does not list {required}; the directory is damaged")
    for relative, expected in sorted(listed.items()):
        path = directory / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise StudyDirError(f"{name}: {MANIFEST_FILE} names a file outside the directory ({relative})")
        if not path.is_file():
            raise StudyDirError(f"{name} is incomplete: {relative} is missing")
        if file_sha256(path) != expected:
            raise StudyDirError(f"{name}: {relative} was changed after the study was written (its sha256 differs "
                                f"from {MANIFEST_FILE}'s)")
    extra = sorted(set(_covered_files(directory)) - set(listed))
    if extra:
        raise StudyDirError(f"{name}: {extra[0]} is not in {MANIFEST_FILE} (added after the study was written)"
                            + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    try:
        spec = StudySpec.from_file(directory / SPEC_FILE)
    except ConfigError as exc:
        raise StudyDirError(f"{name}: {SPEC_FILE} is not a valid study spec for this version ({exc})") from None
    entries = json.loads((directory / STUDY_INDEX_FILE).read_text())["runs"]
    for entry in entries:
        if entry.get("status") not in FINISHED:
            raise StudyDirError(f"{name} is incomplete: run {entry.get('run_dir')} is {entry.get('status')}. Finish "
                                f"the study first (`python -m heft_core study ... --out {name} --resume`).")
        if entry["status"] != "failed" and not (directory / entry["run_dir"] / RUN_FILE).is_file():
            raise StudyDirError(f"{name} is incomplete: {entry['run_dir']}/{RUN_FILE} is missing")
    return spec, entries
