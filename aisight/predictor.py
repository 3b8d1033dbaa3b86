"""Load the model artifact once per process and answer predictions on CPU or GPU.

Single-image predictions from concurrent request threads are micro-batched (aisight.batching): one
model call answers every image that arrives within a few milliseconds of the first, which is several
times the throughput of one call per image on a CPU and far more on a GPU. Settings, from the
environment unless given: AISIGHT_BATCH_MAX (largest batch, 8; 1 turns batching off),
AISIGHT_BATCH_WAIT_MS (longest wait for company, 3 ms), AISIGHT_PRECISION (auto, the default: the fastest
precision the model card allows, timed at start, see aisight.precision; or float32, bf16, int8), AISIGHT_FREEZE
(background, sync or off).

The fast path is a frozen graph: the traced forward pass with the weights as constants, which lets
TensorFlow fold batch-norm into the convolutions and oneDNN keep its re-laid-out weights instead of
redoing that on every call (a quarter of a float32 call's time on this app's CPU). Freezing costs
seconds, so by default the predictor turns ready on the plain traced function and swaps the frozen one
in from a background thread once it is built, warmed and checked.

Faster still on a CPU is OpenVINO (aisight.ov_backend), used when the artifact holds an OpenVINO IR
converted from its model.keras: AISIGHT_BACKEND=auto (the default) picks it unless the runtime or the IR
is missing or an NVIDIA GPU is present; ``openvino`` insists on it; ``tensorflow`` never uses it. On
OpenVINO the predictor is ready without TensorFlow; the Keras model (for Grad-CAM) loads afterwards, in
the background. See docs/performance.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from aisight import tf_backend
from aisight.artifact import ArtifactError, load_model, read_card
from aisight.batching import BatcherClosed, MicroBatcher
from aisight.precision import PRECISIONS, Choice, bf16_native, checked, choose_openvino
from aisight.preprocess import DEFAULT_PREPROCESSING, INPUT_SHAPE

log = logging.getLogger(__name__)

FREEZE_MODES = ("background", "sync", "off")
BACKENDS = ("auto", "openvino", "tensorflow")
DEFAULT_MAX_BATCH = 8
DEFAULT_WAIT_MS = 3.0


class ModelNotReady(RuntimeError):
    """Raised when a prediction is asked for before the model loaded, or after loading failed."""


class Predictor:
    """The served model: its card, its compiled inference function and its readiness state.

    State goes ``loading`` -> ``ready`` (model loaded and a warm-up prediction answered) or
    ``failed`` (the reason is kept in ``error`` and logged); predictions are refused unless ready.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        precision: str | None = None,
        freeze: str | None = None,
        backend: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_batch = (
            max_batch if max_batch is not None else _env_number("AISIGHT_BATCH_MAX", DEFAULT_MAX_BATCH, int)
        )
        self.max_wait_ms = (
            max_wait_ms if max_wait_ms is not None else _env_number("AISIGHT_BATCH_WAIT_MS", DEFAULT_WAIT_MS, float)
        )
        if self.max_batch < 1:
            raise ValueError(f"AISIGHT_BATCH_MAX must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"AISIGHT_BATCH_WAIT_MS must be >= 0, got {self.max_wait_ms}")
        precision = (precision or os.environ.get("AISIGHT_PRECISION") or "auto").strip().lower()
        if precision not in PRECISIONS:
            raise ValueError(f"AISIGHT_PRECISION must be one of {PRECISIONS}, got {precision!r}")
        # Asked for; once loaded, what the model computes in: float32, bf16 or int8 (aisight.precision).
        self.precision = precision
        self.precision_choice: Choice | None = None
        freeze = (freeze or os.environ.get("AISIGHT_FREEZE") or "background").strip().lower()
        if freeze not in FREEZE_MODES:
            raise ValueError(f"AISIGHT_FREEZE must be one of {FREEZE_MODES}, got {freeze!r}")
        self.freeze = freeze
        backend = (backend or os.environ.get("AISIGHT_BACKEND") or "auto").strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"AISIGHT_BACKEND must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend  # once loaded: "openvino" or "tensorflow", the one that answers
        # Which function answers: "openvino", or TensorFlow's "traced" (weights as variables) or "frozen".
        self.graph = "none"
        self.freeze_seconds: float | None = None
        self.state = "loading"
        self.error: str | None = None
        self.card: dict[str, Any] | None = None
        self.model = None
        self.load_seconds: float | None = None
        self.device = "cpu"
        self._infer = None
        self._concrete = None
        self._freezer: threading.Thread | None = None
        self._batcher: MicroBatcher | None = None
        self._buckets: tuple[int, ...] = _buckets(self.max_batch)
        self._lock = threading.Lock()
        self._keras_lock = threading.Lock()
        self._explain_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def threshold(self) -> float:
        if self.card is None:
            raise ModelNotReady(self.error or "model not loaded")
        return float(self.card["threshold"])

    @property
    def preprocessing(self) -> str:
        """How a photo becomes this model's input (the card's ``preprocessing``; ``resize`` for 1.0.0)."""
        return (self.card or {}).get("preprocessing", DEFAULT_PREPROCESSING)

    def load(self) -> Predictor:
        """Load card and model, compile the inference step and warm it up; never raises."""
        start = time.perf_counter()
        try:
            card = read_card(self.model_dir)
            if self._load_openvino(card, start):
                return self
            self.backend = "tensorflow"
            with tf_backend.without_pyplot():  # the first TensorFlow/Keras import in a serving process
                self.device = tf_backend.device_name()
            t_import = time.perf_counter()
            self.precision = self._resolve_precision(card, self.device)
            if self.device.startswith("gpu") and self.precision == "float32":
                tf_backend.exact_float32()
            model = tf_backend.load_bf16(self.model_dir) if self.precision == "bf16" else load_model(self.model_dir)
            shape = tuple(model.input_shape[1:])
            if shape != INPUT_SHAPE:
                raise ArtifactError(f"model input shape {shape} != {INPUT_SHAPE}")
            if tuple(model.output_shape[1:]) != (2,):
                raise ArtifactError(f"model output shape {model.output_shape[1:]} != (2,)")
            self.card, self.model = card, model
            t_model = time.perf_counter()
            self._infer, self._concrete = tf_backend.compile_forward(model)
            self.graph = "traced"
            self._buckets = _buckets(self.max_batch)
            # sync: the frozen graph, warmed on every batch size, answers from the start (if it builds).
            if not (self.freeze == "sync" and self._try_freeze()):
                # background: only batch 1 before ready (cold start); the frozen graph that takes over
                # seconds later is warmed on every size. off: every size now, the traced function stays.
                self._warm(self._buckets[:1] if self.freeze == "background" else self._buckets)
        except Exception as exc:  # any failure leaves the process serving, but not ready
            self.state, self.error = "failed", str(exc)
            log.error("model load failed from %s: %s", self.model_dir, exc)
            return self
        end = self._become_ready(start)
        log.info(
            "model %s %s ready on %s (%s, batches up to %d, wait %.1f ms) in %.2fs: import %.2fs, model %.2fs, "
            "trace + warm-up %.2fs", card["name"], card["version"], self.device, self.precision,
            self.max_batch, self.max_wait_ms, self.load_seconds, t_import - start, t_model - t_import, end - t_model,
        )
        if self.freeze == "background":
            # Not a daemon: a process that exits while TensorFlow is inside a daemon thread aborts
            # ("terminate called ..."); the interpreter waits for this one instead (seconds at most).
            self._freezer = threading.Thread(target=self._freeze_in_background, name="aisight-freeze")
            self._freezer.start()
        return self

    def _load_openvino(self, card: dict[str, Any], start: float) -> bool:
        """Serve through OpenVINO if the backend setting and this artifact allow it; False: use TensorFlow.

        Raises when AISIGHT_BACKEND=openvino and OpenVINO cannot serve (load() turns that into "failed").
        """
        from aisight import ov_backend

        if self.backend == "tensorflow":
            return False
        if self.backend == "auto":
            why = (
                "OpenVINO is not installed" if not ov_backend.available()
                else f"{self.model_dir} has no OpenVINO IR" if not ov_backend.has_ir(self.model_dir)
                else "an NVIDIA GPU is present (TensorFlow uses it)" if _nvidia_gpu_present()
                else None
            )
            if why:
                log.info("serving with TensorFlow: %s", why)
                return False
        t_import = time.perf_counter()
        try:
            self.precision_choice, model = choose_openvino(self.model_dir, card, self.precision, self.max_batch)
        except Exception as exc:
            if self.backend == "openvino":
                raise
            log.warning("OpenVINO not used, serving with TensorFlow: %s", exc)
            return False
        self.card, self.precision, self.device = card, model.precision, "cpu"
        self.backend, self.graph, self._infer = "openvino", "openvino", model
        self._buckets = _buckets(self.max_batch)
        t_model = time.perf_counter()
        self._warm(self._buckets)  # cheap with OpenVINO, so every size before ready
        end = self._become_ready(start)
        log.info(
            "model %s %s ready on cpu with OpenVINO %s (%s, %d threads, batches up to %d, wait %.1f ms) in %.2fs: "
            "card %.2fs, IR and precision %.2fs, warm-up %.2fs", card["name"], card["version"],
            model.version.split("-")[0], model.precision, model.threads, self.max_batch, self.max_wait_ms,
            self.load_seconds, t_import - start, t_model - t_import, end - t_model,
        )
        return True

    def _resolve_precision(self, card: dict[str, Any], device: str) -> str:
        """float32 or bf16 for TensorFlow on ``device``, from the setting, the hardware and the card.

        ``bf16`` is used where the hardware computes it natively; ``auto`` (the default) also needs the
        model card to record a bf16 check within the bound (``bench/precision.py --write-card``). int8
        is OpenVINO's only. Not timed: TensorFlow serves on GPUs, where bf16 is the fast path.
        """
        if self.precision in ("float32", "int8"):
            if self.precision == "int8":
                log.warning("AISIGHT_PRECISION=int8 ignored: only the OpenVINO path serves int8; float32")
            self.precision_choice = Choice("float32", "setting", f"AISIGHT_PRECISION={self.precision} (TensorFlow)")
            return "float32"
        if not bf16_native(device):
            if self.precision == "bf16":
                log.warning("AISIGHT_PRECISION=bf16 ignored: %s has no native bf16 (AMX/AVX512-BF16); float32", device)
            self.precision_choice = Choice("float32", "rule", f"{device} has no native bf16")
            return "float32"
        if self.precision == "bf16":
            self.precision_choice = Choice("bf16", "setting", "AISIGHT_PRECISION=bf16")
            return "bf16"
        ok, why = checked(card, "bf16")
        log.info("precision auto: %s (%s)", "bf16" if ok else "float32", why)
        self.precision_choice = Choice("bf16" if ok else "float32", "rule", why)
        return "bf16" if ok else "float32"

    def _warm(self, sizes) -> None:
        """Run each batch size once (a shape's first call builds its kernels); refuse a non-finite answer."""
        for size in sizes:
            warm = self._run(np.zeros((size, *INPUT_SHAPE), np.uint8))
            if not np.all(np.isfinite(warm)):
                raise ArtifactError("warm-up prediction is not finite")

    def _become_ready(self, start: float) -> float:
        """Start the micro-batcher and turn ready; return the time, for the log line."""
        if self.max_batch > 1:
            self._batcher = MicroBatcher(self._run, max_batch=self.max_batch, max_wait=self.max_wait_ms / 1000)
        end = time.perf_counter()
        self.load_seconds = end - start
        self.state = "ready"
        return end

    def explain_model(self):
        """The Keras model (what Grad-CAM differentiates); with OpenVINO serving, loaded on first use.

        The app asks for it in the background as soon as the predictor is ready, so a request only
        waits for it in the first seconds after start. Raises ModelNotReady before the predictor loaded.
        """
        if self.model is not None:
            return self.model
        if self.card is None:
            raise ModelNotReady(self.error or "model is still loading")
        with self._keras_lock:  # one load, however many threads ask at once
            if self.model is None:
                if self._explain_error is not None:  # failed once: it would fail again, seconds each time
                    raise ArtifactError(f"the Keras model for explanations did not load: {self._explain_error}")
                t0 = time.perf_counter()
                try:
                    with tf_backend.without_pyplot():
                        model = load_model(self.model_dir)
                except Exception as exc:
                    self._explain_error = str(exc)
                    raise
                self.model = model
                log.info("Keras model loaded for explanations in %.2fs", time.perf_counter() - t0)
        return self.model

    def _freeze(self) -> None:
        """Build the frozen graph, warm it on every batch size, check it against the traced one, use it."""
        t0 = time.perf_counter()
        frozen = tf_backend.freeze(self._concrete)
        probe = np.random.default_rng(0).integers(0, 256, (2, *INPUT_SHAPE), dtype=np.uint8).astype(np.float32)
        for size in self._buckets:
            warm = frozen(np.zeros((size, *INPUT_SHAPE), np.float32))
            if not np.all(np.isfinite(warm)):
                raise ArtifactError("frozen graph: warm-up prediction is not finite")
        # Folding batch-norm into the weights rounds differently; anything beyond that is a broken graph.
        with self._lock:
            reference = self._infer(probe)
        diff = float(np.abs(frozen(probe) - reference).max())
        limit = 2e-2 if self.precision == "bf16" else 1e-3
        if not diff <= limit:
            raise ArtifactError(f"frozen graph answers differ from the traced one by {diff:.3g} (> {limit})")
        self._infer = frozen  # one attribute store: a batch runs wholly on one function or the other
        self.graph = "frozen"
        self._concrete = None
        tf_backend.release_memory()
        self.freeze_seconds = time.perf_counter() - t0
        log.info("frozen graph in use after %.2fs (largest difference from the traced one %.2g)",
                 self.freeze_seconds, diff)

    def _try_freeze(self) -> bool:
        """Freeze, or say why not: the traced function keeps answering (slower, never wrong)."""
        try:
            self._freeze()
        except Exception as exc:
            log.warning("frozen graph not used, the traced function keeps answering: %s", exc)
            return False
        return True

    def _freeze_in_background(self) -> None:
        if self._try_freeze():
            return
        try:  # the traced function stays: warm the sizes load() left out
            for size in self._buckets[1:]:
                self._run(np.zeros((size, *INPUT_SHAPE), np.uint8))
        except Exception as exc:  # a broken model shows on the request path too, answered there
            log.warning("warm-up of the traced function failed: %s", exc)

    def warm_batches(self) -> list[int]:
        """The batch sizes the model runs (others are padded up to one), each run once before use."""
        return list(self._buckets)

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
        """Return P(diseased) for one 128x128x3 uint8 image (the request path; micro-batched)."""
        if not self.ready:
            raise ModelNotReady(self.error or "model is still loading")
        image = np.asarray(image)
        if image.shape != INPUT_SHAPE:
            raise ValueError(f"expected one image of shape {INPUT_SHAPE}, got {image.shape}")
        batcher = self._batcher
        if batcher is None:
            return float(self._run(image[None])[0])
        try:
            return float(batcher.submit(image))
        except BatcherClosed:
            raise ModelNotReady("the model is shutting down") from None

    def close(self) -> None:
        """Stop the batcher (images already queued are answered); later predictions raise ModelNotReady."""
        if self.state == "ready":
            self.state, self.error = "closed", "the model was closed"
        if self._batcher is not None:
            self._batcher.close()

    def _run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        batch = images.astype(np.float32, copy=False)
        # Pad up to a warmed batch size: a batch size the model has not seen costs a slow first call
        # (oneDNN builds kernels per shape), which would land in some request's latency.
        size = next((b for b in self._buckets if b >= n), n)
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), np.float32)])
        # One inference at a time per process: TF already uses every core for one batch, and
        # interleaving threads only adds contention (the batcher is the one caller on the request path).
        with self._lock:
            probs = self._infer(batch)
        return np.asarray(probs, dtype=np.float64)[:n, 1]


def _env_number(name: str, default, kind):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None

def _buckets(max_batch: int) -> tuple[int, ...]:
    """Every size up to 8, then powers of two, then ``max_batch``: the batch sizes the model runs.

    Small batches, the common ones on a CPU, run as they are (a padded image costs as much as a real
    one); above 8 a batch is padded to the next size, wasting at most half of it, so a large
    ``AISIGHT_BATCH_MAX`` (GPU) does not mean warming up dozens of sizes.
    """
    sizes = list(range(1, min(max_batch, 8) + 1))
    b = 16
    while b < max_batch:
        sizes.append(b)
        b *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


def _nvidia_gpu_present() -> bool:
    """Whether this machine exposes an NVIDIA GPU (its device file), without importing TensorFlow."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()
