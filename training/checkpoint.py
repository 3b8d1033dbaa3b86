"""A run's resumable state (the model with its optimizer, and the loop's bookkeeping) and the learning-rate
schedules that must survive a resume."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from training.config import TrainConfig


class Checkpoint:
    """The state of a run after its last finished epoch, in one folder: resumable after a stop."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.model_path = self.folder / "last.keras"
        self.state_path = self.folder / "state.json"
        self.best_path = self.folder / "best.weights.h5"

    def exists(self) -> bool:
        return self.state_path.is_file() and self.model_path.is_file()

    def save(self, model, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.model_path.with_name("last.tmp.keras")
        model.save(tmp)  # with the optimizer's state (moments, step count: the schedule resumes too)
        os.replace(tmp, self.model_path)
        tmp_state = self.state_path.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp_state, self.state_path)

    def load(self):
        import keras

        import aisight.layers  # noqa: F401  registers FamilyPreprocess
        from training.adversary import register

        register()  # a domain-adversarial run saves its trainer (training.adversary)
        return keras.saving.load_model(self.model_path, compile=True), json.loads(self.state_path.read_text())


def lr_schedule(cfg: TrainConfig, steps: int):
    import keras

    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if cfg.warmup_epochs else cfg.lr, decay_steps=max(1, steps * (cfg.epochs - cfg.warmup_epochs)),
            warmup_target=cfg.lr if cfg.warmup_epochs else None, warmup_steps=steps * cfg.warmup_epochs,
        )
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def warm_restart(cfg: TrainConfig, model, done: int, steps: int, log: Callable[[str], None]) -> dict | None:
    """With ``cfg.restart_lr``, give a resumed model a new schedule over epochs done+1..cfg.epochs:
    the restart rate for one epoch, then cosine to 0. The optimizer keeps its moments and step count;
    the schedule is saved with it, so a later resume goes on with it. Returns what to record, or None."""
    import keras

    if not cfg.restart_lr or cfg.epochs <= done:
        return None
    at = int(model.optimizer.iterations.numpy())
    # CosineDecay's warm-up from restart_lr to restart_lr is a constant stretch ending one epoch after
    # the restart; step counts continue from the checkpoint, so it is offset by the steps already taken.
    model.optimizer.learning_rate = keras.optimizers.schedules.CosineDecay(
        cfg.restart_lr, decay_steps=max(1, steps * (cfg.epochs - done - 1)), warmup_target=cfg.restart_lr,
        warmup_steps=at + steps,
    )
    log(f"warm restart after epoch {done}: learning rate {cfg.restart_lr:g} for one epoch, then cosine to 0 "
        f"by epoch {cfg.epochs}")
    return {"after_epoch": done, "lr": cfg.restart_lr, "epochs": cfg.epochs}
