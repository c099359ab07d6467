"""Tests for heft_core.stats against hand-computed values and independent computations."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from heft_core.stats import (
    AccuracyResult,
    PairedComparison,
    accuracy_result,
    exact_mcnemar_power,
    majority_baseline,
    mcnemar_exact,
    mean_and_std,
    minimum_detectable_difference,
    one_class,
    paired_bootstrap_difference,
    paired_comparison,
    paper_claim_check,
    wilson_interval,
    yes_share,
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


# --------------------------------------------------------------------------- against independent computations


def _wilson_closed_form(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return centre - half, centre + half


@pytest.mark.parametrize("correct,n", [(1, 3), (8, 10), (37, 50), (2785, 3270), (499, 500)])
def test_wilson_matches_the_closed_form(correct: int, n: int) -> None:
    assert wilson_interval(correct, n) == pytest.approx(_wilson_closed_form(correct, n), abs=1e-12)
    wide = wilson_interval(correct, n, z=2.5758293035489)  # 99%
    assert wide[0] < wilson_interval(correct, n)[0]
    assert wide == pytest.approx(_wilson_closed_form(correct, n, 2.5758293035489))


def test_mcnemar_against_a_direct_binomial_sum_and_statsmodels() -> None:
    from statsmodels.stats.contingency_tables import mcnemar

    for a_only, b_only in [(0, 1), (0, 7), (3, 11), (12, 30), (25, 40), (90, 60), (200, 260)]:
        total = a_only + b_only
        tail = sum(math.comb(total, k) for k in range(min(a_only, b_only) + 1))
        direct = min(1.0, float(2 * Fraction(tail, 2**total)))
        assert mcnemar_exact(a_only, b_only) == pytest.approx(direct, rel=1e-10)
        table = [[5, a_only], [b_only, 9]]  # concordant cells do not matter
        assert mcnemar_exact(a_only, b_only) == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)


def test_majority_baseline_and_one_class_flag_on_constructed_predictions() -> None:
    labels = {f"q{i}": int(i < 13) for i in range(20)}  # 13 yes, 7 no
    majority = majority_baseline(labels)
    assert (majority.answer, majority.answer_word, majority.correct, majority.n) == (1, "yes", 13, 20)
    assert majority.accuracy == pytest.approx(0.65)
    assert sum(majority.correctness(labels).values()) == 13
    assert majority_baseline({"a": 0, "b": 0, "c": 1}).answer_word == "no"
    assert majority_baseline({"a": 0, "b": 1}).answer_word == "yes"  # a tie counts as yes

    always_yes = [1] * 20
    nineteen_of_twenty = [1] * 19 + [0]  # 95%: flagged
    eighteen_of_twenty = [1] * 18 + [0, 0]  # 90%: not flagged
    assert one_class(always_yes) == "yes" and one_class(nineteen_of_twenty) == "yes"
    assert one_class(eighteen_of_twenty) is None
    assert one_class([0] * 20) == "no" and one_class([]) is None
    assert yes_share(eighteen_of_twenty) == pytest.approx(0.9)
    # always answering yes is the majority baseline itself: McNemar sees no discordant question
    correct = {uid: label == 1 for uid, label in labels.items()}
    assert paired_comparison(correct, majority.correctness(labels)).p_value == 1.0


def test_mean_and_std_over_seeds() -> None:
    assert mean_and_std([0.5, 0.7, 0.6]) == pytest.approx((0.6, 0.1))
    assert mean_and_std([0.5]) == (0.5, None)
    assert mean_and_std([]) == (None, None)


def test_bootstrap_difference_is_the_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 120)) < 0.8, rng.random((3, 120)) < 0.6
    interval = paired_bootstrap_difference(a, b, seed=7)
    assert interval.difference == pytest.approx(a.mean() - b.mean())
    assert interval.low < interval.difference < interval.high and interval.resamples == 2000
    assert paired_bootstrap_difference(a, b, seed=7) == interval  # seeded: the same interval again
    assert interval.excludes_zero
    with pytest.raises(ValueError):
        paired_bootstrap_difference(a, b[:, :10])


def test_bootstrap_interval_covers_a_known_difference() -> None:
    """Simulated paired evaluations with a known true difference of 5 points: questions of varying
    difficulty and varying advantage for A, and a training effect per seed and arm. The 95%
    interval should contain the true difference in about 95% of the simulated studies (or more:
    it is conservative by design, see paired_bootstrap_difference) without being needlessly wide;
    a resampler that ignored the questions or the seeds covers about 80% here."""
    rng = np.random.default_rng(2024)
    true_difference, seeds, questions, simulations = 0.05, 5, 200, 150
    covered = 0
    estimates, half_widths = [], []
    for simulation in range(simulations):
        difficulty = rng.uniform(0.3, 0.7, questions)
        advantage = rng.uniform(-0.1, 0.2, questions)  # mean 0.05 over the population of questions
        seed_a, seed_b = rng.uniform(-0.08, 0.08, (2, seeds, 1))  # training luck of each run
        correct_a = rng.random((seeds, questions)) < difficulty + advantage + seed_a
        correct_b = rng.random((seeds, questions)) < difficulty + seed_b
        interval = paired_bootstrap_difference(correct_a, correct_b, resamples=1000, seed=simulation)
        covered += interval.low <= true_difference <= interval.high
        estimates.append(interval.difference)
        half_widths.append((interval.high - interval.low) / 2)
    assert covered / simulations >= 0.90  # resampling only seeds, or only questions: about 0.8
    # the spread of the estimates over the simulations is the true sampling error
    assert np.mean(half_widths) <= 2.0 * 1.96 * np.std(estimates)


def test_minimum_detectable_difference_against_exact_power() -> None:
    smallest = minimum_detectable_difference(500, 0.10)
    assert 0.03 < smallest < 0.05
    # Connor's formula is a normal approximation; the exact test's power there is close to 80%
    assert 0.70 <= exact_mcnemar_power(500, 0.10, smallest) <= 0.85
    assert exact_mcnemar_power(500, 0.10, min(0.10, 1.5 * smallest)) > 0.9
    assert minimum_detectable_difference(3270, 0.10) < smallest < minimum_detectable_difference(200, 0.10)
    # 48 questions with 10% disagreement: even 5 of 5 disagreements one way gives p = 0.0625
    assert minimum_detectable_difference(48, 0.10) is None
    with pytest.raises(ValueError):
        minimum_detectable_difference(0, 0.1)
    with pytest.raises(ValueError):
        minimum_detectable_difference(100, 0.0)
