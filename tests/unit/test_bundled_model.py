"""The bundled model (models/2.0.0) and the one it replaced (model/, 1.0.0) are real artifacts."""

from __future__ import annotations

import numpy as np

from aisight.artifact import DEFAULT_MODEL_DIR, read_card
from aisight.predictor import Predictor
from aisight.preprocess import preprocess_bytes
from tests.conftest import ROOT, fundus_jpeg

BUNDLED = ROOT / "models" / "2.0.0"
PREVIOUS = ROOT / "model"


def test_the_app_serves_2_0_0_by_default():
    assert DEFAULT_MODEL_DIR == BUNDLED
    card = read_card(BUNDLED)
    assert card["version"] == "2.0.0" and card["preprocessing"] == "fundus-v2" and 0 < card["threshold"] < 1
    # What the result page headlines: per-source figures on unseen patients, a left-out source, a warning.
    assert {"odir", "eyepacs_any", "eyepacs_moderate", "raw_dr"} <= set(card["evaluation"]["tasks"])
    assert all(t["auc_ci95"][0] <= t["auc"] <= t["auc_ci95"][1] for t in card["evaluation"]["tasks"].values())
    assert card["leave_one_source_out"] and card["warning"]
    # Against 1.0.0 the new model must not be worse at telling the collection apart (the shortcut probe).
    probe = card["evaluation"]["shortcut_probe"]["healthy"]["balanced_accuracy"]
    assert probe < read_card(PREVIOUS)["evaluation"]["shortcut_probe"]["healthy"]["balanced_accuracy"]


def test_both_models_load_and_answer_on_their_own_preprocessing():
    for folder in (BUNDLED, PREVIOUS):
        card = read_card(folder)
        p = Predictor(folder, max_batch=1, backend="tensorflow", freeze="off").load()
        try:
            assert p.ready, p.error
            how = card.get("preprocessing", "resize")
            x = np.stack([preprocess_bytes(fundus_jpeg(diseased=bool(i), seed=i), preprocessing=how)
                          for i in range(2)])
            prob = p.predict(x)
            assert prob.shape == (2,) and np.all((prob >= 0) & (prob <= 1)), folder
        finally:
            p.close()
