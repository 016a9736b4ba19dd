"""Running a trained model outside the training loop (extraction, evaluation, downstream code):
loading it with its identity, the trainer's autocast rule (inference's own is model/precision.py),
the memory layout and CPU threads inference runs with, and how codes are stored."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from common.device import cpu_native_bf16
from common.errors import UserError
from model.checkpoint import load_checkpoint
from model.lam import LatentActionModel
from pipeline.latent import CODE_DTYPES, CheckpointIdentity, code_dtype

AMP_MODES = ("auto", "bf16", "fp16", "off")
__all__ = ["AMP_MODES", "CheckpointIdentity", "autocast", "autocast_dtype", "codes_to_array", "inference_layout",
           "load_model"]


def load_model(path: Path, device: torch.device) -> tuple[LatentActionModel, CheckpointIdentity]:
    """The model in eval mode and its identity (the sha256 of the bytes its weights came from, not
    of a second read that a replaced file could answer); clear errors for an unusable checkpoint."""
    lam = load_checkpoint(path, device)
    size = lam.config.codebook_size
    try:
        code_dtype(size)
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    identity = CheckpointIdentity(str(path), lam.sha256, int(lam.step),
                                  "gray" if lam.config.in_channels == 1 else "rgb", lam.config.context, size,
                                  lam.action_codes)
    return lam, identity


def codes_to_array(codes: torch.Tensor, codebook_size: int | None = None) -> np.ndarray:
    """Codes (B, 7, 5) int64 on any device -> the stored form on the CPU: the smallest unsigned type
    that holds `codebook_size` codes (pipeline.latent.code_dtype); without a size, the widest stored
    type, so that no code wraps whatever the codebook."""
    dtype = code_dtype(codebook_size) if codebook_size is not None else np.dtype(CODE_DTYPES[-1])
    return codes.to("cpu", torch.int64).numpy().astype(dtype)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The trainer's autocast dtype for an amp mode (None: full fp32). `auto` is bf16 where the hardware runs it
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


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """The autocast context for `dtype` on `device` (None, the default: fp32, a no-op context).
    Inference gets its dtype from model/precision.py's rule."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_layout(lam: LatentActionModel, device: torch.device) -> LatentActionModel:
    """The model in the memory layout inference runs fastest in, changed in place: channels_last on
    a CPU, where oneDNN's NHWC convolutions ran the demo model's encode and decode 1.2-1.5x faster
    (BENCHMARKS.md "Stages"); the outputs differ from NCHW's by float rounding only (tested: the
    same codes). GPUs are left as they are: not measured here."""
    if device.type == "cpu":
        lam.to(memory_format=torch.channels_last)
    return lam
