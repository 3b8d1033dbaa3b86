"""The staged replacement model (models/2.0.0) is a real, loadable artifact with its measurements."""

from __future__ import annotations

import numpy as np

from aisight.artifact import read_card
from aisight.predictor import Predictor
from aisight.preprocess import preprocess_bytes
from tests.conftest import ROOT, fundus_jpeg

STAGED = ROOT / "models" / "2.0.0"


def test_the_staged_model_loads_and_answers_on_its_own_preprocessing():
    card = read_card(STAGED)
    assert card["version"] == "2.0.0" and card["preprocessing"] == "fundus-v2" and 0 < card["threshold"] < 1
    # The card carries its per-source test figures (evaluate --write-card) for the result page.
    assert {"odir", "eyepacs_any", "eyepacs_moderate", "raw_dr"} <= set(card["evaluation"]["tasks"])
    p = Predictor(STAGED, max_batch=1, backend="tensorflow", freeze="off").load()
    try:
        assert p.ready, p.error
        x = np.stack([preprocess_bytes(fundus_jpeg(diseased=bool(i), seed=i), preprocessing="fundus-v2")
                      for i in range(2)])
        prob = p.predict(x)
        assert prob.shape == (2,) and np.all((prob >= 0) & (prob <= 1))
    finally:
        p.close()
