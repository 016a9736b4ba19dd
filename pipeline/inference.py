"""What extract.py and evaluate.py share about running a trained model: loading it with its identity
(checkpoint sha256 and step, colour mode), autocast, and which loader backend to use."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.shards import sha256_file

CODE_DTYPE = np.uint8          # codes are stored one byte each: at most 256 codes


@dataclass(frozen=True)
class CheckpointIdentity:
    path: str
    sha256: str
    step: int
    color: str                 # "gray" | "rgb": the colour mode the model was trained in


def load_model(path: Path, device: torch.device):
    """The model in eval mode and its identity; clear errors for an unusable checkpoint."""
    from model import load_checkpoint

    lam = load_checkpoint(path, device)
    if lam.config.codebook_size > np.iinfo(CODE_DTYPE).max + 1:
        raise UserError(f"{path}: codebook of {lam.config.codebook_size} codes does not fit the uint8 codes.npy")
    identity = CheckpointIdentity(str(path), sha256_file(path), int(lam.step),
                                  "gray" if lam.config.in_channels == 1 else "rgb")
    return lam, identity


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that have it (fp16 otherwise); plain fp32 on CPU. The quantiser's
    nearest-code search runs in fp32 whatever the context."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def default_backend() -> str:
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "torch"


