"""Accuracy intervals and paired significance tests for comparing fine-tuned variants.

Pure Python (``math`` and exact integers); no scipy. Accuracies are fractions in [0, 1]
unless a docstring says otherwise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# Above this many discordant pairs the exact big-integer sum gets slow; log-space is used instead.
_EXACT_MCNEMAR_LIMIT = 20_000


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n``; ``n == 0`` gives (0.0, 1.0).

    Preferred over the normal (Wald) interval because it stays inside [0, 1] and keeps its
    coverage near 0% and 100% accuracy.
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    proportion = correct / n
    z_squared = z * z
    denominator = 1.0 + z_squared / n
    centre = (proportion + z_squared / (2 * n)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z_squared / (4 * n * n)) / denominator
    # At 0% and 100% the bound is exactly 0 or 1; pin it against floating-point residue.
    low = 0.0 if correct == 0 else max(0.0, centre - half_width)
    high = 1.0 if correct == n else min(1.0, centre + half_width)
    return low, high


@dataclass
class AccuracyResult:
    """An accuracy with its 95% Wilson interval. ``str()`` gives e.g. "85.17% [83.9, 86.4] (n=3270)"."""

    accuracy: float
    correct: int
    n: int
    low: float
    high: float

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a (n=0)"
        return f"{self.accuracy * 100:.2f}% [{self.low * 100:.1f}, {self.high * 100:.1f}] (n={self.n})"


def accuracy_result(correct: int, n: int) -> AccuracyResult:
    """Accuracy ``correct / n`` (0.0 when ``n == 0``) with its 95% Wilson interval."""
    low, high = wilson_interval(correct, n)
    return AccuracyResult(accuracy=correct / n if n else 0.0, correct=correct, n=n, low=low, high=high)


@dataclass
class PairedComparison:
    """Two runs scored on the same questions: the 2x2 agreement table and McNemar's exact p-value."""

    n: int
    both_right: int
    a_only: int
    b_only: int
    both_wrong: int
    p_value: float
    accuracy_a: float
    accuracy_b: float

    def summary(self) -> str:
        """One line, e.g. "A 85.2% vs B 84.1% on 3270 questions; A-only 40, B-only 25; McNemar p=0.082 (not significant at 0.05)"."""
        verdict = "significant at 0.05" if self.p_value < 0.05 else "not significant at 0.05"
        return (
            f"A {self.accuracy_a * 100:.1f}% vs B {self.accuracy_b * 100:.1f}% on {self.n} questions; "
            f"A-only right {self.a_only}, B-only right {self.b_only}; "
            f"McNemar exact p={_format_p(self.p_value)} ({verdict})"
        )


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: min(1, 2 * P(X <= min(a_only, b_only))), X ~ Binomial(a_only + b_only, 1/2).

    Only discordant questions (one run right, the other wrong) carry information. No
    discordant pairs gives 1.0. Exact integer arithmetic up to 20,000 discordant pairs,
    log-space (lgamma with log-sum-exp) above that.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    smaller = min(a_only, b_only)
    if 2 * smaller == discordant:  # a tie: the two tails overlap and cover everything
        return 1.0
    if discordant <= _EXACT_MCNEMAR_LIMIT:
        tail_count = 0
        coefficient = 1  # C(discordant, 0)
        for k in range(smaller + 1):
            tail_count += coefficient
            coefficient = coefficient * (discordant - k) // (k + 1)
        # int / int true division is correctly rounded even for huge integers
        return min(1.0, (2 * tail_count) / (1 << discordant))
    log_terms = [_log_comb(discordant, k) for k in range(smaller + 1)]
    largest = max(log_terms)
    log_tail = largest + math.log(math.fsum(math.exp(term - largest) for term in log_terms))
    return min(1.0, math.exp(math.log(2.0) + log_tail - discordant * math.log(2.0)))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def paired_comparison(
    correct_a: Mapping[str, bool],
    correct_b: Mapping[str, bool],
    *,
    require_same_questions: bool = True,
) -> PairedComparison:
    """Compare two runs question by question (uid -> answered correctly).

    Uses the uids both runs scored. Raises ValueError if they share none, or, with
    ``require_same_questions`` (the default), if their uid sets differ at all, because
    then the accuracies are not over the same questions.
    """
    shared = correct_a.keys() & correct_b.keys()
    if not shared:
        raise ValueError(
            f"the two runs share no question uids (A has {len(correct_a)}, B has {len(correct_b)})"
        )
    if len(shared) != len(correct_a) or len(shared) != len(correct_b):
        if require_same_questions:
            raise ValueError(
                f"the two runs evaluated different questions: A has {len(correct_a)} uids, "
                f"B has {len(correct_b)}, {len(shared)} shared; pass require_same_questions=False "
                f"to compare on the shared ones"
            )
        logger.info("Comparing on %d shared of %d and %d questions", len(shared), len(correct_a), len(correct_b))
    both_right = a_only = b_only = both_wrong = 0
    for uid in shared:
        right_a, right_b = bool(correct_a[uid]), bool(correct_b[uid])
        if right_a and right_b:
            both_right += 1
        elif right_a:
            a_only += 1
        elif right_b:
            b_only += 1
        else:
            both_wrong += 1
    n = len(shared)
    return PairedComparison(
        n=n,
        both_right=both_right,
        a_only=a_only,
        b_only=b_only,
        both_wrong=both_wrong,
        p_value=mcnemar_exact(a_only, b_only),
        accuracy_a=(both_right + a_only) / n,
        accuracy_b=(both_right + b_only) / n,
    )


def paper_claim_check(
    acc_a: float,
    acc_b: float,
    n: int,
    *,
    assumed_discordant_share: float = 0.10,
) -> dict:
    """What a reported difference between two accuracies on the same ``n`` questions can mean.

    Accuracies are fractions (0.8517); if either is above 1, both are read as percentages
    (85.17). Returned keys:

    * ``n``, ``accuracy_a``, ``accuracy_b`` (fractions), ``difference_points`` (percentage points);
    * ``difference_questions``: round((acc_a - acc_b) * n), the net number of questions
      behind the difference (85.17% vs 85.05% on 3,270 is 4 questions);
    * ``interval_a``, ``interval_b``: 95% Wilson intervals (from round(acc * n) correct),
      and ``intervals_overlap``;
    * ``min_p_value``: the smallest McNemar exact p-value the difference allows, i.e.
      if every disagreement favoured one run (a_only = |d|, b_only = 0). If even this is
      above 0.05, no paired test on these questions can call the difference significant;
    * ``assumed_discordant``, ``assumed_a_only``, ``assumed_b_only``, ``assumed_p_value``: the
      p-value if the runs disagreed on ``assumed_discordant_share`` of the questions (10%
      by default, typical for two fine-tunes of one model), with the net difference d; the
      discordant count is raised to at least |d| and to d's parity;
    * ``explanation``: the above in one or two sentences.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if acc_a > 1 or acc_b > 1:
        acc_a, acc_b = acc_a / 100, acc_b / 100
    for value in (acc_a, acc_b):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracies must be in [0, 1] (or [0, 100] as percentages), got {value}")
    difference = round((acc_a - acc_b) * n)
    interval_a = wilson_interval(round(acc_a * n), n)
    interval_b = wilson_interval(round(acc_b * n), n)
    net = abs(difference)
    min_p = mcnemar_exact(net, 0)
    discordant = min(n, max(round(assumed_discordant_share * n), net))
    if (discordant - net) % 2:  # a_only - b_only = net needs a_only + b_only of the same parity
        discordant += 1 if discordant < n else -1
    larger, smaller = (discordant + net) // 2, (discordant - net) // 2
    assumed_a_only, assumed_b_only = (larger, smaller) if difference >= 0 else (smaller, larger)
    assumed_p = mcnemar_exact(assumed_a_only, assumed_b_only)
    explanation = (
        f"{(acc_a - acc_b) * 100:+.2f} points on {n} questions is {difference:+d} questions net. "
        f"Even if every disagreement favoured one run, McNemar's exact p would be {_format_p(min_p)}; "
        f"if the runs disagreed on {discordant} questions ({assumed_discordant_share:.0%} of n), p = {_format_p(assumed_p)}."
    )
    return {
        "n": n,
        "accuracy_a": acc_a,
        "accuracy_b": acc_b,
        "difference_points": (acc_a - acc_b) * 100,
        "difference_questions": difference,
        "interval_a": interval_a,
        "interval_b": interval_b,
        "intervals_overlap": interval_a[0] <= interval_b[1] and interval_b[0] <= interval_a[1],
        "min_p_value": min_p,
        "assumed_discordant": discordant,
        "assumed_a_only": assumed_a_only,
        "assumed_b_only": assumed_b_only,
        "assumed_p_value": assumed_p,
        "explanation": explanation,
    }


def _format_p(p_value: float) -> str:
    return f"{p_value:.3g}" if p_value >= 0.001 else f"{p_value:.1e}"
