"""The CPU fast path: the artifact's model as an OpenVINO IR (model.xml + model.bin), run by OpenVINO.

Measured on this app's CPU (docs/performance.md), OpenVINO runs the same Xception 2-3x faster than
TensorFlow's frozen graph, at batch 1 and at batch 8, in float32 and in bf16 (AMX), and it starts in a
fraction of a second: serving becomes ready without importing TensorFlow at all. TensorFlow is still
loaded afterwards, in the background, for Grad-CAM, which needs gradients.

``export`` converts a Keras model (frozen forward pass -> OpenVINO's TensorFlow front end) and records
in the IR the SHA-256 of the model.keras it was converted from; ``load`` refuses an IR whose recorded
checksum does not match the model.keras beside it, so a retrained model can never be served through a
stale conversion.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from aisight.artifact import MODEL_FILE, ArtifactError
from aisight.preprocess import INPUT_SHAPE

log = logging.getLogger(__name__)

IR_FILE = "model.xml"  # and model.bin beside it (the weights, float32)
# The same model quantised to int8 by NNCF (python -m training export-openvino --int8), with the card's
# record of what it changes (precision_check.int8); served only where that record allows it.
INT8_IR_FILE = "model_int8.xml"
_RT_KEY = "aisight"  # the IR's runtime-info section holding what it was converted from


def keras_sha256(model_dir: str | Path) -> str:
    """SHA-256 of the artifact's model.keras (what an IR must have been converted from)."""
    h = hashlib.sha256()
    with (Path(model_dir) / MODEL_FILE).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available() -> bool:
    """Whether the OpenVINO runtime can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def has_ir(model_dir: str | Path, name: str = IR_FILE) -> bool:
    """Whether ``model_dir`` holds an OpenVINO IR ``name`` (model.xml and model.bin by default)."""
    d = Path(model_dir)
    return (d / name).is_file() and (d / name).with_suffix(".bin").is_file()


def export(model, model_dir: str | Path, *, check_images: np.ndarray | None = None) -> dict[str, Any]:
    """Convert ``model`` (the Keras model saved as ``model_dir``/model.keras) to ``model_dir``/model.xml.

    The IR takes float32 images (n, 128, 128, 3) of 0..255 values, as the Keras model does, and returns
    its softmax (n, 2) in float32; its answers are checked against Keras' on ``check_images`` (random
    images by default). Returns what was recorded: the checksum, OpenVINO's version and the largest
    difference found.
    """
    import openvino as ov
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model_dir = Path(model_dir)

    @tf.function(input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32, name="image")])
    def forward(x):
        return tf.cast(model(x, training=False), tf.float32)

    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    ir = ov.convert_model(frozen.graph.as_graph_def())
    if len(ir.inputs) != 1 or len(ir.outputs) < 1:
        raise ArtifactError(f"OpenVINO conversion gave {len(ir.inputs)} inputs and {len(ir.outputs)} outputs")
    if check_images is None:
        check_images = np.random.default_rng(0).integers(0, 256, (4, *INPUT_SHAPE)).astype(np.float32)
    check_images = np.asarray(check_images, np.float32)
    reference = np.asarray(forward(tf.constant(check_images)))
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    diff = float(np.abs(compiled(check_images)[0] - reference).max())
    if not diff <= 1e-4:
        raise ArtifactError(f"OpenVINO IR answers differ from Keras by {diff:.3g} (> 1e-4)")
    info = {"keras_sha256": keras_sha256(model_dir), "openvino_version": ov.get_version(), "max_abs_diff": diff}
    stamp(ir, info)
    ov.save_model(ir, model_dir / IR_FILE, compress_to_fp16=False)  # float32 weights: exact float32 serving
    return info


def export_dir(model_dir: str | Path, *, check_images: np.ndarray | None = None) -> dict[str, Any]:
    """Convert the artifact's own model.keras (as saved: float32) to an IR beside it; see ``export``."""
    from aisight.artifact import load_model

    return export(load_model(model_dir), model_dir, check_images=check_images)


def remove_ir(model_dir: str | Path) -> None:
    """Delete the IRs from ``model_dir`` (a new model.keras makes them stale)."""
    for xml in (IR_FILE, INT8_IR_FILE):
        for name in (xml, Path(xml).with_suffix(".bin").name):
            (Path(model_dir) / name).unlink(missing_ok=True)


def stamp(ir, info: dict[str, Any]) -> None:
    """Record ``info`` (the model.keras checksum first of all) in the IR's runtime info."""
    for key, value in info.items():
        ir.set_rt_info(str(value), [_RT_KEY, key])


class OpenVINOModel:
    """A compiled IR: call it on a batch (n, 128, 128, 3) of 0..255 values to get the softmax (n, 2).

    One call runs at a time (the caller, the predictor, already serialises them); a call releases
    the GIL, so request threads keep decoding meanwhile.
    """

    def __init__(self, model_dir: str | Path, precision: str = "float32", threads: int | None = None) -> None:
        import openvino as ov

        model_dir = Path(model_dir)
        name = INT8_IR_FILE if precision == "int8" else IR_FILE
        path = model_dir / name
        if not has_ir(model_dir, name):
            raise ArtifactError(f"no OpenVINO IR {name} in {model_dir} (make it with: python -m training "
                                f"export-openvino{' --int8' if precision == 'int8' else ''})")
        core = ov.Core()
        try:
            ir = core.read_model(path)
            recorded = ir.get_rt_info([_RT_KEY, "keras_sha256"]).astype(str)
        except Exception as exc:  # a damaged or foreign IR: say so, the TensorFlow path still works
            raise ArtifactError(f"OpenVINO IR unreadable or not converted by aisight: {path}: {exc}") from exc
        actual = keras_sha256(model_dir)
        if recorded != actual:
            raise ArtifactError(
                f"{path} was converted from another model.keras (sha256 {recorded[:12]}..., this one is "
                f"{actual[:12]}...): re-export it with python -m training export-openvino"
            )
        config: dict[str, Any] = {
            # Explicit, because OpenVINO defaults to bf16 on AMX CPUs: float32 must mean float32 (and int8
            # means the quantised layers in int8, the rest in float32, as checked).
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time over every thread: the batcher's way
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(ir, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self.precision = precision
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.version = ov.get_version()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Return the softmax (n, 2) for ``batch``."""
        self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        return self._request.get_output_tensor(0).data.copy()


def infer_threads(environ: dict[str, str] | None = None) -> int | None:
    """Threads one model call may use: AISIGHT_INFER_THREADS, else TF_NUM_INTRAOP_THREADS, else OpenVINO's."""
    env = os.environ if environ is None else environ
    for name in ("AISIGHT_INFER_THREADS", "TF_NUM_INTRAOP_THREADS"):
        value = env.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got {value!r}") from None
            if n > 0:
                return n
    return None
