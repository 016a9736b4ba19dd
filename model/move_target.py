"""Which way each cell's content moved across, read from the pixels of frames t and t+1 (no labels):
the target of the move prior (ModelConfig.motion_weight, model/lam.py).

Left alone, the codes of the paddle's cells name where the paddle lands, which with frame t (the
decoder has it) says the move, but on its own does not say its direction (docs/model.md, "Why the
linear probe stops short of 93 %"). The prior asks each cell's code, through a linear head, to say
the direction as well. The direction is the sign of where pixels appeared minus where they
vanished: a paddle moving 1 px right gains a column at its right edge and loses one at its left.
"""
from __future__ import annotations

import torch

SCALE_PX = 4.0         # tanh(dx / 4): a 1-px move of a 16-px paddle (dx = 16) is ±1, a jitter of noise is not
MIN_MASS = 1.0         # both appeared and vanished pixels must sum to at least this (a paddle's column: 4 px × ~0.5)


@torch.no_grad()
def horizontal_move_target(cur: torch.Tensor, nxt: torch.Tensor,
                           grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, C, H, W) in [0, 1] -> (target, mask), each (B, rows, cols) float32: target in
    (-1, 1), left to right, tanh((centroid of appeared - centroid of vanished) / SCALE_PX) over the
    cell's rows and its columns widened by half a cell each side (an object across a cell border
    counts for both cells); mask 1 where pixels both appeared and vanished there, else 0."""
    rows, cols = grid
    change = (nxt.float() - cur.float()).sum(1)                     # (B, H, W)
    batch, height, width = change.shape
    band, cell = height // rows, width // cols
    change = change[:, :rows * band].reshape(batch, rows, band, width)
    appeared, vanished = change.clamp(min=0).sum(2), (-change).clamp(min=0).sum(2)    # (B, rows, W)
    x = torch.arange(width, device=change.device, dtype=torch.float32)
    start = torch.arange(cols, device=change.device) * cell - cell // 2
    window = ((x >= start[:, None]) & (x < start[:, None] + 2 * cell)).float()          # (cols, W)

    def mass_and_centre(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mass = torch.einsum("brw,cw->brc", profile, window)
        return mass, torch.einsum("brw,cw->brc", profile * x, window) / mass.clamp(min=1e-6)

    mass_in, centre_in = mass_and_centre(appeared)
    mass_out, centre_out = mass_and_centre(vanished)
    target = torch.tanh((centre_in - centre_out) / SCALE_PX)
    return target, ((mass_in > MIN_MASS) & (mass_out > MIN_MASS)).float()
