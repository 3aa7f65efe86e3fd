"""utils/eval/stats.py: standard errors and (paired) bootstrap intervals on synthetic data.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/eval/test_stats.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from utils.eval import stats


def _outcomes(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.int8)


def test_binomial_stderr_matches_a_hand_computation_and_the_harness_formula():
    assert stats.binomial_stderr(0.6, 50) == pytest.approx(math.sqrt(0.6 * 0.4 / 49))
    assert stats.binomial_stderr(0.5, 1) == 0.0
    values = [1] * 30 + [0] * 20  # p = 0.6: the sample std / sqrt(n) is the same number
    assert stats.mean_stderr(values) == pytest.approx(stats.binomial_stderr(0.6, 50), rel=1e-12)


def test_bootstrap_ci_contains_the_estimate_shrinks_with_n_and_is_seeded():
    widths = []
    for n in (50, 500, 5000):
        x = _outcomes(0.6, n, seed=n)
        lo, hi = stats.bootstrap_ci(lambda r: r.mean(-1), x)
        assert lo <= x.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    x = _outcomes(0.6, 100, seed=1)
    assert stats.bootstrap_ci(lambda r: r.mean(-1), x) == stats.bootstrap_ci(lambda r: r.mean(-1), x)


def test_perplexity_interval_resamples_windows():
    nll, tokens = [60.0, 70.0, 80.0, 90.0] * 5, [31] * 20
    lo, hi = stats.ppl_ci95(nll, tokens)
    point = math.exp(sum(nll) / sum(tokens))
    assert lo < point < hi
    assert stats.ppl_ci95([62.0] * 8, [31] * 8) == [pytest.approx(math.exp(2.0))] * 2  # identical windows


def test_paired_interval_of_identical_vectors_is_zero_and_pairing_narrows_it():
    a = _outcomes(0.6, 200, seed=0)
    assert stats.paired_diff_ci(a, a) == [0.0, 0.0]
    b = a.copy()
    b[:10] = 1 - b[:10]  # 10 of 200 examples differ: the paired interval is far narrower than unpaired
    lo, hi = stats.paired_diff_ci(b, a)
    diff = 100 * (b.mean() - a.mean())
    assert lo <= diff <= hi and hi - lo < 2 * 1.96 * 100 * stats.binomial_stderr(a.mean(), 200) / 2


def test_recovered_interval_on_synthetic_rows():
    rng = np.random.default_rng(0)
    n = 400
    fp = (rng.random(n) < 0.8).astype(np.int8)
    rtn = fp * (rng.random(n) < 0.6)  # loses about 40 % of FP's correct answers
    row = np.maximum(rtn, fp * (rng.random(n) < 0.75))  # recovers about 3 / 4 of them
    point = 100 * (row.mean() - rtn.mean()) / (fp.mean() - rtn.mean())
    lo, hi = stats.recovered_ci(row, rtn, fp)
    assert 0 < lo <= point <= hi < 150 and not stats.spans_zero([lo, hi])
    noise = _outcomes(0.5, 50, seed=3)  # FP == RTN: the ratio is undefined, the interval unbounded
    ci = stats.recovered_ci(_outcomes(0.5, 50, seed=4), noise, noise)
    assert ci == [-math.inf, math.inf] and stats.spans_zero(ci)


def test_interval_drops_nan_and_keeps_infinite_samples():
    assert stats.interval(np.array([np.nan] * 3)) is None
    assert stats.interval(np.r_[np.arange(100.0), np.nan]) == [2.0, 97.0]
    assert stats.interval(np.r_[np.arange(100.0), [np.inf] * 10])[1] == math.inf


def test_paired_ppl_uses_the_same_windows_for_every_row():
    nll = np.array([[60.0, 70.0, 80.0, 90.0], [66.0, 77.0, 88.0, 99.0]])  # row 2 = 1.1 x row 1 per window
    samples = stats.paired_ppl(nll, np.full((2, 4), 31.0))
    ratio = np.log(samples[1]) / np.log(samples[0])
    np.testing.assert_allclose(ratio, 1.1)  # paired: every resample keeps the per-window ratio


def test_resample_counts_are_draws_with_replacement_seeded_per_stratum():
    counts = stats.resample_counts(7, resamples=50, seed=0, stratum=2)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all() and (counts >= 0).all()
    assert np.array_equal(counts, stats.resample_counts(7, resamples=50, seed=0, stratum=2))
    assert not np.array_equal(counts, stats.resample_counts(7, resamples=50, seed=0, stratum=3))
    x = np.array([1, 0, 1, 1, 0, 0, 1])
    np.testing.assert_allclose(stats.resampled_accuracy(x, counts), 100 * (counts @ x) / 7)
