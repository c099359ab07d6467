"""Studies: spec validation, plan expansion, presets, a tiny study end to end (CLI, report files,
numbers recomputed from the stored predictions, the same report from database rows), the report
on constructed outcomes, and the study tables with their schema migration."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from heft_common.errors import ConfigError
from heft_core import study_runner
from heft_core.study import StudyArm, StudySpec, dotted_options, evaluation_warning
from heft_core.study_presets import cpu_learns_on_boolq, equal_budget, paper_table, preset
from heft_core.study_report import CHART_FILES, RunOutcome, study_report, training_flops
from storage import queries
from storage.db import open_db
from storage.models import SCHEMA_VERSION
from tests.conftest import write_jsonl_splits

ARMS = [
    {"method": "base"}, {"method": "lora", "lora_epochs": 1}, {"method": "heft", "lora_epochs": 1, "reft_epochs": 1},
]


def _spec(**fields) -> StudySpec:
    base = {"data": "synthetic", "train_size": 16, "eval_size": 16}
    data = {"name": "s", "arms": ARMS, "seeds": [1, 2], "base": base}
    data.update(fields)
    return StudySpec.from_dict(data)


def _refused(option: str, **fields) -> str:
    with pytest.raises(ConfigError) as info:
        _spec(**fields)
    assert info.value.option == option, str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- spec validation


def test_bad_specs_are_refused_naming_the_field() -> None:
    message = _refused("grid.lora.rnak", grid={"lora.rnak": [4, 8]})
    assert "did you mean lora.rank" in message
    assert "lora_epochs" in _refused("arms[1].lora_epochs", arms=[{"method": "base"}, {"method": "lora"}])
    _refused("arms[0].reft_epochs", arms=[{"method": "heft", "lora_epochs": 1}])
    _refused("arms[0].lora_epochs", arms=[{"method": "base", "lora_epochs": 3}])
    _refused("arms[0].lora_epochs", arms=[{"method": "lora", "lora_epochs": 0}])
    _refused("arms[0].method", arms=[{"method": "qlora", "lora_epochs": 1}])
    _refused("arms", arms=[])
    _refused("seeds", seeds=[])
    _refused("seeds", seeds=[1, 1])
    _refused("seeds[1]", seeds=[1, -2])
    message = _refused("grid", grid={"lora.rank": list(range(1, 41))})  # 3 arms x 2 seeds x 40 = 240 > 200
    assert "240 runs" in message and "max_runs=200" in message
    _refused("seeds", seeds=list(range(70)))  # 210 runs without a grid
    assert _spec(grid={"lora.rank": list(range(1, 41))}, max_runs=240).run_count == 240
    _refused("max_runs", max_runs=0)
    _refused("grid.eval_size", grid={"eval_size": [16, 32]})  # every run answers the same questions
    _refused("grid.seed", grid={"seed": [1, 2]})
    _refused("grid.lora.rank", grid={"lora.rank": 8})  # not a list
    _refused("grid.lora.rank", grid={"lora.rank": [4, 0]})  # a value RunConfig refuses
    _refused("base.method", base={"method": "lora"})
    _refused("base.lora.dropout", base={"lora.dropout": 1.5})
    with_data = {"method": "lora", "lora_epochs": 1, "options": {"data": "x"}}
    _refused("arms[1].options.data", arms=[{"method": "base"}, with_data])
    _refused("arms[1].name", arms=[{"method": "lora", "lora_epochs": 1}, {"method": "lora", "lora_epochs": 1}])
    _refused("contrasts[0]", contrasts=[["LoRA 1", "ReFT 9"]])
    _refused("seedz", seedz=[1])
    with pytest.raises(ConfigError) as info:
        StudySpec.from_dict({"arms": ARMS})
    assert info.value.option == "name"


def test_spec_round_trips_through_yaml_and_reads_exponents_as_numbers(tmp_path: Path) -> None:
    text = """
name: grid study
arms:
  - {method: lora, lora_epochs: 2}
  - {method: heft, lora_epochs: 1, reft_epochs: 1, name: HEFT split}
seeds: [7]
grid:
  lora_stage.learning_rate: [1e-4, 3e-4]
base:
  data: synthetic
  lora: {rank: 4}
contrasts: [[HEFT split, LoRA 2]]
"""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    spec = StudySpec.from_file(path)
    assert spec.grid == {"lora_stage.learning_rate": [1e-4, 3e-4]}  # floats, not the strings YAML 1.1 makes
    assert spec.base["lora.rank"] == 4 and [arm.name for arm in spec.arms] == ["LoRA 2", "HEFT split"]
    again = StudySpec.from_text(spec.to_yaml())
    assert again.to_dict() == spec.to_dict() == StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))).to_dict()
    with pytest.raises(ConfigError, match="spec"):
        StudySpec.from_text("name: [unclosed")
    assert "lora.rank" in dotted_options() and "reft_stage.learning_rate" in dotted_options()


# --------------------------------------------------------------------------- the plan


def test_plan_expands_arms_seeds_and_grid() -> None:
    spec = _spec(grid={"lora.rank": [4, 8], "lora_stage.learning_rate": [1e-3, 3e-3]})
    plan = spec.plan()
    assert len(plan) == spec.run_count == 3 * 2 * 4
    assert len({run.key for run in plan}) == len(plan) and len({run.dir_name for run in plan}) == len(plan)
    assert [run.seed for run in plan[:12]] == [1] * 12  # seed by seed: early results cover every arm
    for run in plan:
        assert run.config.seed == run.seed and run.config.method == run.method
        assert run.config.lora.rank == run.grid_point["lora.rank"]
        assert run.config.lora_stage.learning_rate == run.grid_point["lora_stage.learning_rate"]
        assert run.config.eval_size == 16 and run.config.data == "synthetic"
        assert run.arm in run.config.name and f"seed {run.seed}" in run.config.name
    heft = next(run for run in plan if run.method == "heft")
    assert (heft.config.lora_stage.epochs, heft.config.reft_stage.epochs) == (1, 1)
    fields = heft.queue_fields()
    assert fields["arm"] == "HEFT 1+1" and fields["grid_point"] == heft.grid_point and fields["total_epochs"] == 2.0
    assert heft.optimizer_steps(16) == 2 * 2  # batch 8: two steps per epoch, two epochs
    assert next(run for run in plan if run.method == "base").optimizer_steps(16) == 0


def test_same_seed_same_training_rows_and_every_run_the_same_questions(tiny_model, easy_data) -> None:
    """What training will use, from heft_core.train.prepare itself (tokenizer only, no weights)."""
    from heft_core.train import prepare

    spec = _spec(base={"model": tiny_model, "data": "test:easy", "train_size": 24, "eval_size": 20, "max_length": 64})
    train_rows: dict[int, set[frozenset]] = {}
    questions = set()
    for run in spec.plan():
        prepared = prepare(run.config, easy_data)
        questions.add(frozenset(e.uid for e in prepared.eval_encoded))
        if run.method != "base":
            train_rows.setdefault(run.seed, set()).add(frozenset(e.uid for e in prepared.train_encoded))
    assert len(questions) == 1 and len(next(iter(questions))) == 20
    assert all(len(rows) == 1 for rows in train_rows.values())  # every arm of a seed trains on the same rows
    assert train_rows[1] != train_rows[2]  # and another seed draws other rows


def test_presets() -> None:
    assert StudyArm("heft", lora_epochs=1, reft_epochs=2).name == "HEFT 1+2" and StudyArm("base").name == "Base"
    paper = paper_table()  # its recipe against the paper's own text: tests/test_paper_preset.py
    assert [arm.name for arm in paper.arms] == ["Base", "ReFT 20", "LoRA 20", "HEFT 3+3", "HEFT 20+20"]
    assert paper.seeds == [42, 43, 44] and paper.run_count == 15 and paper.compare_with_paper
    assert paper.base["lora_stage.learning_rate"] == 2e-4
    equal = equal_budget(epochs=4, seeds=[1])
    assert {arm.total_epochs for arm in equal.arms if arm.method != "base"} == {4}
    assert [arm.name for arm in equal.arms if arm.method == "heft"] == ["HEFT 1+3", "HEFT 2+2", "HEFT 3+1"]
    cpu = cpu_learns_on_boolq(data="synthetic")
    assert cpu.base["lora.target_modules"] == ["all-linear"] and {arm.method for arm in cpu.arms} >= {"lora", "heft"}
    assert cpu.plan()[1].config.lora.target_modules == ["all-linear"]
    assert preset("Paper table").to_dict() == paper.to_dict()
    with pytest.raises(ConfigError, match="preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="epochs"):
        equal_budget(epochs=1)  # HEFT needs two epochs to split


def test_evaluation_warning_before_launch() -> None:
    assert "cannot separate" in evaluation_warning(48)
    assert "at least" in evaluation_warning(500)
    assert evaluation_warning(3270) is None


def test_training_flops_formula() -> None:
    lora = _spec().plan()[1].config
    # 4 layers, N = 1000 linear weights, 100 tokens, 10 adapter parameters
    assert training_flops(lora, 4, 1000, {"lora": 100}, {"lora": 10}) == 2 * 1000 * 100 * 2 + 6 * 10 * 100
    reft = StudySpec.from_dict({
        "name": "r", "arms": [{"method": "reft", "reft_epochs": 2}],
        "base": {"data": "synthetic", "reft.layers": [2], "reft.positions": "l1"},
    }).plan()[0].config
    # ReFT at layer 2 of 4: backward through 1 layer; positions l1 reuse the prefix: 1 token x 10 rows x 2 epochs
    expected = 2 * 1000 * 100 + 2 * 1000 * 20 * (1 / 4) + 6 * 10 * 20
    assert training_flops(reft, 4, 1000, {"reft": 100}, {"reft": 10}, train_examples=10) == pytest.approx(expected)


# --------------------------------------------------------------------------- a tiny study end to end


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model, easy_data):
    """2 seeds x 3 arms on the tiny random Llama, trained through the CLI's `study` command."""
    from heft_core.cli import main

    root = tmp_path_factory.mktemp("study")
    data_dir = write_jsonl_splits(root / "data", easy_data)
    spec = StudySpec.from_dict({
        "name": "tiny | <study>", "arms": ARMS, "seeds": [1, 2],
        "base": {
            "model": tiny_model, "data": str(data_dir), "train_size": 16, "eval_size": 16, "max_length": 48,
            "precision": "no", "reft.layers": [1, 2], "reft.positions": "l1",
            "lora_stage.learning_rate": 3e-3, "reft_stage.learning_rate": 3e-3,
        },
    })
    spec_file = root / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    out = root / "out"
    assert main(["study", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    return spec, out


def _exact_p(a_only: int, b_only: int) -> float:
    """Exact McNemar p straight from scipy's binomial test (1 without discordant questions)."""
    return binomtest(min(a_only, b_only), a_only + b_only).pvalue if a_only + b_only else 1.0


def _stored_predictions(out: Path) -> dict[tuple[str, int], list[dict]]:
    index = json.loads((out / "study.json").read_text())["runs"]
    result = {}
    for entry in index:
        with open(out / entry["run_dir"] / "predictions.jsonl") as handle:
            result[(entry["arm"], entry["seed"])] = [json.loads(line) for line in handle]
    return result


def test_tiny_study_report_equals_numbers_recomputed_from_stored_predictions(tiny_study) -> None:
    spec, out = tiny_study
    report = json.loads((out / "results.json").read_text())
    stored = _stored_predictions(out)
    assert report["planned_runs"] == report["finished_runs"] == 6 and not report["missing"]
    assert len(stored) == 6 and all(len(p) == 16 for p in stored.values())

    gold = {p["uid"]: p["label"] for p in next(iter(stored.values()))}
    assert all({p["uid"]: p["label"] for p in preds} == gold for preds in stored.values())  # same questions
    yes = sum(gold.values())
    majority_answer, majority_correct = (1, yes) if 2 * yes >= len(gold) else (0, len(gold) - yes)
    assert report["majority"]["answer"] == ("yes" if majority_answer else "no")
    assert report["majority"]["accuracy"] == majority_correct / 16 and report["n_questions"] == 16

    for row in report["runs"]:
        predictions = stored[(row["arm"], row["seed"])]
        correct = sum(p["correct"] for p in predictions)
        low, high = proportion_confint(correct, 16, alpha=0.05, method="wilson")
        assert (row["correct"], row["n"]) == (correct, 16) and row["accuracy"] == correct / 16
        assert row["low"] == pytest.approx(low, abs=1e-12) and row["high"] == pytest.approx(high, abs=1e-12)
        share = sum(p["predicted"] for p in predictions) / 16
        assert row["yes_share"] == share
        assert row["one_class"] == ("yes" if share >= 0.95 else "no" if share <= 0.05 else None)
        run_only = sum(1 for p in predictions if p["correct"] and p["label"] != majority_answer)
        majority_only = sum(1 for p in predictions if not p["correct"] and p["label"] == majority_answer)
        assert (row["vs_majority_run_only"], row["vs_majority_majority_only"]) == (run_only, majority_only)
        assert row["vs_majority_p"] == pytest.approx(_exact_p(run_only, majority_only))
        if row["method"] == "base":
            assert row["flops"] == 0 and row["tokens_seen"] == 0
        else:
            assert row["flops"] > 0 and row["tokens_seen"] > 0 and row["wall_seconds"] > 0

    for arm in report["arms"]:
        accuracies = [sum(p["correct"] for p in stored[(arm["arm"], seed)]) / 16 for seed in (1, 2)]
        assert arm["accuracy_mean"] == pytest.approx(np.mean(accuracies))
        assert arm["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
        assert arm["seeds_finished"] == 2
    lora_tokens = {r["seed"]: r["tokens_seen"] for r in report["runs"] if r["method"] == "lora"}
    heft_tokens = {r["seed"]: r["tokens_seen"] for r in report["runs"] if r["method"] == "heft"}
    assert heft_tokens == {seed: 2 * tokens for seed, tokens in lora_tokens.items()}  # two epochs of the same rows

    [contrast] = report["contrasts"]  # HEFT 1+1 vs LoRA 1
    assert (contrast["a"], contrast["b"]) == ("HEFT 1+1", "LoRA 1")
    differences = []
    for test in contrast["seeds"]:
        right_a = {p["uid"]: p["correct"] for p in stored[("HEFT 1+1", test["seed"])]}
        right_b = {p["uid"]: p["correct"] for p in stored[("LoRA 1", test["seed"])]}
        a_only = sum(1 for uid in gold if right_a[uid] and not right_b[uid])
        b_only = sum(1 for uid in gold if right_b[uid] and not right_a[uid])
        assert (test["a_only"], test["b_only"]) == (a_only, b_only)
        assert test["p_value"] == pytest.approx(_exact_p(a_only, b_only))
        differences.append((a_only - b_only) / 16)
    assert contrast["mean_difference"] == pytest.approx(np.mean(differences))
    assert contrast["ci_low"] <= contrast["mean_difference"] <= contrast["ci_high"] and contrast["resamples"] == 2000
    assert contrast["outcome"] in ("better", "worse", "none") and contrast["verdict"]


def test_tiny_study_directory_holds_the_whole_report(tiny_study, capsys) -> None:
    from heft_core.cli import main

    spec, out = tiny_study
    files = ("spec.yaml", "study.json", "results.md", "results.csv", "arms.csv", "contrasts.csv", "predictions.csv")
    for name in files:
        assert (out / name).stat().st_size > 0, name
    for chart in CHART_FILES:
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
    assert StudySpec.from_file(out / "spec.yaml").to_dict() == spec.to_dict()
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + 6 * 16
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 6
    markdown = (out / "results.md").read_text()
    assert "tiny \\| &lt;study&gt;" in markdown and "<study>" not in markdown  # names are escaped
    assert "majority answer" in markdown and "## Contrasts" in markdown and "accuracy_by_arm.png" in markdown

    assert main(["study-report", str(out), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "results.json").read_text())
    assert printed == written  # the CLI prints what the files say, number for number
    assert main(["study-report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == markdown.strip()


def test_tiny_study_resume_trains_nothing_again(tiny_study, monkeypatch) -> None:
    spec, out = tiny_study
    before = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/run.json")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("heft_core.train.train", no_training)
    report = study_runner.run_study_in_process(spec, out, progress=False, resume=True)
    assert report.finished_runs == 6
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/*/run.json")} == before
    assert json.loads(report.to_json())["runs"] == json.loads((out / "results.json").read_text())["runs"]


def test_tiny_study_report_from_database_rows(tiny_study, tmp_path) -> None:
    """The app's path: runs queued as a study, finished by a worker; the report from the rows equals the files'."""
    spec, out = tiny_study
    engine = open_db(tmp_path / "heft.db")
    plan = spec.plan()
    study = queries.create_study(engine, name=spec.name, spec=spec.to_dict(), runs=[run.queue_fields() for run in plan])
    index = {(e["arm"], e["seed"]): e for e in json.loads((out / "study.json").read_text())["runs"]}
    for _ in plan:  # play the worker: claim, point at the run directory, finish
        run = queries.claim_next_run(engine, 4242)
        queries.set_artifact_dir(engine, run.id, out / index[(run.arm, run.seed)]["run_dir"])
        queries.finish_run(engine, run.id, "completed")
    rows = queries.study_runs(engine, study.id)
    assert {(r.arm, r.seed) for r in rows} == set(index) and all(r.batch_id == f"study-{study.id}" for r in rows)
    stored_spec = StudySpec.from_dict(queries.get_study(engine, study.id).spec)
    from_rows = study_report(stored_spec, [RunOutcome.from_record(r) for r in rows])
    from_files = json.loads((out / "results.json").read_text())
    assert [(r.arm, r.seed, r.accuracy, r.vs_majority_p, r.flops) for r in from_rows.runs] == [
        (r["arm"], r["seed"], r["accuracy"], r["vs_majority_p"], r["flops"]) for r in from_files["runs"]
    ]
    assert [c.mean_difference for c in from_rows.contrasts] == [c["mean_difference"] for c in from_files["contrasts"]]
    assert all(r.run_id for r in from_rows.runs)


# --------------------------------------------------------------------------- the report on constructed outcomes


def _outcome(arm: str, seed: int, right: list[bool], labels: list[int], method: str = "lora", **fields) -> RunOutcome:
    predictions = [
        {"uid": f"q{i}", "label": label, "predicted": label if ok else 1 - label, "correct": ok, "p_yes": 0.5}
        for i, (ok, label) in enumerate(zip(right, labels))
    ]
    return RunOutcome(arm, seed, {}, method, "completed", predictions=predictions, **fields)


def _two_arm_spec(seeds=(1, 2, 3)) -> StudySpec:
    return StudySpec.from_dict({
        "name": "constructed", "seeds": list(seeds), "base": {"data": "synthetic"},
        "arms": [{"method": "lora", "lora_epochs": 3}, {"method": "heft", "lora_epochs": 1, "reft_epochs": 2}],
    })


def test_report_verdicts_follow_the_numbers() -> None:
    rng = np.random.default_rng(5)
    labels = [int(x) for x in rng.random(300) < 0.6]
    spec = _two_arm_spec()
    strong = [_outcome("HEFT 1+2", s, list(rng.random(300) < 0.9), labels, "heft") for s in (1, 2, 3)]
    weak = [_outcome("LoRA 3", s, list(rng.random(300) < 0.6), labels) for s in (1, 2, 3)]
    report = study_report(spec, strong + weak, model_shape=(4, 1000))
    [contrast] = report.contrasts
    assert (contrast.a, contrast.b, contrast.outcome) == ("HEFT 1+2", "LoRA 3", "better")
    assert contrast.verdict.startswith("HEFT 1+2 is better than LoRA 3") and contrast.ci_low > 0
    assert report.majority["answer"] == "yes" and report.majority["correct"] == sum(labels)

    same = [_outcome("HEFT 1+2", s, list(rng.random(300) < 0.7), labels, "heft") for s in (1, 2, 3)]
    other = [_outcome("LoRA 3", s, list(rng.random(300) < 0.7), labels) for s in (1, 2, 3)]
    [contrast] = study_report(spec, same + other, model_shape=(4, 1000)).contrasts
    assert contrast.outcome == "none"
    assert contrast.verdict.startswith("no difference detected at this scale, n = 3 seeds × 300 questions")


def test_report_of_a_partly_failed_study_says_what_is_missing() -> None:
    labels = [1, 0] * 20
    spec = _two_arm_spec()
    always_yes = [label == 1 for label in labels]
    outcomes = [
        _outcome("LoRA 3", 1, always_yes, labels), _outcome("LoRA 3", 2, always_yes, labels),
        RunOutcome("LoRA 3", 3, {}, "lora", "failed", error="RuntimeError: out of memory"),
        _outcome("HEFT 1+2", 1, [True] * 40, labels, "heft"),
        RunOutcome("HEFT 1+2", 2, {}, "heft", "failed", error="first try"),  # re-queued, then finished:
        _outcome("HEFT 1+2", 2, [True] * 39 + [False], labels, "heft"),
    ]
    report = study_report(spec, outcomes, model_shape=(4, 1000))
    assert report.finished_runs == 4 and report.planned_runs == 6
    assert report.missing == ["LoRA 3, seed 3: failed (RuntimeError: out of memory)", "HEFT 1+2, seed 3: not run"]
    lora = next(arm for arm in report.arms if arm.arm == "LoRA 3")
    assert (lora.seeds_finished, lora.one_class_runs, lora.beats_majority_runs) == (2, 2, 0)
    heft = next(arm for arm in report.arms if arm.arm == "HEFT 1+2")
    assert heft.accuracy_mean == pytest.approx((40 + 39) / 80) and heft.beats_majority_runs == 2
    [contrast] = report.contrasts
    assert [t.seed for t in contrast.seeds] == [1, 2]  # paired only where both finished
    assert "Missing (2)" in report.to_markdown() and "out of memory" in report.to_markdown()
    nothing = study_report(spec, [RunOutcome("LoRA 3", 1, {}, "lora", "failed", error="boom")])
    assert nothing.finished_runs == 0 and len(nothing.missing) == 6 and "## Arms" in nothing.to_markdown()


# --------------------------------------------------------------------------- storage


def _study_rows(count: int = 3) -> list[dict]:
    return [
        {"name": f"s · arm {i}", "method": "lora", "config": {"seed": i}, "base_model": "m", "data_source": "d",
         "arm": f"arm {i % 2}", "seed": i, "grid_point": {"lora.rank": 4}}
        for i in range(count)
    ]


def test_study_tables_create_link_cancel_and_requeue(tmp_path) -> None:
    engine = open_db(tmp_path / "heft.db")
    study = queries.create_study(engine, name="first", spec={"name": "first", "arms": []}, runs=_study_rows(3))
    assert queries.get_study(engine, study.id).spec == {"name": "first", "arms": []}
    runs = queries.study_runs(engine, study.id)
    assert [(r.arm, r.seed, r.grid_values, r.status) for r in runs] == [
        ("arm 0", 0, {"lora.rank": 4}, "queued"),
        ("arm 1", 1, {"lora.rank": 4}, "queued"),
        ("arm 0", 2, {"lora.rank": 4}, "queued"),
    ]
    other = queries.create_study(engine, name="second", spec={}, runs=_study_rows(1))
    assert [s.id for s in queries.list_studies(engine)] == [other.id, study.id]
    external = queries.start_external_run(
        engine, name="x", method="base", config={}, base_model="m", data_source="d", worker_pid=1,
        study_id=other.id, arm="Base", seed=5, grid_point="{}",
    )
    assert [r.id for r in queries.study_runs(engine, other.id)][-1] == external.id

    running = queries.claim_next_run(engine, 99)
    assert running.study_id == study.id
    outcome = queries.cancel_study(engine, study.id)
    assert outcome == {runs[0].id: "cancel_requested", runs[1].id: "cancelled", runs[2].id: "cancelled"}
    assert queries.get_study(engine, study.id).cancelled_at is not None
    assert queries.study_status_counts(engine, study.id) == {"running": 1, "cancelled": 2}
    assert queries.study_status_counts(engine, other.id) == {"queued": 1, "running": 1}  # the other study untouched
    again = queries.requeue(engine, runs[1].id)
    assert (again.study_id, again.arm, again.seed, again.grid_point) == (study.id, "arm 1", 1, runs[1].grid_point)
    with pytest.raises(ValueError, match="does not exist"):
        queries.cancel_study(engine, 999)
    with pytest.raises(ValueError, match="study id"):
        queries.get_study(engine, "x")


def test_a_bad_study_run_queues_nothing(tmp_path) -> None:
    engine = open_db(tmp_path / "heft.db")
    rows = _study_rows(2) + [{**_study_rows(1)[0], "method": "qlora"}]
    with pytest.raises(ValueError, match="study run 2: method"):
        queries.create_study(engine, name="bad", spec={}, runs=rows)
    with pytest.raises(ValueError, match="missing field"):
        queries.create_study(engine, name="bad", spec={}, runs=[{"name": "n", "method": "lora"}])
    assert queries.list_studies(engine) == [] and queries.list_runs(engine) == []


# The schema of version 1, as that release's create_all wrote it (before studies).
SCHEMA_V1 = """
CREATE TABLE run (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, name VARCHAR NOT NULL, method VARCHAR NOT NULL,
    status VARCHAR NOT NULL, config_json TEXT NOT NULL, base_model VARCHAR NOT NULL, data_source VARCHAR NOT NULL,
    eval_signature VARCHAR, batch_id VARCHAR, created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME,
    heartbeat_at DATETIME, worker_pid INTEGER, child_pid INTEGER, cancel_requested BOOLEAN NOT NULL, error TEXT,
    artifact_dir VARCHAR, trainable_params INTEGER, trainable_params_json TEXT, accuracy FLOAT, accuracy_low FLOAT,
    accuracy_high FLOAT, eval_n INTEGER, train_seconds FLOAT, tokens_per_second FLOAT, progress_json TEXT,
    total_epochs FLOAT
);
CREATE INDEX ix_run_batch_id ON run (batch_id);
CREATE INDEX ix_run_eval_signature ON run (eval_signature);
CREATE INDEX ix_run_method ON run (method);
CREATE INDEX ix_run_status_created_at ON run (status, created_at);
CREATE TABLE schema_info (id INTEGER NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id));
CREATE TABLE step_metric (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL, stage VARCHAR NOT NULL, epoch FLOAT,
    step INTEGER NOT NULL, loss FLOAT, learning_rate FLOAT, tokens_per_second FLOAT, elapsed_seconds FLOAT,
    created_at DATETIME NOT NULL, FOREIGN KEY(run_id) REFERENCES run (id) ON DELETE CASCADE
);
CREATE INDEX ix_step_metric_run_id_id ON step_metric (run_id, id);
CREATE TABLE epoch_eval (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL, stage VARCHAR NOT NULL,
    epoch INTEGER NOT NULL, cumulative_epoch FLOAT, accuracy FLOAT, accuracy_low FLOAT, accuracy_high FLOAT, n INTEGER,
    created_at DATETIME NOT NULL,
    FOREIGN KEY(run_id) REFERENCES run (id) ON DELETE CASCADE
);
CREATE INDEX ix_epoch_eval_run_id ON epoch_eval (run_id);
INSERT INTO schema_info VALUES (1, 1);
INSERT INTO run (name, method, status, config_json, base_model, data_source, created_at, cancel_requested, accuracy)
    VALUES ('old run', 'lora', 'completed', '{}', 'm', 'd', '2026-01-01 00:00:00', 0, 0.75);
"""


def _run_columns(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return [(row[1], row[2], row[3]) for row in conn.execute("PRAGMA table_info(run)")]


def test_version_1_database_is_migrated(tmp_path) -> None:
    old = tmp_path / "old" / "heft.db"
    old.parent.mkdir()
    with sqlite3.connect(old) as conn:
        conn.executescript(SCHEMA_V1)
    engine = open_db(old)
    with sqlite3.connect(old) as conn:
        assert conn.execute("SELECT version FROM schema_info").fetchone()[0] == SCHEMA_VERSION == 3
        eval_columns = {row[1] for row in conn.execute("PRAGMA table_info(epoch_eval)")}
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(run)")}
        foreign = [(row[2], row[3], row[6]) for row in conn.execute("PRAGMA foreign_key_list(run)")]
    assert "ix_run_study_id" in indexes and foreign == [("study", "study_id", "SET NULL")]
    fresh = tmp_path / "fresh" / "heft.db"
    open_db(fresh)
    assert _run_columns(old) == _run_columns(fresh)  # the migrated table is the one a new database gets
    assert {"scoring", "generation_accuracy", "unparsed"} <= eval_columns

    [kept] = queries.list_runs(engine)
    assert (kept.name, kept.accuracy, kept.study_id, kept.arm, kept.grid_values) == ("old run", 0.75, None, None, {})
    study = queries.create_study(engine, name="after", spec={}, runs=_study_rows(2))
    assert len(queries.study_runs(engine, study.id)) == 2
    with sqlite3.connect(old) as conn:  # the migrated foreign key acts: a deleted study leaves its runs unlinked
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("DELETE FROM study WHERE id = ?", (study.id,))
    assert queries.study_runs(engine, study.id) == [] and len(queries.list_runs(engine)) == 3
