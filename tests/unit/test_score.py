"""The paper's ranking score on hand-made tables, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from training.score import rank_desc, rank_models, scores

KEYS = ("overfitting", "val_accuracy", "val_loss", "sensitivity", "specificity")


def table(*rows, params=None):
    out = []
    for i, values in enumerate(rows):
        row = dict(zip(KEYS, values, strict=True))
        row["arch"] = "ABCDEFGH"[i]
        row["params"] = params[i] if params else 1000 + i
        out.append(row)
    return out


def test_rank_highest_value_gets_one_and_ties_share_the_average():
    assert rank_desc([0.2, 0.9, 0.5]).tolist() == [3, 1, 2]
    assert rank_desc([0.7, 0.7, 0.1, 0.7]).tolist() == [2, 2, 4, 2]
    assert rank_desc([0.1, 0.1 + 1e-12, 0.3]).tolist() == [2.5, 2.5, 1]  # float noise is a tie


def test_formula_on_distinct_values():
    # Ranks worked by hand (highest = 1):  A: of 2, acc 2, loss 2, sens 3, spec 1 ...
    rows = table(
        (0.10, 0.80, 0.50, 0.70, 0.90),  # A
        (0.05, 0.85, 0.40, 0.80, 0.80),  # B
        (0.20, 0.70, 0.60, 0.90, 0.70),  # C
    )
    # A = 3·2 + 2·(4−2) + 1.5·2 + 1·(4−3) + 0.25·(4−1)
    assert scores(rows).tolist() == [14.75, 22.0, 9.75]
    ranked = rank_models(rows)
    assert [r["arch"] for r in ranked] == ["B", "A", "C"]
    assert [r["rank"] for r in ranked] == [1, 2, 3]


def test_formula_with_ties_inside_metrics():
    rows = table(
        (0.1, 0.8, 0.5, 0.7, 0.9),  # A
        (0.1, 0.8, 0.4, 0.7, 0.8),  # B
        (0.2, 0.9, 0.5, 0.6, 0.9),  # C
        (0.0, 0.7, 0.3, 0.7, 0.7),  # D
    )
    # overfitting: C 1, A/B 2.5, D 4; accuracy: C 1, A/B 2.5, D 4; loss: A/C 1.5, B 3, D 4;
    # sensitivity: A/B/D 2, C 4; specificity: A/C 1.5, B 3, D 4.
    assert scores(rows).tolist() == [18.625, 20.5, 15.125, 23.25]
    assert [r["arch"] for r in rank_models(rows)] == ["D", "B", "A", "C"]


def test_equal_scores_go_to_fewer_parameters_then_input_order():
    same = (0.1, 0.8, 0.5, 0.7, 0.9)
    rows = table(same, same, same, params=[5_000, 1_000, 5_000])
    ranked = rank_models(rows)
    assert len({r["score"] for r in ranked}) == 1
    assert [r["arch"] for r in ranked] == ["B", "A", "C"]


def test_single_model_scores_every_term_once():
    assert scores(table((0.1, 0.8, 0.5, 0.7, 0.9))).tolist() == [3 + 2 + 1.5 + 1 + 0.25]


def test_missing_value_counts_as_the_worst():
    rows = table((0.1, 0.8, 0.5, np.nan, 0.9), (0.1, 0.8, 0.5, 0.1, 0.9))
    s = scores(rows)
    assert s[1] > s[0]  # a sensitivity of 0.1 beats an undefined one
    rows = table((np.nan, 0.8, 0.5, 0.7, 0.9), (0.9, 0.8, 0.5, 0.7, 0.9))
    s = scores(rows)
    assert s[0] < s[1]  # a missing overfitting ranks above (worse than) even 0.9


def test_direction_lower_overfitting_and_loss_score_higher():
    """The paper's intent: less overfitting, lower loss, higher accuracy/sens/spec all help."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 18))
        values = rng.uniform(0.05, 0.95, size=(n, 5))
        rows = [dict(zip(KEYS, v, strict=True), arch=f"m{j}", params=1) for j, v in enumerate(values)]
        base = scores(rows)
        i = int(rng.integers(n))
        for key in KEYS:
            better = [dict(r) for r in rows]
            # Improve one metric of model i past every other model.
            better[i][key] = -1.0 if key in ("overfitting", "val_loss") else 2.0
            assert scores(better)[i] >= base[i], (key, values)
        # A model better than all others on every metric wins outright.
        best = [dict(r) for r in rows]
        best[i].update(overfitting=-1, val_accuracy=2, val_loss=-1, sensitivity=2, specificity=2)
        assert rank_models(best)[0]["arch"] == best[i]["arch"]
        assert scores(best)[i] == pytest.approx(3 * n + 2 * n + 1.5 * n + n + 0.25 * n)


def test_ranks_are_a_permutation_and_scores_sum_as_without_ties():
    rows = table((0.1, 0.8, 0.5, 0.7, 0.9), (0.1, 0.8, 0.5, 0.7, 0.9), (0.3, 0.6, 0.2, 0.7, 0.1))
    ranked = rank_models(rows)
    assert sorted(r["rank"] for r in ranked) == [1, 2, 3]
    n = 3
    # Each metric's ranks sum to N(N+1)/2 whatever the ties, so the total of all scores is fixed.
    assert sum(r["score"] for r in ranked) == pytest.approx((3 + 2 + 1.5 + 1 + 0.25) * n * (n + 1) / 2)
