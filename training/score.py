"""The paper's ranking score (method.md §Ranking, paper §2.4.2) and the ordering of models by it.

Per stage with N models, each of five metrics is ranked so that the highest value gets rank 1 and the
lowest rank N, and::

    score = 3·rank(overfitting) + 2·(N+1−rank(val_accuracy)) + 1.5·rank(val_loss)
            + 1·(N+1−rank(sensitivity)) + 0.25·(N+1−rank(specificity))

Low overfitting and low loss get high ranks (close to N), so they add the most; high accuracy,
sensitivity and specificity get low ranks, and N+1−rank turns those into large terms. The highest score
wins.

Rules the paper leaves open, chosen here:

- Ties inside one metric get the average of the ranks they span (two models sharing ranks 2 and 3 both get
  2.5), so tied models get the same term and the terms still sum as with distinct values. Values that
  agree to 9 decimals are ties (floating-point noise is not a difference).
- A missing value (NaN, e.g. sensitivity of a validation set without positives) counts as the worst
  value of that metric: the lowest for accuracy, sensitivity and specificity, the highest for
  overfitting and loss. Several missing values tie with each other.
- Models with equal scores are ordered by fewer parameters (the paper's rule), then by their order in
  the input (so the ranking is a permutation and reproducible).
- Overfitting is taken as signed (train − validation accuracy), as the paper defines it: a negative
  value (validation better than training) counts as less overfitting than zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# (metric, weight, desirable): desirable metrics enter as N+1−rank, the others as rank.
TERMS: tuple[tuple[str, float, bool], ...] = (
    ("overfitting", 3.0, False),
    ("val_accuracy", 2.0, True),
    ("val_loss", 1.5, False),
    ("sensitivity", 1.0, True),
    ("specificity", 0.25, True),
)
TIE_DECIMALS = 9


def rank_desc(values: Sequence[float], missing_high: bool = False) -> np.ndarray:
    """Rank so that the highest value gets 1 and the lowest N; ties share their average rank.

    ``missing_high`` ranks NaN as the highest value (rank 1 side), else as the lowest (rank N side).
    """
    v = np.round(np.asarray(values, dtype=np.float64), TIE_DECIMALS)
    v = np.where(np.isnan(v), np.inf if missing_high else -np.inf, v)
    n = len(v)
    order = np.argsort(-v, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and v[order[j + 1]] == v[order[i]]:
            j += 1
        # Positions i..j (0-based) share the ranks i+1..j+1: their average.
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def metric_ranks(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The rank of every model on each of the five metrics."""
    # A missing value is the worst: for desirable metrics that is the lowest (rank N side); for
    # overfitting and loss the highest (rank 1 side), which adds the least to the score.
    return {name: rank_desc([float(r[name]) for r in rows], missing_high=not good) for name, _, good in TERMS}


def scores(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The paper's overall score of every model in ``rows`` (one stage)."""
    n = len(rows)
    ranks = metric_ranks(rows)
    total = np.zeros(n, dtype=np.float64)
    for name, weight, desirable in TERMS:
        total += weight * ((n + 1 - ranks[name]) if desirable else ranks[name])
    return total


def rank_models(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return copies of ``rows`` with ``score`` and ``rank`` (1 = best), sorted by rank.

    Higher score first; equal scores: fewer ``params`` first; then input order.
    """
    s = scores(rows)
    params = [float(r.get("params", np.inf)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-round(float(s[i]), TIE_DECIMALS), params[i], i))
    out = []
    for position, i in enumerate(order, start=1):
        out.append({**rows[i], "score": float(s[i]), "rank": position})
    return out
