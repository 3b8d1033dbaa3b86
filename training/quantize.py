"""int8 for the OpenVINO path: post-training quantisation with NNCF, and the check that decides its use.

``quantize_int8`` calibrates on photos of patients the model was trained or tuned on (a few hundred,
as NNCF advises), writes ``model_int8.xml`` beside the float32 IR, then runs both IRs on every photo of
``data`` that the model never saw and records in the model card, per source and pooled, the accuracy
and AUC change and how many answers change side of the threshold (``precision_check.int8``). The app
serves int8 only where that record's accuracy and AUC changes are within ``INT8_MAX_ACCURACY_CHANGE``
points, pooled and for every source with enough photos to measure a point, and where timing at start shows
it is the fastest precision.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aisight.precision import MAX_ACCURACY_CHANGE as INT8_MAX_ACCURACY_CHANGE  # the bound the app applies

# A source needs this many photos for one changed answer to move its accuracy by at most the bound;
# smaller sources are recorded but cannot fail the check on their own (the pooled figure covers them).
MIN_PHOTOS_PER_SOURCE = 100


def _probs(model, images: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([model(images[i : i + batch].astype(np.float32))[:, 1]
                           for i in range(0, len(images), batch)]).astype(np.float64)


def _change(labels: np.ndarray, ref: np.ndarray, new: np.ndarray, threshold: float) -> dict[str, Any]:
    from training.metrics import classification_metrics

    a, b = classification_metrics(labels, ref, threshold), classification_metrics(labels, new, threshold)
    auc = 100 * (b["auc"] - a["auc"]) if np.isfinite(a["auc"]) and np.isfinite(b["auc"]) else None
    return {
        "n": int(len(labels)),
        "accuracy_float32": round(float(a["accuracy"]), 4),
        "accuracy_change_points": round(100 * float(b["accuracy"] - a["accuracy"]), 3),
        "auc_change_points": None if auc is None else round(float(auc), 3),
        "answers_changed": int(((ref >= threshold) != (new >= threshold)).sum()),
        "max_abs_prob_change": round(float(np.abs(new - ref).max()), 4) if len(ref) else 0.0,
    }


def int8_record(sources: list[str], labels: np.ndarray, ref: np.ndarray, new: np.ndarray,
                threshold: float) -> dict[str, Any]:
    """What int8 changes against float32: pooled and per source, and whether that is within the bound."""
    src = np.asarray(sources)
    per_source = {s: _change(labels[src == s], ref[src == s], new[src == s], threshold) for s in sorted(set(sources))}
    pooled = _change(labels, ref, new, threshold)
    return {**pooled, "per_source": per_source, **judge(pooled, per_source),
            "reference": "openvino float32 (equal to Keras within 1e-4)"}


def judge(pooled: dict[str, Any], per_source: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst accuracy and AUC change over the pooled figures and every source large enough to
    measure a point, and whether both are within the bound (a ranking that moves is a change too)."""
    judged = [pooled] + [r for r in per_source.values() if r["n"] >= MIN_PHOTOS_PER_SOURCE]
    acc = max(abs(r["accuracy_change_points"]) for r in judged)
    auc = max((abs(r["auc_change_points"]) for r in judged if r["auc_change_points"] is not None), default=0.0)
    return {
        "worst_accuracy_change_points": acc,
        "worst_auc_change_points": auc,
        "within_limit": bool(acc < INT8_MAX_ACCURACY_CHANGE and auc < INT8_MAX_ACCURACY_CHANGE),
        "limit_points": INT8_MAX_ACCURACY_CHANGE,
    }


# Accuracy control stops reverting layers to float32 once the worst change on validation patients is
# under this many points: half the bound, so that the unseen patients' check has room for its noise.
ACCURACY_CONTROL_DROP = INT8_MAX_ACCURACY_CHANGE / 2


def _worst_change_fn(labels: np.ndarray, sources: list[str], ref: np.ndarray, threshold: float):
    """NNCF's validation function: 100 minus the worst per-source change (points) against float32.

    Items are (image, index); it also returns each item's output, so that NNCF ranks layers by how far
    they move the outputs (a per-photo AUC does not exist)."""
    src = np.asarray(sources)

    def validate(compiled, items) -> tuple[float, list[list[np.ndarray]]]:
        outs, idx = [], []
        for image, i in items:
            outs.append(np.asarray(compiled(image[None].astype(np.float32))[0]))
            idx.append(i)
        idx_a = np.asarray(idx)
        probs = np.array([o[0, 1] for o in outs], dtype=np.float64)
        rec = int8_record(list(src[idx_a]), labels[idx_a], ref[idx_a], probs, threshold)
        return 100.0 - max(rec["worst_accuracy_change_points"], rec["worst_auc_change_points"]), [[o] for o in outs]

    return validate


def _float_layers(model) -> list[str]:
    """Convolutions and matrix products left without an int8 input (kept in float32)."""
    quantized_inputs = set()
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                quantized_inputs.add(target.get_node().get_friendly_name())
    return sorted(op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
                  and op.get_friendly_name() not in quantized_inputs)


def quantize_int8(
    model_dir: str | Path,
    data: str,
    cache_dir: str | Path | None = None,
    calibration: int = 300,
    seed: int = 0,
    log: Callable[[str], None] = print,
    accuracy_control: bool = False,
) -> dict[str, Any]:
    """Write ``model_dir``/model_int8.xml (NNCF, calibrated on seen photos) and record its check in the card.

    With ``accuracy_control`` NNCF keeps in float32 the layers whose int8 moves the answers most, until
    the worst per-source change on the model's *validation* patients is under half the bound (the
    check on unseen patients then judges it as any other int8 IR).
    """
    import nncf
    import openvino as ov

    from aisight import ov_backend
    from aisight.artifact import read_card, write_card
    from training.data import load_arrays, load_sources
    from training.evaluate import seen_parts

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if not ov_backend.has_ir(model_dir):
        log("no float32 IR yet: converting model.keras first")
        ov_backend.export_dir(model_dir)
    preprocessing = card.get("preprocessing", "resize")
    samples = load_sources(data).samples
    trained, val_patients = seen_parts(model_dir, card)  # once: without a split file it re-splits every source
    seen = trained | val_patients
    pool = [s for s in samples if s.patient_id in seen]
    held = [s for s in samples if s.patient_id not in seen]
    if not pool or not held:
        raise ValueError(f"{data}: needs photos of patients the model saw ({len(pool)}) for calibration and "
                         f"of patients it did not see ({len(held)}) for the check")
    rng = np.random.default_rng(seed)
    pick = [pool[i] for i in sorted(rng.choice(len(pool), size=min(calibration, len(pool)), replace=False))]
    x_cal, _, _, _ = load_arrays(pick, cache_dir, preprocessing=preprocessing)
    log(f"calibrating on {len(x_cal)} photos of trained patients")
    ir = ov.Core().read_model(model_dir / ov_backend.IR_FILE)
    calibration_set = nncf.Dataset(list(x_cal), lambda x: x[None].astype(np.float32))
    info: dict[str, Any] = {"keras_sha256": ov_backend.keras_sha256(model_dir), "openvino_version": ov.get_version(),
                            "nncf_version": nncf.__version__, "calibration_photos": len(x_cal)}
    if accuracy_control:
        val = [s for s in pool if s.patient_id in val_patients]
        x_val, y_val, val_kept, _ = load_arrays(val, cache_dir, preprocessing=preprocessing)
        log(f"accuracy control on {len(x_val)} photos of validation patients")
        ref_val = _probs(ov_backend.OpenVINOModel(model_dir, "float32"), x_val)
        validation_set = nncf.Dataset([(x, i) for i, x in enumerate(x_val)], lambda it: it[0][None].astype(np.float32))
        quantized = nncf.quantize_with_accuracy_control(
            ir, calibration_set, validation_set,
            _worst_change_fn(y_val, [s.source or s.folder for s in val_kept], ref_val, float(card["threshold"])),
            max_drop=ACCURACY_CONTROL_DROP, subset_size=len(x_cal),
        )
        info.update(accuracy_control_photos=len(x_val), accuracy_control_max_drop_points=ACCURACY_CONTROL_DROP,
                    float32_layers=_float_layers(quantized))
        log(f"accuracy control kept {len(info['float32_layers'])} layer(s) in float32")
    else:
        quantized = nncf.quantize(ir, calibration_set, subset_size=len(x_cal))
    ov_backend.stamp(quantized, info)
    ov.save_model(quantized, model_dir / ov_backend.INT8_IR_FILE, compress_to_fp16=False)

    x, y, kept, bad = load_arrays(held, cache_dir, preprocessing=preprocessing)
    log(f"checking on {len(x)} photos of patients the model never saw ({len(bad)} unreadable)")
    ref = _probs(ov_backend.OpenVINOModel(model_dir, "float32"), x)
    new = _probs(ov_backend.OpenVINOModel(model_dir, "int8"), x)
    record = int8_record([s.source or s.folder for s in kept], y, ref, new, float(card["threshold"]))
    record.update(calibration_photos=len(x_cal), data=data, measured=dt.date.today().isoformat(),
                  by="python -m training export-openvino --int8" + (" --accuracy-control" if accuracy_control else ""))
    if accuracy_control:
        record.update({k: info[k] for k in ("accuracy_control_photos", "accuracy_control_max_drop_points",
                                             "float32_layers")})
    card.setdefault("precision_check", {})["int8"] = record
    write_card(model_dir, card)
    return record
