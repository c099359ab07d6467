"""Make a small, importable copy of a finished study directory: the app's bundled demo (``app/demo_study``).

``python -m heft_core.study_bundle SRC DEST [--max-mb 10]`` copies the study written by ``python -m heft_core
study`` into DEST without what an import does not need (checkpoints, training logs), with every weight file
(the LoRA adapter's and the ReFT interventions' safetensors) stored in bf16, which halves them; peft and
``load_state_dict`` cast them back to the model's dtype when they are loaded. The report files are copied (they
hold no weights); the manifest is rewritten (``heft_core.study_manifest``), so DEST imports like
the original. A file of a run directory identical (sha256) to one of an earlier run directory (in name order)
becomes a relative symbolic link to it (:func:`link_identical_files`: HEFT's stage-1 adapter when it is the
LoRA run's); imports accept such links and refuse any that leads outside the study directory
(``heft_core.study_manifest``). The report files name each run directory relatively (``runs/<name>``,
:func:`portable_report`), not by where the study was written. A result larger than ``--max-mb`` is refused. A
study directory holds no question or passage text (predictions are ids, labels, scores and generated answers),
so neither does the bundle.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from heft_common.errors import HeftError, StudyDirError
from heft_common.hashing import file_sha256
from heft_core.study_manifest import MANIFEST_FILE, verify_study_dir, write_manifest
from heft_core.study_report.outcomes import portable_run_dir
from heft_core.study_runner import RUNS_SUBDIR

logger = logging.getLogger(__name__)

DROPPED = ("checkpoints", "train.log")  # in each run directory: resume state and logs, not results
DEFAULT_MAX_MB = 10.0
REPORT_JSON, REPORT_CSV = "results.json", "results.csv"  # the report files that name run directories


def _relative_run_dirs(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: portable_run_dir(item) if key == "run_dir" else _relative_run_dirs(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_relative_run_dirs(item) for item in value]
    return value


def portable_report(directory: str | Path) -> list[str]:
    """Rewrite the run directories that a study's report files name by absolute paths (where the runner wrote
    the study: ``results.json``'s and ``results.csv``'s ``run_dir``) as ``runs/<name>``, relative to the study
    directory; returns the names of the files changed. The report files are outside the manifest, so its
    checksums stay valid; a ``run_dir`` that is not under a ``runs`` folder is left as it is."""
    directory = Path(directory)
    changed = []
    results = directory / REPORT_JSON
    if results.is_file():
        report = json.loads(results.read_text())
        portable = _relative_run_dirs(report)
        if portable != report:
            results.write_text(json.dumps(portable, indent=2))  # as study_report writes it
            changed.append(REPORT_JSON)
    table = directory / REPORT_CSV
    if table.is_file():
        rows = list(csv.DictReader(io.StringIO(table.read_text())))
        if rows and "run_dir" in rows[0]:
            portable_rows = [{**row, "run_dir": portable_run_dir(row["run_dir"])} for row in rows]
            if portable_rows != rows:
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
                writer.writeheader()
                writer.writerows(portable_rows)
                table.write_text(buffer.getvalue())
                changed.append(REPORT_CSV)
    return changed


def _to_bf16(path: Path) -> None:
    import torch  # heavy: deferred
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    halved = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(halved, str(path), metadata={"format": "pt"})


def directory_bytes(directory: Path) -> int:
    """The bytes ``directory`` takes: a link counts as a link, not as the file it leads to."""
    return sum(path.lstat().st_size for path in directory.rglob("*") if path.is_file() or path.is_symlink())


def link_identical_files(directory: str | Path) -> list[tuple[str, str]]:
    """Replace each non-empty file under ``<directory>/runs/`` whose sha256 equals that of a file of an earlier
    run directory (paths in sorted order) by a relative symbolic link to that first file; returns the (link,
    target) pairs, relative to ``directory``. Files identical within one run directory stay files."""
    directory = Path(directory)
    runs = directory / RUNS_SUBDIR
    first: dict[str, Path] = {}  # sha256 -> the first file with it
    linked = []
    files = sorted(path for path in runs.rglob("*") if path.is_file() and not path.is_symlink())
    for path in files:
        if path.stat().st_size == 0:  # nothing to save, and a link would only hide the file
            continue
        original = first.setdefault(file_sha256(path), path)
        if original.relative_to(runs).parts[0] == path.relative_to(runs).parts[0]:
            continue  # the first of its content, or a twin in the same run directory
        path.unlink()
        path.symlink_to(os.path.relpath(original, path.parent))
        linked.append((path.relative_to(directory).as_posix(), original.relative_to(directory).as_posix()))
    for link, target in linked:
        logger.info("%s is identical to %s: linked", link, target)
    return linked


def bundle_study(source: str | Path, destination: str | Path, max_mb: float = DEFAULT_MAX_MB) -> Path:
    """Copy the verified study ``source`` to ``destination`` (which must not exist) as described above."""
    source, destination = Path(source), Path(destination)
    verify_study_dir(source)  # a damaged or unfinished study is refused before anything is written
    if destination.exists():
        raise StudyDirError(f"{destination} exists; remove it or choose another destination")
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*DROPPED))
    for weights in sorted((destination / RUNS_SUBDIR).rglob("*.safetensors")):
        _to_bf16(weights)
    link_identical_files(destination)  # after bf16: identical weights stay identical once halved
    portable_report(destination)
    (destination / MANIFEST_FILE).unlink()
    write_manifest(destination)
    verify_study_dir(destination)
    size = directory_bytes(destination)
    if size > max_mb * 2 ** 20:
        shutil.rmtree(destination)
        raise StudyDirError(f"the bundle would take {size / 2 ** 20:.1f} MB, more than --max-mb {max_mb:g}")
    logger.info("bundled %s into %s (%.1f MB)", source, destination, size / 2 ** 20)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heft_core.study_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a finished study directory written by `python -m heft_core study`")
    parser.add_argument("destination", help="where to write the bundle (must not exist), e.g. app/demo_study")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, help="refuse a larger bundle (default 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = bundle_study(args.source, args.destination, args.max_mb)
    except HeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({directory_bytes(path) / 2 ** 20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
