"""Classification metrics of the paper (accuracy, sensitivity, specificity, overfitting) plus AUC."""

from __future__ import annotations

from typing import Any

import numpy as np


def auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN with one class only."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (false positive rate, true positive rate, thresholds), thresholds descending."""
    y_true = np.asarray(y_true).astype(bool)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    tpr = np.array([(scores[y_true] >= t).mean() if y_true.any() else np.nan for t in thresholds])
    fpr = np.array([(scores[~y_true] >= t).mean() if (~y_true).any() else np.nan for t in thresholds])
    return fpr, tpr, thresholds


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, AUC and confusion matrix at ``threshold`` on P(diseased)."""
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    pred = (prob >= threshold).astype(int)
    tp = int(((pred == 1) & (y_true == 1)).sum())
    tn = int(((pred == 0) & (y_true == 0)).sum())
    fp = int(((pred == 1) & (y_true == 0)).sum())
    fn = int(((pred == 0) & (y_true == 1)).sum())
    n = len(y_true)
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "auc": auc(y_true, prob),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "threshold": float(threshold),
    }


def threshold_for_sensitivity(y_true: np.ndarray, prob: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (y_true, prob) is at least ``target``.

    The highest such threshold keeps specificity as high as the sensitivity target allows.
    """
    y_true = np.asarray(y_true).astype(bool)
    pos = np.sort(np.asarray(prob, dtype=np.float64)[y_true])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples to set a threshold on")
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above the threshold
    return float(pos[max(k, 1) - 1])


def mse_loss(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared error of the 2-way softmax against one-hot labels (the paper's Stage 2 loss)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    return float(np.mean(((1 - y) - (1 - p)) ** 2 + (y - p) ** 2) / 2)


def crossentropy_loss(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Categorical cross-entropy of the 2-way softmax against one-hot labels."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def mae_loss(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean absolute error of the 2-way softmax against one-hot labels (Keras' MAE over both outputs)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    return float(np.mean(np.abs(y - p)))


def loss_value(loss: str, y_true: np.ndarray, prob: np.ndarray) -> float:
    """The validation loss a model trained with ``loss`` (mse, cce or mae) reports, as Keras computes it."""
    key = loss.lower()
    if key in ("mse", "mean_squared_error"):
        return mse_loss(y_true, prob)
    if key in ("mae", "mean_absolute_error"):
        return mae_loss(y_true, prob)
    if key in ("cce", "categorical_crossentropy"):
        return crossentropy_loss(y_true, prob)
    raise ValueError(f"unknown loss {loss!r}")
