"""Checkpoints of a training run: `step-NNNNNN.pt` on its cadence and at the end, `best.pt` when the
validation loss improves, and `--resume` from the latest step file. The format itself (atomic
write, weights_only) is model/checkpoint.py's; this module decides what goes in and when."""
from __future__ import annotations

import math
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from model import clean_state_dict, read_checkpoint, save_checkpoint
from model.checkpoint import first_line
from pipeline.shards import remove_orphaned_temps
from training.config import TrainConfig
from training.runtime import Runtime, all_gather, average_batchnorm_stats
from training.step import TrainStep, every, learning_rate, schedule_horizon

STEP_FILE = re.compile(r"step-(\d+)\.pt")


def latest_checkpoint(out: Path) -> Path:
    """The step file with the highest step number (by number: step-1000000.pt comes after step-999999.pt)."""
    found = [(int(match.group(1)), path) for path in (out.glob("step-*.pt") if out.is_dir() else [])
             if (match := STEP_FILE.fullmatch(path.name))]
    if not found:
        raise UserError(f"--resume: no step-*.pt checkpoint in {out}")
    return max(found)[1]


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
    """Saves and restores everything a run needs to continue exactly: the unwrapped model, optimiser,
    GradScaler, schedule, step, RNG, every rank's loader position and the best validation loss."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, model: torch.nn.Module, train_step: TrainStep, loader,
                 extra: dict):
        self.cfg, self.rt, self.model, self.train_step, self.loader = cfg, rt, model, train_step, loader
        self.out, self.extra = Path(cfg.out), extra
        self.best_val = math.inf
        if rt.main and self.out.is_dir():
            remove_orphaned_temps(self.out)             # left by a run killed inside a write

    def restore(self, resumed: dict) -> int:
        """Load a checkpoint's state into the run's components; returns its step."""
        try:
            self.model.load_state_dict(clean_state_dict(resumed["model"]))
            self.train_step.optimizer.load_state_dict(resumed["optimizer"])
            self.train_step.scaler.load_state_dict(resumed["scaler"])
            loader_states = resumed["loader"]
            self.loader.load_state_dict(loader_states[self.rt.rank if len(loader_states) == self.rt.world_size else 0])
            set_rng_state(resumed["rng"])
            self.best_val = float(resumed["best_val_loss"])
            self.train_step.overflow_skips = int(resumed.get("amp_overflow_skips", 0))
        except Exception as error:              # noqa: BLE001 - the file's content, whatever its shape
            raise UserError(f"--resume: checkpoint in {self.out} does not fit this run ({first_line(error)})") from None
        if self.rt.main and len(loader_states) != self.rt.world_size:
            print(f"warning: checkpoint was written by {len(loader_states)} rank(s), this run has "
                  f"{self.rt.world_size}: data order is not resumed exactly", flush=True)
        return int(resumed["step"])

    def improves(self, val_loss: float | None) -> bool:
        return val_loss is not None and val_loss < self.best_val

    def save(self, step: int, *, last: bool = False, val_loss: float | None = None) -> None:
        """`step-NNNNNN.pt` every ckpt_every steps and at the last step; `best.pt` when `val_loss`
        beats the best so far. Collective under DDP: every rank calls it."""
        periodic = every(step, self.cfg.ckpt_every) or last
        improved = self.improves(val_loss)
        if improved:
            self.best_val = val_loss
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
        return {"config": {"model": cfg.model_config().to_dict(), "train": asdict(cfg)}, "step": step,
                "optimizer": self.train_step.optimizer.state_dict(), "scaler": self.train_step.scaler.state_dict(),
                "amp_overflow_skips": self.train_step.overflow_skips,
                "schedule": {"kind": cfg.lr_schedule, "lr": learning_rate(cfg, step - 1), "lr_min": cfg.lr_min,
                             "warmup": cfg.warmup, "horizon": schedule_horizon(cfg)},
                "rng": rng_state(), "loader": all_gather(plain(self.loader.state_dict()), self.rt),
                "best_val_loss": self.best_val, "world_size": self.rt.world_size, **self.extra}


def read_resume_checkpoint(out: Path) -> tuple[Path, dict]:
    path = latest_checkpoint(out)
    return path, read_checkpoint(path)
