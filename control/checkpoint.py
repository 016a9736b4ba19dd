"""Controller checkpoints, by the LAM's rules (DESIGN "Training"): a plain dict of tensors and Python
values that loads with torch.load(weights_only=True), written atomically (temp file, fsync, rename)."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from model import clean_state_dict
from pipeline.errors import UserError
from pipeline.shards import atomic_write_bytes

from control.network import Controller, ControllerConfig

CONTROLLER_FORMAT = "lam-controller/1"


def save_controller(path: str | Path, controller: Controller, *, step: int, lam: dict | None = None,
                    train_config: dict | None = None, metrics: dict | None = None,
                    optimizer: dict | None = None) -> Path:
    """Write the controller with what it was trained for: `lam` names the checkpoint whose codes it
    predicts ({"sha256", "step"} from the latent manifest)."""
    checkpoint = {"format": CONTROLLER_FORMAT, "model": clean_state_dict(controller.state_dict()),
                  "config": controller.config.to_dict(), "step": int(step), "lam": lam or {},
                  "train_config": train_config or {}, "metrics": metrics or {}}
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def read_controller_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: controller checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path}: not a readable controller checkpoint (truncated or corrupt: {first_line[:160]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CONTROLLER_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path}: format is {found!r}, expected {CONTROLLER_FORMAT!r}")
    return checkpoint


def load_controller(path: str | Path, device: str | torch.device = "cpu") -> Controller:
    """The controller in eval mode; `.step`, `.lam` (the LAM identity it was trained on) attached."""
    checkpoint = read_controller_checkpoint(path)
    try:
        controller = Controller(ControllerConfig.from_dict(checkpoint["config"]))
        controller.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: controller weights or config unusable ({str(error).splitlines()[0][:160]})") from None
    controller.step = int(checkpoint.get("step", 0))
    controller.lam = dict(checkpoint.get("lam", {}))
    return controller.to(device).eval()
