"""Which numeric precision serves the model: the fastest one measured here, among those the card allows.

CPU flags do not say what is fastest: bf16 "native" on an AVX512-BF16 Xeon ran slower than float32 there,
and int8 pays on some CPUs and not on others. So at start, on the OpenVINO path, every precision the model
card allows (float32 always; bf16 where the CPU computes it natively; int8 where the artifact has an int8
IR) is timed on the batch sizes the server runs, and the fastest serves, if it beats float32 by
``MIN_GAIN``. A reduced precision is allowed only where the card records a check of what it changes on
held-out photos within ``MAX_ACCURACY_CHANGE`` points (``bench/precision.py`` for bf16, ``python -m
training export-openvino --int8`` for int8). ``AISIGHT_PRECISION`` = float32, bf16 or int8 forces one.

The measurement is cached per model, CPU and OpenVINO version (AISIGHT_CACHE_DIR, by default under the
temporary folder): the first worker of a pod measures while the others wait for its answer, so they
neither disturb its timing nor measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aisight.preprocess import INPUT_SHAPE

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bf16", "int8")
# The most a reduced precision may move held-out accuracy (points) to be used without being asked.
MAX_ACCURACY_CHANGE = 1.0
# A reduced precision serves only if it is at least this much faster than float32 (float32 is exact:
# a tie within timing noise goes to it).
MIN_GAIN = 0.05
TIMING_REPEATS = 7


@dataclass
class Choice:
    """The precision that serves and why: ``by`` is timing, setting, rule (only one allowed) or cache."""

    precision: str
    by: str
    why: str
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() == field), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or "unknown"


def bf16_native(device: str) -> bool:
    """Whether bf16 is computed natively here: any GPU TF uses, or a CPU with AMX or AVX512-BF16."""
    if device.startswith("gpu"):
        return True
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def checked(card: dict[str, Any], precision: str) -> tuple[bool, str]:
    """Whether the card records a check of ``precision`` within the bound, and why (for the log)."""
    check = (card.get("precision_check") or {}).get(precision)
    if not isinstance(check, dict):
        return False, f"the model card records no {precision} accuracy check"
    try:
        # int8 records its worst source; bf16 its pooled change (one figure: the worst of its paths).
        change = float(check.get("worst_accuracy_change_points", check["accuracy_change_points"]))
    except (KeyError, TypeError, ValueError):
        return False, f"the model card's {precision} check has no accuracy change"
    if not abs(change) < MAX_ACCURACY_CHANGE:
        return False, f"{precision} moved test accuracy by {change:+.2f} points (limit {MAX_ACCURACY_CHANGE:g})"
    auc = check.get("worst_auc_change_points")  # int8 records its worst AUC change too
    if auc is not None and not abs(float(auc)) < MAX_ACCURACY_CHANGE:
        return False, f"{precision} moved a test AUC by {float(auc):.2f} points (limit {MAX_ACCURACY_CHANGE:g})"
    return True, (f"{precision} checked on {check.get('n', '?')} held-out photos: accuracy {change:+.2f} points, "
                  f"{check.get('answers_changed', '?')} answers changed")


def time_model(
    run: Callable[[np.ndarray], Any], sizes: tuple[int, ...], repeats: int = TIMING_REPEATS
) -> dict[str, float]:
    """Median milliseconds of one call at each batch size, after one untimed call per size."""
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        batch = rng.integers(0, 256, (size, *INPUT_SHAPE)).astype(np.float32)
        run(batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - t0)
        out[str(size)] = round(1000 * float(np.median(times)), 3)
    return out


def per_image_ms(t: dict[str, float]) -> float:
    """One number per precision: time per image at batch 1 plus at the largest batch (both matter)."""
    largest = max(t, key=int)
    return t["1"] + t[largest] / int(largest) if "1" in t else t[largest] / int(largest)


def fastest(timings: dict[str, dict[str, float]]) -> tuple[str, str]:
    """The precision to serve from measured timings, and why."""
    base = per_image_ms(timings["float32"])
    best = min(timings, key=lambda p: per_image_ms(timings[p]))
    summary = ", ".join(f"{p} {per_image_ms(t):.1f} ms" for p, t in timings.items())
    if best != "float32" and per_image_ms(timings[best]) <= base * (1 - MIN_GAIN):
        return best, f"fastest here ({summary}; per image at batch 1 + at the largest batch)"
    if best != "float32":
        return "float32", f"{best} not {MIN_GAIN:.0%} faster than float32 here ({summary})"
    return "float32", f"float32 fastest here ({summary})"


def cache_key(model_id: str, candidates: list[str], sizes: tuple[int, ...], threads: int | None, runtime: str) -> str:
    """What a cached measurement is valid for: model, candidates, batch sizes, CPU, threads and runtime."""
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or "vnni" in f)
    raw = json.dumps([model_id, candidates, list(sizes), threads, runtime, cpu_model(), flags, os.cpu_count()])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("AISIGHT_CACHE_DIR") or Path(tempfile.gettempdir()) / "aisight-cache")


@contextlib.contextmanager
def cached(key: str) -> Iterator[dict[str, Any]]:
    """A lock held while one process measures; yields the cached entry ({} if none) to read or fill in.

    Any trouble with the folder (read-only, full) means measuring without a cache, never failing."""
    entry: dict[str, Any] = {}
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"precision-{key}.json"
        lock = open(folder / f"precision-{key}.lock", "a")  # noqa: SIM115 - held across the yield
    except OSError as exc:
        log.info("precision cache not used (%s)", exc)
        yield entry
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with contextlib.suppress(OSError, ValueError):
            entry.update(json.loads(path.read_text()))
        before = dict(entry)
        yield entry
        if entry and entry != before:
            with contextlib.suppress(OSError):
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(entry))
                os.replace(tmp, path)


def choose_openvino(model_dir: Path, card: dict[str, Any], setting: str, max_batch: int):
    """(Choice, compiled OpenVINO model) for ``model_dir``: forced by ``setting``, else the fastest allowed here."""
    from aisight import ov_backend

    threads = ov_backend.infer_threads()

    def build(p: str):
        return ov_backend.OpenVINOModel(model_dir, p, threads)

    if setting != "auto":
        return _forced(model_dir, setting, build)
    allowed, refused = ["float32"], {}
    for p, possible, why_not in (
        ("bf16", bf16_native("cpu"), "this CPU has no native bf16 (AMX/AVX512-BF16)"),
        ("int8", ov_backend.has_ir(model_dir, ov_backend.INT8_IR_FILE), "the artifact has no int8 IR"),
    ):
        ok, why = checked(card, p) if possible else (False, why_not)
        if ok:
            allowed.append(p)
        else:
            refused[p] = why
    if len(allowed) == 1:
        log.info("precision float32: %s", "; ".join(f"{k}: {v}" for k, v in refused.items()))
        return Choice("float32", "rule", "the only precision allowed here", refused=refused), build("float32")
    sizes = tuple(sorted({1, max_batch}))
    import openvino as ov

    key = cache_key(ov_backend.keras_sha256(model_dir), allowed, sizes, threads, ov.get_version())
    models: dict[str, Any] = {}
    with cached(key) as entry:
        if entry.get("precision") in allowed:
            choice = Choice(entry["precision"], "cache", entry["why"], entry["timings_ms"], refused)
        else:
            timings = {}
            for p in allowed:
                models[p] = build(p)
                timings[p] = time_model(models[p], sizes)
            best, why = fastest(timings)
            entry.update(precision=best, why=why, timings_ms=timings)
            choice = Choice(best, "timing", why, timings, refused)
    log.info("precision %s (by %s): %s", choice.precision, choice.by, choice.why)
    model = models.pop(choice.precision, None) or build(choice.precision)
    models.clear()  # the other precisions' compiled networks are freed here
    return choice, model


def _forced(model_dir: Path, setting: str, build) -> tuple[Choice, Any]:
    from aisight import ov_backend

    p, why = setting, f"AISIGHT_PRECISION={setting}"
    if p == "bf16" and not bf16_native("cpu"):
        log.warning("AISIGHT_PRECISION=bf16 ignored: this CPU has no native bf16 (AMX/AVX512-BF16); float32")
        p, why = "float32", "AISIGHT_PRECISION=bf16, but this CPU has no native bf16"
    if p == "int8" and not ov_backend.has_ir(model_dir, ov_backend.INT8_IR_FILE):
        log.warning("AISIGHT_PRECISION=int8 ignored: %s has no int8 IR; float32", model_dir)
        p, why = "float32", "AISIGHT_PRECISION=int8, but the artifact has no int8 IR"
    return Choice(p, "setting", why), build(p)
