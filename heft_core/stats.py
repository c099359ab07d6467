"""Accuracy intervals, paired significance tests and study statistics for comparing fine-tuned variants.

The statistics come from the field's libraries: Wilson intervals from statsmodels
(``proportion_confint(method="wilson")``), exact McNemar p-values from scipy's exact binomial
test (equal to statsmodels' ``mcnemar(exact=True)``), quantiles from scipy. What is ours is the
bookkeeping around them: question-by-question pairing, the majority-class baseline, the
one-class flag, a two-way bootstrap over seeds and questions, and the minimum detectable
difference of a paired evaluation. Accuracies are fractions in [0, 1] unless a docstring says
otherwise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
ONE_CLASS_SHARE = 0.95  # a run answering one class at least this often is flagged
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n``; ``n == 0`` gives (0.0, 1.0).

    Preferred over the normal (Wald) interval because it stays inside [0, 1] and keeps its
    coverage near 0% and 100% accuracy. Computed by statsmodels' ``proportion_confint``.
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 2.0 * norm.sf(z)  # z = 1.96 is alpha = 0.05
    low, high = proportion_confint(correct, n, alpha=alpha, method="wilson")
    # At 0% and 100% the bound is exactly 0 or 1; pin it against floating-point residue.
    low = 0.0 if correct == 0 else max(0.0, float(low))
    high = 1.0 if correct == n else min(1.0, float(high))
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
        """One line: "A 85.2% vs B 84.1% on 3270 questions; A-only right 40, B-only right 25; McNemar exact p=..."."""
        verdict = "significant at 0.05" if self.p_value < 0.05 else "not significant at 0.05"
        return (
            f"A {self.accuracy_a * 100:.1f}% vs B {self.accuracy_b * 100:.1f}% on {self.n} questions; "
            f"A-only right {self.a_only}, B-only right {self.b_only}; "
            f"McNemar exact p={format_p(self.p_value)} ({verdict})"
        )


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: min(1, 2 * P(X <= min(a_only, b_only))), X ~ Binomial(a_only + b_only, 1/2).

    Only discordant questions (one run right, the other wrong) carry information. No
    discordant pairs gives 1.0. scipy's exact binomial test on the discordant pairs; the same
    number as statsmodels' ``mcnemar(table, exact=True)``.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    return min(1.0, float(binomtest(min(a_only, b_only), discordant, 0.5, alternative="two-sided").pvalue))


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
        f"Even if every disagreement favoured one run, McNemar's exact p would be {format_p(min_p)}; "
        f"if the runs disagreed on {discordant} questions ({assumed_discordant_share:.0%} of n), "
        f"p = {format_p(assumed_p)}."
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


def format_p(p_value: float) -> str:
    """A p-value for people: three significant digits, scientific notation below 0.001."""
    return f"{p_value:.3g}" if p_value >= 0.001 else f"{p_value:.1e}"



# --------------------------------------------------------------------------- baselines and flags


@dataclass
class MajorityBaseline:
    """Answering the majority gold class to every question: the score a model must beat."""

    answer: int  # 1 yes, 0 no
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def answer_word(self) -> str:
        return "yes" if self.answer else "no"

    def correctness(self, labels: Mapping[str, int | bool]) -> dict[str, bool]:
        """uid -> whether always answering the majority class is right on that question."""
        return {uid: int(label) == self.answer for uid, label in labels.items()}


def majority_baseline(labels: Mapping[str, int | bool]) -> MajorityBaseline:
    """The majority class of the gold labels (uid -> 1 yes / 0 no); a tie counts as "yes"."""
    yes = sum(1 for label in labels.values() if int(label) == 1)
    n = len(labels)
    answer = 1 if 2 * yes >= n else 0
    return MajorityBaseline(answer=answer, correct=yes if answer else n - yes, n=n)


def yes_share(predicted: Sequence[int | bool | None]) -> float:
    """Share of predictions that are "yes" (0.0 for none); an unparsed answer (None) is neither class."""
    return sum(1 for value in predicted if value is not None and int(value) == 1) / len(predicted) if predicted else 0.0


def one_class(predicted: Sequence[int | bool | None], threshold: float = ONE_CLASS_SHARE) -> str | None:
    """"yes" or "no" when at least ``threshold`` of the predictions are that class, else None.

    Such a run has learnt (or kept) an answer prior, not the task, whatever its accuracy.
    """
    if not predicted:
        return None
    if yes_share(predicted) >= threshold:
        return "yes"
    no_share = sum(1 for value in predicted if value is not None and int(value) == 0) / len(predicted)
    if no_share >= threshold:
        return "no"
    return None


# --------------------------------------------------------------------------- across seeds


@dataclass
class BootstrapInterval:
    """Mean accuracy difference A - B with a percentile bootstrap interval."""

    difference: float
    low: float
    high: float
    resamples: int
    seeds: int
    questions: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap_difference(
    correct_a: np.ndarray | Sequence[Sequence[bool]],
    correct_b: np.ndarray | Sequence[Sequence[bool]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """Mean accuracy difference of A over B across seeds and questions, with a bootstrap interval.

    ``correct_a`` and ``correct_b`` are (seeds x questions) 0/1 arrays, paired on both axes:
    row s holds the two arms trained with seed s, column q the same question for every run.
    Each resample draws the seeds with replacement, then the questions with replacement, and
    takes the mean of the paired differences over the drawn rows and columns. The question
    draw is shared by the drawn seeds because the questions are crossed with the seeds (every
    run answered the same questions), not nested in them; drawing them afresh per seed would
    average the question-to-question variation away and make the interval too narrow. So the
    interval carries both the seed-to-seed training variance and the sampling of questions
    (with one seed, only the latter). It errs on the wide side: the noise of each single
    (seed, question) answer enters through both draws (Owen 2007, the "pigeonhole" bootstrap),
    so with several seeds it covers the true difference somewhat more often than 95%
    (tests/test_stats.py simulates it), which keeps verdicts of "better" or "worse" honest.
    Percentile interval; seeded numpy Generator, so the same inputs give the same interval.
    """
    a = np.asarray(correct_a, dtype=np.int8)
    b = np.asarray(correct_b, dtype=np.int8)
    if a.ndim != 2 or a.shape != b.shape or 0 in a.shape:
        raise ValueError(f"need two (seeds x questions) arrays of one non-empty shape, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    differences = a - b  # -1, 0 or 1 per (seed, question)
    n_seeds, n_questions = differences.shape
    rng = np.random.default_rng(seed)
    estimates = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(1, n_seeds * n_questions))  # bounds the (seeds, chunk, questions) block
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        seed_draws = rng.integers(0, n_seeds, size=(size, n_seeds))
        question_draws = rng.integers(0, n_questions, size=(size, n_questions))
        # per resample and per seed: the sum of differences over the drawn questions
        sums_by_seed = differences[:, question_draws].sum(axis=2, dtype=np.int64).T  # (size, seeds)
        drawn = np.take_along_axis(sums_by_seed, seed_draws, axis=1)
        estimates[start:start + size] = drawn.sum(axis=1) / (n_seeds * n_questions)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return BootstrapInterval(
        difference=float(differences.mean()), low=float(low), high=float(high),
        resamples=resamples, seeds=n_seeds, questions=n_questions,
    )


def mean_and_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for fewer than two values."""
    if not values:
        return None, None
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


# --------------------------------------------------------------------------- how much an evaluation can see


def minimum_detectable_difference(
    n_questions: int,
    discordance: float = 0.10,
    *,
    alpha: float = 0.05,
    power: float = 0.80,
) -> float | None:
    """Smallest accuracy difference two runs on ``n_questions`` paired questions can show.

    ``discordance`` is the share of questions on which the two runs disagree (one right, the
    other wrong); 10% is typical for two fine-tunes of one model. The answer is the difference
    d = p10 - p01 that a two-sided McNemar test at level ``alpha`` detects with probability
    ``power``, from Connor's (1987) sample-size formula for paired proportions,

        n = (z_{1-alpha/2} * sqrt(psi) + z_{power} * sqrt(psi - d^2))^2 / d^2,   psi = discordance,

    solved for d (scipy's brentq). Returns None when no difference is detectable: even if
    every disagreement favoured one run (d = psi), the test would not reach that power. The
    normal approximation is optimistic for few discordant pairs; the exact test needs a
    little more (checked in tests/test_stats.py against the exact power).
    """
    if not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be a positive integer, got {n_questions!r}")
    if not 0.0 < discordance <= 1.0:
        raise ValueError(f"discordance must be in (0, 1], got {discordance!r}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha!r} and {power!r}")
    z_alpha = norm.isf(alpha / 2)
    z_power = norm.ppf(power)
    root_n = math.sqrt(n_questions)

    def shortfall(difference: float) -> float:
        spread = math.sqrt(max(0.0, discordance - difference**2))
        return root_n * difference - z_alpha * math.sqrt(discordance) - z_power * spread

    if shortfall(discordance) < 0:
        return None
    return float(optimize.brentq(shortfall, 1e-12, discordance, xtol=1e-10))


def exact_mcnemar_power(n_questions: int, discordance: float, difference: float, alpha: float = 0.05) -> float:
    """Power of the exact two-sided McNemar test at level ``alpha`` (exact, by summation).

    The discordant count D ~ Binomial(n, discordance); given D, the A-only count ~
    Binomial(D, (discordance + difference) / (2 * discordance)). Sums the probability of
    every outcome the exact test rejects. For checking :func:`minimum_detectable_difference`.
    """
    from scipy.stats import binom

    if not 0 <= difference <= discordance <= 1:
        raise ValueError(f"need 0 <= difference <= discordance <= 1, got {difference} and {discordance}")
    favour_a = (discordance + difference) / (2 * discordance)
    total = 0.0
    for discordant in range(1, n_questions + 1):
        weight = binom.pmf(discordant, n_questions, discordance)
        if weight < 1e-15:
            continue
        # the exact test rejects when min(a, D - a) <= k, with k the largest count keeping p < alpha
        a_values = np.arange(discordant + 1)
        p_values = np.minimum(1.0, 2 * binom.cdf(np.minimum(a_values, discordant - a_values), discordant, 0.5))
        rejected = a_values[p_values < alpha]
        if rejected.size:
            total += weight * float(binom.pmf(rejected, discordant, favour_a).sum())
    return total
