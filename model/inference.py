"""Running a trained model outside the training loop (extract.py, evaluate.py, downstream code):
loading it with its identity, the autocast rule shared with the trainer, and how codes are stored."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.device import cpu_native_bf16
from common.errors import UserError
from model.checkpoint import load_checkpoint
from model.lam import LatentActionModel

CODE_DTYPE = np.uint8          # codes are stored one byte each (codes.npy): at most 256 codes
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class CheckpointIdentity:
    path: str
    sha256: str
    step: int
    color: str                 # "gray" | "rgb": the colour mode the model was trained in
    context: int = 0           # 1: the model takes frame t-1 too (ModelConfig.context)


def load_model(path: Path, device: torch.device) -> tuple[LatentActionModel, CheckpointIdentity]:
    """The model in eval mode and its identity (the sha256 of the bytes its weights came from, not
    of a second read that a replaced file could answer); clear errors for an unusable checkpoint."""
    lam = load_checkpoint(path, device)
    if lam.config.codebook_size > np.iinfo(CODE_DTYPE).max + 1:
        raise UserError(f"{path}: codebook of {lam.config.codebook_size} codes does not fit the uint8 codes.npy")
    identity = CheckpointIdentity(str(path), lam.sha256, int(lam.step),
                                  "gray" if lam.config.in_channels == 1 else "rgb", lam.config.context)
    return lam, identity


def codes_to_array(codes: torch.Tensor) -> np.ndarray:
    """Codes (B, 7, 5) int64 on any device -> the stored form: CODE_DTYPE on the CPU."""
    return codes.to("cpu", torch.uint8).numpy().astype(CODE_DTYPE, copy=False)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an amp mode (None: full fp32). `auto` is bf16 where the hardware runs it
    natively (a GPU that supports it; a CPU with avx512_bf16 or AMX) and fp32 elsewhere: emulated
    bf16 is several times slower than fp32, and fp16 needs a GradScaler in training, so it is only
    ever asked for by name. The quantiser's rounding and nearest-code search run in fp32 whatever
    the context."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_native_bf16() is not None
        return torch.bfloat16 if native else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def describe_amp(amp: str, device: torch.device) -> str:
    """What `amp` resolves to on `device` and why, for the first lines of a log."""
    dtype = autocast_dtype(amp, device)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
    if amp != "auto":
        return f"{name} (--amp {amp})"
    if device.type == "cuda":
        return f"{name} (auto: this GPU {'supports' if dtype else 'lacks'} bf16)"
    flag = cpu_native_bf16()
    return f"{name} (auto: " + (f"this CPU has native bf16, {flag})" if flag else
                                "this CPU has no native bf16 (avx512_bf16 or AMX); emulated bf16 is slower than fp32)")


def autocast(device: torch.device, amp: str = "auto"):
    """The autocast context for `amp` on `device` (a no-op context for fp32)."""
    dtype = autocast_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
