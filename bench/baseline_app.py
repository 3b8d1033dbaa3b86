"""The paper's way of serving, as the benchmark's baseline: Flask, PIL resize, ``model.predict`` per request.

One process, Flask's development server with ``threaded=True`` (a thread per connection), the full
photo decoded, ``.convert('RGB').resize((128, 128))`` and ``model.predict(x)`` on every request. The
answers have the same route and field as the app (``POST /api/v1/predict``, field ``image``), and
``/readyz`` says when the model has loaded, so bench/serve.py drives both servers the same way.

    PYTHONPATH=. .venv/bin/python bench/baseline_app.py --model DIR --port 8001
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def create_app(model_dir: str) -> Flask:
    """The baseline app; its model loads in a thread so /readyz can answer 503 meanwhile."""
    app = Flask(__name__)
    state: dict = {"model": None}

    def load() -> None:
        import keras

        import aisight.layers  # noqa: F401  the artifact's input-scaling layer

        model = keras.saving.load_model(Path(model_dir) / "model.keras", compile=False)
        model.predict(np.zeros((1, 128, 128, 3), np.float32), verbose=0)  # as a paper-era app would warm up
        state["model"] = model

    threading.Thread(target=load, daemon=True).start()

    @app.get("/readyz")
    def readyz():
        ready = state["model"] is not None
        return jsonify(status="ready" if ready else "loading"), 200 if ready else 503

    @app.post("/api/v1/predict")
    def predict():
        model = state["model"]
        if model is None:
            return jsonify(error="loading"), 503
        img = Image.open(request.files["image"]).convert("RGB").resize((128, 128))
        x = np.asarray(img, dtype=np.float32)[None]
        prob = model.predict(x, verbose=0)[0, 1]
        return jsonify(label="diseased" if prob >= 0.5 else "healthy", probability=float(prob))

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model artifact folder (model.keras)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log: it would cost the baseline time
    create_app(args.model).run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
