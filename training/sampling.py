"""Which training photos each epoch draws: balanced by label, by camera look x label, or by within-look pairs.

Sources and labels are entangled in the shared data (IDRiD, DIARETDB1 and retina_dataset hold retinopathy
only; fundus-eye4's EyePACS photos are all retinopathy), so what an epoch draws decides how much a camera's
look can answer for the label. ``pairs`` gives most of the epoch to the looks that hold every label
(eyepacs-256, ODIR), label-balanced within each, so that the contrast the model sees most is disease
against health under one camera.
"""

from __future__ import annotations

import numpy as np

BALANCE = ("none", "label", "cell", "pairs")


def epoch_indices(
    labels: np.ndarray, cells: np.ndarray | None, balance: str, size: int, rng: np.random.Generator,
    looks: np.ndarray | None = None, pair_share: float = 0.75,
) -> np.ndarray:
    """The training images of one epoch.

    ``none``: every image once, shuffled. ``label``: ``size`` draws, half of each label. ``cell``: half of
    each label, and within a label each cell (folder x source: a camera's look) drawn in proportion to the
    square root of its size, so that small collections are not drowned out nor copied dozens of times.
    ``pairs`` (needs ``looks``, the camera look of every image): half of each label as well, but within a
    label the looks holding every label take ``pair_share`` of it (all of it where the label has no other
    look), each in proportion to the square root of the look's size, the same for every label, so that
    within such a look the labels come out in the ratio ``pair_share`` at worst; the rest goes to
    single-label cells as in ``cell``.
    """
    n = len(labels)
    if balance not in BALANCE:
        raise ValueError(f"unknown balance {balance!r}; choose from {', '.join(BALANCE)}")
    if balance == "none":
        order = rng.permutation(n)
        return order if not size else np.resize(order, size)
    if balance == "pairs":
        if looks is None:
            raise ValueError("balance 'pairs' needs the camera look of every training image")
        if not 0.0 < pair_share <= 1.0:
            raise ValueError(f"pair_share must be in (0, 1], not {pair_share}")
        weights = _pair_weights(labels, cells if cells is not None else looks, looks, pair_share)
    else:
        groups = labels if balance == "label" or cells is None else cells
        weights = _sqrt_weights(labels, groups, 1.0 if balance == "label" else 0.5)
    return rng.choice(n, size=size or n, replace=True, p=weights / weights.sum())


def _sqrt_weights(labels: np.ndarray, groups: np.ndarray, power: float) -> np.ndarray:
    """Per image: each label half of the total, each group within it in proportion to size**power."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = counts.astype(np.float64) ** power
    weights = weights[inverse] / counts[inverse]  # per image: its group's weight shared by its images
    for label in np.unique(labels):
        m = labels == label
        weights[m] /= weights[m].sum() * len(np.unique(labels))
    return weights


def _pair_weights(labels: np.ndarray, cells: np.ndarray, looks: np.ndarray, pair_share: float) -> np.ndarray:
    """Per image weights of ``pairs`` (see epoch_indices)."""
    names = np.unique(labels)
    both = [lk for lk in np.unique(looks) if len(np.unique(labels[looks == lk])) == len(names)]
    paired = np.isin(looks, both)
    if not paired.any():  # no look holds every label: nothing to pair
        return _sqrt_weights(labels, cells, 0.5)
    look_size = {lk: int((looks == lk).sum()) for lk in np.unique(looks[paired])}
    weights = np.zeros(len(labels))
    for label in names:
        m = labels == label
        inside, outside = m & paired, m & ~paired
        share = pair_share if outside.any() else 1.0
        # A paired look's share of this label: sqrt of the look's whole size, the same for every label.
        kept, inverse, counts = np.unique(looks[inside], return_inverse=True, return_counts=True)
        w = np.sqrt([look_size[lk] for lk in kept])[inverse] / counts[inverse]
        weights[inside] = share * w / w.sum()
        if outside.any():
            # One label only here, so the cell balance's weights of these images sum to 1.
            weights[outside] = (1.0 - share) * _sqrt_weights(labels[outside], cells[outside], 0.5)
    return weights / len(names)

