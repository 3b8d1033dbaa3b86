"""The paper's data recipe (method.md §Data, paper §2.2) and the two split protocols.

The recipe, as published for EyePACS + ORIGA-650:

1. Sample EyePACS: 3000 healthy (level 0) and 987 diabetic retinopathy images.
2. Augment ORIGA: each photo becomes ``b`` orientations/zooms (constant black fill) times ``c`` noise
   configurations plus the original (every channel value shifted by a random integer in [−2, 2], clipped
   to [0, 255]): ``b·(c+1)`` images. Healthy b=3, c=1 (482 → 2892); glaucoma b=4, c=3 (168 → 2688).
3. Duplicate EyePACS DR photos: 2 extra copies each (987 → 2961).
4. Shuffle and split 60/20/20 (11541 → 6924/2308/2309).

Choices where the paper is silent, stated here and in docs/training.md:

- ``b`` counts the photo's own orientation, as ``c+1`` counts its own noise level: orientation 0 is the
  photo as it is, orientations 1..b−1 rotate it by a random angle in [−180°, 180°) and zoom by a random
  factor in [0.9, 1.1] about the centre. So ``b=1, c=0`` leaves a photo alone.
- Augmentation runs on the 128x128 arrays (the paper resizes first), with seeds derived from the
  recipe seed and the file path, so any split can be rebuilt exactly from its saved file lists.
- Roles come from ``Sample.source``: ``eyepacs`` photos are sampled and (diseased ones) duplicated; every
  other source gets ORIGA's treatment (augmentation). In fundus-eye4 that means ODIR and
  retina_dataset photos are augmented and EyePACS DR photos duplicated, which is the closest analogue.
  Fewer EyePACS photos than asked for: all are used, and the log says so.

Protocols:

- ``paper``: sample, augment and duplicate everything, shuffle the copies and split them by image, as
  published. Copies of one photo land in train and test: the known leak, kept for reproduction.
- ``leakfree`` (the default): sample, split by patient (``data.split_by_patient``), then augment and
  duplicate the training part only; validation and test keep one untouched copy of each photo.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.data import LABELS, Sample, load_arrays, split_by_patient, to_label

PROTOCOLS = ("leakfree", "paper")
RECIPES = ("paper", "none")
PARTS = ("train", "val", "test")
EYEPACS = "eyepacs"


@dataclass(frozen=True)
class Item:
    """One training image: a photo plus which augmented version of it (all zeros: the photo itself)."""

    sample: Sample
    orientation: int = 0  # 0 as photographed; 1..b-1 a random rotation + zoom
    noise: int = 0  # 0 the control; 1..c a noise configuration
    copy: int = 0  # 0 the original; 1.. exact duplicates (EyePACS DR)

    # The Sample fields, so code written for samples (evaluate_parts, write_split) takes items too.
    @property
    def path(self) -> str:
        return self.sample.path

    @property
    def label(self) -> int:
        return self.sample.label

    @property
    def patient_id(self) -> str:
        return self.sample.patient_id

    @property
    def source(self) -> str:
        return self.sample.source

    @property
    def original_label(self) -> str:
        return self.sample.original_label

    @property
    def folder(self) -> str:
        return self.sample.folder

    @property
    def augmented(self) -> bool:
        return bool(self.orientation or self.noise or self.copy)


@dataclass
class Recipe:
    """The paper's sampling and augmentation numbers; ``name='none'`` uses every photo once."""

    name: str = "paper"
    eyepacs_healthy: int = 3000
    eyepacs_diseased: int = 987
    dr_copies: int = 2
    aug_healthy: tuple[int, int] = (3, 1)  # (b, c) for healthy non-EyePACS photos (ORIGA in the paper)
    aug_diseased: tuple[int, int] = (4, 3)  # (b, c) for diseased non-EyePACS photos (glaucoma ORIGA)
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_rotation: float = 180.0
    zoom: tuple[float, float] = (0.9, 1.1)
    noise: int = 2

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; choose from {', '.join(RECIPES)}")
        for b, c in (self.aug_healthy, self.aug_diseased):
            if b < 1 or c < 0:
                raise ValueError(f"augmentation needs b >= 1 and c >= 0 (got b={b}, c={c})")
        if self.dr_copies < 0:
            raise ValueError("dr_copies must be >= 0")

    def factor(self, sample: Sample) -> int:
        """How many images one photo becomes under this recipe."""
        if self.name == "none":
            return 1
        if sample.source == EYEPACS:
            return 1 + self.dr_copies if sample.label == 1 else 1
        b, c = self.aug_diseased if sample.label == 1 else self.aug_healthy
        return b * (c + 1)


def limit_samples(samples: Sequence[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """A random subset of ``n`` photos with the label mix kept (for tiny runs); all when ``n`` is None."""
    if n is None or n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for group in ([s for s in samples if s.label == lab] for lab in (0, 1)):
        k = max(1, round(n * len(group) / len(samples))) if group else 0
        picks = rng.permutation(len(group))[: min(k, len(group))]
        out += [group[i] for i in sorted(picks)]
    return out


def sample_sources(
    samples: Sequence[Sample], recipe: Recipe, seed: int = 0, log: Callable[[str], None] = print
) -> list[Sample]:
    """Step 1: sample EyePACS healthy and DR photos (all other sources are kept whole)."""
    if recipe.name == "none":
        return list(samples)
    rng = np.random.default_rng(seed)
    out = [s for s in samples if s.source != EYEPACS]
    for label, wanted in ((0, recipe.eyepacs_healthy), (1, recipe.eyepacs_diseased)):
        group = [s for s in samples if s.source == EYEPACS and s.label == label]
        if len(group) < wanted and group:
            log(f"recipe: {len(group)} EyePACS {LABELS[label]} photos, fewer than {wanted}: using all")
        picks = sorted(rng.permutation(len(group))[:wanted]) if len(group) > wanted else range(len(group))
        out += [group[i] for i in picks]
    return out


def expand(samples: Iterable[Sample], recipe: Recipe) -> list[Item]:
    """Steps 2-3: every photo becomes its augmented versions or duplicates."""
    items: list[Item] = []
    for s in samples:
        if recipe.name == "none":
            items.append(Item(s))
        elif s.source == EYEPACS:
            copies = 1 + recipe.dr_copies if s.label == 1 else 1
            items += [Item(s, copy=k) for k in range(copies)]
        else:
            b, c = recipe.aug_diseased if s.label == 1 else recipe.aug_healthy
            items += [Item(s, orientation=o, noise=k) for o in range(b) for k in range(c + 1)]
    return items


def build_parts(
    samples: Sequence[Sample],
    recipe: Recipe,
    protocol: str = "leakfree",
    seed: int = 0,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[Item]]:
    """Apply the recipe under ``protocol`` and return the train/val/test items (reproducible from ``seed``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    chosen = sample_sources(limit_samples(samples, limit, seed), recipe, seed, log)
    if protocol == "paper":
        items = expand(chosen, recipe)
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
        # int(): 11541 images -> 6924 / 2308 / 2309, the paper's counts.
        n_train = int(recipe.fractions[0] * len(items))
        n_val = int(recipe.fractions[1] * len(items))
        return {"train": items[:n_train], "val": items[n_train : n_train + n_val], "test": items[n_train + n_val :]}
    train, val, test = split_by_patient(chosen, recipe.fractions, seed)
    return {"train": expand(train, recipe), "val": [Item(s) for s in val], "test": [Item(s) for s in test]}


def _variant_rng(seed: int, path: str, *parts: int) -> np.random.Generator:
    """A generator that depends only on the seed, the file and the variant: reproducible in any order."""
    key = "|".join([str(seed), os.path.basename(os.path.dirname(path)), os.path.basename(path), *map(str, parts)])
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def orient(image: np.ndarray, angle_deg: float, zoom: float) -> np.ndarray:
    """Rotate by ``angle_deg`` and zoom by ``zoom`` about the centre; uncovered pixels are black."""
    from PIL import Image

    h, w = image.shape[:2]
    cx, cy = w / 2.0, h / 2.0  # PIL samples at pixel centres (x + 0.5): the image centre is w/2
    t = np.deg2rad(angle_deg)
    # PIL's affine maps each output pixel to the input pixel it samples: the inverse transform.
    a, b = np.cos(t) / zoom, np.sin(t) / zoom
    coeffs = (a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy)
    out = Image.fromarray(image).transform(
        (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(out, dtype=np.uint8)


def add_noise(image: np.ndarray, rng: np.random.Generator, amplitude: int = 2) -> np.ndarray:
    """Shift every channel value by a random integer in [−amplitude, amplitude], clipped to [0, 255]."""
    shift = rng.integers(-amplitude, amplitude + 1, size=image.shape, dtype=np.int16)
    return np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def render(image: np.ndarray, item: Item, recipe: Recipe, seed: int = 0) -> np.ndarray:
    """The array of ``item`` given the 128x128 array of its photo (copies are the photo itself)."""
    out = image
    if item.orientation:
        rng = _variant_rng(seed, item.path, item.orientation)
        out = orient(out, rng.uniform(-recipe.max_rotation, recipe.max_rotation), rng.uniform(*recipe.zoom))
    if item.noise:
        out = add_noise(out, _variant_rng(seed, item.path, item.orientation, item.noise), recipe.noise)
    return out


def materialize(
    items: Sequence[Item],
    recipe: Recipe,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[Item], list[tuple[str, str]]]:
    """Decode each photo once (``load_arrays``: the app's preprocessing, parallel, cached), then render
    the items. Returns (images, labels, kept items, unreadable [(path, reason)])."""
    unique = list({it.path: it.sample for it in items}.values())
    images, _, kept, bad = load_arrays(unique, cache_dir, progress=progress)
    index = {s.path: i for i, s in enumerate(kept)}
    keep = [it for it in items if it.path in index]
    x = np.empty((len(keep), *images.shape[1:]), np.uint8)
    for j, it in enumerate(_progress(keep, progress, "augment")):
        x[j] = render(images[index[it.path]], it, recipe, seed)
    return x, np.array([it.label for it in keep], np.int64), keep, bad


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="img", leave=False, disable=None)


ITEM_COLUMNS = ("path", "label", "patient_id", "source", "original_label", "orientation", "noise", "copy")


def write_parts(out_dir: str | Path, parts: dict[str, Sequence[Item]], info: dict) -> Path:
    """Save each part as a CSV file list (one row per image, variant included) plus ``recipe.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in parts.items():
        tmp = out / f".{name}.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(ITEM_COLUMNS)
            for it in items:
                s = it.sample
                w.writerow([s.path, LABELS[s.label], s.patient_id, s.source, s.original_label,
                            it.orientation, it.noise, it.copy])
        os.replace(tmp, out / f"{name}.csv")
    tmp = out / ".recipe.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "recipe.json")
    return out


def read_parts(split_dir: str | Path) -> dict[str, list[Item]]:
    """Read the file lists written by ``write_parts``."""
    parts = {}
    for name in PARTS:
        with open(Path(split_dir) / f"{name}.csv", newline="") as f:
            parts[name] = [
                Item(
                    Sample(r["path"], to_label(r["label"]), r["patient_id"], r["source"], r["original_label"]),
                    int(r["orientation"]), int(r["noise"]), int(r["copy"]),
                )
                for r in csv.DictReader(f)
            ]
    return parts


def fingerprint(parts: dict[str, Sequence[Item]]) -> str:
    """A hash of the split that ignores where the data folder is mounted (paths relative to their root)."""
    paths = [it.path for items in parts.values() for it in items]
    root = os.path.commonpath(paths) if paths else ""
    h = hashlib.sha1()
    for name in sorted(parts):
        for it in parts[name]:
            rel = os.path.relpath(it.path, root) if root else it.path
            h.update(f"{name}|{rel}|{it.label}|{it.orientation}|{it.noise}|{it.copy}\n".encode())
    return h.hexdigest()


def summary(parts: dict[str, Sequence[Item]]) -> dict[str, dict]:
    """Per part: images, diseased, photos, patients, augmented copies, and patients shared with train."""
    train_patients = {it.patient_id for it in parts.get("train", [])}
    train_paths = {it.path for it in parts.get("train", [])}
    out = {}
    for name, items in parts.items():
        patients = {it.patient_id for it in items}
        out[name] = {
            "images": len(items),
            "diseased": sum(it.label for it in items),
            "photos": len({it.path for it in items}),
            "patients": len(patients),
            "augmented": sum(it.augmented for it in items),
            "by_source": dict(sorted(Counter(it.source or "unknown" for it in items).items())),
        }
        if name != "train":
            out[name]["patients_also_in_train"] = len(patients & train_patients)
            out[name]["photos_also_in_train"] = len({it.path for it in items} & train_paths)
    return out


@dataclass
class Prepared:
    """A split ready to train on: items and their arrays per part, plus what was skipped."""

    parts: dict[str, list[Item]]
    arrays: dict[str, tuple[np.ndarray, np.ndarray, list[Item]]]
    info: dict
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def prepare(
    samples: Sequence[Sample],
    recipe: Recipe,
    protocol: str = "leakfree",
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    split_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Prepared:
    """Build the split, check it against (or save it to) ``split_dir``, and materialize the arrays.

    A ``split_dir`` that already holds a different split is an error: candidates of one selection must
    train and validate on the same images, wherever and whenever each of them runs.
    """
    parts = build_parts(samples, recipe, protocol, seed, limit, log)
    info = {
        "protocol": protocol,
        "recipe": asdict(recipe),
        "seed": seed,
        "limit": limit,
        "fingerprint": fingerprint(parts),
        "summary": summary(parts),
    }
    if split_dir:
        saved = Path(split_dir) / "recipe.json"
        if saved.is_file():
            old = json.loads(saved.read_text())
            if old.get("fingerprint") != info["fingerprint"]:
                raise ValueError(
                    f"{split_dir} holds a different split (protocol {old.get('protocol')}, seed {old.get('seed')}, "
                    f"limit {old.get('limit')}): use another --out, or the same data, recipe, seed and --limit"
                )
        else:
            write_parts(split_dir, parts, info)
    train = info["summary"]["train"]
    if train["images"] and not 0.35 <= train["diseased"] / train["images"] <= 0.65:
        # The paper's factors balance EyePACS + ORIGA; on other data they may not (docs/training.md).
        log(f"recipe: the training part is {train['diseased'] / train['images']:.0%} diseased; set --aug-healthy "
            "and --aug-diseased to balance it (fundus-eye4: --aug-healthy 3,1 --aug-diseased 2,1)")
    for name in PARTS:
        s = info["summary"][name]
        log(
            f"{name}: {s['images']} images ({s['diseased']} diseased) from {s['photos']} photos of "
            f"{s['patients']} patients, {s['augmented']} augmented copies"
            + (f"; {s['photos_also_in_train']} photos also in train" if name != "train" else "")
        )
    arrays, unreadable = {}, []
    for name in PARTS:
        x, y, kept, bad = materialize(parts[name], recipe, seed, cache_dir, progress)
        arrays[name] = (x, y, kept)
        unreadable += bad
    for path, why in dict(unreadable).items():
        log(f"unreadable, skipped: {path}: {why}")
    info["unreadable"] = len(dict(unreadable))
    return Prepared(parts, arrays, info, unreadable)
