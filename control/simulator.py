"""One step of play inside the model: the controller picks the codes for an action (or they are
given: the codes extracted from a recording; or drawn at random, the floor), the LAM decoder or a
world model (control/world.py: the past frames and the codes, and maybe the key) draws the next
frame, and that frame, snapped to the game's palette, is the next step's input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from pipeline.frames import GRID
from pipeline.palette import snap

from control.network import Controller
from control.world import MAX_PAST_FRAMES, WorldModel, stack_past


class Choice(NamedTuple):
    """The codes one step is drawn from: a grid (B, 7, 5) and/or a per-frame action code (B,); and
    the key pressed (B,) where known, which a world model with a key input reads beside the codes."""

    grid: torch.Tensor | None
    action: torch.Tensor | None
    key: torch.Tensor | None = None


@dataclass
class Simulator:
    """One model step: codes from the controller (or at random), the next frame from the decoder.

    `palette` (K, C) in the LAM's colour mode: each generated frame is snapped to its nearest colours
    before it is fed back (pipeline/palette.py says why); None feeds the decoder's output back as it is.
    `world`: the world model that draws instead of the LAM's decoder (None: the LAM's decoder)."""

    lam: torch.nn.Module
    controller: Controller | None
    device: torch.device = torch.device("cpu")
    per_cell: bool = False              # the controller's codes cell by cell, not a grid seen in training
    palette: torch.Tensor | None = None
    world: WorldModel | None = None

    @torch.no_grad()
    def codes(self, cur: torch.Tensor, prev: torch.Tensor, action: torch.Tensor,
              random_codes: torch.Generator | None = None, before: Choice | None = None) -> Choice:
        """What the decoder is given for a key press: (grid codes (B, 7, 5), action codes (B,)), either
        None where the LAM takes none: a LAM with a per-frame action code is played from it alone.
        `before`: the codes of the step before (the controller sees them; None: none)."""
        split = self.lam.action_codes
        cur, prev = cur.to(self.device), prev.to(self.device)
        if random_codes is not None or self.controller is None:
            shape, size = ((cur.shape[0],), split) if split else ((cur.shape[0], *GRID), self.lam.config.codebook_size)
            drawn = torch.randint(0, size, shape, generator=random_codes).to(self.device)
        else:
            last = None if before is None else (before.action.view(-1, 1, 1) if split else before.grid)
            drawn = self.controller.codes(cur, action.to(self.device), prev, per_cell=self.per_cell,
                                          prev_codes=None if last is None else last.to(self.device))
        key = action.to(self.device) if action is not None else None
        return Choice(None, drawn, key) if split else Choice(drawn, None, key)

    @torch.no_grad()
    def draw(self, cur: torch.Tensor, choice: Choice, prev: torch.Tensor | None = None,
             older: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Frame t+1 from frame t, frame t-1 and the choice; `older`: frames before t-1, oldest
        first, for a world model that sees more of the past (None: the oldest given is repeated)."""
        if self.world is None:
            return self.decode(cur, choice.grid, prev, choice.action)
        past = [frame.to(self.device) for frame in (*(older or []), cur if prev is None else prev, cur)]
        frame = self.world(stack_past(past, self.world.past_frames), choice.grid, choice.key).float().clamp_(0, 1)
        return frame if self.palette is None else snap(frame, self.palette.to(frame.device))

    @torch.no_grad()
    def decode(self, cur: torch.Tensor, codes: torch.Tensor | None, prev: torch.Tensor | None = None,
               action: torch.Tensor | None = None) -> torch.Tensor:
        """The LAM's next frame, as fed back: snapped to the palette when there is one; `prev` is
        frame t-1 (a LAM with context uses it; None: frame t); `action` the per-frame action code of
        a LAM that has one (with `codes` None it draws from the past and the action alone)."""
        cur, prev = cur.to(self.device), None if prev is None else prev.to(self.device)
        frame = self.lam.decode(cur, codes, prev, action).float().clamp_(0, 1)
        return frame if self.palette is None else snap(frame, self.palette.to(frame.device))

    @torch.no_grad()
    def rollout(self, start: torch.Tensor, prev: torch.Tensor, actions: torch.Tensor | None = None,
                random_codes: torch.Generator | None = None, codes: torch.Tensor | None = None,
                action_codes: torch.Tensor | None = None, before: Choice | None = None,
                older: list[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        """start, prev: (B, C, 210, 160); actions int64 (B, H), or the codes to play instead of the
        controller's: `codes` int64 (B, H, 7, 5) and, for a LAM with a per-frame action code,
        `action_codes` int64 (B, H) (alone: no grid) -> the H generated frames, one per step. After
        the first step, frame t-1 (for the controller and the LAM) is the previous generated frame,
        and the codes of the step before are those just played (`before`: those of the recorded
        transition into the start frame, which the controller sees first; None: none). With given
        codes, `actions` (if any) are the keys a world model with a key input reads beside them.
        `older`: recorded frames before `prev`, oldest first, for a world model that sees them."""
        cur, prev = start.to(self.device), prev.to(self.device)
        past = [frame.to(self.device) for frame in older or []]
        given = codes is not None or action_codes is not None
        steps = (codes if codes is not None else action_codes if action_codes is not None else actions).shape[1]
        for step in range(steps):
            key = None if actions is None else actions[:, step].to(self.device)
            choice = (Choice(None if codes is None else codes[:, step].to(self.device),
                             None if action_codes is None else action_codes[:, step].to(self.device), key) if given
                      else self.codes(cur, prev, actions[:, step], random_codes, before))
            nxt = self.draw(cur, choice, prev, past)
            yield nxt
            past = [*past, prev][-MAX_PAST_FRAMES:]
            prev, cur, before = cur, nxt, choice
