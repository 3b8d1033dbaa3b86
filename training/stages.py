"""Model selection as in the paper: Stage 1 over the base networks, Stage 2 over optimizers x losses.

Every candidate is one run in ``OUT/stage<S>/<candidate>/`` that ends by writing ``result.json``
atomically; a candidate whose ``result.json`` exists is skipped, so a selection can be resumed, and its
candidates spread over machines (``--stage S --index I``, one Kubernetes Job completion each) and ranked
afterwards (``rank``). Candidates train with the shared ``train.fit`` and are scored with the shared
metrics; the split is built once from the seed, saved in ``OUT/split/`` and checked by every candidate.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.models import ARCHS, TINY, get_arch
from training.train import TrainConfig

STAGE2_OPTIMIZERS = ("rmsprop", "adam", "adagrad")
STAGE2_LOSSES = ("cce", "mse", "mae")
CSV_COLUMNS = (
    "arch", "optimizer", "loss", "params", "train_accuracy", "val_accuracy", "overfitting", "val_loss",
    "sensitivity", "specificity", "auc", "score", "rank",
)
BASELINE_ARCH = "Xception"  # the paper's random-init baseline (§2.3)


def stage_defaults() -> TrainConfig:
    """The paper's Stage 1 settings (§2.4.1, §2.4.3): RMSprop, categorical cross-entropy, batch 32,
    15 epochs, Flatten -> Dropout(0.5) -> Dense(2), base frozen except BatchNormalization, Keras' default
    learning rate without a schedule, and the metrics of the last epoch (not the best one)."""
    return TrainConfig(
        arch=BASELINE_ARCH, optimizer="rmsprop", loss="cce", lr=1e-3, schedule="constant", warmup_epochs=0,
        epochs=15, batch_size=32, head="flatten", dropout=0.5, trainable="bn", bn_momentum=None, weights="none",
        augment=False, class_weight=False, precision="float32", select_metric="last", patience=0,
        name="aisight-select",
    )


@dataclass(frozen=True)
class Candidate:
    """One configuration of a stage; ``index`` is its position in the stage's grid."""

    stage: str  # "1", "2" or "baseline"
    index: int
    arch: str
    optimizer: str
    loss: str
    weights: str | None = None  # None: the selection's --weights

    @property
    def name(self) -> str:
        if self.stage == "1":
            return self.arch
        if self.stage == "baseline":
            return f"{self.arch}-random"
        return f"{self.arch}-{self.optimizer}-{self.loss}"

    def directory(self, out: str | Path) -> Path:
        return Path(out) / ("baseline" if self.stage == "baseline" else f"stage{self.stage}") / self.name


def parse_list(text: str | None, choices: Sequence[str], what: str) -> list[str]:
    """Split ``A,B`` and check each against ``choices`` (case-insensitive); None: all choices."""
    if not text:
        return list(choices)
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = [c for c in choices if c.lower() == part.lower()]
        if not match:
            raise ValueError(f"unknown {what} {part!r}; choose from {', '.join(choices)}")
        out.append(match[0])
    return out


def stage1_candidates(
    archs: Sequence[str] | None = None, optimizer: str = "rmsprop", loss: str = "cce"
) -> list[Candidate]:
    """Stage 1: one candidate per base (all 17 in the paper's order by default; TinyNet allowed for tests)."""
    names = [get_arch(a).name for a in archs] if archs else list(ARCHS)
    return [Candidate("1", i, a, optimizer, loss) for i, a in enumerate(names)]


def stage2_candidates(
    arch: str, optimizers: Sequence[str] = STAGE2_OPTIMIZERS, losses: Sequence[str] = STAGE2_LOSSES
) -> list[Candidate]:
    """Stage 2: the winner with every optimizer x loss, optimizers outer (index 4 = adam + mse)."""
    return [
        Candidate("2", i * len(losses) + j, get_arch(arch).name, o, lo)
        for i, o in enumerate(optimizers)
        for j, lo in enumerate(losses)
    ]


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stage1_winner(out: str | Path) -> str:
    """The architecture ranked first in ``OUT/stage1.csv``."""
    path = Path(out) / "stage1.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run Stage 1 and `python -m training rank --out {out} --stage 1`")
    rows = [r for r in read_csv(path) if r.get("rank") == "1"]
    if not rows:
        raise ValueError(f"{path} has no row with rank 1")
    return rows[0]["arch"]


def _write_json(path: Path, data: Any) -> None:
    """Write then rename, so a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def candidate_config(base: TrainConfig, cand: Candidate) -> TrainConfig:
    """The selection's settings with the candidate's architecture, optimizer, loss (and weights)."""
    return replace(
        base, arch=cand.arch, optimizer=cand.optimizer, loss=cand.loss,
        weights=cand.weights or base.weights, name=f"aisight-select-{cand.name.lower()}",
    )


def run_candidate(
    cand: Candidate,
    base: TrainConfig,
    data: Callable[[], Any],
    out: str | Path,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Train and score one candidate unless its ``result.json`` exists; return the result.

    ``data`` returns the prepared split (training.recipe.Prepared); it is called only when something
    has to be trained, so a resumed selection with nothing left to do decodes nothing.
    """
    cdir = cand.directory(out)
    result_path = cdir / "result.json"
    if result_path.is_file():
        log(f"[stage {cand.stage} #{cand.index}] {cand.name}: finished earlier ({result_path}), skipped")
        return json.loads(result_path.read_text())
    import keras

    from training.metrics import classification_metrics, loss_value
    from training.train import SOURCE_CONTROLLED, evaluate_parts, fit, predict_proba, to_float32

    cfg = candidate_config(base, cand)
    cdir.mkdir(parents=True, exist_ok=True)
    _write_json(cdir / "config.json", asdict(cfg))
    prep = data()
    (x_tr, y_tr, _), (x_val, y_val, val_items) = prep.arrays["train"], prep.arrays["val"]
    log(f"[stage {cand.stage} #{cand.index}] {cand.name}: {cfg.optimizer} + {cfg.loss}, weights {cfg.weights}, "
        f"{cfg.epochs} epochs on {len(y_tr)} images")
    history_path = cdir / "history.csv"
    history_path.unlink(missing_ok=True)
    controlled = np.array([it.source == SOURCE_CONTROLLED for it in val_items])
    t0 = time.perf_counter()
    model, history = fit(cfg, (x_tr, y_tr), (x_val, y_val), log, history_path, controlled, progress=sys.stdout.isatty())
    model = to_float32(model, cfg)
    # One call for all parts: predict_proba traces its function anew on every call (seconds per model).
    names = list(prep.arrays)
    joined = predict_proba(model, np.concatenate([prep.arrays[n][0] for n in names]))
    cuts = np.cumsum([len(prep.arrays[n][1]) for n in names])[:-1]
    probs = dict(zip(names, np.split(joined, cuts), strict=True))
    # The paper's metrics: the softmax's argmax, i.e. threshold 0.5 on P(diseased).
    parts = {name: classification_metrics(y, probs[name], 0.5) for name, (_, y, _) in prep.arrays.items()}
    controlled_parts = {
        name: evaluate_parts(y, probs[name], items, 0.5).get(SOURCE_CONTROLLED)
        for name, (_, y, items) in prep.arrays.items()
    }
    val = parts["val"]
    result = {
        "candidate": cand.name,
        "stage": cand.stage,
        "index": cand.index,
        "arch": cfg.arch,
        "optimizer": cfg.optimizer,
        "loss": cfg.loss,
        "weights": cfg.weights,
        "params": int(model.count_params()),
        "train_accuracy": parts["train"]["accuracy"],
        "val_accuracy": val["accuracy"],
        "overfitting": parts["train"]["accuracy"] - val["accuracy"],
        "val_loss": loss_value(cfg.loss, y_val, probs["val"]),
        "sensitivity": val["sensitivity"],
        "specificity": val["specificity"],
        "auc": val["auc"],
        "val_crossentropy": loss_value("cce", y_val, probs["val"]),
        # Keras' running accuracy over the last epoch (training mode: dropout on); the ranked
        # train_accuracy is measured in inference mode after training, like the validation accuracy.
        "fit_train_accuracy": history[-1]["accuracy"] if history else float("nan"),
        "metrics": parts,
        "source_controlled": {k: v for k, v in controlled_parts.items() if v},
        "epochs_run": len(history),
        "seconds": time.perf_counter() - t0,
        "train_images_per_second": float(np.mean([h["images_per_second"] for h in history])) if history else 0.0,
        "protocol": prep.info["protocol"],
        "split_fingerprint": prep.info["fingerprint"],
        "config": asdict(cfg),
    }
    np.savez_compressed(
        cdir / "predictions.npz",
        **{f"{k}_prob": v for k, v in probs.items()},
        **{f"{k}_y": prep.arrays[k][1] for k in prep.arrays},
    )
    _write_json(result_path, result)
    log(
        f"[stage {cand.stage} #{cand.index}] {cand.name}: val acc {val['accuracy']:.4f} overfitting "
        f"{result['overfitting']:+.4f} loss {result['val_loss']:.4f} sens {val['sensitivity']:.4f} "
        f"spec {val['specificity']:.4f} auc {val['auc']:.4f} ({result['seconds']:.0f}s)"
    )
    del model
    keras.backend.clear_session()
    gc.collect()
    return result


def load_results(out: str | Path, stage: str) -> list[dict]:
    """Every finished candidate of ``stage`` (result.json files), in grid order."""
    folder = Path(out) / ("baseline" if stage == "baseline" else f"stage{stage}")
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*/result.json"))]
    return sorted(results, key=lambda r: (_grid_position(r), r["candidate"]))


def _grid_position(result: dict) -> tuple:
    """Order of the paper's tables: its architecture order (Stage 1), optimizers x losses (Stage 2)."""
    names = [*ARCHS, TINY.name]
    arch = names.index(result["arch"]) if result["arch"] in names else len(names)
    opt = STAGE2_OPTIMIZERS.index(result["optimizer"]) if result["optimizer"] in STAGE2_OPTIMIZERS else 9
    loss = STAGE2_LOSSES.index(result["loss"]) if result["loss"] in STAGE2_LOSSES else 9
    return (arch, opt, loss) if result["stage"] == "1" else (opt, loss, arch)


def rank_stage(out: str | Path, stage: str, log: Callable[[str], None] = print) -> list[dict]:
    """Rank the finished candidates of ``stage`` with the paper's score and write ``OUT/stage<S>.csv``."""
    from training.score import rank_models

    out = Path(out)
    results = load_results(out, stage)
    if stage == "2" and (out / "stage1.csv").is_file():
        # Stage 2 compares configurations of one base: the current Stage 1 winner.
        winner = stage1_winner(out)
        others = sorted({r["arch"] for r in results} - {winner})
        if others:
            log(f"rank: ignoring Stage 2 runs of {', '.join(others)} (the Stage 1 winner is {winner})")
        results = [r for r in results if r["arch"] == winner]
    if not results:
        raise FileNotFoundError(f"no finished Stage {stage} candidates in {out / f'stage{stage}'}")
    ranked = rank_models(results)
    path = out / f"stage{stage}.csv"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(ranked)
    os.replace(tmp, path)
    best = ranked[0]
    log(f"Stage {stage}: {len(ranked)} candidates ranked -> {path}; winner {best['candidate']} "
        f"(score {best['score']:g})")
    return ranked


@dataclass
class Selection:
    """Everything a selection run needs besides the candidates."""

    data: str
    out: Path
    base: TrainConfig
    recipe: Any  # training.recipe.Recipe
    protocol: str = "leakfree"
    limit: int | None = None
    cache_dir: str | None = None
    archs: list[str] | None = None
    optimizers: list[str] | None = None
    losses: list[str] | None = None
    baseline_arch: str = BASELINE_ARCH


class LazyData:
    """Load, split and decode the data on first use only (resumed runs may need none of it)."""

    def __init__(self, sel: Selection, log: Callable[[str], None]) -> None:
        self.sel, self.log, self.value = sel, log, None

    def __call__(self):
        if self.value is None:
            from training.data import load_sources
            from training.recipe import prepare

            ds = load_sources(self.sel.data)
            self.log(f"data: {len(ds.samples)} photos {ds.counts()}, {len(ds.skipped)} skipped; "
                     f"protocol {self.sel.protocol}, recipe {self.sel.recipe.name}")
            self.value = prepare(
                ds.samples, self.sel.recipe, self.sel.protocol, self.sel.base.seed, self.sel.limit,
                self.sel.cache_dir, self.sel.out / "split", self.log,
            )
        return self.value


def _settings(sel: Selection) -> dict:
    return {
        "data": str(sel.data),
        "protocol": sel.protocol,
        "recipe": asdict(sel.recipe),
        "limit": sel.limit,
        "archs": [c.arch for c in stage1_candidates(sel.archs)],
        "optimizers": sel.optimizers or list(STAGE2_OPTIMIZERS),
        "losses": sel.losses or list(STAGE2_LOSSES),
        "baseline_arch": sel.baseline_arch,
        "config": asdict(sel.base),
    }


def run_stage(
    sel: Selection, stage: str, index: int | None, data: LazyData, log: Callable[[str], None] = print
) -> list[str]:
    """Run one candidate (``index``) or all of ``stage``; return the names of candidates that failed."""
    if stage == "1":
        cands = stage1_candidates(sel.archs, sel.base.optimizer, sel.base.loss)
    elif stage == "2":
        winner = stage1_winner(sel.out)
        cands = stage2_candidates(winner, sel.optimizers or STAGE2_OPTIMIZERS, sel.losses or STAGE2_LOSSES)
    elif stage == "baseline":
        cands = [Candidate("baseline", 0, get_arch(sel.baseline_arch).name, "rmsprop", "cce", weights="none")]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if index is not None:
        if not 0 <= index < len(cands):
            raise IndexError(f"Stage {stage} has candidates 0..{len(cands) - 1}, not {index}")
        cands = [cands[index]]
    failed = []
    for cand in _progress(cands, f"stage {stage}"):
        try:
            run_candidate(cand, sel.base, data, sel.out, log)
        except Exception as exc:  # one broken candidate must not sink a days-long grid
            if index is not None:
                raise
            failed.append(cand.name)
            log(f"[stage {cand.stage} #{cand.index}] {cand.name} FAILED: {type(exc).__name__}: {exc}")
            (cand.directory(sel.out) / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return failed


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="model", leave=False, disable=None if len(items) > 1 else True)


def select(
    sel: Selection,
    stage: str | None = None,
    index: int | None = None,
    baseline: bool = True,
    log: Callable[[str], None] = print,
) -> int:
    """Run the selection: one candidate, one stage, or everything (Stage 1, rank, Stage 2, rank,
    baseline, report). Returns the number of candidates that failed."""
    sel.out.mkdir(parents=True, exist_ok=True)
    if sel.base.weights.lower() == "none":
        log("weights: none -- every base is trained from random initialisation (no ImageNet weights here); "
            "the paper used ImageNet weights, so its numbers are not a like-for-like comparison")
    settings = _settings(sel)
    if index is None or not (sel.out / "select.json").is_file():
        _write_json(sel.out / "select.json", settings)
    data = LazyData(sel, log)
    if stage is not None:
        failed = run_stage(sel, stage, index, data, log)
        if index is None and stage in ("1", "2"):
            rank_stage(sel.out, stage, log)
        return len(failed)
    failed = run_stage(sel, "1", None, data, log)
    rank_stage(sel.out, "1", log)
    failed += run_stage(sel, "2", None, data, log)
    rank_stage(sel.out, "2", log)
    if baseline:
        reuse = sel.out / "stage1" / get_arch(sel.baseline_arch).name / "result.json"
        if reuse.is_file() and json.loads(reuse.read_text())["weights"].lower() == "none":
            log(f"baseline: the Stage 1 {sel.baseline_arch} run is already random-init; reused")
        else:
            failed += run_stage(sel, "baseline", None, data, log)
    from training.report import write_selection_report

    write_selection_report(sel.out, log=log)
    return len(failed)
