"""Finite scalar quantisation (ModelConfig.quantizer = "fsq", FSQConfig; Mentzer et al. 2023, "Finite Scalar
Quantization: VQ-VAE Made Simple").

Each cell's 128-d encoder output is projected to a few scalars (3 for levels 8, 8, 4), each bounded
by a tanh and rounded to its own number of levels; the code is the grid point's index (8·8·4 = 256
codes), and a projection back to 128-d feeds the decoder. There is no codebook to learn, so nothing
collapses, nothing needs resetting and no commitment, codebook or entropy term is needed.

Why here: with the nearest-code quantiser the encoder's continuous output named the paddle's
displacement (a linear read-out within 2 px for 56 % of val pairs) but its codes did not (26 %):
the few codes the paddle's cells used lumped moves of 2 and 16 px together, and the decoder copied
the paddle to the wrong place. Rounding a scalar keeps nearby moves apart by construction.

The public face is the vector quantiser's: forward(z) -> (quantised, codes, losses), lookup(codes),
`codebook` (K, D) (the 256 grid points projected to the decoder's 128 dims), reset_dead_codes().
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.conv import Conv2d



def check_codes(codes: torch.Tensor, size: int) -> None:
    """Every code in [0, size), or a ValueError naming the first one outside."""
    outside = (codes < 0) | (codes >= size)
    if bool(outside.any()):
        raise ValueError(f"code {int(codes[outside].flatten()[0])} is outside the codebook's {size} codes "
                         f"(0..{size - 1})")


class ScalarQuantizer(nn.Module):
    def __init__(self, levels: tuple[int, ...], code_dim: int):
        """`levels` per scalar (FSQConfig.levels for the grid; ActionCodeConfig.levels for the
        per-frame action code); vectors of `code_dim` in and out."""
        super().__init__()
        levels = list(levels)
        self.codebook_size, self.code_dim = math.prod(levels), code_dim
        # derived from the config, so not saved with the weights
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long).view(1, -1, 1, 1), persistent=False)
        self.down = Conv2d(code_dim, len(levels), 1)
        self.up = Conv2d(len(levels), code_dim, 1)

    @property
    def half_width(self) -> torch.Tensor:
        return torch.div(self.levels, 2, rounding_mode="floor")

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """Each scalar squashed into (−L/2, L/2), shifted half a step for even L, so that rounding
        gives exactly L values: −L/2 .. L/2 − 1 for even L, −(L−1)/2 .. (L−1)/2 for odd."""
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        return torch.tanh(h + torch.atanh(offset / half)) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, D, H, W) -> quantised (B, D, H, W), codes (B, H, W) int64, losses (all 0: nothing to learn)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.bound(self.down(z.float()))
            rounded = bounded + (bounded.round() - bounded).detach()     # straight-through
            codes = ((rounded.detach().round() + self.half_width).long() * self.basis).sum(1)
            quantised = self.up(rounded / self.half_width)
        zero = quantised.new_zeros(())
        return quantised, codes, {"commitment": zero, "codebook": zero, "entropy": zero}

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> quantised vectors (B, D, H, W), as the forward pass produces them. A
        code outside [0, codebook_size) is a ValueError: the digits' `% levels` would wrap it (259
        drawn as 3)."""
        check_codes(codes, self.codebook_size)
        digits = torch.div(codes[:, None], self.basis, rounding_mode="floor") % self.levels.long()
        return self.up((digits - self.half_width) / self.half_width)

    @property
    def codebook(self) -> torch.Tensor:
        """The decoder-side vector of every code, (K, D)."""
        codes = torch.arange(self.codebook_size, device=self.levels.device).view(1, -1, 1)
        return self.lookup(codes)[0, :, :, 0].t()

    def reset_dead_codes(self) -> int:
        return 0                  # every grid point stays reachable: nothing to reset

    def forward_state(self) -> dict:
        return {}                 # a forward pass changes nothing here

    def restore_forward_state(self, state: dict) -> None:
        pass
