"""Frame constants and the one preprocessing function shared by every loader and by evaluation.

DALI and the plain-PyTorch path both hand decoded uint8 frames to `to_model_input`, so the two
backends cannot drift apart: a test holds them against each other and against PIL.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch is imported where it is used: the packer needs only the constants
    import torch

FRAME_HEIGHT = 210
FRAME_WIDTH = 160
GRID = (7, 5)          # latent code grid (rows, cols) for a 210 x 160 frame
CODEBOOK_SIZE = 256

# ITU-R 601 luma in PIL's fixed-point form: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
# Using PIL's exact integer arithmetic (not float 0.299/0.587/0.114) makes the gray frames
# bit-identical to Image.convert("L"), on any device.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def rgb_to_gray_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., H, W, 1) uint8, identical to PIL's convert("L")."""
    import torch

    # Per channel with in-place int32 adds: 8-10x faster on a CPU than a weighted sum over the
    # innermost size-3 dimension, and the same bits.
    r, g, b = rgb.unbind(-1)
    luma = r.to(torch.int32) * _LUMA_WEIGHTS[0]
    luma.add_(g.to(torch.int32), alpha=_LUMA_WEIGHTS[1]).add_(b.to(torch.int32), alpha=_LUMA_WEIGHTS[2])
    return luma.add_(0x8000).bitwise_right_shift_(16).to(torch.uint8).unsqueeze(-1)


def to_model_input(frames: torch.Tensor, grayscale: bool = True) -> torch.Tensor:
    """Decoded frames (..., H, W, 3) uint8 (HWC, as decoders give them) -> float32 (..., C, H, W) in [0, 1].

    Runs wherever `frames` lives: on the GPU the conversion and normalisation happen on the device.
    A (..., H, W, 1) input is taken as already gray.
    """
    import torch

    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    if grayscale and frames.shape[-1] == 3:
        frames = rgb_to_gray_uint8(frames)
    elif not grayscale and frames.shape[-1] != 3:
        raise ValueError(f"RGB output asked for, but frames have {frames.shape[-1]} channel(s)")
    return frames.movedim(-1, -3).to(torch.float32).div_(_scale_on(frames.device))


_SCALES: dict = {}


def _scale_on(device) -> torch.Tensor:
    """255 as a 0-dim float32 tensor on `device`. Dividing by it, not by the Python number 255: CUDA
    divides by a host scalar as a multiplication by its reciprocal, which rounds 126 of the 256
    byte values differently from a true division, so the same frame came out of the loader with
    other bits on a GPU than on a CPU. Divided by a tensor on its own device, both round correctly
    (IEEE division), and on a CPU it is also the faster of the two."""
    import torch

    scale = _SCALES.get(device)
    if scale is None:
        scale = _SCALES[device] = torch.tensor(255.0, dtype=torch.float32, device=device)
    return scale
