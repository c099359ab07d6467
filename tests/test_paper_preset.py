"""The "Paper table" preset against the paper's own recipe, as written in ../shared/notes/paper-recipe.md.

The numbers are parsed from that file (Table 1 and the stated settings), not copied here, so the test
fails when the preset drifts from the paper (or the notes are corrected and the preset is not).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from heft_core.study import StudySpec
from heft_core.study_presets import (
    PAPER_MODEL,
    PAPER_TABLE_1,
    paper_options,
    paper_reft_layer,
    paper_table,
    paper_table_linear,
    preset,
)

RECIPE = Path(os.environ.get("HEFT_PAPER_RECIPE", Path(__file__).resolve().parents[2] / "shared/notes/paper-recipe.md"))


@pytest.fixture(scope="module")
def recipe() -> str:
    if not RECIPE.is_file():
        pytest.skip(f"the paper's recipe notes are absent ({RECIPE}; set HEFT_PAPER_RECIPE): nothing to check against")
    return RECIPE.read_text()


def _table(text: str) -> list[dict[str, str]]:
    section = text.split("## Table 1", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def _one(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.S)
    assert found, f"the recipe notes no longer say {pattern!r}"
    return found.group(1)


def test_the_rows_epochs_numbers_and_times_are_table_1(recipe: str) -> None:
    rows = _table(recipe)
    parsed = [
        (int(row["LoRA epochs"]), int(row["ReFT epochs"]), round(float(row["accuracy"].rstrip("%")) / 100, 6),
         row["time (h:mm)"])
        for row in rows
    ]
    ours = [(r.lora_epochs, r.reft_epochs, r.accuracy, f"{r.minutes // 60}:{r.minutes % 60:02d}")
            for r in PAPER_TABLE_1]
    assert ours == parsed
    spec = paper_table()
    assert [arm.method for arm in spec.arms] == ["base"] + [
        "heft" if lora and reft else "lora" if lora else "reft" for lora, reft, _, _ in parsed
    ]
    assert [(arm.lora_epochs or 0, arm.reft_epochs or 0) for arm in spec.arms[1:]] == [p[:2] for p in parsed]
    assert "HEFT 3+3" in [arm.name for arm in spec.arms]  # "three epochs" is 3 LoRA + 3 ReFT
    assert len(spec.seeds) == 3 and spec.compare_with_paper


def test_the_settings_are_the_papers(recipe: str) -> None:
    config = next(run.config for run in paper_table().plan() if run.method == "heft")
    assert config.model == _one(r"Base model: `([^`]+)`", recipe) == PAPER_MODEL
    assert config.data == "hub" and config.train_size is None and config.eval_size is None  # the whole splits
    lora = re.search(r"LoraConfig\(task_type=CAUSAL_LM, r=(\d+), lora_alpha=(\d+), lora_dropout=([\d.]+)\)", recipe)
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (
        int(lora.group(1)), float(lora.group(2)), float(lora.group(3)))
    defaults = _one(r"peft's default is then `(\w+)` and `(\w+)`", recipe)
    assert config.lora.target_modules[0] == defaults and config.lora.target_modules == ["q_proj", "v_proj"]
    stage1 = recipe.split("## Stage 1", 1)[1].split("## Stage 2", 1)[0]
    stage2 = recipe.split("## Stage 2", 1)[1].split("## Scoring", 1)[0]
    for settings, text in ((config.lora_stage, stage1), (config.reft_stage, stage2)):
        assert settings.learning_rate == float(_one(r"learning rate ([\d.e-]+)", text))
        assert (settings.batch_size, settings.grad_accum) == tuple(
            int(n) for n in re.search(r"batch (\d+) × (?:gradient )?accumulation (\d+)", text).groups())
        assert "default" in text and re.search(r"default\s+schedule", text)  # the Trainer's: linear, no warmup
        assert (settings.scheduler, settings.warmup_ratio, settings.weight_decay) == ("linear", 0.0, 0.0)
    assert "default schedule (linear decay, no warmup)" in stage1
    assert "whole text" in stage1 and config.lora_loss == "sequence"
    assert "merge_and_unload()" in stage1 and config.heft_stage2_mode == "merged"
    assert config.max_length == int(_one(r"padded to ([\d,]+)", stage1).replace(",", ""))
    assert config.reft.rank == int(_one(r"rank \(low_rank_dimension\) (\d+)", stage2))
    assert config.reft.layers == [int(_one(r"on layer (\d+)'s `block_output`", stage2))]
    assert "last prompt position" in stage2 and config.reft.positions == "l1"
    scoring = recipe.split("## Scoring", 1)[1].split("##", 1)[0]
    assert config.scoring in ("generation", "both") and "Generation, not logits" in scoring
    assert config.generation_max_new_tokens == int(_one(r"at most (\d+) new tokens", scoring))
    words = re.findall(r'"( \w+)"', _one(r"Target words: ([^\n]+)", recipe))
    assert (config.template.yes, config.template.no) == tuple(words)
    assert config.template.format == "chat" and config.template.system and "Answer:" in config.template.after_question


def test_the_other_reading_and_another_model() -> None:
    text = paper_table_linear()
    assert text.plan()[2].config.lora.target_modules == ["all-linear"] and preset("paper-table-linear").to_dict() == (
        text.to_dict())
    assert paper_reft_layer(32) == 15 and paper_reft_layer(30) == 14  # the same relative depth on SmolLM2
    assert paper_options("embedded")["reft.layers"] == [14] and paper_options()["reft.layers"] == [15]
    assert "layer 14" in paper_table(model="embedded").description


def test_committed_study_specs_name_data_portably_and_still_load() -> None:
    specs = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*/spec.yaml"))
    assert specs
    for path in specs:
        text = path.read_text()
        assert not re.search(r"data: /|/work/|/home/|/tmp/", text), path
        spec = StudySpec.from_file(path)
        assert not Path(spec.plan_config().data).is_absolute()
