"""TensorFlow's serving path: trace the forward pass, freeze it, load a model under bf16.

Used by aisight.predictor where OpenVINO does not serve (an NVIDIA GPU, no IR, AISIGHT_BACKEND=tensorflow),
and by Grad-CAM, which needs the Keras model's gradients.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from aisight.artifact import ArtifactError, load_model
from aisight.preprocess import INPUT_SHAPE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def without_pyplot():
    """Import TensorFlow/Keras without matplotlib.pyplot, about 20% of their import time.

    Keras imports pyplot at start only for a plotting helper (keras.visualization) that serving never
    uses, and falls back to ``plt = None`` when the import fails. Blocked only while Keras first
    imports, and only if nothing loaded pyplot before: later imports of pyplot work as usual.
    """
    if "matplotlib.pyplot" in sys.modules or "keras" in sys.modules:
        yield
        return
    sys.modules["matplotlib.pyplot"] = None  # makes `import matplotlib.pyplot` raise ImportError
    try:
        yield
    finally:
        if "matplotlib.pyplot" in sys.modules and sys.modules["matplotlib.pyplot"] is None:
            del sys.modules["matplotlib.pyplot"]


def release_memory() -> None:
    """Hand the heap freed by freezing back to the OS (about 1 GB of copies for Xception).

    Freezing makes several temporary copies of the weights; glibc keeps freed memory in its arenas,
    where it would count against the pod's memory limit for the life of the process.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def compile_forward(model):
    """Trace the model's forward pass once for any batch size (much faster than model.predict).

    Returns the callable and its concrete function (what ``_freeze`` freezes).
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32)])
    def infer(x):
        return tf.cast(model(x, training=False), tf.float32)

    return (lambda batch: infer(tf.constant(batch)).numpy()), infer.get_concrete_function()


def freeze(concrete):
    """The concrete function with its variables turned into constants, as a callable on numpy batches."""
    import tensorflow as tf

    # TensorFlow's own freezing (what tf.saved_model and the TFLite converter use); there is no public alias.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(concrete)
    return lambda batch: frozen(tf.constant(batch))[0].numpy()

# Layers that stay float32 under bf16: the input scaling (0..255 has few bf16 steps) and the softmax,
# as Keras' mixed-precision guide advises for the output.
_FLOAT32_LAYERS = ("preprocess", "prediction")


def load_bf16(model_dir: str | Path):
    """Load the artifact's model with its layers under Keras' mixed_bfloat16 policy, built once.

    The saved config is rewritten before the model is built (not built in float32 and then cloned, which
    costs a second build at every start); weights stay float32 variables, cast to bf16 as they are used.
    """
    import io
    import json
    import zipfile

    import aisight.layers  # noqa: F401  registers FamilyPreprocess for deserialization
    from aisight.artifact import MODEL_FILE

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as src:
            config = json.loads(src.read("config.json"))
            for layer in config["config"]["layers"]:
                if layer.get("class_name") != "InputLayer" and layer["config"].get("name") not in _FLOAT32_LAYERS:
                    layer["config"]["dtype"] = "mixed_bfloat16"
            patched = io.BytesIO()
            with zipfile.ZipFile(patched, "w", zipfile.ZIP_STORED) as dst:
                for info in src.infolist():
                    data = json.dumps(config) if info.filename == "config.json" else src.read(info.filename)
                    dst.writestr(info.filename, data)
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"model file unreadable: {path}: {exc}") from exc
    patched.seek(0)
    try:
        return _load_from_fileobj(patched)
    except (ImportError, AttributeError, TypeError) as exc:  # a Keras without that loader: build twice
        log.info("bf16 in one build not available (%s): loading float32, then cloning", exc)
        return _bf16_clone(load_model(model_dir))
    except Exception as exc:  # as in artifact.load_model: any failure means the file does not fit
        raise ArtifactError(f"model file unreadable as bf16: {path}: {exc}") from exc


def _load_from_fileobj(fileobj):
    """Load a .keras archive from an open file (keras.saving.load_model takes only paths).

    The loader under it does (Keras 3.x), with the weights read in memory, which is also much faster
    than ``model.load_weights`` on a .keras zip.
    """
    from keras.src.saving import saving_lib

    return saving_lib.load_model(fileobj, compile=False)


def _bf16_clone(model):
    """Rebuild a loaded float32 ``model`` under mixed_bfloat16 with the same weights (the slow way)."""
    import keras

    def clone(layer):
        cfg = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer) and layer.name not in _FLOAT32_LAYERS:
            cfg["dtype"] = "mixed_bfloat16"
        return layer.__class__.from_config(cfg)

    net = keras.models.clone_model(model, clone_function=clone)
    net.set_weights(model.get_weights())
    return net


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"gpu ({len(gpus)})" if gpus else "cpu"


def exact_float32() -> None:
    """Make float32 mean float32 on a GPU: TensorFlow otherwise runs float32 matmuls and convolutions in
    TF32 (10-bit mantissa) on Ampere and later, which moves answers by about 1e-3 from the CPU's."""
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
