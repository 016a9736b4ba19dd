"""Controller checkpoints, by the LAM's rules (DESIGN "Training"): a plain dict of tensors and Python
values that loads with torch.load(weights_only=True), written atomically (temp file, fsync, rename)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from common.errors import UserError
from model import clean_state_dict, read_checkpoint_file
from model.checkpoint import first_line
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
    """The controller checkpoint dict; the LAM's reader (model/checkpoint.py) does the reading, so
    any load failure is the same one line naming the file."""
    return read_checkpoint_file(path, CONTROLLER_FORMAT, "controller checkpoint").state


def load_controller(path: str | Path, device: str | torch.device = "cpu") -> Controller:
    """The controller in eval mode; `.step`, `.lam` (the LAM identity it was trained on) attached."""
    checkpoint = read_controller_checkpoint(path)
    try:
        controller = Controller(ControllerConfig.from_dict(checkpoint["config"]))
        controller.load_state_dict(checkpoint["model"])
        controller.step = int(checkpoint.get("step", 0))
        controller.lam = dict(checkpoint.get("lam", {}))
    except Exception as error:                  # noqa: BLE001 - the file's content, whatever its shape
        raise UserError(f"{path}: controller weights or config unusable ({first_line(error)})") from None
    return controller.to(device).eval()
