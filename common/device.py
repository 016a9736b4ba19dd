"""The one device rule, shared by the loader, the trainer's runtime, extract.py and evaluate.py."""
from __future__ import annotations

import torch

from common.errors import UserError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The one device rule: None or "auto" is the current GPU when there is one, else the CPU; a GPU
    asked for by name must exist."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):         # 'bogus', 'cuda:x': torch's own error is a traceback
        raise UserError(f"device {device!r} is not a device; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but torch sees no GPU (use device='cpu')")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"device {device} is not supported; use 'cuda' or 'cpu'")
    if device.type == "cuda" and device.index is None:
        # pin the caller's current GPU (its DDP rank's): the loader's thread would otherwise see GPU 0
        device = torch.device("cuda", torch.cuda.current_device())
    return device
