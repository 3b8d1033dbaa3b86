"""Load the model artifact once per process and answer predictions on CPU or GPU."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from aisight.artifact import ArtifactError, load_model, read_card
from aisight.preprocess import INPUT_SHAPE

log = logging.getLogger(__name__)


class ModelNotReady(RuntimeError):
    """Raised when a prediction is asked for before the model loaded, or after loading failed."""


class Predictor:
    """The served model: its card, its compiled inference function and its readiness state.

    State goes ``loading`` -> ``ready`` (model loaded and a warm-up prediction answered) or
    ``failed`` (the reason is kept in ``error`` and logged); predictions are refused unless ready.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.state = "loading"
        self.error: str | None = None
        self.card: dict[str, Any] | None = None
        self.model = None
        self.load_seconds: float | None = None
        self.device = "cpu"
        self._infer = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def threshold(self) -> float:
        if self.card is None:
            raise ModelNotReady(self.error or "model not loaded")
        return float(self.card["threshold"])

    def load(self) -> Predictor:
        """Load card and model, compile the inference step and warm it up; never raises."""
        start = time.perf_counter()
        try:
            card = read_card(self.model_dir)
            model = load_model(self.model_dir)
            shape = tuple(model.input_shape[1:])
            if shape != INPUT_SHAPE:
                raise ArtifactError(f"model input shape {shape} != {INPUT_SHAPE}")
            if tuple(model.output_shape[1:]) != (2,):
                raise ArtifactError(f"model output shape {model.output_shape[1:]} != (2,)")
            self.card, self.model = card, model
            self._infer = _compile(model)
            self.device = _device_name()
            warm = self._run(np.zeros((1, *INPUT_SHAPE), np.uint8))
            if not np.all(np.isfinite(warm)):
                raise ArtifactError("warm-up prediction is not finite")
        except Exception as exc:  # any failure leaves the process serving, but not ready
            self.state, self.error = "failed", str(exc)
            log.error("model load failed from %s: %s", self.model_dir, exc)
            return self
        self.load_seconds = time.perf_counter() - start
        self.state = "ready"
        log.info("model %s %s ready on %s in %.2fs", card["name"], card["version"], self.device, self.load_seconds)
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return P(diseased) for a batch of 128x128x3 uint8 images (shape (n, 128, 128, 3))."""
        if not self.ready:
            raise ModelNotReady(self.error or "model is still loading")
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"expected images of shape (n, {INPUT_SHAPE}), got {images.shape}")
        return self._run(images)

    def predict_one(self, image: np.ndarray) -> float:
        """Return P(diseased) for one 128x128x3 uint8 image (the request path; may be micro-batched)."""
        return float(self.predict(image[None])[0])

    def _run(self, images: np.ndarray) -> np.ndarray:
        batch = images.astype(np.float32, copy=False)
        # One inference at a time per process: TF already uses every core for one batch, and
        # interleaving threads only adds contention.
        with self._lock:
            probs = self._infer(batch)
        return np.asarray(probs, dtype=np.float64)[:, 1]


def _compile(model):
    """Wrap the model's forward pass in a traced tf.function (much faster than model.predict)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)], reduce_retracing=True)
    def infer(x):
        return model(x, training=False)

    return lambda batch: infer(tf.constant(batch)).numpy()


def _device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"gpu ({len(gpus)})" if gpus else "cpu"
