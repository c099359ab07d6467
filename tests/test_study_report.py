"""The study report with both scorings and the paper's column, from hand-written outcomes in the stored schema."""
from __future__ import annotations

from heft_core.study import StudyArm, StudySpec
from heft_core.study_presets import paper_table
from heft_core.study_report import RunOutcome, study_report


def _both(arm: str, method: str, labels, logits_right, generated) -> RunOutcome:
    """An outcome scored both ways: correct/predicted are the logits' (the primary), generation beside them."""
    rows = []
    for i, (label, right, answer) in enumerate(zip(labels, logits_right, generated)):
        rows.append({
            "uid": f"q{i}", "label": label, "predicted": label if right else 1 - label, "correct": right,
            "p_yes": 0.5, "logits_correct": right, "generated": {1: " Yes", 0: " No", None: " Maybe"}[answer],
            "generation_predicted": answer, "generation_correct": answer == label,
        })
    return RunOutcome(arm, 42, {}, method, "completed", config={"scoring": "both"}, predictions=rows,
                      train_seconds=5000.0, wall_seconds=5400.0)


def test_both_scorings_their_agreement_and_the_papers_column() -> None:
    spec = paper_table(model="embedded", data="synthetic", seeds=[42])
    labels = [1, 0] * 10
    outcomes = []
    for arm in spec.arms:
        logits = [i % 5 != 0 for i in range(20)]  # 16 of 20
        generated = [label if i % 4 else None for i, label in enumerate(labels)]  # 5 unparsed, else right
        outcomes.append(_both(arm.name, arm.method, labels, logits, generated))
    report = study_report(spec, outcomes, model_shape=(4, 1000), resamples=200)
    run = next(r for r in report.runs if r.arm == "HEFT 3+3")
    assert (run.scoring, run.accuracy, run.logits_accuracy) == ("logits", 0.8, 0.8)
    assert run.generation_accuracy == 0.75 and run.unparsed == 5
    same = sum(1 for i, label in enumerate(labels) if i % 4 and (i % 5 != 0))  # both right where both answered
    assert run.scorings_agree == same / 20
    heft = next(a for a in report.arms if a.arm == "HEFT 3+3")
    assert (heft.paper_accuracy, heft.paper_minutes) == (0.8517, 83)
    assert next(a for a in report.arms if a.arm == "Base").paper_accuracy is None
    text = report.to_markdown()
    assert "accuracy % by logits (mean ± sd)" in text and "by generation % (mean)" in text
    assert "logits = generation %" in text and "Data: synthetic." in text
    assert "| HEFT 3+3 | 3+3 | 85.2 | 1:23 | 80.0 | 75.0 | 1:23 | 1:30 |" in text
    assert "| LoRA 20 | 20+0 | 85.0 | 6:52 |" in text and "| ReFT 20 | 0+20 | 83.4 | 2:19 |" in text
    assert "generation_accuracy" in report.to_csv("runs").splitlines()[0]


def test_an_older_run_without_scoring_fields_reads_as_logits() -> None:
    spec = StudySpec(name="old", arms=[StudyArm("base"), StudyArm("lora", lora_epochs=1)], seeds=[1],
                     base={"data": "synthetic"})
    labels = [1, 0, 1, 1]
    outcomes = [
        RunOutcome(arm.name, 1, {}, arm.method, "completed", predictions=[
            {"uid": f"q{i}", "label": label, "predicted": label, "correct": True, "p_yes": 0.9}
            for i, label in enumerate(labels)
        ])
        for arm in spec.arms
    ]
    report = study_report(spec, outcomes, model_shape=(4, 1000), resamples=100)
    assert all(r.scoring == "logits" and r.logits_accuracy == 1.0 and r.generation_accuracy is None
               for r in report.runs)
    text = report.to_markdown()
    assert "accuracy % by logits" in text and "by generation" not in text and "Against the paper" not in text
