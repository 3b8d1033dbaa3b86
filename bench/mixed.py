"""The headline of ``make bench``: the mixed load, the ratio against the paper-style server, the model step.

The load the performance issue sets: 8 clients posting real 400 px fundus JPEGs, one request in eight a
12 MP phone photo. The ratio is the app's requests/s over the paper-style server's (bench/baseline_app.py)
in the same run; the model step's share is the app's requests/s over the peak images/s of the model
alone, in the precision the app chose, measured in the same run with the servers stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Targets (the issue): >= 5x the paper-style server, p99 <= 4x p50, 0 errors, model step >= 70% of peak.
TARGET_RATIO = 5.0
TARGET_TAIL = 4.0
TARGET_MODEL_SHARE = 0.70
PHONE_EVERY = 8


def mixed_set(real: list[bytes], phones: list[bytes], n: int = 32) -> list[bytes]:
    """Request bodies where every PHONE_EVERY-th is a 12 MP phone photo and the rest real 400 px photos.

    The load generator walks this list with a stride coprime to its length, so each client's requests
    keep the one-in-eight mix."""
    return [phones[(i // PHONE_EVERY) % len(phones)] if i % PHONE_EVERY == PHONE_EVERY - 1 else real[i % len(real)]
            for i in range(n)]


def model_peak(model_dir: Path, precision: str, sizes: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Images/s of the model alone (OpenVINO, every core) at each batch size in ``precision``, and the best."""
    from aisight import ov_backend
    from aisight.precision import time_model

    model = ov_backend.OpenVINOModel(model_dir, precision)
    ms = time_model(model, sizes, repeats=9)
    per_s = {b: 1000 * int(b) / t for b, t in ms.items()}
    best = max(per_s, key=per_s.get)
    return {"precision": precision, "ms": ms, "images_per_s": per_s, "best_batch": int(best), "peak": per_s[best]}


def headline(levels: list, app_name: str, chosen: dict[str, Any], peak: dict[str, Any] | None,
             concurrency: int = 8) -> str:
    """The lines ``make bench`` ends with: each target, its measured value, and whether it is met."""
    at = {lv.server: lv for lv in levels if lv.photos == "mixed" and lv.concurrency == concurrency}
    app, base = at.get(app_name), at.get("baseline")
    if app is None:
        return "no mixed-load level at 8 clients was run: no headline"
    lines = [f"Headline: mixed load (one request in {PHONE_EVERY} a 12 MP photo), {concurrency} clients; the app "
             f"served {chosen.get('precision', '?')} (chosen by {chosen.get('by', '?')}: {chosen.get('why', '')})."]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if base is not None and base.rps:
        ratio = app.rps / base.rps
        lines.append(f"- app {app.rps:.2f} req/s vs paper-style {base.rps:.2f} req/s: **{ratio:.2f}x** "
                     f"(target >= {TARGET_RATIO:g}x: {verdict(ratio >= TARGET_RATIO)})")
    tail = app.p99_ms / app.p50_ms if app.p50_ms else float("nan")
    lines.append(f"- app p99 {app.p99_ms:.0f} ms / p50 {app.p50_ms:.0f} ms = **{tail:.2f}** "
                 f"(target <= {TARGET_TAIL:g}: {verdict(tail <= TARGET_TAIL)})")
    lines.append(f"- app errors: **{app.errors}** (target 0: {verdict(app.errors == 0)})")
    if peak:
        share = app.rps / peak["peak"]
        lines.append(f"- model step: the model alone peaks at {peak['peak']:.1f} images/s ({peak['precision']}, "
                     f"batch {peak['best_batch']}); the app served **{100 * share:.0f}%** of that "
                     f"(target >= {100 * TARGET_MODEL_SHARE:.0f}%: {verdict(share >= TARGET_MODEL_SHARE)})")
    return "\n".join(lines)
