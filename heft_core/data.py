"""Yes/no question data for HEFT Studio: BoolQ from the hub or local files, or a synthetic set.

Everything a run trains and evaluates on arrives as :class:`DatasetSplits` from :func:`load_data`.

Source forms accepted by :func:`load_data` and :func:`validate_source`:

* ``"synthetic"`` -- an offline, generated yes/no set (:func:`synthetic_boolq`; the generator and its
  word tables are in :mod:`heft_core.synthetic`), not BoolQ.
* ``"hub"`` or ``"google/boolq"`` -- BoolQ from the Hugging Face hub.
* ``"hub:<dataset id>"`` or ``"hub:<dataset id>:<config>"`` -- any hub dataset in a supported
  schema, e.g. ``"hub:aps/super_glue:boolq"``.
* ``"boolq-local"`` -- the local BoolQ directory of the machine that runs (:func:`local_boolq_dir`:
  ``$HEFT_BOOLQ_DIR``, else ``../shared/data/boolq`` next to the checkout). Specs and presets name
  the shared sample this way, never by its absolute path, so a committed spec runs anywhere.
* a local path (write ``./synthetic`` or ``./hub`` for directories with those names):

  - a directory holding files whose names contain ``train`` and ``validation`` (or ``val``,
    ``valid``, ``dev``), each ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``. Names are matched
    on word-like pieces (``boolq_train.jsonl``, ``validation-00000-of-00001.parquet``), so
    ``constraints.csv`` is not a train file. Several files of one split with the same extension
    are shards and are concatenated in name order; ``test`` files are ignored (BoolQ's test split
    has no answers). If the directory itself holds no data file, its immediate subdirectories are
    searched (the hub's ``data/`` layout).
  - a single file: split 80/20 into train/validation, stratified by answer and deterministic for
    the seed, because a lone file rarely says which split it is.

Schemas: google/boolq (``question``, ``passage``, ``answer`` bool) or SuperGLUE (``question``,
``passage``, ``label`` 0/1). Answers and labels may also be the strings ``true``/``false``
(any case), ``1``/``0`` or ``yes``/``no``, because CSV files carry no types. Other columns are
ignored.

Question uids: ``f"{split}-{row_index}-{hash8}"`` where ``split`` is the split the row came from
(``train``/``validation``, or ``all`` for a single file that this module split itself),
``row_index`` is the 0-based row within that split (shards counted together) and ``hash8`` is
the first 8 hex digits of sha256(question + U+001F + passage). The index keeps uids unique within
a split even for duplicate rows; the hash keeps two different datasets from sharing a uid; and a
single file's uids do not depend on the seed, so one question keeps its uid in every run.

This module imports no torch, Gradio or SQL library. Heavy imports are deferred: ``datasets`` is
imported only inside the hub loader and ``pyarrow`` only when a parquet file is read.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heft_common.errors import DataError
from heft_common.vocabulary import DEFAULT_HUB_DATASET, HUB_DATA, HUB_PREFIX, SYNTHETIC_DATA
from heft_core import synthetic

logger = logging.getLogger(__name__)

BOOLQ_DIR_ENV = "HEFT_BOOLQ_DIR"
# The source label of local_boolq_dir(): resolved where the run runs, so specs and reports carry no path.
LOCAL_BOOLQ = "boolq-local"
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
# The evaluation subset ignores the run's seed, so that runs of any seed are paired on the same questions.
EVAL_SUBSET_SEED = 0

# Hub ids: "name" or "owner/name" made of letters, digits, "-", "_", ".".
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRAIN_TOKENS = frozenset({"train", "training"})
_VALIDATION_TOKENS = frozenset({"validation", "val", "valid", "dev", "development"})
_SINGLE_FILE_VALIDATION_SHARE = 0.2
_ANSWER_STRINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass(frozen=True)
class Example:
    """One yes/no question about a passage. ``answer`` is True for "yes"."""

    uid: str
    question: str
    passage: str
    answer: bool


@dataclass
class DatasetSplits:
    """Train and validation examples plus where they came from.

    ``source`` is the canonical source string (``"synthetic"``, ``"hub:<id>"`` or the resolved
    local path); ``label`` is for people, e.g. ``"BoolQ (google/boolq, hub)"``.
    """

    train: list[Example]
    validation: list[Example]
    source: str
    label: str
    is_synthetic: bool


# --------------------------------------------------------------------------- public API


def load_data(
    source: str,
    *,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (800, 200),
) -> DatasetSplits:
    """Load train and validation examples from ``source`` (see the module docstring for forms).

    ``seed`` drives the synthetic generator and the 80/20 split of a single local file; it has no
    effect on hub data or on a directory with explicit split files. ``synthetic_size`` is
    ``(n_train, n_validation)`` for ``"synthetic"``.

    Raises :class:`DataError` for an unknown form, an unreachable hub or missing dataset id,
    malformed files (naming file, 1-based data row and column), empty data, or a train split
    without both yes and no answers.
    """
    kind, target = _parse_source(source)
    if kind == "synthetic":
        n_train, n_validation = synthetic_size
        return synthetic_boolq(n_train, n_validation, seed)
    if kind == "hub":
        dataset_id, config = target
        splits = _load_hub(dataset_id, config)
    else:
        path = Path(target).expanduser()
        if not path.exists():
            raise DataError(_missing_path_message(source))
        splits = _load_local(path.resolve(), seed)
    _check_splits(splits)
    logger.info(
        "Loaded %s: %d train, %d validation examples", splits.label, len(splits.train), len(splits.validation)
    )
    return splits


def validate_source(source: str) -> None:
    """Check that ``source`` has a known form and, for local data, exists and looks usable.

    Cheap enough to call before queuing a run: it reads no more than a header or the first
    row of each local file, and never contacts the hub (a hub id is checked for syntax only;
    reachability is found out by :func:`load_data`). Raises :class:`DataError`.
    """
    kind, target = _parse_source(source)
    if kind != "local":
        return
    path = Path(target).expanduser()
    if not path.exists():
        raise DataError(_missing_path_message(source))
    if path.is_dir():
        files_by_split = _find_split_files(path)
        files = [file for split_files in files_by_split.values() for file in split_files]
    else:
        _check_extension(path)
        files = [path]
    for file in files:
        _peek_first_row(file)


def local_boolq_dir() -> Path | None:
    """The local BoolQ directory: ``$HEFT_BOOLQ_DIR`` if set and existing, else
    ``<repo root>/../shared/data/boolq`` if it exists, else None."""
    configured = os.environ.get(BOOLQ_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if path.is_dir():
            return path
        logger.warning("%s=%s is not a directory; falling back to the shared dev sample", BOOLQ_DIR_ENV, configured)
    repo_root = Path(__file__).resolve().parent.parent
    shared = repo_root.parent / "shared" / "data" / "boolq"
    return shared if shared.is_dir() else None


def data_fingerprint(source: str) -> str | None:
    """sha256 (hex) of a local source's data files: each split file's name within the source and its bytes,
    in split and name order. The same files give the same digest on any machine, under any path. None for
    synthetic and hub sources (named by their id). Raises :class:`DataError` as :func:`load_data` would."""
    kind, target = _parse_source(source)
    if kind != "local":
        return None
    path = Path(target).expanduser()
    if not path.exists():
        raise DataError(_missing_path_message(source))
    if path.is_dir():
        files = [file for split in ("train", "validation") for file in _find_split_files(path)[split]]
    else:
        files = [path]
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def data_label(source: str) -> str:
    """A data source as a portable name: ``synthetic``, ``hub:<id>``, or for local files a label and the
    content hash of the files (:func:`data_fingerprint`), e.g. ``boolq-local (sha256 1a2b3c4d5e6f…)``.
    The label is ``boolq-local`` for :func:`local_boolq_dir`, else the directory's or file's name; never
    an absolute path."""
    kind, target = _parse_source(source)
    if kind == "synthetic":
        return SYNTHETIC_DATA
    if kind == "hub":
        dataset_id, config = target
        return f"{HUB_PREFIX}{dataset_id}" + (f":{config}" if config else "")
    path = Path(target).expanduser().resolve()
    local = local_boolq_dir()
    name = LOCAL_BOOLQ if local is not None and local.resolve() == path else path.name
    return f"{name} (sha256 {data_fingerprint(str(path))[:12]}…)"


def portable_data_name(source: str, label: str | None = None) -> str:
    """``source`` as a record may show it on another machine: itself unless it is an absolute path, which becomes
    its recorded ``label`` when that holds no path (runs since data labels carry a hash), else
    :func:`data_label` if the files are here, else the last part of the path."""
    text = str(source).strip()
    if not text.startswith(("/", "~")) and not Path(text).is_absolute():  # a name, or a path relative to the run
        return text
    if label and not re.search(r"(^|[\s:(])[/~]", label):
        return label.removeprefix("BoolQ-format local: ")
    try:
        return data_label(text)
    except (DataError, OSError):
        return Path(text).name or text


def subset(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A deterministic, answer-stratified subsample of ``n`` examples.

    ``n=None`` or ``n >= len(examples)`` returns all examples. Which examples are kept depends only
    on their uids and ``seed`` (not on input order): each class (yes/no) is ranked by
    sha256(seed, uid), and the yes/no shares of the input are kept (yes count rounded half up).
    Ranking by hash also makes a smaller subset a subset of a larger one for the same seed.
    The result keeps the input order.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"subset size must be >= 0 or None, got {n}")
    yes_examples = [example for example in examples if example.answer]
    no_examples = [example for example in examples if not example.answer]
    exact_yes = n * len(yes_examples) / len(examples)
    n_yes = int(exact_yes)
    if exact_yes - n_yes >= 0.5:  # round half up, deterministic unlike round()'s banker's rule
        n_yes += 1
    n_yes = min(n_yes, len(yes_examples))
    n_no = min(n - n_yes, len(no_examples))
    n_yes = n - n_no  # give any shortfall of one class to the other

    def rank(example: Example) -> str:
        return hashlib.sha256(f"{seed}\x1f{example.uid}".encode()).hexdigest()

    kept = {id(e) for e in sorted(yes_examples, key=rank)[:n_yes]}
    kept |= {id(e) for e in sorted(no_examples, key=rank)[:n_no]}
    return [example for example in examples if id(example) in kept]


def eval_signature(examples: Iterable[Example]) -> str:
    """A 16-hex-digit sha256 of the sorted uids: equal iff two runs evaluated the same questions
    (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(example.uid for example in examples)).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- source forms


def _parse_source(source: str) -> tuple[str, Any]:
    """Classify ``source`` as ("synthetic", None), ("hub", (id, config)) or ("local", path)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("No data source given: use 'synthetic', 'hub', 'hub:<dataset id>' or a local path.")
    text = source.strip()
    if text.lower() == SYNTHETIC_DATA:
        return "synthetic", None
    if text.lower() == LOCAL_BOOLQ:
        local = local_boolq_dir()
        if local is None:
            raise DataError(
                f"'{LOCAL_BOOLQ}' names the local BoolQ directory, and this machine has none: set "
                f"{BOOLQ_DIR_ENV} to a directory with train and validation files (or put them in ../shared/data/boolq)."
            )
        return "local", str(local)
    if text.lower() == HUB_DATA or text == DEFAULT_HUB_DATASET:
        return "hub", (DEFAULT_HUB_DATASET, None)
    if text.lower().startswith(HUB_PREFIX):
        dataset_id, _, config = text[len(HUB_PREFIX):].strip().partition(":")
        dataset_id, config = dataset_id.strip(), config.strip()
        if not _HUB_ID_PATTERN.match(dataset_id):
            raise DataError(
                f"'{source}' is not a valid hub source: expected 'hub:<dataset id>' or "
                f"'hub:<dataset id>:<config>', e.g. 'hub:google/boolq'."
            )
        return "hub", (dataset_id, config or None)
    return "local", text


def _missing_path_message(source: str) -> str:
    message = (
        f"Unknown data source '{source}': it is not 'synthetic', 'hub' or 'hub:<dataset id>', "
        f"and no file or directory exists at that path."
    )
    if _HUB_ID_PATTERN.match(source.strip()) and "/" in source:
        message += f" If it is a hub dataset id, write 'hub:{source.strip()}'."
    return message


# --------------------------------------------------------------------------- hub


def _load_hub(dataset_id: str, config: str | None) -> DatasetSplits:
    """Load a hub dataset with ``datasets.load_dataset``; every failure becomes a DataError."""
    shown_id = f"{dataset_id}:{config}" if config else dataset_id
    try:
        import datasets  # lazy: heavy, and only this loader needs it
    except ImportError as error:
        raise DataError(f"Loading '{shown_id}' from the hub needs the 'datasets' package ({error}).") from error
    logger.info("Loading %s from the Hugging Face hub (or its local cache)", shown_id)
    try:
        loaded = datasets.load_dataset(dataset_id, config) if config else datasets.load_dataset(dataset_id)
    except Exception as error:  # network, auth, missing id, bad config: all mean "cannot use it"
        raise DataError(
            f"Could not load dataset '{shown_id}' from the Hugging Face hub: the hub is unreachable "
            f"(offline, or HF_HUB_OFFLINE is set without a cached copy) or the dataset id or config "
            f"does not exist. Original error: {type(error).__name__}: {_first_line(error)}"
        ) from error
    try:
        split_names = list(loaded.keys())
    except AttributeError as error:
        raise DataError(f"Hub dataset '{shown_id}' did not load as a set of splits.") from error
    train_name = next((name for name in split_names if _split_of_name(name) == "train"), None)
    validation_name = next((name for name in split_names if _split_of_name(name) == "validation"), None)
    if train_name is None or validation_name is None:
        raise DataError(
            f"Hub dataset '{shown_id}' needs a train and a validation split; it has: {', '.join(split_names)}."
        )
    origin = f"hub dataset '{shown_id}' split '{{}}'"
    train = _examples_from_rows(_numbered(loaded[train_name]), origin.format(train_name), "train")
    validation = _examples_from_rows(
        _numbered(loaded[validation_name]), origin.format(validation_name), "validation"
    )
    label = "BoolQ (google/boolq, hub)" if shown_id == DEFAULT_HUB_DATASET else f"BoolQ-format hub: {shown_id}"
    return DatasetSplits(train, validation, source=f"{HUB_PREFIX}{shown_id}", label=label, is_synthetic=False)


def _numbered(rows: Iterable[Any]) -> Iterator[tuple[int, int | None, Any]]:
    for row_number, row in enumerate(rows, start=1):
        yield row_number, None, row


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


# --------------------------------------------------------------------------- local files


def _load_local(path: Path, seed: int) -> DatasetSplits:
    label = f"BoolQ-format local: {data_label(str(path))}"  # portable: a name and a content hash, no path
    if path.is_dir():
        files_by_split = _find_split_files(path)
        splits = {
            split: _examples_from_files(files, split) for split, files in files_by_split.items()
        }
        return DatasetSplits(splits["train"], splits["validation"], str(path), label, is_synthetic=False)
    _check_extension(path)
    examples = _examples_from_files([path], "all")
    train, validation = _split_single_file(examples, seed, path)
    logger.info(
        "Split single file %s 80/20 (seed %d): %d train, %d validation", path, seed, len(train), len(validation)
    )
    return DatasetSplits(train, validation, str(path), label, is_synthetic=False)


def _split_single_file(examples: list[Example], seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    """Stratified 80/20 split; both parts keep file order so uids read in order."""
    if len(examples) < 2:
        raise DataError(f"{path}: a single file needs at least 2 rows to split into train and validation.")
    rng = random.Random(seed)
    validation_indices: set[int] = set()
    for answer in (True, False):
        indices = [i for i, example in enumerate(examples) if example.answer == answer]
        rng.shuffle(indices)
        validation_indices.update(indices[: round(len(indices) * _SINGLE_FILE_VALIDATION_SHARE)])
    if not validation_indices:  # tiny files: still give validation one row
        validation_indices.add(rng.randrange(len(examples)))
    train = [e for i, e in enumerate(examples) if i not in validation_indices]
    validation = [e for i, e in enumerate(examples) if i in validation_indices]
    return train, validation


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUPPORTED_EXTENSIONS)}."
        )


def _split_of_name(name: str) -> str | None:
    """'train', 'validation' or None from a file stem or split name, matched on word pieces."""
    tokens = {token for token in re.split(r"[^a-z]+", name.lower()) if token}
    is_train = bool(tokens & _TRAIN_TOKENS)
    is_validation = bool(tokens & _VALIDATION_TOKENS)
    if is_train == is_validation:  # neither, or both ("train_val.jsonl"): not a split file
        return None
    return "train" if is_train else "validation"


def _data_files_in(directory: Path) -> list[Path]:
    return sorted(
        child
        for child in directory.iterdir()
        if child.is_file() and not child.name.startswith(".") and child.suffix.lower() in SUPPORTED_EXTENSIONS
    )


def _find_split_files(directory: Path) -> dict[str, list[Path]]:
    """Map 'train' and 'validation' to their files by name, or raise DataError."""
    candidates = _data_files_in(directory)
    if not candidates:  # the hub's layout keeps files in data/
        for child in sorted(directory.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                candidates.extend(_data_files_in(child))
    files_by_split: dict[str, list[Path]] = {"train": [], "validation": []}
    for candidate in candidates:
        split = _split_of_name(candidate.stem)
        if split:
            files_by_split[split].append(candidate)
    for split, files in files_by_split.items():
        if not files:
            found = ", ".join(file.name for file in candidates) or "no .jsonl/.json/.csv/.parquet files"
            raise DataError(
                f"{directory}: no {split} file found (need file names containing 'train' and "
                f"'validation'/'val'/'dev'; found: {found})."
            )
        if len({file.suffix.lower() for file in files}) > 1:
            raise DataError(
                f"{directory}: several {split} files of different types ({', '.join(f.name for f in files)}); "
                f"keep one so rows are not counted twice."
            )
    return files_by_split


def _examples_from_files(files: list[Path], split: str) -> list[Example]:
    examples: list[Example] = []
    for file in files:
        examples.extend(_examples_from_rows(_read_rows(file), str(file), split, first_index=len(examples)))
    if not examples:
        raise DataError(f"{', '.join(str(file) for file in files)}: no data rows (empty {split} data).")
    return examples


def _read_rows(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (1-based data row, 1-based line or None, row object) from one file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as handle:
                yield from _json_lines(handle, path)
        elif suffix == ".json":
            yield from _json_document(path)
        elif suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as handle:
                for row_number, row in enumerate(csv.DictReader(handle), start=1):
                    yield row_number, None, row
        elif suffix == ".parquet":
            yield from _numbered(_parquet_rows(path))
        else:
            _check_extension(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}).") from error
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error}).") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror or error}).") from error


def _json_lines(lines: Iterable[str], path: Path) -> Iterator[tuple[int, int | None, Any]]:
    row_number = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row_number += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: row {row_number} (line {line_number}): invalid JSON ({error.msg}).") from error
        yield row_number, line_number, row


def _json_document(path: Path) -> Iterator[tuple[int, int | None, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        document = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines saved as .json, as the hub often does
            yield from _json_lines(text.splitlines(), path)
            return
        raise DataError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg}).") from error
    if isinstance(document, dict):
        rows_key = next((key for key in ("data", "rows", "examples") if isinstance(document.get(key), list)), None)
        if rows_key:
            document = document[rows_key]
        elif document and all(isinstance(column, list) for column in document.values()):
            document = _columns_to_rows(document, path)  # pandas' to_json(orient="list") layout
        else:
            raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines).")
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines).")
    yield from _numbered(document)


def _columns_to_rows(columns: dict[str, list[Any]], path: Path) -> list[dict[str, Any]]:
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise DataError(f"{path}: columns have different lengths ({sorted(lengths)}).")
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())]


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as parquet  # lazy: only parquet files need it

    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises its own ArrowInvalid/ArrowIOError types
        raise DataError(f"{path}: cannot read parquet file ({_first_line(error)}).") from error


def _peek_first_row(path: Path) -> None:
    """Check a file's columns from its first row (or schema) without reading all of it."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as parquet

        try:
            columns = set(parquet.read_schema(path).names)
        except Exception as error:
            raise DataError(f"{path}: cannot read parquet file ({_first_line(error)}).") from error
        _check_columns(columns, path, row_number=1)
        return
    if path.suffix.lower() == ".json":
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty (no data rows).")
        return  # a JSON document must be parsed whole; load_data checks it
    for row_number, _line, row in _read_rows(path):
        if isinstance(row, dict):
            _check_columns(set(row), path, row_number)
        return
    raise DataError(f"{path}: the file is empty (no data rows).")


def _check_columns(columns: set[str], path: Path, row_number: int) -> None:
    for column in ("question", "passage"):
        if column not in columns:
            raise DataError(f"{path}: row {row_number}: missing column '{column}'.")
    if "answer" not in columns and "label" not in columns:
        raise DataError(f"{path}: row {row_number}: missing column 'answer' (or SuperGLUE 'label').")


# --------------------------------------------------------------------------- rows to examples


def _examples_from_rows(
    rows: Iterable[tuple[int, int | None, Any]], origin: str, split: str, first_index: int = 0
) -> list[Example]:
    """Turn numbered rows into Examples; DataError names ``origin``, the row and the column."""
    examples: list[Example] = []
    for row_number, line_number, row in rows:
        where = f"{origin}: row {row_number}"
        if line_number not in (None, row_number):
            where += f" (line {line_number})"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with question/passage/answer, got {type(row).__name__}.")
        question = _text_field(row, "question", where)
        passage = _text_field(row, "passage", where)
        answer = _answer_field(row, where)
        uid = _make_uid(split, first_index + len(examples), question, passage)
        examples.append(Example(uid, question, passage, answer))
    return examples


def _text_field(row: dict[str, Any], column: str, where: str) -> str:
    if column not in row:
        raise DataError(f"{where}, column '{column}': missing column '{column}'.")
    value = row[column]
    if value is None:
        raise DataError(f"{where}, column '{column}': missing value.")
    if not isinstance(value, str):
        raise DataError(f"{where}, column '{column}': expected text, got {type(value).__name__} {value!r}.")
    text = value.strip()
    if not text:
        raise DataError(f"{where}, column '{column}': empty {column}.")
    return text


def _answer_field(row: dict[str, Any], where: str) -> bool:
    # google/boolq says "answer"; SuperGLUE says "label". Prefer "answer" when both exist.
    column = "answer" if "answer" in row else "label" if "label" in row else None
    if column is None:
        raise DataError(f"{where}, column 'answer': missing column 'answer' (or SuperGLUE 'label').")
    value = row[column]
    answer = _parse_answer(value)
    if answer is None:
        raise DataError(
            f"{where}, column '{column}': unparsable label {value!r} (expected true/false, 1/0 or yes/no)."
        )
    return answer


def _parse_answer(value: Any) -> bool | None:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _ANSWER_STRINGS.get(value.strip().lower())
    return None


def _make_uid(split: str, row_index: int, question: str, passage: str) -> str:
    content_hash = hashlib.sha256(f"{question}\x1f{passage}".encode()).hexdigest()[:8]
    return f"{split}-{row_index}-{content_hash}"


def _check_splits(splits: DatasetSplits) -> None:
    """Reject data a run cannot use: empty splits or a train split with one answer only."""
    for name, examples in (("train", splits.train), ("validation", splits.validation)):
        if not examples:
            raise DataError(f"{splits.label}: the {name} split is empty (no data rows).")
    train_answers = {example.answer for example in splits.train}
    if len(train_answers) < 2:
        only = "yes" if True in train_answers else "no"
        raise DataError(
            f"{splits.label}: the train split needs both yes and no answers, but all "
            f"{len(splits.train)} answers are '{only}'."
        )
    if len({example.answer for example in splits.validation}) < 2:
        logger.warning("%s: every validation answer is the same; accuracy will mean little", splits.label)


# --------------------------------------------------------------------------- synthetic set

SYNTHETIC_LABEL = "Synthetic yes/no set (offline, not BoolQ)"


def synthetic_boolq(n_train: int, n_validation: int, seed: int) -> DatasetSplits:
    """A generated, offline yes/no set in BoolQ's layout ("Title -- passage"); not BoolQ.

    Deterministic for ``seed``. Each split has exactly half yes answers (an odd size gets one
    more yes); no (question, passage) pair occurs twice, so train and validation are disjoint.
    Questions are lowercase like BoolQ's, under 20 words; passages have 3-6 sentences and
    under 90 words. The answer is yes exactly when the value the question asks about appears
    in the passage (see :mod:`heft_core.synthetic`).
    """
    train_rows, validation_rows = synthetic.generate(n_train, n_validation, seed)

    def examples(split: str, rows: list[synthetic.SyntheticRow]) -> list[Example]:
        return [
            Example(_make_uid(split, index, question, passage), question, passage, answer)
            for index, (question, passage, answer) in enumerate(rows)
        ]

    return DatasetSplits(
        examples("train", train_rows), examples("validation", validation_rows),
        source=SYNTHETIC_DATA, label=SYNTHETIC_LABEL, is_synthetic=True,
    )
