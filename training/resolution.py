"""Is 128 px the limit? The same small network and recipe at several input sizes, within one collection.

``python -m training resolution --data DIR --sizes 128,256`` trains ProxyNet (``--arch Xception``: the
product's network) from scratch (Adam + MSE, label-balanced epochs, flips and rotations) once per size
on the same patient split, keeps the epoch with the best validation AUC of the graded retinopathy task
(grade 0 vs 2-4) and reports the test patients' AUCs with bootstrap intervals side by side
(``resolution.md`` and ``resolution.json``).

Run it on ``eyepacs-256``: healthy and diseased eyes from one collection, so no camera can answer and
any difference between sizes is what the extra pixels show of the disease. The input is ``fundus-v2``
at each size, decoded as the app decodes (crop to the field, minus a blurred copy whose width scales
with the size: ``aisight.fundus.blur_sigma``). The product stays at 128x128x3 (the paper's design); this
measures what that choice costs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.data import Sample

TASK_NAMES = ("eyepacs_any", "eyepacs_moderate")  # the graded tasks; both classes from one collection
SELECT_TASK = "eyepacs_moderate"


def fundus_arrays(samples: Sequence[Sample], side: int, cache: Path | None) -> np.ndarray:
    """``fundus-v2`` inputs (uint8, side x side x 3) of ``samples``, cached per side as one .npy file."""
    from aisight.fundus import fundus_input
    from aisight.preprocess import open_image

    digest = hashlib.sha1("\n".join(s.path for s in samples).encode()).hexdigest()[:16]
    key = f"fundus-v2-{side}-{len(samples)}-{digest}.npy"
    if cache is not None and (cache / key).is_file():
        return np.load(cache / key)
    out = np.empty((len(samples), side, side, 3), np.uint8)
    for i, s in enumerate(samples):
        # The app's decode; a JPEG's draft scale kept at twice the side, as the app keeps it at twice 128.
        out[i] = fundus_input(open_image(Path(s.path).read_bytes(), draft_size=(2 * side, 2 * side)), side)[0]
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / key, out)
    return out


ARCHS = ("ProxyNet", "Xception")


def build_net(side: int, arch: str = "ProxyNet"):
    """``arch`` from scratch (ProxyNet from ``training.models``, or Xception with BatchNormalization
    momentum 0.9 as the product's run) with a GAP head on a side x side x 3 input."""
    import keras

    from training.models import _proxy_base

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    inputs = keras.Input((side, side, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)  # also Xception's own scaling
    x = keras.layers.RandomFlip("horizontal_and_vertical", name="flip")(x)
    x = keras.layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, name="rotate")(x)  # 0 = grey
    if arch == "Xception":
        base = keras.applications.Xception(include_top=False, weights=None, input_tensor=x)
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        features = base.output
    else:
        features = _proxy_base(x).output
    y = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    y = keras.layers.Dropout(0.3, name="dropout")(y)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="prediction")(y))


def train_one(side: int, x: dict[str, np.ndarray], y: dict[str, np.ndarray], masks: dict, epochs: int,
              epoch_size: int, seed: int, log: Callable[[str], None], arch: str = "ProxyNet") -> dict:
    """Train at ``side``; return the kept epoch, its validation AUCs and the test patients' AUCs with intervals."""
    import keras

    from training.evaluate import bootstrap_auc
    from training.metrics import auc
    from training.sampling import epoch_indices

    keras.utils.set_random_seed(seed)
    model = build_net(side, arch)
    steps = epochs * (epoch_size // 32)
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)), loss="mse")
    rng = np.random.default_rng(seed)
    best, history, t_train = None, [], 0.0
    for epoch in range(1, epochs + 1):
        idx = epoch_indices(y["train"], None, "label", epoch_size, rng)
        t0 = time.perf_counter()
        model.fit(x["train"][idx], keras.utils.to_categorical(y["train"][idx], 2), batch_size=32, epochs=1, verbose=0)
        t_train += time.perf_counter() - t0
        prob = model.predict(x["val"], batch_size=64, verbose=0)[:, 1]
        row = {"epoch": epoch, **{t: auc(*_task(masks["val"][t], prob)) for t in TASK_NAMES},
               "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        kept = best is None or row[SELECT_TASK] > best[0][SELECT_TASK]
        if kept:
            best = (row, [w.copy() for w in model.get_weights()])
        log(f"{side}px epoch {epoch}/{epochs}: val " + ", ".join(f"{t} {row[t]:.3f}" for t in TASK_NAMES)
            + f" ({row['seconds']}s){' *' if kept else ''}")
    model.set_weights(best[1])
    prob = model.predict(x["test"], batch_size=64, verbose=0)[:, 1]
    test = {"prob": [round(float(p), 6) for p in prob]}  # kept: the sizes are compared photo by photo
    for t in TASK_NAMES:
        yt, pt = _task(masks["test"][t], prob)
        test[t] = {"auc": auc(yt, pt), "ci95": list(bootstrap_auc(yt, pt)), "n": [int((yt == 0).sum()), int(yt.sum())]}
    return {"side": side, "arch": arch, "kept_epoch": best[0]["epoch"], "val": best[0], "test": test,
            "history": history, "train_images_per_second": round(epochs * epoch_size / t_train, 1)}


def _task(mask_labels: tuple[np.ndarray, np.ndarray], prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask, labels = mask_labels
    return labels, prob[mask]


def run_resolution(data, out: str | Path, sizes: Sequence[int], epochs: int = 10, epoch_size: int = 2000,
                   cache: str | Path | None = None, seed: int = 0, log: Callable[[str], None] = print,
                   arch: str = "ProxyNet") -> dict:
    """Train and test once per size on one patient split of ``data``; write resolution.{json,md} in ``out``."""
    from training.data import load_sources, split_by_patient
    from training.tasks import get_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_sources(data)
    parts = dict(zip(("train", "val", "test"), split_by_patient(ds.samples, seed=seed), strict=True))
    masks = {p: {t: get_task(t).select(parts[p]) for t in TASK_NAMES} for p in ("val", "test")}
    for p in ("val", "test"):
        for t, (_, labels) in masks[p].items():
            if labels.size == 0 or labels.min() == labels.max():
                raise ValueError(f"{p} patients have no photos of both classes for {t}: use EyePACS graded photos")
    y = {p: np.array([s.label for s in parts[p]]) for p in parts}
    log("photos: " + ", ".join(f"{p} {len(v)} ({int(v.sum())} diseased)" for p, v in y.items()))
    results = []
    for side in sizes:
        t0 = time.perf_counter()
        x = {p: fundus_arrays(parts[p], side, Path(cache) if cache else None) for p in parts}
        log(f"{side}px: inputs ready in {time.perf_counter() - t0:.0f}s")
        results.append(train_one(side, x, y, masks, epochs, epoch_size, seed, log, arch))
        compare_to_first(results, masks["test"])
        summary = {"data": str(data), "arch": arch, "epochs": epochs, "epoch_size": epoch_size, "seed": seed,
                   "results": results}
        (out / "resolution.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "resolution.md").write_text(markdown(results, epochs, epoch_size, arch))
    log((out / "resolution.md").read_text())
    return {"results": results}


def compare_to_first(results: list[dict], masks: dict) -> None:
    """Add to each result after the first its AUC difference from the first size, paired on the test photos."""
    from training.evaluate import bootstrap_auc_difference

    first = np.array(results[0]["test"]["prob"])
    for r in results[1:]:
        prob = np.array(r["test"]["prob"])
        r["vs_first"] = {}
        for t in TASK_NAMES:
            mask, labels = masks[t]
            d, lo, hi = bootstrap_auc_difference(labels, prob[mask], first[mask])
            r["vs_first"][t] = {"difference": d, "ci95": [lo, hi]}


def markdown(results: list[dict], epochs: int, epoch_size: int, arch: str = "ProxyNet") -> str:
    """The side-by-side table of the test patients' AUCs (and differences from the first size, paired)."""
    base = results[0]["side"]
    lines = [f"{arch} from scratch, {epochs} epochs of {epoch_size} label-balanced photos, epoch kept by "
             f"validation {SELECT_TASK}; test patients' AUC [95% bootstrap interval], and the difference from "
             f"{base} px on the same photos [paired 95% interval]:", "",
             "| input | kept epoch | grade 0 vs 1-4 | grade 0 vs 2-4 | training img/s |", "|---|---:|---|---|---:|"]
    for r in results:
        cells = []
        for t in TASK_NAMES:
            a = r["test"][t]
            cell = f"{a['auc']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            if "vs_first" in r:
                d = r["vs_first"][t]
                cell += f"; {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            cells.append(cell)
        lines.append(f"| {r['side']}x{r['side']} | {r['kept_epoch']} | {cells[0]} | {cells[1]} | "
                     f"{r['train_images_per_second']} |")
    return "\n".join(lines) + "\n"
