"""Bootstrap confidence intervals for evaluation means and for the difference between two runs.

A proxy evaluation scores a few hundred documents, so a 2-point gap between two models can be noise. The
intervals here are percentile bootstraps over documents with a fixed seed (the same numbers every time the
report is rebuilt). The paired version resamples documents, not runs: both models' scores of a document stay
together, which removes the between-document variance that the two runs share and gives a much tighter
interval than comparing two independent intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` documents and its bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: expected a positive number of bootstrap resamples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a value in (0, 1), e.g. 0.95")


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = SEED) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval (documents resampled with replacement).

    Deterministic for a given ``seed``. Raises ValueError on no values: a mean over nothing is a bug upstream,
    not a 0.
    """
    import numpy as np  # only when computing: every `memtrain` start imports this package's modules

    _check(resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci: expected a non-empty list of numbers, got {len(x)} values")
    mean = float(x.mean())
    if np.all(x == x[0]):  # every resample has the same mean: a zero-width interval, exactly
        return Interval(mean, mean, mean, int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(lo), float(hi), int(x.size))


def paired_difference_ci(a: Mapping[str, float], b: Mapping[str, float], confidence: float = CONFIDENCE,
                         resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of ``b[id] - a[id]`` over the ids both have, with a paired percentile bootstrap interval.

    ``a`` and ``b`` map a document id to its score in run A and run B; ids present in only one run are left
    out (``Interval.n`` says how many were matched). Raises ValueError when no id is shared.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"paired_difference_ci: the runs share no document id ({len(a)} vs {len(b)} "
                         "documents)")
    return bootstrap_ci([float(b[k]) - float(a[k]) for k in common], confidence, resamples, seed)


def pooled_paired_ci(pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]],
                     confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                     seed: int = SEED) -> Interval:
    """The paired difference b - a pooled over several replicates (seeds), each a pair of runs (a, b) on its
    own documents, with a two-level bootstrap: seeds resampled with replacement, then documents within each
    drawn seed. The interval so carries the spread between seeds (a training run's luck), not only the
    documents': with one seed it is the paired interval. ``Interval.n`` counts the matched documents; the
    mean is over all of them (seeds of different sizes weigh by their documents).
    """
    import numpy as np

    _check(resamples, confidence)
    diffs = []
    for i, (a, b) in enumerate(pairs):
        common = sorted(set(a) & set(b))
        if not common:
            raise ValueError(f"pooled_paired_ci: replicate {i} has no document in both runs")
        diffs.append(np.asarray([float(b[k]) - float(a[k]) for k in common], dtype=np.float64))
    if not diffs:
        raise ValueError("pooled_paired_ci: no replicates")
    everything = np.concatenate(diffs)
    mean = float(everything.mean())
    if np.all(everything == everything[0]):
        return Interval(mean, mean, mean, int(everything.size))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        drawn = [diffs[i] for i in rng.integers(0, len(diffs), size=len(diffs))]
        total = sum(float(d[rng.integers(0, d.size, size=d.size)].sum()) for d in drawn)
        means[r] = total / sum(d.size for d in drawn)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(lo), float(hi), int(everything.size))
