"""On a GPU machine: do TensorFlow's GPU paths answer as the CPU does? Writes gpu_check.json.

The reference is OpenVINO float32 on the CPU (what the app serves there, equal to Keras within 1e-4).
Each GPU path runs the bundled model on the same photos: TensorFlow's traced function, the same with XLA
(``jit_compile=True``), mixed bf16, and TF-TRT where TensorRT is installed. float32 paths must agree
within 1e-4 (TF32 is off, as the app sets it for float32 on a GPU: aisight.tf_backend.exact_float32);
bf16 is recorded, not held to that bound.

    PYTHONPATH=. python bench/gpu_check.py --model models/2.0.0 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aisight.artifact import DEFAULT_MODEL_DIR  # noqa: E402  (the bundled model)

FLOAT32_BOUND = 1e-4


def photos(n: int) -> np.ndarray:
    """Model inputs of real photos where the shared data is present, else generated ones."""
    from aisight.preprocess import preprocess_bytes
    from bench.serve import DEFAULT_DATA, real_photos

    jpegs, _ = real_photos(DEFAULT_DATA, n)
    return np.stack([preprocess_bytes(j) for j in jpegs]).astype(np.float32)


def timed(fn, x: np.ndarray) -> tuple[np.ndarray, float]:
    fn(x[:1])
    t = time.perf_counter()
    out = np.asarray(fn(x))
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--out", required=True)
    ap.add_argument("--photos", type=int, default=64)
    args = ap.parse_args(argv)

    import tensorflow as tf

    from aisight import ov_backend
    from aisight.artifact import load_model

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("no GPU visible to TensorFlow: nothing to check", file=sys.stderr)
        return 2
    from aisight.tf_backend import exact_float32

    exact_float32()
    x = photos(args.photos)
    ref = ov_backend.OpenVINOModel(args.model, "float32")(x)[:, 1]
    model = load_model(args.model)
    paths = {
        "tf-float32": tf.function(lambda b: model(b, training=False)),
        "tf-float32-xla": tf.function(lambda b: model(b, training=False), jit_compile=True),
    }
    from aisight.tf_backend import load_bf16

    bf16 = load_bf16(args.model)
    paths["tf-bf16"] = tf.function(lambda b: tf.cast(bf16(b, training=False), tf.float32))
    result: dict = {"gpu": [g.name for g in gpus], "photos": len(x), "reference": "openvino float32 on the CPU",
                    "float32_bound": FLOAT32_BOUND, "paths": {}}
    try:
        from tensorflow.python.compiler.tensorrt import trt_convert  # noqa: F401  needs TensorRT's libraries
        result["tf_trt"] = "available, not converted by this script (TensorRT engines are built per GPU model)"
    except Exception as exc:  # noqa: BLE001 - any import failure means no TF-TRT here
        result["tf_trt"] = f"not available: {exc}"
    for name, fn in paths.items():
        out, seconds = timed(lambda b, fn=fn: fn(tf.constant(b)).numpy(), x)
        diff = float(np.abs(out[:, 1] - ref).max())
        ok = diff <= FLOAT32_BOUND if "float32" in name else None
        result["paths"][name] = {"max_abs_diff": diff, "within_bound": ok, "seconds_for_all": seconds}
        print(f"{name}: largest difference from the CPU {diff:.2g}"
              + ("" if ok is None else f" ({'within' if ok else 'OUTSIDE'} {FLOAT32_BOUND:g})"), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(p["within_bound"] is not False for p in result["paths"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
