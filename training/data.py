"""Datasets: loaders for the supported layouts, patient-level splits, and cached 128x128 arrays."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aisight.preprocess import DEFAULT_PREPROCESSING, INPUT_SHAPE, ImageError, check_preprocessing, preprocess_path

LABELS = ("healthy", "diseased")
# Original class names (as folders or label values) mapped to the two labels of the task.
LABEL_ALIASES = {
    "healthy": "healthy",
    "normal": "healthy",
    "0": "healthy",
    "negative": "healthy",
    "diseased": "diseased",
    "disease": "diseased",
    "1": "diseased",
    "positive": "diseased",
    "diabetic_retinopathy": "diseased",
    "dr": "diseased",
    "glaucoma": "diseased",
    "cataract": "diseased",
    "amd": "diseased",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".heic", ".heif"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given (missing files, unknown labels, an empty class)."""


@dataclass(frozen=True)
class Sample:
    """One photograph: where it is, its label (0 healthy, 1 diseased) and who it belongs to."""

    path: str
    label: int
    patient_id: str
    source: str = ""
    original_label: str = ""
    folder: str = ""  # the data folder it was listed in (e.g. eyepacs-256): tasks are defined per folder


@dataclass
class Dataset:
    """Samples plus what could not be used (listed and counted, not fatal)."""

    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(LABELS[s.label] for s in self.samples)
        return {label: c.get(label, 0) for label in LABELS}


def to_label(value: str) -> int:
    """Map a label or original class name to 0 (healthy) or 1 (diseased)."""
    key = str(value).strip().lower().replace(" ", "_").replace("-", "_")
    if key not in LABEL_ALIASES:
        raise DatasetError(f"unknown label {value!r}; known: {', '.join(sorted(LABEL_ALIASES))}")
    return LABELS.index(LABEL_ALIASES[key])


def _check(ds: Dataset, where: Path) -> Dataset:
    counts = ds.counts()
    empty = [label for label, n in counts.items() if n == 0]
    if empty:
        raise DatasetError(f"{where}: no {' and no '.join(empty)} images found (counts {counts})")
    return ds


def load_manifest(path: str | Path, root: str | Path | None = None, check: bool = True) -> Dataset:
    """Load ``path,label[,patient_id,source,original_label]`` CSV; paths relative to its folder."""
    path = Path(path)
    root = Path(root) if root else path.parent
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    samples, skipped = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: needs columns path,label (has {reader.fieldnames})")
        for row in reader:
            file = root / row["path"]
            if not file.is_file():
                skipped.append((str(file), "missing file"))
                continue
            samples.append(
                Sample(
                    path=str(file),
                    label=to_label(row["label"]),
                    patient_id=row.get("patient_id") or file.stem,
                    source=row.get("source") or "",
                    original_label=row.get("original_label") or row["label"],
                    folder=root.name,
                )
            )
    ds = Dataset(samples, skipped)
    return _check(ds, path) if check else ds


def load_folders(root: str | Path) -> Dataset:
    """Load a class-per-folder layout (healthy/, diseased/ or original class names)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    samples, skipped = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            label = to_label(sub.name)
        except DatasetError:
            skipped.append((str(sub), "folder is not a known class"))
            continue
        for file in sorted(sub.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(file), label, _patient_from_name(file), "", sub.name))
    return _check(Dataset(samples, skipped), root)


def _patient_from_name(file: Path) -> str:
    """Patient id from ``<id>_<left|right>`` names (both eyes share it); else the file stem."""
    m = re.match(r"^(.*?)[_-](left|right)$", file.stem, re.IGNORECASE)
    return m.group(1) if m else file.stem


def load_eyepacs(labels_csv: str | Path, image_dir: str | Path | None = None) -> Dataset:
    """Load EyePACS ``trainLabels.csv`` (image,level): level 0 healthy, 1-4 diseased."""
    labels_csv = Path(labels_csv)
    image_dir = Path(image_dir) if image_dir else labels_csv.parent / "train"
    if not labels_csv.is_file():
        raise DatasetError(f"EyePACS labels not found: {labels_csv}")
    files = {p.stem: p for p in image_dir.iterdir()} if image_dir.is_dir() else {}
    samples, skipped = [], []
    with open(labels_csv, newline="") as f:
        for row in csv.DictReader(f):
            name, level = row["image"], int(row["level"])
            if name not in files:
                skipped.append((name, "missing file"))
                continue
            original = "healthy" if level == 0 else f"dr_level_{level}"
            patient = f"eyepacs-{name.split('_')[0]}"
            samples.append(Sample(str(files[name]), int(level > 0), patient, "eyepacs", original))
    return _check(Dataset(samples, skipped), labels_csv)


def load_origa(labels_csv: str | Path, image_dir: str | Path | None = None) -> Dataset:
    """Load ORIGA-650: a CSV with a filename column and a 0/1 glaucoma column."""
    labels_csv = Path(labels_csv)
    image_dir = Path(image_dir) if image_dir else labels_csv.parent / "images"
    if not labels_csv.is_file():
        raise DatasetError(f"ORIGA labels not found: {labels_csv}")
    samples, skipped = [], []
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.lower(): c for c in reader.fieldnames or []}
        name_col = next((cols[c] for c in ("filename", "image", "file", "name") if c in cols), None)
        flag_col = next((cols[c] for c in ("glaucoma", "label", "diagnosis") if c in cols), None)
        if not name_col or not flag_col:
            raise DatasetError(f"{labels_csv}: needs a filename column and a glaucoma column (has {reader.fieldnames})")
        for row in reader:
            file = image_dir / row[name_col]
            if not file.is_file():
                skipped.append((str(file), "missing file"))
                continue
            glaucoma = int(float(row[flag_col]))
            samples.append(
                Sample(str(file), glaucoma, f"origa-{file.stem}", "origa", "glaucoma" if glaucoma else "healthy")
            )
    return _check(Dataset(samples, skipped), labels_csv)


def load_dataset(path: str | Path, check: bool = True) -> Dataset:
    """Load a folder (with manifest.csv if present, else class-per-folder) or a manifest CSV.

    ``check=False`` accepts a folder with one class only (joined with others by ``load_sources``).
    """
    path = Path(path)
    if path.is_file():
        return load_manifest(path, check=check)
    if (path / "manifest.csv").is_file():
        return load_manifest(path / "manifest.csv", check=check)
    return load_folders(path)


def load_sources(spec: str | Path | Sequence[str | Path]) -> Dataset:
    """Load one data set or several joined: ``PATH``, ``PATH,PATH,...`` or ``KIND=PATH[:IMAGES],...``.

    A PATH is a folder (manifest.csv or class-per-folder) or a manifest CSV. KIND is ``eyepacs``
    (trainLabels.csv, images in IMAGES or ./train), ``origa`` (labels CSV, images in IMAGES or ./images),
    ``manifest`` (CSV) or ``folder``. E.g. ``eyepacs=/d/eyepacs/trainLabels.csv,origa=/d/origa/origa.csv``
    is the paper's data; ``../shared/data/fundus-eye4,../shared/data/eyepacs-256`` joins two folders.
    A list (``--data`` given several times) is joined the same way. Patient ids are kept as the
    folders give them, so a patient in two folders is one patient to ``split_by_patient``.
    """
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    if len(parts) == 1 and Path(parts[0]).exists():
        return load_dataset(parts[0])
    loaders = {"eyepacs": load_eyepacs, "origa": load_origa, "manifest": load_manifest, "folder": load_dataset}
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for part in (item for p in parts for item in p.split(",") if item.strip()):
        kind, sep, rest = part.partition("=")
        if not sep:  # a plain path; one class alone is fine when other parts bring the other
            ds = load_dataset(part.strip(), check=False)  # the joined set is checked below
        else:
            kind = kind.strip().lower()
            if kind not in loaders or not rest:
                raise DatasetError(f"bad data spec {part!r}: use PATH or KIND=PATH with KIND in {', '.join(loaders)}")
            path, _, images = rest.partition(":")
            ds = loaders[kind](path, images) if images and kind in ("eyepacs", "origa") else loaders[kind](path)
        samples += ds.samples
        skipped += ds.skipped
    return _check(Dataset(samples, skipped), Path(",".join(parts)))


def split_by_patient(
    samples: Sequence[Sample], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split into train/val/test so that no patient appears in two parts, stratified by label.

    Patients are grouped by their majority label and by source, shuffled with ``seed``, and dealt to
    the parts by cumulative fraction, so every part keeps the class and source mix.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3:
        raise ValueError("fractions must be three numbers summing to 1")
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault(s.patient_id, []).append(s)
    strata: dict[tuple[int, str], list[str]] = {}
    for pid, group in sorted(by_patient.items()):
        label = round(np.mean([s.label for s in group]))
        strata.setdefault((int(label), group[0].source), []).append(pid)
    rng = np.random.default_rng(seed)
    parts: list[list[Sample]] = [[], [], []]
    bounds = np.cumsum(fractions)
    for key in sorted(strata):
        pids = strata[key]
        rng.shuffle(pids)
        for i, pid in enumerate(pids):
            part = int(np.searchsorted(bounds, (i + 0.5) / len(pids)))
            parts[min(part, 2)].extend(by_patient[pid])
    return parts[0], parts[1], parts[2]


def write_split(out_dir: str | Path, parts: dict[str, Sequence[Sample]]) -> None:
    """Save each part as a CSV file list, so a split can be inspected and reused."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in parts.items():
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "patient_id", "source", "original_label", "folder"])
            for s in samples:
                w.writerow([s.path, LABELS[s.label], s.patient_id, s.source, s.original_label, s.folder])


def read_split(path: str | Path) -> list[Sample]:
    """Read a part written by ``write_split``."""
    with open(path, newline="") as f:
        return [
            Sample(r["path"], to_label(r["label"]), r["patient_id"], r["source"], r["original_label"],
                   r.get("folder") or "")
            for r in csv.DictReader(f)
        ]


def load_arrays(
    samples: Iterable[Sample],
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
    preprocessing: str = DEFAULT_PREPROCESSING,
    crops: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[Sample], list[tuple[str, str]]]:
    """Decode samples to 128x128x3 uint8 with the app's ``preprocessing``, in parallel, with a cache.

    Returns (images, labels, kept samples, unreadable [(path, reason)]). Unreadable images are listed,
    not fatal. The cache is one .npy per file keyed by path, size, mtime and preprocessing. With
    ``crops`` (``fundus-v2`` only) the arrays are the field's crop and mask packed as (128, 128, 4)
    (``training.augment.stack_crop``), the stage that training augments before normalising. ``progress`` shows a bar
    (on a terminal).
    """
    samples = list(samples)
    check_preprocessing(preprocessing)
    # The plain resize keeps its old cache keys (caches made before preprocessing had a name stay valid).
    if crops and preprocessing != "fundus-v2":
        raise ValueError("crops are cached for the fundus-v2 preprocessing only")
    tag = ("" if preprocessing == "resize" else f"|{preprocessing}") + ("|crop" if crops else "")
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def one(s: Sample) -> np.ndarray | str:
        key = None
        if cache:
            st = os.stat(s.path)
            key = cache / (hashlib.sha1(f"{s.path}|{st.st_size}|{st.st_mtime_ns}{tag}".encode()).hexdigest() + ".npy")
            if key.is_file():
                return np.load(key)
        try:
            arr = _crop_path(s.path) if crops else preprocess_path(s.path, preprocessing=preprocessing)
        except (ImageError, OSError) as exc:
            return str(getattr(exc, "message", exc))
        if key:
            np.save(key, arr)
        return arr

    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        mapped = pool.map(one, samples)
        if progress:
            from tqdm import tqdm

            mapped = tqdm(mapped, total=len(samples), desc="decode", unit="img", leave=False, disable=None)
        results = list(mapped)
    kept, arrays, bad = [], [], []
    for s, r in zip(samples, results, strict=True):
        if isinstance(r, str):
            bad.append((s.path, r))
        else:
            kept.append(s)
            arrays.append(r)
    empty = (0, *INPUT_SHAPE[:2], 4 if crops else 3)
    images = np.stack(arrays) if arrays else np.zeros(empty, np.uint8)
    return images, np.array([s.label for s in kept], np.int64), kept, bad


def _crop_path(path: str) -> np.ndarray:
    """The packed fundus crop + mask of an image file, decoded exactly as the app decodes uploads."""
    from aisight.fundus import fundus_crop
    from aisight.preprocess import open_image
    from training.augment import stack_crop

    crop, mask, _ = fundus_crop(open_image(Path(path).read_bytes()))
    return stack_crop(crop, mask)
