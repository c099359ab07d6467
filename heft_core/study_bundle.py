"""Make a small, importable copy of a finished study directory: the app's bundled demo (``app/demo_study``).

``python -m heft_core.study_bundle SRC DEST [--max-mb 10]`` copies the study written by ``python -m heft_core
study`` into DEST without what an import does not need (checkpoints, training logs), with every weight file
(the LoRA adapter's and the ReFT interventions' safetensors) stored in bf16, which halves them; peft and
``load_state_dict`` cast them back to the model's dtype when they are loaded. The report files are copied as
they are (they hold no weights); the manifest is rewritten (``heft_core.study_manifest``), so DEST imports like
the original. A result larger than ``--max-mb`` is refused. A study directory holds no question or passage
text (predictions are ids, labels, scores and generated answers), so neither does the bundle.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from heft_common.errors import HeftError, StudyDirError
from heft_core.study_manifest import MANIFEST_FILE, verify_study_dir, write_manifest
from heft_core.study_runner import RUNS_SUBDIR

logger = logging.getLogger(__name__)

DROPPED = ("checkpoints", "train.log")  # in each run directory: resume state and logs, not results
DEFAULT_MAX_MB = 10.0


def _to_bf16(path: Path) -> None:
    import torch  # heavy: deferred
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    halved = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(halved, str(path), metadata={"format": "pt"})


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def bundle_study(source: str | Path, destination: str | Path, max_mb: float = DEFAULT_MAX_MB) -> Path:
    """Copy the verified study ``source`` to ``destination`` (which must not exist) as described above."""
    source, destination = Path(source), Path(destination)
    verify_study_dir(source)  # a damaged or unfinished study is refused before anything is written
    if destination.exists():
        raise StudyDirError(f"{destination} exists; remove it or choose another destination")
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*DROPPED))
    for weights in sorted((destination / RUNS_SUBDIR).rglob("*.safetensors")):
        _to_bf16(weights)
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
