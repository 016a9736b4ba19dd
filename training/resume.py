"""`--resume`, in one place: the latest step file in --out (of the one run the folder holds, and the
run the command line asks for: training/run_folder.py), the run's config from it (what the command
line gives on top, each change listed), the check that the data is the same, and the saved state put
back into the run's parts (weights, optimiser, scaler, loader position, RNG)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from common.errors import UserError
from model import ModelConfig, clean_state_dict, read_checkpoint
from model.checkpoint import first_line, model_config_from
from model.config import model_settings
from training.checkpointer import set_rng_state
from training.config import PRESETS, TRAIN_FIELDS, TrainConfig, make_config, parse_settings
from training.run_folder import STEP_FILE, check_one_run, check_same_run_asked
from training.runtime import Runtime
from training.step import TrainStep


@dataclass
class Resumed:
    """The checkpoint a run continues from."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def latest_checkpoint(out: Path) -> Path:
    """The step file with the highest step number (by number: step-1000000.pt comes after step-999999.pt)."""
    found = [(int(match.group(1)), path) for path in (out.glob("step-*.pt") if out.is_dir() else [])
             if (match := STEP_FILE.fullmatch(path.name))]
    if not found:
        raise UserError(f"--resume: no step-*.pt checkpoint in {out}")
    return max(found)[1]


def resume(out: Path, preset: str | None, settings: Sequence[str], flags: dict[str, Any],
           variant: str | None = None) -> tuple[TrainConfig, Resumed]:
    """The latest checkpoint in `out` and the run's config: the checkpoint's, with what the command
    line gives on top (each change printed)."""
    path = latest_checkpoint(out)
    state = read_checkpoint(path)
    check_one_run(out, path, state)
    check_same_run_asked(path, state, preset, parse_settings(settings))
    saved = state["config"].get("train", {})
    model = model_config_from(state, path)
    if variant is not None and variant != model.variant:
        raise UserError(f"--model {variant}: the run in {out} trains model {model.variant!r}; a resumed run keeps "
                        f"its checkpoint's model (another --out starts a new run)")
    cfg, changes = resumed_config(saved, model, preset, settings, flags)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming {path}: every setting as saved" + ("" if changes else ", none changed")
              + "".join(f"\n  {change}" for change in changes), flush=True)
    return cfg, Resumed(path, state)


def resumed_config(saved: dict, model: ModelConfig, preset: str | None = None, settings: Sequence[str] = (),
                   flags: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: every training field as the checkpoint saved it, so a resume is
    the same run; then what the command line gives (a different --preset, --set, flags) overrides,
    except the architecture, which is the checkpoint's. Returns the config and one line per field
    that changed. (Checkpoints from before the model had its own config saved its fields flat in
    `saved` too: the architecture still comes from `model`.)"""
    training = set(TRAIN_FIELDS)
    values = {name: value for name, value in saved.items() if name in training}
    if model.quantizer != "vq":
        values.pop("reset_every", None)          # saved by runs from before it was VQ's alone
    if preset is not None and preset != values.get("preset"):
        values.update({"preset": preset, **PRESETS[preset]})
    given = {**parse_settings(settings), **{name: value for name, value in (flags or {}).items() if value is not None}}
    architecture = {"rgb": model.in_channels == 3, **model_settings(model)}
    kept = [name for name, value in architecture.items() if name in given and given[name] != value]
    given = {name: value for name, value in given.items() if name not in architecture}
    cfg = make_config(model, {**values, "rgb": architecture["rgb"]}, given)
    changes = [f"{name}: {saved[name]!r} -> {getattr(cfg, name)!r} (from the command line)"
               for name in sorted(training) if name in saved and saved[name] != getattr(cfg, name)]
    changes += [f"{name}: the checkpoint's {architecture[name]!r} kept (the architecture comes from the checkpoint)"
                for name in kept]
    return cfg, changes


def check_same_shards(resumed: Resumed, manifest_sha: str, shards: str) -> None:
    """A run continues on the data it started on: the pair manifest's hash is in every checkpoint."""
    saved = resumed.state.get("shards_manifest_sha256")
    if saved not in (None, manifest_sha):
        raise UserError(f"--resume: {Path(shards) / 'manifest.json'} changed since the checkpoint was written "
                        f"(sha256 {manifest_sha[:12]}, was {saved[:12]}): the run cannot continue on other data; "
                        f"train into a new --out")


def best_so_far(state: dict, best_by: str) -> float:
    """The best validation measure a checkpoint had seen (lower is better), if it measured what this
    run's best_by asks for; otherwise nothing yet. Checkpoints from before best_by existed kept the
    best val/recon under "best_val_loss"."""
    by, value = (state["best"]["by"], state["best"]["value"]) if "best" in state else ("recon", state["best_val_loss"])
    return float(value) if by == best_by else math.inf


def restore(resumed: Resumed, model: torch.nn.Module, train_step: TrainStep, loader, rt: Runtime,
            best_by: str) -> float:
    """Put the checkpoint's state into the run's parts; returns the best validation loss so far."""
    state = resumed.state
    try:
        model.load_state_dict(clean_state_dict(state["model"]))
        train_step.optimizer.load_state_dict(state["optimizer"])
        train_step.scaler.load_state_dict(state["scaler"])
        loader_states = state["loader"]
        loader.load_state_dict(loader_states[rt.rank if len(loader_states) == rt.world_size else 0])
        set_rng_state(state["rng"])
        best_val = best_so_far(state, best_by)
        train_step.overflow_skips = int(state.get("amp_overflow_skips", 0))
    except Exception as error:              # noqa: BLE001 - the file's content, whatever its shape
        raise UserError(f"--resume: checkpoint in {resumed.path.parent} does not fit this run "
                        f"({first_line(error)})") from None
    if rt.main and len(loader_states) != rt.world_size:
        print(f"warning: checkpoint was written by {len(loader_states)} rank(s), this run has "
              f"{rt.world_size}: data order is not resumed exactly", flush=True)
    if rt.main:
        print(f"resumed from step {resumed.step} in {resumed.path.parent}", flush=True)
    return best_val
