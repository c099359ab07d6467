"""Time estimates from this machine's measured speed: the arithmetic, the calibration and its cache,
the Studies tab's default preset and its past-a-day warning (issue 24)."""
from __future__ import annotations

import html

import pytest

from app import studies, timing
from heft_core import calibration, study_presets
from heft_core.calibration import Calibration, TokenCounts
from heft_core.study import StudySpec

CPU_TITLE = study_presets.PRESET_TITLES["cpu-boolq"]


def _calibration(**overrides) -> Calibration:
    fields = dict(machine="test cpu", model="embedded", shapes="s", eval_tokens_per_second=1000.0, load_seconds=10.0,
                  train_tokens_per_second={"lora": 250.0, "reft": 400.0, "heft2": 500.0}, parameters=106_168_320)
    fields.update(overrides)
    return Calibration(**fields)


def test_a_study_estimate_follows_from_the_measured_rates(monkeypatch) -> None:
    from heft_core import models

    monkeypatch.setattr(models, "needs_conversion", lambda ref: False)
    cpu = study_presets.preset("cpu-boolq").to_dict()
    base = {**cpu["base"], "data": "synthetic", "train_size": 400, "eval_size": 100}
    spec = StudySpec.from_dict({**cpu, "base": base})
    tokens = TokenCounts(train_rows=400, train_tokens=400 * 150, eval_rows=100, eval_tokens=100 * 160)
    rates = timing.rates_from_calibration(_calibration())
    summary = studies.plan_summary(spec, None, tokens, rates)
    n_train, n_eval = summary["train_rows"], summary["eval_questions"]
    assert (n_train, n_eval) == (400, 100)
    one_eval = n_eval * 160 / 1000.0
    base = 10.0 + one_eval
    lora_2 = 10.0 + 2 * n_train * 150 / 250.0 + 2 * one_eval  # two epochs, evaluated after each
    heft_1_1 = 10.0 + n_train * 150 / 250.0 + n_train * 150 / 500.0 + 2 * one_eval  # ReFT on the LoRA model
    assert summary["seconds"] == pytest.approx(base + lora_2 + heft_1_1)
    assert summary["low"] == pytest.approx(summary["seconds"] * timing.SPREAD_CALIBRATED[0])
    assert summary["high"] == pytest.approx(summary["seconds"] * timing.SPREAD_CALIBRATED[1])
    assert "calibration" in summary["basis"] and "150 real tokens per training row" in summary["basis"]
    assert not summary["past_a_day"]


def test_a_finished_run_comes_before_the_calibration(monkeypatch) -> None:
    from heft_core import models
    from heft_core.config import RunConfig

    monkeypatch.setattr(models, "needs_conversion", lambda ref: False)
    config = RunConfig.from_dict({"method": "lora", "model": "embedded"})
    tokens = TokenCounts(100, 100 * 120, 50, 50 * 120)
    rates = timing.rates_from_calibration(_calibration())
    measured = timing.Speed(tokens_per_second=600.0, eval_seconds_per_question=0.1, load_seconds=5.0, run_id=7)
    estimate = timing.estimate_seconds(config, 100, 50, measured, tokens=tokens, rates=rates)
    assert estimate.train == pytest.approx(100 * config.total_epochs * 120 / 600.0)
    assert estimate.evaluation == pytest.approx(config.total_epochs * 50 * 0.1) and estimate.load == 5.0
    calibrated = timing.estimate_seconds(config, 100, 50, None, tokens=tokens, rates=rates)
    assert calibrated.train == pytest.approx(100 * config.total_epochs * 120 / 250.0)


def test_a_model_not_measured_is_estimated_from_its_size() -> None:
    reference = _calibration()
    scaled = timing.rates_from_size(4 * reference.parameters, reference)
    assert scaled.train["lora"] == pytest.approx(250.0 / 4) and scaled.eval_tokens_per_second == pytest.approx(250.0)
    assert scaled.from_size and "from the model's size" in scaled.basis and "not loaded" in scaled.basis
    assumed = timing.rates_from_size(timing.EMBEDDED_MATMUL_PARAMETERS)
    assert assumed.train["lora"] == pytest.approx(300.0) and assumed.spread == timing.SPREAD_ASSUMED


def test_format_range() -> None:
    assert timing.format_range(31 * 60, 45 * 60) == "about 31–45 min"
    assert timing.format_range(2.1 * 3600, 3.4 * 3600) == "about 2.1–3.4 h"
    assert timing.format_range(1300 * 3600, 3900 * 3600) == "about 1,300–3,900 h"


def test_the_calibration_runs_on_the_tiny_llama_and_is_cached(home, tiny_model, data_dir, monkeypatch) -> None:
    from tests.tiny import make_config

    config = make_config(tiny_model, "heft", data=data_dir, train_size=64, eval_size=32)
    assert calibration.cached(config) is None
    first = calibration.calibrate(config, ("lora", "reft", "heft2"), steps=2, eval_batches=1)
    assert set(first.train_tokens_per_second) == {"lora", "reft", "heft2"}
    assert all(rate > 0 for rate in first.train_tokens_per_second.values()) and first.eval_tokens_per_second > 0
    assert calibration.cache_path().is_file() and first.machine == calibration.machine_key()

    def measure_again(*args, **kwargs):
        raise AssertionError("the second call measured again")

    monkeypatch.setattr(calibration, "_measure", measure_again)
    assert calibration.calibrate(config, ("lora", "heft2")) == first
    assert calibration.cached(config) == first
    rates = timing.rates_for(config)
    assert rates.train == first.train_tokens_per_second and not rates.from_size
    counts = calibration.token_counts(config)
    assert counts.train_rows == 64 and 0 < counts.per_train_row() <= config.max_length


def test_the_studies_tab_opens_on_the_cpu_preset_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(calibration, "has_gpu", lambda: False)
    assert studies.default_preset_title() == CPU_TITLE
    monkeypatch.setattr(calibration, "has_gpu", lambda: True)
    assert studies.default_preset_title() == studies.PRESET_TITLES[0]


def test_a_plan_past_a_day_says_so_and_what_would_help(home) -> None:
    plan = html.unescape(studies.plan_markdown(studies.preset_text("Paper table")))
    assert "runs past a day" in plan and "CPU: learns on BoolQ" in plan and "GPU" in plan
    assert "–" in plan and " h" in plan
