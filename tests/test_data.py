"""Tests for heft_core.data. All text here is invented; no BoolQ rows belong in the repository."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from heft_core import data, synthetic
from heft_core.data import (
    DataError,
    DatasetSplits,
    Example,
    data_fingerprint,
    data_label,
    eval_signature,
    load_data,
    local_boolq_dir,
    subset,
    synthetic_boolq,
    validate_source,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def _rows(count: int, schema: str = "boolq", prefix: str = "q") -> list[dict]:
    """Invented rows alternating yes/no in the google/boolq or SuperGLUE schema."""
    rows = []
    for i in range(count):
        row = {
            "question": f"is the {prefix} lantern number {i} green",
            "passage": (
                f"Lantern {i} -- The lantern number {i} hangs by the mill. It is {'green' if i % 2 == 0 else 'red'}."
            ),
        }
        if schema == "boolq":
            row["answer"] = i % 2 == 0
        else:
            row["label"] = 1 if i % 2 == 0 else 0
            row["idx"] = i
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        columns = list(rows[0]) if rows else ["question", "passage", "answer"]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(suffix)
    return path


def _split_dir(tmp_path: Path, extension: str, schema: str = "boolq", names=("train", "validation")) -> Path:
    directory = tmp_path / f"set_{extension}_{schema}"
    directory.mkdir()
    _write(directory / f"{names[0]}.{extension}", _rows(10, schema, "train"))
    _write(directory / f"{names[1]}.{extension}", _rows(4, schema, "val"))
    return directory


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_for_a_seed() -> None:
    first = synthetic_boolq(60, 20, seed=3)
    second = synthetic_boolq(60, 20, seed=3)
    other = synthetic_boolq(60, 20, seed=4)
    assert first.train == second.train and first.validation == second.validation
    assert first.train != other.train


def test_synthetic_sizes_balance_and_disjointness() -> None:
    splits = synthetic_boolq(800, 200, seed=0)
    assert (len(splits.train), len(splits.validation)) == (800, 200)
    assert sum(e.answer for e in splits.train) == 400
    assert sum(e.answer for e in splits.validation) == 100
    train_pairs = {(e.question, e.passage) for e in splits.train}
    validation_pairs = {(e.question, e.passage) for e in splits.validation}
    assert len(train_pairs) == 800 and len(validation_pairs) == 200
    assert not train_pairs & validation_pairs
    all_uids = [e.uid for e in splits.train + splits.validation]
    assert len(set(all_uids)) == len(all_uids)
    assert splits.is_synthetic and splits.source == "synthetic" and "not BoolQ" in splits.label


def test_synthetic_shape_and_learnable_relation() -> None:
    splits = synthetic_boolq(400, 100, seed=1)
    titles = set()
    for example in splits.train + splits.validation:
        assert len(example.question.split()) < 20
        assert len(example.passage.split()) < 90
        title, separator, body = example.passage.partition(" -- ")
        assert separator and title
        titles.add(title)
        assert 3 <= body.count(". ") + 1 <= 6
    assert len(titles) > 300  # variety: entities rarely repeat


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9,]+", text.lower().replace(", ", " ")))


def test_synthetic_answer_follows_one_learnable_rule() -> None:
    # Rule: yes iff every question word that is not template wording occurs in the passage
    # (the asked value is there for yes and absent for no). A word-overlap check this simple
    # scoring ~100% shows the relation is consistent enough for a small LM to learn.
    template_words = set()
    for domain in synthetic.DOMAINS:
        for attribute in domain.attributes:
            for template in attribute.questions:
                template_words |= _words(template.replace("{name}", " ").replace("{value}", " "))
    splits = synthetic_boolq(400, 100, seed=2)
    hits = 0
    for example in splits.train + splits.validation:
        content = _words(example.question) - template_words
        hits += (content <= _words(example.passage)) == example.answer
    assert hits / 500 >= 0.98


def test_synthetic_rejects_tiny_sizes() -> None:
    with pytest.raises(DataError):
        synthetic_boolq(1, 10, seed=0)


def test_load_data_synthetic_uses_size_and_seed() -> None:
    splits = load_data("synthetic", seed=5, synthetic_size=(40, 10))
    assert (len(splits.train), len(splits.validation)) == (40, 10)
    assert splits.train == synthetic_boolq(40, 10, 5).train


# --------------------------------------------------------------------------- local formats


@pytest.mark.parametrize("extension", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("schema", ["boolq", "superglue"])
def test_load_local_directory_every_format_and_schema(tmp_path: Path, extension: str, schema: str) -> None:
    directory = _split_dir(tmp_path, extension, schema)
    validate_source(str(directory))
    splits = load_data(str(directory))
    assert (len(splits.train), len(splits.validation)) == (10, 4)
    assert [e.answer for e in splits.train] == [i % 2 == 0 for i in range(10)]
    assert splits.train[0].question == "is the train lantern number 0 green"
    assert splits.validation[1].passage.startswith("Lantern 1 -- ")
    assert splits.train[3].uid.startswith("train-3-") and splits.validation[0].uid.startswith("validation-0-")
    assert not splits.is_synthetic
    assert splits.label == f"BoolQ-format local: {directory.name} (sha256 {data_fingerprint(str(directory))[:12]}…)"
    assert str(tmp_path) not in splits.label  # no path of this machine


@pytest.mark.parametrize(
    "names",
    [
        ("boolq_train", "boolq_dev"),
        ("train-00000-of-00001", "validation-00000-of-00001"),
        ("training", "val"),
    ],
)
def test_split_detection_by_file_name(tmp_path: Path, names: tuple[str, str]) -> None:
    directory = _split_dir(tmp_path, "jsonl", names=names)
    _write(directory / "test.jsonl", _rows(3, prefix="test"))  # ignored: BoolQ's test has no answers
    (directory / "README.md").write_text("notes", encoding="utf-8")
    splits = load_data(str(directory))
    assert (len(splits.train), len(splits.validation)) == (10, 4)


def test_split_files_in_data_subdirectory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "train-00000-of-00001.parquet", _rows(6))
    _write(tmp_path / "data" / "validation-00000-of-00001.parquet", _rows(2))
    splits = load_data(str(tmp_path))
    assert (len(splits.train), len(splits.validation)) == (6, 2)


def test_shards_are_concatenated_with_running_uids(tmp_path: Path) -> None:
    _write(tmp_path / "train-00000-of-00002.jsonl", _rows(4, prefix="a"))
    _write(tmp_path / "train-00001-of-00002.jsonl", _rows(4, prefix="b"))
    _write(tmp_path / "validation.jsonl", _rows(2, prefix="v"))
    splits = load_data(str(tmp_path))
    assert len(splits.train) == 8
    assert [e.uid.split("-")[1] for e in splits.train] == [str(i) for i in range(8)]


def test_directory_without_validation_file(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", _rows(4))
    _write(tmp_path / "constraints.jsonl", _rows(4))  # "train" inside a word is not a split name
    with pytest.raises(DataError, match="no validation file"):
        validate_source(str(tmp_path))
    with pytest.raises(DataError, match="constraints.jsonl"):
        load_data(str(tmp_path))


def test_single_file_is_split_80_20_by_seed(tmp_path: Path) -> None:
    path = _write(tmp_path / "all_questions.csv", _rows(50))
    first = load_data(str(path), seed=1)
    again = load_data(str(path), seed=1)
    other = load_data(str(path), seed=2)
    assert (len(first.train), len(first.validation)) == (40, 10)
    assert first.validation == again.validation
    assert first.validation != other.validation
    assert sum(e.answer for e in first.validation) == 5  # stratified
    assert {e.uid for e in first.train} | {e.uid for e in first.validation} == {
        e.uid for e in other.train
    } | {e.uid for e in other.validation}  # uids do not depend on the seed
    assert not {e.uid for e in first.train} & {e.uid for e in first.validation}


def test_json_lines_saved_as_json_and_column_layout(tmp_path: Path) -> None:
    lines = tmp_path / "train.json"
    lines.write_text("\n".join(json.dumps(row) for row in _rows(4)), encoding="utf-8")
    rows = _rows(2)
    columns = tmp_path / "validation.json"
    columns.write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}), encoding="utf-8")
    splits = load_data(str(tmp_path))
    assert (len(splits.train), len(splits.validation)) == (4, 2)


def test_string_labels_are_accepted(tmp_path: Path) -> None:
    rows = _rows(4, "superglue")
    for row, label in zip(rows, ["True", "false", "TRUE", "False"]):
        row["label"] = label
    path = _write(tmp_path / "mixed.jsonl", rows * 3)
    splits = load_data(str(path))
    assert {e.answer for e in splits.train + splits.validation} == {True, False}


# --------------------------------------------------------------------------- errors


def test_missing_column_names_file_row_and_column(tmp_path: Path) -> None:
    rows = _rows(6)
    del rows[2]["passage"]
    directory = tmp_path / "d"
    directory.mkdir()
    _write(directory / "train.jsonl", rows)
    _write(directory / "validation.jsonl", _rows(2))
    with pytest.raises(DataError) as caught:
        load_data(str(directory))
    message = str(caught.value)
    assert "train.jsonl" in message and "row 3" in message and "'passage'" in message


def test_missing_column_in_header_is_caught_cheaply(tmp_path: Path) -> None:
    rows = [{key: value for key, value in row.items() if key != "answer"} for row in _rows(4)]
    path = _write(tmp_path / "noanswer.csv", rows)
    with pytest.raises(DataError, match=r"noanswer\.csv: row 1.*'answer'"):
        validate_source(str(path))


def test_bad_label_names_file_row_and_column(tmp_path: Path) -> None:
    rows = _rows(6, "superglue")
    rows[4]["label"] = "maybe"
    path = _write(tmp_path / "labels.csv", rows)
    with pytest.raises(DataError) as caught:
        load_data(str(path))
    message = str(caught.value)
    assert "labels.csv" in message and "row 5" in message and "'label'" in message and "maybe" in message


def test_superglue_test_label_minus_one_is_unparsable(tmp_path: Path) -> None:
    rows = _rows(4, "superglue")
    rows[0]["label"] = -1
    path = _write(tmp_path / "superglue.parquet", rows)
    with pytest.raises(DataError, match=r"superglue\.parquet: row 1, column 'label': unparsable label -1"):
        load_data(str(path))


def test_empty_question_names_file_row_and_column(tmp_path: Path) -> None:
    rows = _rows(6)
    rows[1]["question"] = "   "
    path = _write(tmp_path / "blank.json", rows)
    with pytest.raises(DataError, match=r"blank\.json: row 2, column 'question': empty question"):
        load_data(str(path))


def test_wrong_type_is_reported(tmp_path: Path) -> None:
    rows = _rows(4)
    rows[3]["question"] = 42
    path = _write(tmp_path / "types.jsonl", rows)
    with pytest.raises(DataError, match=r"row 4, column 'question': expected text, got int"):
        load_data(str(path))


def test_invalid_json_line_names_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2 \(line 3\): invalid JSON"):
        load_data(str(path))


@pytest.mark.parametrize("extension", ["jsonl", "json", "csv"])
def test_empty_file(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"empty.{extension}"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows|empty"):
        load_data(str(path))
    with pytest.raises(DataError, match="empty"):
        validate_source(str(path))


def test_empty_validation_file_in_directory(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", _rows(4))
    (tmp_path / "validation.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"validation\.jsonl: no data rows"):
        load_data(str(tmp_path))


def test_train_split_with_one_answer_only(tmp_path: Path) -> None:
    rows = [row for row in _rows(10) if row["answer"]]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "validation.jsonl", _rows(4))
    with pytest.raises(DataError, match="needs both yes and no answers"):
        load_data(str(tmp_path))


def test_unknown_source_form(tmp_path: Path) -> None:
    for source in ["", "no/such/place/at-all", str(tmp_path / "missing.jsonl")]:
        with pytest.raises(DataError):
            validate_source(source)
        with pytest.raises(DataError):
            load_data(source)
    with pytest.raises(DataError, match="hub:someone/yesno"):
        load_data("someone/yesno")  # looks like a hub id: the message suggests the prefix
    with pytest.raises(DataError, match="not a valid hub source"):
        validate_source("hub:")
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(str(_write_text(tmp_path / "notes.txt", "hello")))


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_known_forms_parse_and_validate_without_loading(tmp_path: Path) -> None:
    expected = {
        "synthetic": ("synthetic", None),
        " Synthetic ": ("synthetic", None),
        "hub": ("hub", ("google/boolq", None)),
        "google/boolq": ("hub", ("google/boolq", None)),
        "hub:google/boolq": ("hub", ("google/boolq", None)),
        "hub:aps/super_glue:boolq": ("hub", ("aps/super_glue", "boolq")),
        "HUB: owner/name : cfg ": ("hub", ("owner/name", "cfg")),
        "./synthetic": ("local", "./synthetic"),
        str(tmp_path / "train.jsonl"): ("local", str(tmp_path / "train.jsonl")),
    }
    for source, parsed in expected.items():
        assert data._parse_source(source) == parsed, source
    for source in ["synthetic", "hub", "google/boolq", "hub:google/boolq", "hub:aps/super_glue:boolq"]:
        validate_source(source)  # never contacts the hub


# --------------------------------------------------------------------------- hub


def test_hub_failure_is_a_data_error_naming_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def unreachable(path, name=None, **kwargs):
        calls.append((path, name))
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DataError) as caught:
        load_data("hub:aps/super_glue:boolq")
    message = str(caught.value)
    assert "aps/super_glue:boolq" in message and "unreachable" in message
    assert "ConnectionError: Couldn't reach" in message and "more detail" not in message
    assert calls == [("aps/super_glue", "boolq")]


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_splits = {"train": _rows(6, "superglue"), "validation": _rows(2, "superglue"), "test": []}
    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda path, name=None: fake_splits)
    )
    splits = load_data("hub")
    assert (len(splits.train), len(splits.validation)) == (6, 2)
    assert splits.label == "BoolQ (google/boolq, hub)" and splits.source == "hub:google/boolq"


def test_hub_offline_with_real_datasets_library(tmp_path: Path) -> None:
    # A subprocess, so HF_HUB_OFFLINE is read when datasets is first imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    code = (
        "from heft_core.data import load_data, DataError\n"
        "try:\n    load_data('hub:example-org/no-such-yesno-set')\n"
        "except DataError as error:\n    print('DATAERROR', error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert "DATAERROR" in result.stdout, result.stderr[-2000:]
    assert "example-org/no-such-yesno-set" in result.stdout and "unreachable" in result.stdout


# --------------------------------------------------------------------------- subset, signature


def _examples(n_yes: int, n_no: int) -> list[Example]:
    answers = [True] * n_yes + [False] * n_no
    return [Example(f"validation-{i}-x", f"q{i}", f"p{i}", answer) for i, answer in enumerate(answers)]


def test_subset_is_deterministic_and_stratified() -> None:
    examples = _examples(60, 40)
    chosen = subset(examples, 20, seed=7)
    assert chosen == subset(examples, 20, seed=7)
    assert chosen != subset(examples, 20, seed=8)
    assert len(chosen) == 20 and sum(e.answer for e in chosen) == 12
    positions = [examples.index(e) for e in chosen]
    assert positions == sorted(positions)  # input order kept
    assert set(chosen) == set(subset(list(reversed(examples)), 20, seed=7))  # order-independent choice
    assert set(subset(examples, 10, seed=7)) <= set(chosen)  # nested for one seed


def test_subset_edge_cases() -> None:
    examples = _examples(3, 2)
    assert subset(examples, None, seed=0) == examples
    assert subset(examples, 50, seed=0) == examples
    assert subset(examples, 0, seed=0) == []
    lopsided = subset(_examples(1, 9), 4, seed=0)
    assert len(lopsided) == 4


def test_eval_signature_is_stable_and_order_independent() -> None:
    examples = _examples(5, 5)
    signature = eval_signature(examples)
    assert signature == eval_signature(list(reversed(examples)))
    assert len(signature) == 16 and int(signature, 16) >= 0
    assert signature != eval_signature(examples[:-1])
    same_set = synthetic_boolq(20, 10, 0).validation
    assert eval_signature(same_set) == eval_signature(synthetic_boolq(20, 10, 0).validation)


# --------------------------------------------------------------------------- local BoolQ


def test_local_boolq_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.BOOLQ_DIR_ENV, str(tmp_path))
    assert local_boolq_dir() == tmp_path
    monkeypatch.setenv(data.BOOLQ_DIR_ENV, str(tmp_path / "absent"))
    fallback = local_boolq_dir()
    assert fallback is None or fallback.name == "boolq"


def test_local_boolq_sample_loads() -> None:
    directory = local_boolq_dir()
    if directory is None:
        pytest.skip(f"no local BoolQ directory (set {data.BOOLQ_DIR_ENV} or add ../shared/data/boolq)")
    validate_source(str(directory))
    splits = load_data(str(directory))
    assert isinstance(splits, DatasetSplits)
    assert (len(splits.train), len(splits.validation)) == (1500, 500)
    assert all(" -- " in e.passage for e in splits.validation)
    assert not {e.uid for e in splits.train} & {e.uid for e in splits.validation}


def test_local_data_is_named_by_a_label_and_a_content_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _split_dir(tmp_path, "jsonl")
    copy = tmp_path / "elsewhere" / first.name
    shutil.copytree(first, copy)
    assert data_fingerprint(str(first)) == data_fingerprint(str(copy))  # same files, another path: same hash
    assert data_label(str(copy)) == f"{first.name} (sha256 {data_fingerprint(str(first))[:12]}…)"
    (copy / "validation.jsonl").write_text((copy / "validation.jsonl").read_text().replace("Lantern 1", "Lantern 9"))
    assert data_fingerprint(str(copy)) != data_fingerprint(str(first))
    assert data_fingerprint("synthetic") is None and data_label("hub") == "hub:google/boolq"
    monkeypatch.setenv("HEFT_BOOLQ_DIR", str(first))
    assert data_label(str(first)).startswith("boolq-local (sha256 ")  # the local BoolQ directory by its label
    by_label = load_data("boolq-local")
    assert by_label.train == load_data(str(first)).train and str(tmp_path) not in by_label.label
    validate_source("boolq-local")
    assert data.portable_data_name(str(copy), f"BoolQ-format local: {copy}") == data_label(str(copy))  # old label
    assert data.portable_data_name(str(copy), by_label.label) == by_label.label.removeprefix("BoolQ-format local: ")
    assert data.portable_data_name("synthetic") == "synthetic" and data.portable_data_name("boolq-local") == (
        "boolq-local")

