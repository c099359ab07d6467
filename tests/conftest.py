"""Shared fixtures: a private data home, a tiny random Llama, and an easy yes/no set.

The easy set is learnable in a few dozen steps by a 4-layer random model: the answer is
"yes" exactly when the question's last word is one of the "yes" colours.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# The repository root is on sys.path through pytest.ini's ``pythonpath = .``.
ROOT = Path(__file__).resolve().parent.parent

# Tests never touch the user's data home or the hub; set before any project module is imported
# (huggingface_hub reads HF_HUB_OFFLINE when it is first imported).
os.environ.setdefault("HEFT_HOME", str(ROOT / ".heft_home" / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HEFT_NO_CALIBRATION", "1")  # no background calibration of the embedded model in UI tests
os.environ.setdefault("HEFT_DEMO", "0")  # an app started by a test begins empty (the demo tests turn it on)

from heft_core.data import DatasetSplits, Example  # noqa: E402  (after the environment above)
from tests.tiny import make_tiny_model_dir  # noqa: E402

YES_WORDS = ["red", "green", "gold", "pink"]
NO_WORDS = ["blue", "grey", "black", "white"]
FILLER = "the a river town bird stone lake hill road tree wind song boat field wall door".split()


def easy_splits(n_train: int = 160, n_validation: int = 64, seed: int = 0) -> DatasetSplits:
    rng = random.Random(seed)

    def make(split: str, n: int) -> list[Example]:
        rows = []
        for i in range(n):
            answer = i % 2 == 0
            colour = rng.choice(YES_WORDS if answer else NO_WORDS)
            passage = " ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14)))
            rows.append(Example(f"{split}-{i}", f"is the {rng.choice(FILLER)} {colour}", passage, answer))
        return rows

    return DatasetSplits(make("train", n_train), make("validation", n_validation), "test:easy", "Easy test set", True)


@pytest.fixture(scope="session")
def easy_data():
    return easy_splits()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, easy_data) -> str:
    texts = [e.passage + " " + e.question for e in easy_data.train + easy_data.validation]
    texts.append(" ".join(YES_WORDS + NO_WORDS + FILLER))
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), texts, layers=4, hidden=64))


def write_jsonl_splits(directory: Path, splits) -> Path:
    """Write splits as train.jsonl / validation.jsonl in the google/boolq schema."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", splits.train), ("validation", splits.validation)):
        with open(directory / f"{name}.jsonl", "w") as fh:
            fh.writelines(
                json.dumps({"question": e.question, "passage": e.passage, "answer": e.answer}) + "\n" for e in rows
            )
    return directory


@pytest.fixture
def data_dir(tmp_path, easy_data) -> str:
    """The easy set as a local data source, for code that loads data by path (children, the UI)."""
    return str(write_jsonl_splits(tmp_path / "data", easy_data))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private data home (HEFT_HOME) for this test."""
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def quick_config(model: str, method: str, **overrides):
    """A one-epoch config on 32 training and 32 evaluation examples (seconds on the tiny Llama)."""
    from heft_core.config import StageSettings
    from tests.tiny import make_config

    one_epoch = dict(epochs=1, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0)
    return make_config(
        model,
        method,
        train_size=32,
        eval_size=32,
        lora_stage=StageSettings(**one_epoch),
        reft_stage=StageSettings(**one_epoch),
        **overrides,
    )


@pytest.fixture(scope="session")
def quick_runs(tiny_model, easy_data, tmp_path_factory) -> dict[str, Path]:
    """One short finished run directory per trained method (tests export them; they must not change them):
    ReFT with unshared first/last interventions, HEFT shared."""
    from heft_core.config import ReftSettings
    from heft_core.train import train

    root = tmp_path_factory.mktemp("quick-runs")
    configs = {
        "lora": quick_config(tiny_model, "lora"),
        "reft": quick_config(
            tiny_model,
            "reft",
            reft=ReftSettings(rank=4, layers=[1, 3], positions="f2+l2", share_weights=False, dropout=0.0),
        ),
        "heft": quick_config(
            tiny_model, "heft", reft=ReftSettings(rank=4, layers="all", positions="f1+l2", dropout=0.0)
        ),
    }
    return {method: Path(train(config, root / method, data=easy_data).run_dir) for method, config in configs.items()}


@pytest.fixture
def app_client(home):
    """The app served on a free port with a gradio_client Client; no worker (nothing queued runs)."""
    from gradio_client import Client

    from storage.db import open_db
    from tests.servers import served_app

    engine = open_db(home / "heft.db")
    with served_app(engine) as url:
        yield Client(url, verbose=False), engine, home


@pytest.fixture
def studio(tmp_path, home, data_dir):
    """The app on a free port with its own data home and a worker thread polling every 0.2 s."""
    from storage.db import open_db
    from tests.servers import served_app, worker_thread

    db = tmp_path / "home" / "heft.db"
    engine = open_db(db)
    with worker_thread(db), served_app(engine) as url:
        yield url, engine, str(data_dir)
