"""The game's palette: the few colours its frames are drawn in, read off the recordings.

Atari Breakout draws every frame in nine colours (nine gray levels once converted). A model's
prediction is a little off everywhere, and played forward each frame is the next one's input: the
errors pile up as grain until the walls and bricks dissolve. Snapping each generated frame to the
nearest palette colour before it is fed back removes that grain at every step (with recorded codes,
200 steps on: 32.6 dB against 12.5 dB unsnapped, README "Playing in the model").

The palette is measured, not written down: `pipeline.pack` collects the colours of a sample of the
frames it packs into the pair manifest (`"palette": {"rgb": [[r, g, b], ...]}`), extraction copies
it into the latent manifest, and rollouts, the play server and a downstream world model read it
from there (`read_palette`). Shards packed before it existed get it from their frames
(`Palette.of_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from pipeline.frames import rgb_to_gray_uint8
# more than MAX_COLOURS is not a palette game: nothing to snap to (the manifest schema's rule, MIN_COLOURS too)
from pipeline.manifest_schema import MAX_COLOURS, MIN_COLOURS, PALETTE, SchemaError, validate  # noqa: F401 - pack reads them here

if TYPE_CHECKING:      # torch is imported where it is used: the packer needs only the colours
    import torch


@dataclass(frozen=True)
class Palette:
    """The game's colours, uint8 (K, 3) RGB, sorted."""

    rgb: np.ndarray

    @classmethod
    def of_frames(cls, frames: Iterable[np.ndarray | torch.Tensor]) -> "Palette | None":
        """The colours of uint8 (..., 3) RGB frames, or None when there are more than MAX_COLOURS."""
        seen: set[int] = set()
        for frame in frames:
            seen.update(colour_ids(frame).tolist())
            if len(seen) > MAX_COLOURS:
                return None
        return cls.from_ids(seen) if seen else None

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> "Palette":
        ids = np.array(sorted(ids), dtype=np.uint32)
        return cls(np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=1).astype(np.uint8))

    def to_json(self) -> dict:
        return {"rgb": self.rgb.tolist()}

    @classmethod
    def from_json(cls, value: dict) -> "Palette":
        try:
            validate(value, PALETTE, "palette")          # the manifest schema's rule, for a dict from anywhere
        except SchemaError as error:
            raise ValueError(str(error)) from None
        return cls(np.asarray(value["rgb"], dtype=np.uint8))

    def levels(self, channels: int) -> torch.Tensor:
        """float (K', C) in [0, 1]: the colours in the model's colour mode (C = 1 gray, 3 RGB); in gray,
        colours of the same luma are one level."""
        import torch

        rgb = torch.from_numpy(self.rgb)
        if channels == 3:
            return rgb.float() / 255
        return torch.unique(rgb_to_gray_uint8(rgb[None])[0].float()).view(-1, 1) / 255


def colour_ids(frame: np.ndarray | torch.Tensor) -> np.ndarray:
    """The distinct colours of a uint8 (..., 3) RGB frame as 24-bit integers."""
    rgb = np.asarray(frame).reshape(-1, 3).astype(np.uint32)
    return np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])


def snap(frames: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) -> the same with each pixel the nearest of `levels` (K, C), by squared
    distance (for gray, a pixel exactly halfway between two levels takes the darker).

    Gray (C = 1), the common case when playing, is a binary search among the midpoints of the
    sorted levels: no (B, K, H, W) distance tensor and no argmin across it, which took a third of a
    rollout's time (measured: BENCHMARKS.md "Stages", palette snap). Colours: the distances with
    the K levels last, so that the argmin runs along contiguous memory."""
    import torch

    colours = levels.to(frames.dtype)
    if colours.shape[1] == 1:
        grey = colours[:, 0].sort().values
        between = (grey[1:] + grey[:-1]) / 2                 # x <= between[i] is nearer grey[i] (or as near)
        return grey[torch.bucketize(frames, between)]
    pixels = frames.permute(0, 2, 3, 1)                                                    # (B, H, W, C)
    distance = (pixels.unsqueeze(3) - colours).pow(2).sum(-1)                              # (B, H, W, K)
    return colours[distance.argmin(-1)].permute(0, 3, 1, 2).contiguous()


def frame_levels(frames: torch.Tensor) -> torch.Tensor | None:
    """The distinct colours of float (..., C, H, W) frames in [0, 1] as (K, C) levels, or None when
    there are more than MAX_COLOURS: the palette of shards whose manifest does not record one."""
    import torch

    channels = frames.shape[-3]
    values = (frames.movedim(-3, -1).reshape(-1, channels) * 255).round().to(torch.int64)
    levels = torch.unique(values, dim=0)
    return None if len(levels) > MAX_COLOURS else levels.float() / 255


def read_palette(manifest: dict) -> Palette | None:
    """The palette a pair or latent manifest records, or None (shards packed before it was recorded)."""
    value = manifest.get("palette")
    return None if value is None else Palette.from_json(value)
