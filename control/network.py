"""The controller: frame t (and t-1) plus the real action -> logits over the codebook for every
cell of the 7 x 5 latent grid. Small on purpose: the play page runs it on a CPU once per frame."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.actions import ACTION_NAMES
from pipeline.frames import CODEBOOK_SIZE, GRID


TARGETS = ("grid", "action")


@dataclass
class ControllerConfig:
    in_channels: int = 1              # the LAM's colour mode: 1 gray, 3 RGB
    # what it predicts: the LAM's code grid (one of codebook_size codes per cell), or, for a LAM with
    # a per-frame action code (Genie's split), that one code (one of codebook_size)
    target: str = "grid"
    use_prev: bool = True             # also see frame t-1: the ball's direction is not in one frame
    # also see the codes of the step before (in play: the codes it chose last step): a code names a
    # move, and what moved last step (the ball's flight, the paddle's momentum) mostly moves on alike.
    # Off by default: it gets more changed cells right one step at a time (37.8 % against 33.7 %) but
    # played forward it finds the ball no more often (README "Playing in the model")
    prev_codes: bool = False
    code_embed: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)   # five stride-2 stages: 210 x 160 -> 7 x 5
    action_dim: int = 32
    hidden: int = 192
    codebook_size: int = CODEBOOK_SIZE
    num_actions: int = len(ACTION_NAMES)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if len(self.channels) != 5 or min(self.channels) < 1:
            raise ValueError(f"channels must be five positive widths (one per stride-2 stage), got {self.channels}")
        for name in ("action_dim", "hidden", "codebook_size", "num_actions", "code_embed"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["channels"] = list(self.channels)       # plain list: weights_only loads it back
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ControllerConfig":
        """A saved config; one from before `target` predicts the grid, one from before `prev_codes`
        sees no codes."""
        values = {"prev_codes": False, **values}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown controller config field(s): {', '.join(sorted(unknown))}")
        return cls(**values)


class Controller(nn.Module):
    def __init__(self, config: ControllerConfig | None = None):
        super().__init__()
        self.config = config = config or ControllerConfig()
        frames_in = config.in_channels * (2 if config.use_prev else 1)
        stages, width = [], frames_in
        for out in config.channels:
            # 3x3 stride 2, padding 1: 210 x 160 -> 105 x 80 -> 53 x 40 -> 27 x 20 -> 14 x 10 -> 7 x 5
            stages += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        self.frames = nn.Sequential(*stages)
        self.action = nn.Embedding(config.num_actions, config.action_dim)
        # where a cell is matters (the paddle lives in the bottom row): a learned map per cell
        self.position = nn.Parameter(torch.zeros(config.action_dim, *GRID))
        # the previous codes, one learned vector per code and one for "none" (an episode's start)
        self.code_embedding = (nn.Embedding(config.codebook_size + 1, config.code_embed) if config.prev_codes
                               else None)
        # 3 x 3 mixing over the grid lets the action's effect depend on the neighbouring cells
        codes_in = config.code_embed if config.prev_codes else 0
        self.head = nn.Sequential(
            nn.Conv2d(width + config.action_dim + codes_in, config.hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(config.hidden, config.hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(config.hidden, config.codebook_size, 1))
        # the whole code grids seen in training, most common first (control.train fills it)
        self.register_buffer("seen_grids", torch.zeros(0, GRID[0] * GRID[1], dtype=self.grid_dtype))

    def forward(self, cur: torch.Tensor, action: torch.Tensor, prev: torch.Tensor | None = None,
                prev_codes: torch.Tensor | None = None) -> torch.Tensor:
        """cur, prev: float (B, C, 210, 160) in [0, 1]; action: int64 (B,); prev_codes: the codes of
        the step before, int64 (B, 7, 5) (or (B, 1, 1) for target "action"), negative where there
        is none -> logits (B, K, 7, 5) over each cell's codes, or (B, K) over the per-frame
        action codes (target "action": the cells' evidence averaged). Without `prev` (first frame
        of an episode) frame t stands in for t-1; without `prev_codes`, none."""
        frames = cur
        if self.config.use_prev:
            frames = torch.cat([cur, cur if prev is None else prev], dim=1)
        features = self.frames(frames)
        if tuple(features.shape[-2:]) != GRID:
            raise ValueError(f"expected 210 x 160 frames, got {tuple(cur.shape[-2:])}")
        action = self.action(action.long())[:, :, None, None] + self.position
        parts = [features, action.expand(len(features), -1, -1, -1)]
        if self.code_embedding is not None:
            none = self.config.codebook_size                      # the "no codes before" token
            prev_codes = (torch.full((len(features), *self.cells), none, device=cur.device) if prev_codes is None
                          else torch.where(prev_codes < 0, none, prev_codes.long()))
            embedded = self.code_embedding(prev_codes).permute(0, 3, 1, 2)
            parts.append(embedded.expand(-1, -1, *GRID))
        logits = self.head(torch.cat(parts, dim=1))
        return logits.mean((2, 3)) if self.config.target == "action" else logits

    def cell_logits(self, cur: torch.Tensor, action: torch.Tensor, prev: torch.Tensor | None = None,
                    prev_codes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits as a grid, (B, K, h, w): the 7 x 5 cells, or one cell holding the action code, so
        that training and scoring treat both targets alike."""
        logits = self(cur, action, prev, prev_codes)
        return logits[:, :, None, None] if self.config.target == "action" else logits

    @property
    def cells(self) -> tuple[int, int]:
        """The target's grid: (7, 5), or (1, 1) for the per-frame action code."""
        return (1, 1) if self.config.target == "action" else GRID

    @torch.no_grad()
    def codes(self, cur: torch.Tensor, action: torch.Tensor, prev: torch.Tensor | None = None,
              temperature: float = 0.0, generator: torch.Generator | None = None,
              per_cell: bool = False, prev_codes: torch.Tensor | None = None) -> torch.Tensor:
        """The codes to feed the LAM decoder: the grid, int64 (B, 7, 5), or (target "action") the action
        code, int64 (B,); the most likely, or sampled at `temperature`. With `seen_grids` (and not `per_cell`) the choice is among the whole grids seen
        in training, scored by the sum of their cells' log-probabilities; otherwise cell by cell.

        Why whole grids: chosen cell by cell, one unlikely code beside its neighbours' (the paddle
        spans two cells, and the decoder's shift for a block reads a 3 x 3 neighbourhood of codes)
        makes a combination the LAM never saw, which erases the paddle; played forward, that is final."""
        logits = self(cur, action, prev, prev_codes).float()
        if self.config.target == "action":
            return (logits.argmax(1) if temperature <= 0 else
                    torch.multinomial(F.softmax(logits / temperature, dim=1), 1, generator=generator)[:, 0])
        if len(self.seen_grids) and not per_cell:
            scores = grid_scores(logits.log_softmax(1).flatten(2), self.seen_grids)
            pick = (scores.argmax(1) if temperature <= 0 else
                    torch.multinomial(F.softmax(scores / temperature, dim=1), 1, generator=generator)[:, 0])
            return self.seen_grids[pick].long().view(-1, *GRID)
        if temperature <= 0:
            return logits.argmax(1)
        probs = F.softmax(logits / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[0], *GRID)

    def set_seen_grids(self, grids: torch.Tensor) -> None:
        """The code grids (N, 7·5) the controller may answer with (see `codes`); empty: cell by cell."""
        self.seen_grids = grids.to(device=self.seen_grids.device, dtype=self.grid_dtype).reshape(-1, GRID[0] * GRID[1])

    @property
    def grid_dtype(self) -> torch.dtype:
        return torch.uint8 if self.config.codebook_size <= 256 else torch.uint16   # a byte a cell where it fits

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of seen grids is the checkpoint's; a checkpoint from before them has none
        key = prefix + "seen_grids"
        self.set_seen_grids(state_dict.setdefault(key, self.seen_grids.new_zeros(0, GRID[0] * GRID[1])))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def grid_scores(log_probs: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """log_probs (B, K, cells), grids (N, cells) of code indices -> (B, N): each grid's summed
    log-probability. One cell at a time, so memory is B x N, not B x N x cells."""
    grids = grids.long()
    scores = log_probs.new_zeros(log_probs.shape[0], grids.shape[0])
    for cell in range(grids.shape[1]):
        scores += log_probs[:, grids[:, cell], cell]
    return scores


def grid_bytes(codes: torch.Tensor) -> list[bytes]:
    """Each code grid of (B, 7, 5) as the bytes of its uint16 cells: a Counter key, whatever the codebook."""
    return [row.tobytes() for row in codes.flatten(1).numpy().astype(np.uint16)]


def most_common_grids(counts: Counter, limit: int) -> torch.Tensor:
    """The `limit` most frequent code grids of a Counter keyed by `grid_bytes` -> (N, 35) int64."""
    joined = b"".join(grid for grid, _ in counts.most_common(limit))
    return torch.from_numpy(np.frombuffer(joined, dtype=np.uint16).astype(np.int64)).view(-1, GRID[0] * GRID[1])
