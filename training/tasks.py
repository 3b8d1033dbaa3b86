"""The evaluation tasks: which photos count as negatives and positives for each question we ask.

A pooled AUC over the shared folders mostly measures which collection a photo came from (every
healthy photo of fundus-eye4 is ODIR, every retinopathy one EyePACS). The fair questions compare
classes from one collection: those tasks are ``controlled``. The others are reported for what they
are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.data import Sample

DR_GRADES = ("no_dr", "mild_dr", "moderate_dr", "severe_dr", "proliferative_dr")
RAW_DR_SOURCES = ("idrid", "diaretdb1")


@dataclass(frozen=True)
class Task:
    """A binary question on a subset of photos."""

    name: str
    title: str
    controlled: bool  # both classes from one collection (a camera cannot answer it)
    negative: Callable[[Sample], bool]
    positive: Callable[[Sample], bool]

    def select(self, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the samples in the task, their 0/1 labels in the task)."""
        neg = np.array([self.negative(s) for s in samples], bool)
        pos = np.array([self.positive(s) for s in samples], bool)
        mask = neg | pos
        return mask, pos[mask].astype(np.int64)


def _grade(s: Sample) -> int:
    return DR_GRADES.index(s.original_label) if s.source == "eyepacs" and s.original_label in DR_GRADES else -1


TASKS: tuple[Task, ...] = (
    Task("odir", "ODIR: normal vs glaucoma or cataract", True,
         lambda s: s.source == "odir" and s.label == 0, lambda s: s.source == "odir" and s.label == 1),
    Task("eyepacs_any", "EyePACS graded: no retinopathy vs any (grade 0 vs 1-4)", True,
         lambda s: _grade(s) == 0, lambda s: _grade(s) >= 1),
    Task("eyepacs_moderate", "EyePACS graded: no retinopathy vs moderate or worse (grade 0 vs 2-4)", True,
         lambda s: _grade(s) == 0, lambda s: _grade(s) >= 2),
    Task("raw_dr", "raw camera photos: IDRiD/DIARETDB1 retinopathy vs ODIR normal (two sources: not controlled)",
         False, lambda s: s.source == "odir" and s.label == 0, lambda s: s.source in RAW_DR_SOURCES),
    Task("pooled", "all photos (sources and labels entangled: not controlled)", False,
         lambda s: s.label == 0, lambda s: s.label == 1),
)


def get_task(name: str) -> Task:
    """Look a task up by name."""
    for t in TASKS:
        if t.name == name:
            return t
    raise ValueError(f"unknown task {name!r}; known: {', '.join(t.name for t in TASKS)}")


def task_masks(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Mask of each task that has both classes among ``samples`` (what fit scores every epoch)."""
    out = {}
    for t in TASKS:
        mask, y = t.select(samples)
        if mask.any() and 0 < y.sum() < len(y):
            out[t.name] = mask
    return out


def controlled_names() -> tuple[str, ...]:
    return tuple(t.name for t in TASKS if t.controlled)


def cells(samples: Sequence[Sample]) -> np.ndarray:
    """A cell number per sample: one per (folder, source, label), i.e. per camera look and label, for
    balanced sampling (eyepacs-256's enhanced EyePACS photos are another look than fundus-eye4's raw ones)."""
    return _numbered([(s.folder, s.source, s.label) for s in samples])


def looks(samples: Sequence[Sample]) -> np.ndarray:
    """A look number per sample: one per (folder, source), i.e. per camera look whatever the label."""
    return _numbered([(s.folder, s.source) for s in samples])


def _numbered(keys: list[tuple]) -> np.ndarray:
    """One number per distinct key, in sorted order of the keys."""
    index = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.array([index[k] for k in keys], np.int64)
