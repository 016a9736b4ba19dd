"""One step of play inside the model: the controller picks the codes for an action (or they are
drawn at random, the floor), the LAM decoder draws the next frame; `rollout` feeds it back in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.frames import GRID

from control.network import Controller


@dataclass
class Simulator:
    """One model step: codes from the controller (or at random), the next frame from the decoder."""

    lam: torch.nn.Module
    controller: Controller | None
    device: torch.device = torch.device("cpu")
    per_cell: bool = False              # the controller's codes cell by cell, not a grid seen in training

    @torch.no_grad()
    def codes(self, cur: torch.Tensor, prev: torch.Tensor, action: torch.Tensor,
              random_codes: torch.Generator | None = None) -> torch.Tensor:
        if random_codes is not None or self.controller is None:
            size = self.lam.config.codebook_size
            return torch.randint(0, size, (cur.shape[0], *GRID), generator=random_codes).to(self.device)
        return self.controller.codes(cur, action.to(self.device), prev, per_cell=self.per_cell)

    @torch.no_grad()
    def decode(self, cur: torch.Tensor, codes: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The LAM's next frame; `prev` is frame t-1 (a LAM with context uses it; None: frame t)."""
        return self.lam.decode(cur, codes, prev).float().clamp_(0, 1)

    @torch.no_grad()
    def rollout(self, start: torch.Tensor, prev: torch.Tensor, actions: torch.Tensor,
                random_codes: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """start, prev: (B, C, 210, 160); actions int64 (B, H) -> the H generated frames, one per step.
        After the first step, frame t-1 (for the controller and the LAM) is the previous generated frame."""
        cur, prev = start.to(self.device), prev.to(self.device)
        for step in range(actions.shape[1]):
            nxt = self.decode(cur, self.codes(cur, prev, actions[:, step], random_codes), prev)
            yield nxt
            prev, cur = cur, nxt
