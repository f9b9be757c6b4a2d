"""The statistics library (pore.stats): intervals cover at their nominal rate, McNemar's exact test gives the
textbook values, grouped and stratified resampling keep their units and strata whole, paired intervals and
seed spreads are what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pore.stats import (
    BootstrapSettings,
    bootstrap_mean,
    bootstrap_means,
    draw_counts,
    draw_units,
    jaccard,
    mcnemar_exact,
    mcnemar_p_value,
    paired_mean_difference,
    spread,
    unit_index,
)
from pore.stats.divergence import first_token_divergence


def test_intervals_cover_a_known_mean_at_the_nominal_rate() -> None:
    """1000 simulated runs of 200 questions answered right with probability 0.7: the 95 % intervals hold 0.7
    in 93-97 % of the runs (Monte Carlo standard error 0.7 %), and shrink as 1 / sqrt(n)."""
    rng = np.random.default_rng(1)
    settings = BootstrapSettings(resamples=1000, seed=0, level=0.95)
    runs = (rng.random((1000, 200)) < 0.7).astype(float)
    estimate, low, high = bootstrap_means(runs, settings)
    coverage = float(((low <= 0.7) & (high >= 0.7)).mean())
    assert 0.93 <= coverage <= 0.97, coverage
    assert np.allclose(estimate, runs.mean(axis=1))
    assert np.all(low <= estimate) and np.all(estimate <= high)
    # The width is that of the normal interval, 2 * 1.96 * sqrt(p (1 - p) / n), on average.
    assert float((high - low).mean()) == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 200), rel=0.05)
    # A lower level gives narrower intervals from the same draws.
    _, low90, high90 = bootstrap_means(runs[:50], BootstrapSettings(1000, 0, 0.90))
    assert np.all(high90 - low90 <= (high - low)[:50] + 1e-12)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another() -> None:
    values = np.random.default_rng(0).random(300)
    first = bootstrap_mean(values, BootstrapSettings(500, seed=7))
    assert first == bootstrap_mean(values, BootstrapSettings(500, seed=7))
    assert first != bootstrap_mean(values, BootstrapSettings(500, seed=8))
    assert first.estimate == pytest.approx(values.mean())


def test_mcnemar_gives_the_textbook_exact_values() -> None:
    """b = 1, c = 9 (a hand-made 2 x 2 table with 10 discordant pairs): p = 2 (C(10,0) + C(10,1)) / 2^10."""
    assert mcnemar_p_value(1, 9) == 2 * (1 + 10) / 1024 == 0.021484375
    assert mcnemar_p_value(9, 1) == mcnemar_p_value(1, 9)  # two-sided: symmetric
    assert mcnemar_p_value(5, 5) == 1.0 and mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(0, 6) == 2 / 64  # every discordant pair one way: 2 * 0.5^6
    # Concordant pairs do not matter: right/right 40, right/wrong 1, wrong/right 9, wrong/wrong 50.
    first = [True] * 40 + [True] * 1 + [False] * 9 + [False] * 50
    second = [True] * 40 + [False] * 1 + [True] * 9 + [False] * 50
    test = mcnemar_exact(first, second)
    assert (test.only_first, test.only_second, test.p_value) == (1, 9, 0.021484375)
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_mcnemar_matches_the_binomial_tail_in_floating_point() -> None:
    """The exact integer computation against the binomial tail summed in logs (an independent route)."""
    for b, c in [(3, 17), (12, 13), (40, 61), (150, 86)]:
        n, k = b + c, min(b, c)
        log_pmf = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)
        ]
        expected = min(1.0, 2 * sum(math.exp(term) for term in log_pmf))
        assert mcnemar_p_value(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_p_value(150, 86) < 1e-4  # a large, lopsided table is clearly significant


def test_grouped_resampling_moves_whole_groups() -> None:
    """Each group holds one right and one wrong answer: any resample of whole groups has mean exactly 0.5,
    while resampling the questions one by one does not."""
    values = np.tile([1.0, 0.0], 100)  # 100 groups of two questions
    groups = np.repeat(np.arange(100), 2)
    settings = BootstrapSettings(500)
    grouped = bootstrap_mean(values, settings, units=groups)
    assert (grouped.low, grouped.estimate, grouped.high) == (0.5, 0.5, 0.5)
    loose = bootstrap_mean(values, settings)
    assert loose.low < 0.47 and loose.high > 0.53
    # Perfectly correlated groups (both questions right or both wrong): the grouped interval is wider,
    # as wide as that of 100 independent questions, not 200.
    correlated = np.repeat((np.random.default_rng(3).random(100) < 0.5).astype(float), 2)
    wide = bootstrap_mean(correlated, settings, units=groups)
    narrow = bootstrap_mean(correlated, settings)
    assert (wide.high - wide.low) > 1.25 * (narrow.high - narrow.low)


def test_draws_and_counts() -> None:
    index, count = unit_index(["b", "a", "b", "c"], 4)
    assert index.tolist() == [0, 1, 0, 2] and count == 3
    draws = draw_units(5, 3, np.random.default_rng(0))
    counts = draw_counts(draws, 5)
    assert counts.shape == (3, 5) and counts.sum(axis=1).tolist() == [5, 5, 5]
    for row, drawn in zip(counts, draws, strict=True):
        assert row.tolist() == np.bincount(drawn, minlength=5).tolist()
    # Stratified: each column is drawn from its own stratum.
    strata = np.array([0, 0, 1, 1, 1])
    stratified = draw_units(5, 200, np.random.default_rng(0), strata)
    assert set(stratified[:, :2].ravel()) == {0, 1} and set(stratified[:, 2:].ravel()) == {2, 3, 4}


def test_stratified_resampling_keeps_each_stratum_size() -> None:
    """30 right answers in one stratum and 70 wrong in another: resampled within strata, the mean is always
    0.3; resampled across them it varies."""
    values = np.array([1.0] * 30 + [0.0] * 70)
    strata = ["a"] * 30 + ["b"] * 70
    within = bootstrap_mean(values, BootstrapSettings(500), strata=strata)
    assert within.low == within.high == pytest.approx(0.3)
    across = bootstrap_mean(values, BootstrapSettings(500))
    assert across.high - across.low > 0.1
    with pytest.raises(ValueError, match="spans several strata"):
        bootstrap_mean(values[:4], BootstrapSettings(10), units=[0, 0, 1, 1], strata=["a", "b", "b", "b"])


def test_paired_difference_cancels_what_both_runs_share() -> None:
    """Two runs that differ on 5 of 400 questions: the paired interval is far narrower than the two
    unpaired intervals, and centred on the difference."""
    rng = np.random.default_rng(0)
    first = (rng.random(400) < 0.6).astype(float)
    second = first.copy()
    second[np.flatnonzero(first == 0)[:5]] = 1.0
    settings = BootstrapSettings(1000)
    paired = paired_mean_difference(first, second, settings)
    assert paired.estimate == pytest.approx(5 / 400)
    unpaired = bootstrap_mean(first, settings)
    assert (paired.high - paired.low) < 0.25 * (unpaired.high - unpaired.low)
    assert paired.low >= 0.0  # the second run never does worse
    assert not paired_mean_difference(first, first, settings).excludes(0.0)


def test_spread_jaccard_and_divergence() -> None:
    over = spread([0.80, 0.82, 0.84])
    assert (over.mean, over.low, over.high, over.n) == (pytest.approx(0.82), 0.80, 0.84, 3)
    assert over.sd == pytest.approx(0.02)
    assert spread([0.5]).sd == 0.0
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0
    logits = torch.randn(3, 50)
    kl, agree = first_token_divergence(logits, logits.clone())
    assert kl.tolist() == [0.0, 0.0, 0.0] and agree.all()
    other = logits.clone()
    other[0] = -logits[0]
    kl, agree = first_token_divergence(logits, other)
    p, q = logits[0].double().softmax(-1), other[0].double().softmax(-1)
    assert float(kl[0]) == pytest.approx(float((p * (p / q).log()).sum()))
    assert not agree[0] and kl[1] == 0.0


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"bootstrap.level must be a number between 0 and 1"):
        BootstrapSettings(level=1.5)
    with pytest.raises(ValueError, match=r"bootstrap.resamples must be an integer >= 0"):
        BootstrapSettings(resamples=-1)
    assert not BootstrapSettings(resamples=0).enabled
