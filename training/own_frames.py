"""Training on the model's own frames (issue "Play forward", GameNGen's and scheduled sampling's
lesson): played forward, the decoder moves a frame it drew itself, with its small errors (a faint
second ball, a smeared edge), and has only ever seen recorded frames. So for a share of each batch
the decoder starts from its own one-step drawing of frame t (from frame t-1 and the codes of
t-1 -> t, snapped to the game's palette as play snaps it) while the codes still come from the
recorded pair (t, t+1) and the target is the recorded t+1: it learns to draw the right next frame
from a slightly wrong one, which is what a rollout asks of it.

The drawing runs without gradient and in eval mode (BatchNorm's running statistics, no quantiser
bookkeeping), from step `start` on (early on the model's drawings are noise); which samples get it
is drawn from a generator seeded by the run's seed and the step, so a resumed run draws the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.palette import snap


@dataclass
class OwnFrames:
    share: float                        # of each batch's samples
    start: int                          # the first step that uses them
    seed: int
    levels: torch.Tensor | None         # the palette (K, C), or None: not snapped

    def __call__(self, model: torch.nn.Module, batch: dict, step: int) -> torch.Tensor | None:
        """The frames the decoder starts from at update `step` (frame t, or the model's own drawing
        of it where drawn), or None when this step uses none."""
        if step < self.start or "prev" not in batch:
            return None
        cur, prev = batch["cur"], batch["prev"]
        chosen = torch.rand(len(cur), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step)) < self.share
        if not chosen.any():
            return None
        rows = chosen.nonzero()[:, 0].to(cur.device)           # drawn for the chosen samples only
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                # frame t-1 stands in for t-2 where the model takes context: one frame of history is enough
                before, now = prev[rows], cur[rows]
                grid, action = model.encode_both(before, now, before)
                drawn = model.decode(before, grid, before, action).float().clamp(0, 1)
        finally:
            model.train(was_training)
        if self.levels is not None:
            drawn = snap(drawn, self.levels.to(drawn.device))
        return cur.index_copy(0, rows, drawn.to(cur.dtype))
