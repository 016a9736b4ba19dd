"""Controller checkpoints: the LAM's checkpoint format (model/checkpoint.py writes and reads both
kinds) with format "lam-controller/1", the controller's config, and the LAM whose codes it predicts."""
from __future__ import annotations

from pathlib import Path

import torch

from common.errors import UserError
from model.checkpoint import first_line, read_checkpoint_file, save_checkpoint, with_weights

from control.network import Controller, ControllerConfig

CONTROLLER_FORMAT = "lam-controller/1"


def save_controller(path: str | Path, controller: Controller, *, step: int, lam: dict | None = None,
                    train_config: dict | None = None, metrics: dict | None = None) -> Path:
    """Write the controller with what it was trained for: `lam` names the checkpoint whose codes it
    predicts ({"sha256", "step"} from the latent manifest)."""
    save_checkpoint(path, controller, controller.config.to_dict(), step, checkpoint_format=CONTROLLER_FORMAT,
                    lam=lam or {}, train_config=train_config or {}, metrics=metrics or {})
    return Path(path)


def controller_lam(controller: Controller) -> dict:
    """What the controller records of the LAM it was trained for (model/checkpoint.lam_identity's
    terms): what its training wrote, and what its own shape implies (a controller from before it
    wrote the rest): its colour mode, and grid codes of its codebook, or that many action codes."""
    config = controller.config
    implied = ({"action_codes": config.codebook_size} if config.target == "action"
               else {"codebook_size": config.codebook_size, "action_codes": 0})
    return {"in_channels": config.in_channels, **implied, **controller.lam}


def load_controller(path: str | Path, device: str | torch.device = "cpu") -> Controller:
    """The controller in eval mode; `.step`, `.lam` (the LAM identity it was trained on) attached."""
    loaded = read_checkpoint_file(path, CONTROLLER_FORMAT, "controller checkpoint")
    try:
        config, lam = ControllerConfig.from_dict(loaded.state["config"]), dict(loaded.state.get("lam", {}))
    except Exception as error:                  # noqa: BLE001 - the file's content, whatever its shape
        raise UserError(f"{path}: controller config unusable ({first_line(error)})") from None
    controller = with_weights(Controller(config), loaded)
    controller.lam = lam
    return controller.to(device)
