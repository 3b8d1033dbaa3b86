"""A small model trained on generated images: for tests, and for serving before a real model exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.export import export_artifact
from training.models import build_model
from training.synthetic import make_fundus
from training.train import recalibrate_bn


def synthetic_arrays(n_per_class: int, seed: int = 0, preprocessing: str = "resize") -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels) of generated fundus photos, preprocessed as the app does."""
    import io

    from aisight.preprocess import preprocess_bytes

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(2 * n_per_class):
        diseased = i % 2 == 1
        buf = io.BytesIO()
        make_fundus(rng, diseased, size=256).save(buf, format="JPEG", quality=92)
        xs.append(preprocess_bytes(buf.getvalue(), preprocessing=preprocessing))
        ys.append(int(diseased))
    return np.stack(xs), np.array(ys)


def build_synthetic_model(
    out_dir: str | Path,
    arch: str = "TinyNet",
    n_per_class: int = 48,
    epochs: int = 6,
    seed: int = 0,
    preprocessing: str = "resize",
) -> Path:
    """Train ``arch`` from scratch on generated photos and export it with an honest model card."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = synthetic_arrays(n_per_class, seed, preprocessing)
    model = build_model(arch, weights="none", head="gap", trainable="all", bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["accuracy"])
    model.fit(x.astype("float32"), keras.utils.to_categorical(y, 2), batch_size=16, epochs=epochs, verbose=0)
    recalibrate_bn(model, x)
    probs = model(x.astype("float32"), training=False).numpy()[:, 1]
    acc = float(np.mean((probs >= 0.5) == y))
    card = {
        "name": "aisight-synthetic-demo",
        "version": f"synthetic-{arch.lower()}-{seed}",
        "architecture": arch,
        "optimizer": "adam",
        "loss": "mse",
        "threshold": 0.5,
        "preprocessing": preprocessing,
        "training": {
            "data": "generated images (training.synthetic), not real fundus photographs",
            "data_summary": "generated images only: a demonstration model, not for screening",
            "n_images": int(len(y)),
            "epochs": epochs,
        },
        "metrics": {"train_accuracy_inference_mode": acc},
        "warning": "Trained on generated images only. Not a screening model.",
    }
    return export_artifact(model, out_dir, card)
