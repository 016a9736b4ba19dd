"""The checkpoint format, read and written here only: a plain dict loadable with
torch.load(weights_only=True): format, model (unwrapped state_dict), config, step, and whatever
else its writer adds (tensors and plain Python values only). Three kinds share it: the LAM's
("lam-checkpoint/1": config {"model", "train"}, plus the trainer's resume state), the
controller's (control/checkpoint.py: "lam-controller/1") and the world model's (control/world.py:
"lam-world/1")."""
from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from model.config import ModelConfig
from model.lam import LatentActionModel
from pipeline.shards import atomic_write_bytes

CHECKPOINT_FORMAT = "lam-checkpoint/1"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
ZIP_MAGIC = b"PK\x03\x04"             # torch.save's format since torch 1.6


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


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, step: int, *,
                    checkpoint_format: str = CHECKPOINT_FORMAT, **extra) -> None:
    """Write a checkpoint of `model` (unwrapped, no `_orig_mod.`/`module.` keys) atomically: torch.save
    to memory, then temp file + fsync + rename, so a crash never leaves a half-written .pt. `extra`:
    the rest of the dict (the trainer's resume state, the controller's LAM identity and metrics)."""
    state = {"format": checkpoint_format, "model": clean_state_dict(unwrap(model).state_dict()),
             "config": config, "step": int(step), **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint as read from disk: `state` was loaded from the very bytes `sha256` hashes, so a
    file replaced while it is being read can never lend its name to another file's weights."""

    path: Path
    sha256: str
    state: dict


def read_checkpoint_file(path: str | Path, expected_format: str, kind: str = "checkpoint",
                         map_location: str | torch.device = "cpu") -> CheckpointFile:
    """Read `path` once, hash those bytes and torch.load(weights_only=True) them. Any failure
    (missing, unreadable, not a torch file, objects weights_only refuses, another format, an entry
    missing) is one UserError naming the file: the file is the user's input, so whatever torch.load
    raises on it (KeyError, IndexError, struct.error for text or random bytes, ...) is the user's
    problem to fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {kind} not found")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read the {kind} ({error.strerror or error})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:                  # noqa: BLE001 - see the docstring
        raise UserError(f"{path}: not a readable {kind} ({load_failure(error, data)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a {kind} (a dict of format {expected_format!r})")
    if state.get("format") != expected_format:
        raise UserError(f"{path}: format is {state.get('format')!r}, expected {expected_format!r}")
    for key, entry in (("model", dict), ("config", dict), ("step", int)):
        if key not in state:
            raise UserError(f"{path}: {kind} has no {key!r} entry")
        if not isinstance(state[key], entry):
            raise UserError(f"{path}: {kind}'s {key!r} is a {type(state[key]).__name__}, expected a {entry.__name__}")
    return CheckpointFile(path, hashlib.sha256(data).hexdigest(), state)


def finished_run(path: Path, steps: int, train_config: dict, run_local: frozenset[str]) -> dict | None:
    """`--reuse` of a controller or world model: the checkpoint at `path` when it finished `steps`
    steps with `train_config` (the settings in `run_local`, which say where and how it ran and not
    what it learns, aside) and its metrics.json lies beside it; else None, whatever is wrong with
    the file. The caller compares the identities it names (the LAM, the controller)."""
    if not (path.is_file() and (path.parent / "metrics.json").is_file()):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:                       # noqa: BLE001 - not reusable, whatever is wrong with it
        return None
    if not isinstance(state, dict) or state.get("step") != steps:
        return None
    saved = {k: v for k, v in dict(state.get("train_config") or {}).items() if k not in run_local}
    wanted = {k: v for k, v in train_config.items() if k not in run_local}
    return state if saved == wanted else None


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, as `CheckpointFile.sha256` records it; None when unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def load_failure(error: Exception, data: bytes) -> str:
    """Why torch.load failed, in words for the user. Its own weights-only message advises loading
    with weights_only=False, which is wrong advice for a corrupt file."""
    if not data:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch checkpoint, or it holds objects that weights_only=True refuses"
    if not data.startswith(ZIP_MAGIC):
        return "not a torch checkpoint: torch.save writes a zip archive"
    return f"truncated or corrupt: {first_line(error)}"


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict, with one clear UserError for a missing, corrupt or foreign file."""
    return read_checkpoint_file(path, CHECKPOINT_FORMAT, "checkpoint", map_location).state


def model_config_from(checkpoint: dict, path: str | Path = "checkpoint") -> ModelConfig:
    try:
        return ModelConfig.from_dict(checkpoint["config"]["model"])
    except Exception as error:                  # noqa: BLE001 - the file's content, whatever its shape
        raise UserError(f"{path}: checkpoint's model config is unusable ({first_line(error)})") from None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160] or type(error).__name__


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LatentActionModel:
    """The trained model in eval mode on `device`, its architecture rebuilt from the checkpoint.
    `lam.config` is its ModelConfig; `lam.step` the optimiser step it was saved at; `lam.sha256`
    the hash of the bytes the weights were loaded from (the checkpoint's identity); `lam.trained_with`
    the preset and git commit it was trained with, where the checkpoint says (reports record them)."""
    loaded = read_checkpoint_file(path, CHECKPOINT_FORMAT)
    lam = with_weights(LatentActionModel(model_config_from(loaded.state, path)), loaded).to(device)
    train, commit = loaded.state["config"].get("train"), loaded.state.get("git_sha")
    lam.trained_with = {"preset": train.get("preset") if isinstance(train, dict) else None,
                        "commit": commit if isinstance(commit, str) else None}
    return lam


# the facts of a LAM that decide whether an artefact made for one can work with another
LAM_KIND = ("codebook_size", "action_codes", "in_channels")


def lam_identity(lam: LatentActionModel) -> dict:
    """What an artefact made from `lam` records of it, and what a reader holds that record against
    (common/identity.check_made_from): its sha256 and step, and LAM_KIND."""
    return {"sha256": lam.sha256, "step": int(lam.step), "codebook_size": lam.config.codebook_size,
            "action_codes": lam.action_codes, "in_channels": lam.config.in_channels}


def with_weights(module: nn.Module, loaded: CheckpointFile) -> nn.Module:
    """`module` (built from the checkpoint's config) with its weights, in eval mode; `.step` the step
    it was saved at, `.sha256` the hash of the bytes the weights were loaded from."""
    try:
        module.load_state_dict(clean_state_dict(loaded.state["model"]))
    except Exception as error:                  # noqa: BLE001 - a size mismatch, or values that are not tensors
        raise UserError(f"{loaded.path}: weights do not match the saved architecture ({first_line(error)})") from None
    module.step = int(loaded.state["step"])
    module.sha256 = loaded.sha256
    return module.eval()
