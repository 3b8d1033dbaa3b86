"""Training throughput vs input-pipeline throughput, in images per second.

    python bench/train_throughput.py [--data DIR] [--n 256] [--archs TinyNet,MobileNet,Xception] [--json OUT]

Input pipeline, each stage alone:
  decode    photo file -> 128x128x3 uint8 with the app's preprocessing (load_arrays, threads, no cache)
  cache     the same from the .npy cache (what every run after the first reads)
  augment   the paper recipe's orientation/zoom + noise on cached arrays (training.recipe.render)
  tf.data   the training pipeline of train.fit (shuffle, batch, cast, prefetch), with and without the
            online augmentation layers
Training: train.fit's model.fit step for each architecture on the same arrays, after one warm-up epoch
(which pays for XLA compilation), in training images per second.

The input pipeline is not the bottleneck when the arrays (cache, then tf.data) deliver images
faster than the slowest model trains on them; decoding happens once per photo and is cached.
Uses the real photos when found (../shared/data/fundus-eye4), else generated ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.data import load_arrays, load_dataset  # noqa: E402
from training.recipe import Item, Recipe, render  # noqa: E402
from training.train import TrainConfig, augmenter, loss_name, make_optimizer, train_dataset  # noqa: E402


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def samples_for(data: str | None, n: int, tmp: Path):
    default = ROOT.parent / "shared" / "data" / "fundus-eye4"
    path = Path(data) if data else default
    if not (path.exists()):
        from training.synthetic import write_dataset

        path = write_dataset(tmp / "synthetic", n_per_class=max(1, n // 2), size=400)
    samples = load_dataset(path).samples
    rng = np.random.default_rng(0)
    return [samples[i] for i in rng.permutation(len(samples))[:n]], str(path)


def bench_pipeline(samples, tmp: Path, batch: int) -> dict:
    out = {}
    cache = tmp / "cache"
    t = time.perf_counter()
    x, y, kept, _ = load_arrays(samples, None)
    out["decode"] = rate(len(kept), time.perf_counter() - t)
    load_arrays(samples, cache)  # fill the cache
    t = time.perf_counter()
    x, y, kept, _ = load_arrays(samples, cache)
    out["cache"] = rate(len(kept), time.perf_counter() - t)
    recipe = Recipe()
    items = [Item(s, orientation=1, noise=1) for s in kept]
    t = time.perf_counter()
    for i, it in enumerate(items):
        render(x[i], it, recipe)
    out["augment"] = rate(len(items), time.perf_counter() - t)
    cfg = TrainConfig(batch_size=batch)
    for name, aug in (("tf.data", None), ("tf.data+online_augment", augmenter(0))):
        ds = train_dataset(x, y, cfg, aug)
        for _ in ds.take(1):  # warm-up: traces the map functions
            pass
        t, seen = time.perf_counter(), 0
        for _ in range(3):
            for xb, _yb in ds:
                seen += int(xb.shape[0])
        out[name] = rate(seen, time.perf_counter() - t)
    return out, x, y


def bench_training(arch: str, x, y, batch: int) -> dict:
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(0)
    cfg = TrainConfig(arch=arch, optimizer="rmsprop", loss="cce", batch_size=batch, schedule="constant")
    model = build_model(arch, weights="none")
    model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.lr), loss=loss_name(cfg.loss), metrics=["accuracy"])
    ds = train_dataset(x, y, cfg)
    t = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    seconds = time.perf_counter() - t
    result = {"train": rate(len(x), seconds), "first_epoch_seconds": round(warm, 1), "params": model.count_params()}
    keras.backend.clear_session()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--n", type=int, default=256, help="photos to use")
    p.add_argument("--archs", default="TinyNet,MobileNet,Xception")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        samples, where = samples_for(args.data, args.n, Path(tmp))
        pipeline, x, y = bench_pipeline(samples, Path(tmp), args.batch)
        training = {a: bench_training(a, x, y, args.batch) for a in args.archs.split(",") if a}
    slowest_input = min(pipeline["cache"], pipeline["tf.data"])
    fastest_model = max(t["train"] for t in training.values()) if training else 0.0
    report = {
        "data": where,
        "images": len(x),
        "cpus": os.cpu_count(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
        "load_average": os.getloadavg()[0],
        "input_pipeline_images_per_second": pipeline,
        "training_images_per_second": training,
        "input_is_bottleneck": slowest_input < fastest_model,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(
        f"input pipeline (cache -> tf.data): {slowest_input:.0f} img/s; fastest model trains at {fastest_model:.0f} "
        f"img/s: the input pipeline {'IS' if report['input_is_bottleneck'] else 'is not'} the bottleneck",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
