"""Error bars: standard errors and bootstrap intervals, as small pure functions of per-example data.

    se = binomial_stderr(0.62, 50)                          # accuracy's standard error
    lo, hi = ppl_ci95(nll, tokens)                          # perplexity, windows resampled
    s = paired_accuracy([np.stack([qat, rtn, fp])])         # [3, R] accuracies (%) on shared resamples
    lo, hi = interval(s[0] - s[1])                          # QAT - RTN, points
    lo, hi = interval(recovered(s[0], s[1], s[2]))          # recovered % of the FP -> RTN gap

Standard error (lm-evaluation-harness's `mean_stderr`): the sample standard deviation of the n
per-example 0/1 outcomes over sqrt(n), i.e. sqrt(p (1 - p) / (n - 1)).

Bootstrap: `RESAMPLES` resamples of the n examples with replacement, seeded with `SEED` and, for
paired samples, the task's stratum number (each task draws on its own, and a task's draws are the
same in every comparison); `resample_counts` holds a draw as counts per example, so a row's
resampled accuracy is one matrix product. The 95 % interval is the 2.5th and 97.5th percentiles of
the statistic over the resamples (the percentile bootstrap). Perplexity resamples whole windows:
ppl = exp(sum nll / sum tokens) of the drawn windows. Paired: rows evaluated on the same examples
are resampled with the same draws, so a difference (or a ratio of differences) is computed on
identical example sets each time and the examples' shared difficulty cancels. A zero-shot average
over tasks draws each task's examples on its own (stratified) and averages the per-task
accuracies, as the table's `avg` does.

Recovered % = 100 (row - RTN) / (FP - RTN) is a ratio: in a resample where FP - RTN is near 0 it is
unstable (huge, either sign) and where it is exactly 0 undefined (+-inf, or nan when row - RTN is 0
too). Such resamples are kept as +-inf (nan ones dropped), so a gap that is not clearly positive
gives a very wide or unbounded interval, which spans 0 and is reported as not significant.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def binomial_stderr(p: float, n: int) -> float:
    """sqrt(p (1 - p) / (n - 1)): the standard error of a proportion p over n examples (0 for n < 2)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n) (the harness's `mean_stderr`; for 0/1 values it is
    `binomial_stderr` of their mean); 0 for fewer than two values."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def interval(samples: np.ndarray, level: float = LEVEL) -> Optional[list]:
    """[lo, hi]: the (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap samples, as observed
    values (no interpolation, so +-inf samples give +-inf bounds); nan samples are dropped; None if
    none is left."""
    kept = np.sort(np.asarray(samples, dtype=float).ravel())
    kept = kept[~np.isnan(kept)]
    if kept.size == 0:
        return None
    tail = (1 - level) / 2
    lo, hi = np.quantile(kept, [tail, 1 - tail], method="inverted_cdf")
    return [float(lo), float(hi)]


def spans_zero(ci: Optional[Sequence[float]]) -> bool:
    """True when the interval contains 0 (the difference is not significant at its level)."""
    return ci is not None and ci[0] <= 0 <= ci[1]


def resample_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] indices drawn with replacement from range(n)."""
    return rng.integers(0, n, size=(resamples, n))


def bootstrap_ci(statistic: Callable, *arrays, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> Optional[list]:
    """Percentile bootstrap interval of `statistic` over examples.

    Args:
        statistic: maps resampled arrays [R, n] (one per array in `arrays`, the same indices for
            each) to the statistic of each resample [R], e.g. `lambda x: x.mean(-1)`.
        arrays: per-example values [n] each (e.g. per-window nll and tokens).
    """
    arrays = [np.asarray(a) for a in arrays]
    idx = resample_indices(len(arrays[0]), resamples, np.random.default_rng(seed))
    return interval(statistic(*(a[idx] for a in arrays)), level)


def ppl(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """exp(sum nll / sum tokens) over the last axis (windows)."""
    return np.exp(np.sum(nll, axis=-1) / np.sum(tokens, axis=-1))


def ppl_ci95(nll: Sequence[float], tokens: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> list:
    """95 % interval of the perplexity of windows with summed NLLs `nll` and token counts `tokens`,
    windows resampled with replacement."""
    return bootstrap_ci(ppl, np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float),
                        resamples=resamples, seed=seed)


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED, stratum: int = 0) -> np.ndarray:
    """[resamples, n] float counts: how often each of n examples is drawn in each resample (n draws
    with replacement). `stratum` seeds an independent stream per task: (seed, stratum)."""
    idx = np.random.default_rng([seed, stratum]).integers(0, n, size=(resamples, n))
    flat = (idx + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)


def resampled_accuracy(correct: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Accuracy in % of 0/1 outcomes correct [..., n] in each resample of `counts` [R, n] -> [..., R]."""
    return 100 * (np.asarray(correct, dtype=float) @ counts.T) / counts.shape[1]


def resampled_ppl(nll: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Perplexity of windows (nll, tokens: [..., W]) in each resample of `counts` [R, W] -> [..., R]."""
    return np.exp((np.asarray(nll, dtype=float) @ counts.T) / (np.asarray(tokens, dtype=float) @ counts.T))


def paired_accuracy(tasks: Sequence[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap samples [k, R] of k rows' accuracy in % (the mean over tasks of each task's accuracy).

    Args:
        tasks: per task a [k, n_t] array of 0/1 correctness, the k rows on the same n_t examples;
            each resample draws each task's examples with replacement (task i: stratum i), the same
            draw for all k rows.
    """
    per_task = [resampled_accuracy(x, resample_counts(np.shape(x)[1], resamples, seed, i)) for i, x in enumerate(tasks)]
    return np.mean(per_task, axis=0)


def paired_ppl(nll: np.ndarray, tokens: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap samples [k, R] of k rows' perplexity on the same windows (nll, tokens: [k, W]),
    every row resampled with the same window draws."""
    return resampled_ppl(nll, tokens, resample_counts(np.shape(nll)[1], resamples, seed))


def recovered(row, rtn, fp):
    """100 (row - rtn) / (fp - rtn), elementwise; +-inf or nan where fp == rtn (see module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100 * (np.asarray(row, dtype=float) - rtn) / (np.asarray(fp, dtype=float) - rtn)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> list:
    """95 % paired bootstrap interval of mean(a) - mean(b) in points (100 x), for 0/1 correctness
    of two methods on the same examples."""
    samples = paired_accuracy([np.stack([a, b])], resamples, seed)
    return interval(samples[0] - samples[1])


def recovered_ci(row: Sequence[float], rtn: Sequence[float], fp: Sequence[float], resamples: int = RESAMPLES,
                 seed: int = SEED) -> Optional[list]:
    """95 % interval of recovered % for 0/1 correctness of three rows on the same examples: the
    indices are drawn once per resample for all three rows and the ratio computed each time."""
    s = paired_accuracy([np.stack([row, rtn, fp])], resamples, seed)
    return interval(recovered(s[0], s[1], s[2]))
