"""Metrics against scipy.stats on random data and against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from ldm_scene import metrics


def test_dice_iou_hand_cases():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[1, 0, 1, 0]], dtype=bool)
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / (2 + 2))
    assert metrics.iou(a, b) == pytest.approx(1 / 3)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0 and metrics.iou(a, ~a) == 0.0
    empty = np.zeros((3, 3), dtype=bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    full = np.ones((3, 3), dtype=bool)
    assert metrics.dice(empty, full) == 0.0
    # non-boolean masks: any non-zero is foreground
    assert metrics.dice(np.array([0, 2, 5]), np.array([0, 1, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(np.zeros(3), np.zeros(4))


def test_dice_iou_relation_random():
    rng = np.random.default_rng(0)
    p, t = rng.random((32, 32)) > 0.5, rng.random((32, 32)) > 0.3
    d, j = metrics.dice(p, t), metrics.iou(p, t)
    assert d == pytest.approx(2 * j / (1 + j))


def test_rank_average_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 7, size=200).astype(float)  # many ties
    np.testing.assert_array_equal(metrics.rank_average(x), scipy.stats.rankdata(x, method="average"))
    np.testing.assert_array_equal(metrics.rank_average([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(ties):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(24, 24))
    b = 0.5 * a + rng.normal(size=(24, 24))
    if ties:
        a, b = np.round(a), np.round(b * 2)
    assert metrics.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b, axis=None)[0], abs=1e-12)
    assert metrics.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert metrics.rmse(a, b) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-12)


def test_correlation_hand_cases():
    x = np.arange(10.0)
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)  # monotone: rank correlation is exact
    assert metrics.pearson(x, x**3) < 1.0
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert math.isnan(metrics.spearman(np.ones(10), x))
    assert math.isnan(metrics.pearson(x, np.full(10, 3.0)))
    assert metrics.rmse(np.zeros(4), np.full(4, 2.0)) == 2.0
    with pytest.raises(ValueError, match="finite"):
        metrics.spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_batched_means_skip_nan():
    rng = np.random.default_rng(3)
    preds = rng.normal(size=(3, 8, 8))
    targets = preds + 0.1 * rng.normal(size=(3, 8, 8))
    preds[1] = 1.0  # constant map: its correlation is undefined and skipped
    per = [scipy.stats.spearmanr(preds[i], targets[i], axis=None)[0] for i in (0, 2)]
    assert math.isnan(metrics.spearman(preds[1], targets[1]))
    assert metrics.mean_spearman(preds, targets) == pytest.approx(np.mean(per))
    assert metrics.mean_pearson(preds, targets) == pytest.approx(
        np.mean([metrics.pearson(preds[i], targets[i]) for i in (0, 2)])
    )
    assert metrics.mean_rmse(preds, targets) == pytest.approx(
        np.mean([np.sqrt(np.mean((p - t) ** 2)) for p, t in zip(preds, targets)])
    )
    masks_p, masks_t = preds > 0, targets > 0
    assert metrics.mean_dice(masks_p, masks_t) == pytest.approx(
        np.mean([metrics.dice(p, t) for p, t in zip(masks_p, masks_t)])
    )
    assert metrics.mean_iou(masks_p, masks_t) <= metrics.mean_dice(masks_p, masks_t)
    assert math.isnan(metrics.mean_ignore_nan([math.nan, math.nan]))
    assert math.isnan(metrics.mean_ignore_nan([]))
    assert metrics.mean_ignore_nan([1.0, math.nan, 3.0]) == 2.0


def test_spearman_tie_ceiling_matches_the_closed_form_for_a_tied_block():
    # N values of which a block of m is tied: a prediction ranking the block in any order has rank
    # correlation sqrt(1 - (m/N)(m^2 - 1)/(N^2 - 1)) with the labels (their ranks are the block's mean).
    n, m = 100, 50
    image = np.concatenate([np.arange(n - m) * 0.01, np.ones(m)]).reshape(10, 10)
    batch = np.stack([image, image[::-1], image.T])
    expected = math.sqrt(1 - (m / n) * (m * m - 1) / (n * n - 1))
    assert metrics.spearman_tie_ceiling(batch) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.94  # half the pixels tied costs more than six points
    untied = np.arange(300, dtype=np.float64).reshape(3, 10, 10) * 0.01
    assert metrics.spearman_tie_ceiling(untied) == pytest.approx(1.0, abs=1e-12)


def test_bootstrap_interval_contains_the_true_mean_of_a_known_case():
    """400 scores at the quantiles of N(0.3, 1) (symmetric: their mean is exactly 0.3, their sd
    ~1): the mean's standard error is 0.05, so the 95% interval is 0.3 +- ~0.1 and contains it;
    the same seed gives the same interval."""
    values = 0.3 + scipy.stats.norm.ppf((np.arange(400) + 0.5) / 400)
    mean, low, high = metrics.bootstrap_mean_ci(values, resamples=1000, seed=0)
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert 0.3 - 0.12 < low < 0.3 < high < 0.3 + 0.12
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.15)
    assert (mean, low, high) == metrics.bootstrap_mean_ci(values, resamples=1000, seed=0)


def test_bootstrap_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    """Over 200 independent samples of 100 paired differences (true mean 0.1), the percentile
    interval misses the truth about 5% of the time (binomial sd ~1.5%; percentile intervals of
    the mean run slightly narrow at n = 100)."""
    rng = np.random.default_rng(11)
    data = rng.normal(0.1, 0.5, size=(100, 200))  # 200 columns: one experiment each
    _, low, high = metrics.bootstrap_mean_ci(data, resamples=1000, seed=1)
    coverage = np.mean((low <= 0.1) & (0.1 <= high))
    assert 0.89 <= coverage <= 0.99


def test_bootstrap_skips_nan_and_keeps_shape():
    values = np.array([[1.0, np.nan], [3.0, np.nan], [2.0, np.nan], [2.0, np.nan]])
    mean, low, high = metrics.bootstrap_mean_ci(values, resamples=200)
    assert mean.shape == low.shape == high.shape == (2,)
    assert mean[0] == 2.0 and 1.0 <= low[0] <= 2.0 <= high[0] <= 3.0
    assert np.isnan(mean[1]) and np.isnan(low[1]) and np.isnan(high[1])  # a column with no score at all
    const = metrics.bootstrap_mean_ci(np.full(10, 0.25))
    assert const == (0.25, 0.25, 0.25)  # no spread, no interval
    with pytest.raises(ValueError):
        metrics.bootstrap_mean_ci(np.zeros(0))


def test_constant_inputs_give_nan_without_scipy_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would fail here
        assert math.isnan(metrics.spearman(np.ones((4, 4)), np.arange(16.0).reshape(4, 4)))
        assert math.isnan(metrics.pearson(np.arange(3.0), np.zeros(3)))
        assert math.isnan(metrics.spearman(np.ones(1), np.ones(1)))
