"""Tests for heft_core.stats against hand-computed values."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from heft_core.stats import (
    AccuracyResult,
    PairedComparison,
    accuracy_result,
    mcnemar_exact,
    paired_comparison,
    paper_claim_check,
    wilson_interval,
)


def test_wilson_hand_computed() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == 1.0


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


def test_accuracy_result_and_str() -> None:
    result = accuracy_result(2785, 3270)
    assert isinstance(result, AccuracyResult)
    assert result.correct == 2785 and result.n == 3270
    assert math.isclose(result.accuracy, 2785 / 3270)
    assert str(result) == "85.17% [83.9, 86.3] (n=3270)"
    assert str(accuracy_result(0, 0)) == "n/a (n=0)"
    assert (accuracy_result(0, 0).low, accuracy_result(0, 0).high) == (0.0, 1.0)


def test_mcnemar_small_cases() -> None:
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)  # 2 * (1/32)
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)  # 2 * (1 + 7) / 128
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 3) == 1.0  # capped at 1
    assert mcnemar_exact(0, 1) == 1.0


def test_mcnemar_is_symmetric() -> None:
    for a_only, b_only in [(0, 5), (1, 6), (7, 20), (40, 25), (300, 250)]:
        assert mcnemar_exact(a_only, b_only) == mcnemar_exact(b_only, a_only)


def test_mcnemar_exact_against_fractions() -> None:
    a_only, b_only = 12, 30
    total = a_only + b_only
    expected = 2 * Fraction(sum(math.comb(total, k) for k in range(a_only + 1)), 2**total)
    assert mcnemar_exact(a_only, b_only) == pytest.approx(float(expected), rel=1e-12)


def test_mcnemar_large_counts_stay_accurate() -> None:
    # 4,900 vs 5,100 discordant: normal approximation with continuity correction is close to exact.
    p_value = mcnemar_exact(4900, 5100)
    z = (abs(4900 - 5100) - 1) / math.sqrt(10000)
    assert p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)
    # the log-space path (above 20,000 pairs) agrees with the exact path at the boundary
    assert mcnemar_exact(9_901, 10_100) == pytest.approx(mcnemar_exact(9_900, 10_100), rel=0.05)
    assert 0.0 <= mcnemar_exact(0, 10_000) < 1e-300


def test_paired_comparison_counts() -> None:
    correct_a = {"q1": True, "q2": True, "q3": False, "q4": False, "q5": True}
    correct_b = {"q1": True, "q2": False, "q3": True, "q4": False, "q5": False}
    comparison = paired_comparison(correct_a, correct_b)
    assert isinstance(comparison, PairedComparison)
    assert (comparison.n, comparison.both_right, comparison.a_only, comparison.b_only, comparison.both_wrong) == (
        5, 1, 2, 1, 1,
    )
    assert comparison.accuracy_a == pytest.approx(0.6) and comparison.accuracy_b == pytest.approx(0.4)
    assert comparison.p_value == 1.0
    summary = comparison.summary()
    assert "\n" not in summary and "A-only right 2" in summary and "p=1" in summary


def test_paired_comparison_question_sets() -> None:
    with pytest.raises(ValueError, match="share no question uids"):
        paired_comparison({"a": True}, {"b": True})
    with pytest.raises(ValueError, match="A has 3 uids, B has 2, 2 shared"):
        paired_comparison({"a": True, "b": False, "c": True}, {"a": True, "b": True})
    relaxed = paired_comparison(
        {"a": True, "b": False, "c": True}, {"a": True, "b": True}, require_same_questions=False
    )
    assert relaxed.n == 2 and relaxed.b_only == 1


def test_paper_claim_four_questions() -> None:
    claim = paper_claim_check(0.8517, 0.8505, 3270)
    assert claim["difference_questions"] == 4
    assert claim["min_p_value"] == pytest.approx(0.125)  # 4 vs 0 discordant
    assert claim["intervals_overlap"]
    assert claim["assumed_a_only"] - claim["assumed_b_only"] == 4
    assert claim["assumed_discordant"] in (327, 328)
    assert claim["assumed_p_value"] > 0.5
    assert "4 questions" in claim["explanation"]
    assert paper_claim_check(85.17, 85.05, 3270)["difference_questions"] == 4  # percentages accepted


def test_paper_claim_negative_difference() -> None:
    claim = paper_claim_check(0.80, 0.90, 100)
    assert claim["difference_questions"] == -10
    assert claim["assumed_b_only"] - claim["assumed_a_only"] == 10
    assert claim["min_p_value"] == pytest.approx(mcnemar_exact(10, 0))
