"""Paired statistics for comparing two methods on the same seeds and the same test rows.

Inputs are 0/1 verdicts (1: the run's metric counted the row correct) as numpy arrays shaped seeds x rows, one array
per method with the same seeds and rows in the same order, so that cell [s, r] of both is the same test row under
the same seed. Two sources of chance are in such a comparison: which seeds were drawn (training randomness) and which
rows the test set happens to hold (sampling of examples); the functions here account for one or both, as each says.
"""

import math

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
# Resamples are drawn from this fixed seed, so a table computed twice from the same predictions is the same table.
BOOTSTRAP_SEED = 0
# Resamples are drawn this many at a time, so memory stays bounded on large test sets.
BOOTSTRAP_CHUNK = 100
# Up to this many seeds the sign-flip test enumerates every sign pattern (2**16); beyond, it samples patterns.
EXACT_SIGN_FLIP_SEEDS = 16
SIGN_FLIP_SAMPLES = 100_000
# Two test statistics closer than this are equal (float rounding of means of the same 0/1 values).
TIE_TOLERANCE = 1e-12


def check_paired(correct_a: np.ndarray, correct_b: np.ndarray) -> None:
    """Refuse arrays that cannot be paired cell by cell: different shapes, or no rows at all."""
    if correct_a.shape != correct_b.shape or correct_a.ndim != 2:
        raise ValueError(f"paired verdicts must be two seeds x rows arrays of one shape, got {correct_a.shape} "
                         f"and {correct_b.shape}")
    if correct_a.size == 0:
        raise ValueError("no paired seeds and rows to compare")


def mean_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Accuracy of a minus accuracy of b, over every seed and row (a share: 0.01 is one percentage point)."""
    check_paired(correct_a, correct_b)
    return float(np.mean(correct_a.astype(float) - correct_b.astype(float)))


def bootstrap_interval(
    values: np.ndarray, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile confidence interval of the mean of a seeds x rows array, by a two-way bootstrap.

    Each resample draws seeds with replacement and, independently, test rows with replacement, and takes the mean
    of the crossed cells: the interval then covers both the seed-to-seed spread of training and the sampling of the
    test set. Given the per-row differences of two methods (a - b), it is the paired bootstrap of the difference:
    the same resampled rows and seeds enter both methods, so what the rows have in common cancels. With one seed
    only the rows are resampled (the seed spread is then unknown, and the interval narrower than it should be).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a seeds x rows array with at least one cell is needed, got shape {values.shape}")
    n_seeds, n_rows = values.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, samples, BOOTSTRAP_CHUNK):
        count = min(BOOTSTRAP_CHUNK, samples - start)
        # n_rows draws of rows with replacement per resample, as counts: how often each row was drawn.
        draws = rng.integers(0, n_rows, size=(count, n_rows)) + n_rows * np.arange(count)[:, None]
        row_counts = np.bincount(draws.ravel(), minlength=count * n_rows).reshape(count, n_rows)
        seed_draws = rng.integers(0, n_seeds, size=(count, n_seeds))
        per_seed_sums = row_counts @ values.T  # resample x seed: each seed's sum over the resampled rows
        means.append(np.take_along_axis(per_seed_sums, seed_draws, axis=1).sum(axis=1) / (n_seeds * n_rows))
    low, high = np.quantile(np.concatenate(means), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def sign_flip_p(seed_differences: np.ndarray) -> float | None:
    """Two-sided p-value of a paired permutation (sign-flip) test over seeds; None for fewer than two seeds.

    Under the null hypothesis that both methods are equally good, each seed's accuracy difference is as likely to
    have either sign, so every sign pattern is equally likely; the p-value is the share of patterns whose mean
    difference is at least as far from zero as the observed one (patterns enumerated exactly up to
    EXACT_SIGN_FLIP_SEEDS seeds, sampled with a fixed seed beyond). It treats seeds as the units, so it speaks to
    training randomness, and needs no normality; with n seeds its smallest p-value is 2 / 2**n (0.25 for three).
    """
    differences = np.asarray(seed_differences, dtype=float)
    n = len(differences)
    if n < 2:
        return None
    observed = abs(differences.mean())
    if n <= EXACT_SIGN_FLIP_SEEDS:
        patterns = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(patterns @ differences) / n >= observed - TIE_TOLERANCE))
    patterns = np.random.default_rng(BOOTSTRAP_SEED).choice((-1.0, 1.0), size=(SIGN_FLIP_SAMPLES, n))
    extreme = np.sum(np.abs(patterns @ differences) / n >= observed - TIE_TOLERANCE)
    return float((extreme + 1) / (SIGN_FLIP_SAMPLES + 1))


def mcnemar_exact_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided p-value of McNemar's exact test on paired verdicts (all seeds' rows pooled).

    Only discordant pairs speak to a difference: b rows that a gets right and b wrong, c the other way. Under the
    null hypothesis each discordant pair goes either way with probability 1/2, so min(b, c) follows a binomial
    (b + c, 1/2); p = 2 * P(X <= min(b, c)), capped at 1 (and 1 when no pair is discordant): the exact binomial
    tail, not the chi-square approximation, summed in log space so thousands of discordant pairs cost little.
    Pooling seeds treats every (seed, row) pair as independent, so it speaks to the sampling of test rows, not to
    training randomness (the sign-flip test does that).
    """
    check_paired(correct_a, correct_b)
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    below = np.arange(min(only_a, only_b))
    # log C(n, k) for k = 0 .. min(b, c), from C(n, k + 1) = C(n, k) * (n - k) / (k + 1).
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(discordant - below) - np.log(below + 1))])
    log_tail = np.logaddexp.reduce(log_choose) - discordant * math.log(2)
    return min(1.0, 2 * math.exp(log_tail))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment for testing several comparisons at once; None entries stay None and do not count.

    With m p-values sorted ascending, the i-th smallest (i from 1) becomes max over j <= i of min(1, (m - j + 1) *
    p_(j)). Rejecting where the adjusted value is below alpha keeps the chance of any false rejection among the m
    comparisons of a table at most alpha, under any dependence between them, and is never less powerful than
    Bonferroni's correction.
    """
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted
