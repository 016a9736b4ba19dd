"""Checkpoints of a training run: `step-NNNNNN.pt` on its cadence and at the end, `best.pt` when the
validation measure improves (TrainConfig.best_by). The format itself (atomic write, weights_only) is
model/checkpoint.py's; this module decides what goes in and when (training/resume.py puts it back)."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import save_checkpoint
from pipeline.shards import remove_orphaned_temps
from training.config import TrainConfig
from training.runtime import Runtime, all_gather, average_batchnorm_stats
from training.step import TrainStep, every, learning_rate, schedule_horizon


def plain(value: Any) -> Any:
    """Numpy values inside loader/RNG state -> lists and Python scalars, so torch.load(weights_only=True) works."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": plain(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Checkpointer:
    """Saves everything a run needs to continue exactly: the unwrapped model, optimiser, GradScaler,
    schedule, step, RNG, every rank's loader position and the best validation loss."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, model: torch.nn.Module, train_step: TrainStep, loader,
                 extra: dict, best_val: float = math.inf):
        self.cfg, self.rt, self.model, self.train_step, self.loader = cfg, rt, model, train_step, loader
        self.out, self.extra = Path(cfg.out), extra
        self.best_val = best_val                 # the best validation measure so far (a resumed run's too)
        if rt.main and self.out.is_dir():
            remove_orphaned_temps(self.out)             # left by a run killed inside a write

    def measure(self, row: dict) -> float | None:
        """The step's validation measure, lower is better: −val/selection (best_by "selection"), or
        val/recon (best_by "recon", the seed's rule); None when it was not measured this step."""
        if self.cfg.best_by == "selection":
            score = row.get("val/selection")
            return None if score is None else -score
        return row.get("val/recon")

    def save(self, step: int, *, last: bool = False, row: dict | None = None) -> None:
        """`step-NNNNNN.pt` every ckpt_every steps and at the last step; `best.pt` when the step's
        validation measure (see `measure`) beats the best so far. Collective under DDP."""
        periodic = every(step, self.cfg.ckpt_every) or last
        value = self.measure(row or {})
        improved = value is not None and value < self.best_val
        if improved:
            self.best_val = value
        if not (periodic or improved):
            return
        average_batchnorm_stats(self.model, self.rt)
        state = self._state(step)                          # collective: every rank's loader position
        if not self.rt.main:
            return
        if periodic:
            save_checkpoint(self.out / f"step-{step:06d}.pt", self.model, **state)
        if improved:
            save_checkpoint(self.out / "best.pt", self.model, **state)

    def _state(self, step: int) -> dict:
        cfg = self.cfg
        return {"config": {"model": cfg.model.to_dict(), "train": cfg.to_dict()}, "step": step,
                "optimizer": self.train_step.optimizer.state_dict(), "scaler": self.train_step.scaler.state_dict(),
                "amp_overflow_skips": self.train_step.overflow_skips,
                "schedule": {"kind": cfg.lr_schedule, "lr": learning_rate(cfg, step - 1), "lr_min": cfg.lr_min,
                             "warmup": cfg.warmup, "horizon": schedule_horizon(cfg)},
                "rng": rng_state(), "loader": all_gather(plain(self.loader.state_dict()), self.rt),
                "best": {"by": self.cfg.best_by, "value": self.best_val}, "world_size": self.rt.world_size,
                **self.extra}

