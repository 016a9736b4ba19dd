"""The checkpoint format, read and written here only: a plain dict loadable with
torch.load(weights_only=True): format, model (unwrapped state_dict), config ({"model", "train"}),
step, and whatever resume state the trainer adds (tensors and plain Python values only)."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.lam import LatentActionModel
from pipeline.errors import UserError
from pipeline.shards import atomic_write_bytes

CHECKPOINT_FORMAT = "lam-checkpoint/1"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    """State dict keys without wrapper prefixes, whatever wrapped the model."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, step: int, **resume_state) -> None:
    """Write a checkpoint of `model` (unwrapped, no `_orig_mod.`/`module.` keys) atomically: torch.save
    to memory, then temp file + fsync + rename, so a crash never leaves a half-written .pt."""
    state = {"format": CHECKPOINT_FORMAT, "model": clean_state_dict(unwrap(model).state_dict()),
             "config": config, "step": int(step), **resume_state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load(weights_only=True) with one clear UserError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError,
            io.UnsupportedOperation) as error:
        raise UserError(f"{path}: not a readable checkpoint ({load_failure(error)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path}: format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    for key in ("model", "config", "step"):
        if key not in checkpoint:
            raise UserError(f"{path}: checkpoint has no {key!r} entry")
    return checkpoint


def load_failure(error: Exception) -> str:
    """Why torch.load failed, in words for the user. Its own weights-only message advises loading
    with weights_only=False, which is wrong advice for a corrupt file."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch checkpoint, or it holds objects that weights_only=True refuses"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"truncated or corrupt: {first_line[:160]}"


def model_config_from(checkpoint: dict, path: str | Path = "checkpoint") -> ModelConfig:
    try:
        return ModelConfig.from_dict(checkpoint["config"]["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: checkpoint's model config is unusable ({error})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LatentActionModel:
    """The trained model in eval mode on `device`, its architecture rebuilt from the checkpoint.
    `lam.config` is its ModelConfig; `lam.step` the optimiser step it was saved at."""
    checkpoint = read_checkpoint(path, map_location="cpu")
    model = LatentActionModel(model_config_from(checkpoint, path))
    try:
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not match the saved architecture ({str(error).splitlines()[0]})") from None
    model.step = int(checkpoint["step"])
    return model.to(device).eval()
