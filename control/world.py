"""The world model that is played (DESIGN "Control and play"): the past frames (t-P+1 .. t) and the
codes of the player's choice (and, optionally, the key itself) -> frame t+1.

Why apart from the LAM: the LAM's codes describe the whole change t -> t+1, the ball's flight
included, which no key press decides; the controller, asked for all 35 cells, gets about a third of
the changed cells right, so a decoder that trusts the codes loses the ball within ten steps. The
world model is the LAM's decoder, given the past (what moved last step is in t - (t-1)) and trained
on the codes the controller gives for the recorded action, so that what the player does not decide
must come from the past.

It starts as the LAM's decoder exactly: the frame stack's first convolution gets one more input
per extra past frame, (t-1) - (t-2) and so on, beside what the LAM's decoder already takes
(frame t, and t - (t-1) for a LAM with context), with zero weights; the code table starts as the
LAM's (`lam.codebook`); the key's embedding starts at zero. So an untrained world model draws what
the LAM's decoder draws (tested), and training moves it from there.

Checkpoints use model/checkpoint.py's format with format "lam-world/1", the config, and the
identities (sha256, step) of the LAM and the controller it was trained with: played with any other,
its codes would mean something else, so that is refused (`check_belongs`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from model.checkpoint import first_line, read_checkpoint_file, save_checkpoint, with_weights
from model.config import ModelConfig
from evaluation.events import PADDLE_TOP
from model.motion import shift_frame
from model.networks import Decoder
from pipeline.actions import ACTION_NAMES
from pipeline.frames import FRAME_HEIGHT, GRID

WORLD_FORMAT = "lam-world/1"
CODE_CELLS = ("grid", "paddle-row")
MAX_PAST_FRAMES = 4
PADDLE_ROW = PADDLE_TOP * GRID[0] // FRAME_HEIGHT          # the code grid's row the paddle is drawn in (6 of 0..6)
FLIGHT_REACH = 8                      # px each way: the ball moves 2-8 px across and 4-8 down per step (recorder's RAM)
FLIGHT_STRENGTH = 10.0                # the flight prior's starting weight: full evidence outweighs the head's own say
LIT = 0.1                             # a pixel brighter than this is content (the background is black)
SAME = 0.02                           # two pixels within this are the same colour (the palette's levels differ more)


@dataclass
class WorldConfig:
    model: dict                          # the LAM's ModelConfig (as a dict): the decoder's architecture
    past_frames: int = 2                 # frames it sees: t-1 and t (2), also t-2 (3), ...
    key: bool = False                    # the real key press beside the codes (an embedding added to every cell)
    flight: bool = False                 # what moved keeps moving: a prior on the shift head's choices (FlightPrior)
    # the cells whose codes it reads: all ("grid"), or only the paddle's row ("paddle-row"), the rest
    # given a learned "nothing changes" latent, so that all but the paddle must come from the past
    code_cells: str = "grid"
    num_actions: int = len(ACTION_NAMES)

    def __post_init__(self):
        lam = self.lam_config
        if lam.action_code is not None:
            raise ValueError("a LAM with a per-frame action code (the split variant) is played from its own "
                             "decoder; the world model takes a code grid")
        if not 1 + lam.context <= self.past_frames <= MAX_PAST_FRAMES:
            raise ValueError(f"past_frames must be in {1 + lam.context}..{MAX_PAST_FRAMES} for this LAM "
                             f"(context {lam.context}), got {self.past_frames}")
        if self.num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {self.num_actions}")
        if self.code_cells not in CODE_CELLS:
            raise ValueError(f"code_cells must be one of {', '.join(CODE_CELLS)}, got {self.code_cells!r}")
        if self.flight and (lam.output != "shift" or self.past_frames < 2):
            raise ValueError("the flight prior weighs the shift output's moves by the last step: it needs a LAM "
                             "with output 'shift' and past_frames >= 2")

    @property
    def lam_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "WorldConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown world config field(s): {', '.join(sorted(unknown))}")
        return cls(**values)


class PastDecoder(Decoder):
    """The LAM's decoder whose frame stack also reads the past: concat(t, t - (t-1), (t-1) - (t-2), ...),
    and whose shift head's choices can be weighed by a prior (`FlightPrior`)."""

    def frame_input(self, cur: torch.Tensor, past_changes: torch.Tensor | None) -> torch.Tensor:
        return cur if past_changes is None else torch.cat([cur, past_changes], dim=1)

    def forward(self, cur: torch.Tensor, latent: torch.Tensor, past_changes: torch.Tensor | None = None,
                prior: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder.forward; for the shift output each shift factor's probabilities multiplied by
        exp(prior) and renormalised: the prior's logits added to the head's."""
        if self.output != "shift":
            return super().forward(cur, latent, past_changes)
        frame_features = self.frame_stack.outputs(self.frame_input(cur, past_changes))
        x = self.film(frame_features[-1], latent)
        inner, shifts = len(self.up_stack) - 1, None
        for i, stage in enumerate(self.up_stack):
            x = self.up_stack.run(stage, x)
            if i == inner:
                break
            if self.skips:
                x = x + frame_features[inner - 1 - i]
            if self.stage_films is not None:
                x = self.stage_films[i](x, latent)
            if i == self.motion_stage:
                shifts = self.shift_head(x, latent)
        if prior is not None:
            shifts = [(dim, step, weighed(probs, logits)) for (dim, step, probs), logits in zip(shifts, prior)]
        return (shift_frame(cur, shifts) + x.float()).clamp(0, 1)


def weighed(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax(head's logits + prior's logits) from the head's probabilities (B, bins, h, w)."""
    scaled = probs * torch.exp(logits - logits.amax(1, keepdim=True))
    return scaled / scaled.sum(1, keepdim=True).clamp_min(1e-12)


class FlightPrior(nn.Module):
    """What moved keeps moving: per block of the shift head's grid, evidence that lit content arrives
    there under a move it also made last step, as logits for the shift head's factors.

    For a move s (even steps up to FLIGHT_REACH px each way: the ball's moves) and a destination
    block, the evidence is the share of the block's pixels that frame t has lit at x - s, that
    frame t-1 had at x - 2s (the same content, one move earlier) and that frame t-1 did not have at
    x - s (it moved there; bricks and walls stand still, and shifting a row of bricks by a brick's
    width finds bricks too). Each factor's bin gets the most evidence of the moves through it; the
    block where such content stands now gets evidence against staying (bin 0), since it moves on.
    Scaled per row of blocks by a learned weight: it starts at FLIGHT_STRENGTH everywhere but the
    paddle's row of cells, at 0 there, which the player decides; training moves both.

    Why: trained on the controller's codes, the LAM's decoder must learn to read the ball's flight
    off the past frames from zero weights, and in the few hundred steps a CPU affords it learns to
    draw the ball one step from recorded frames (2.8 px off) but loses it within a few steps of its
    own (docs/world-model.md). The flight itself is simple, so it is given, and learning is left
    what it is for: bounces, bricks, the paddle."""

    def __init__(self, head, frame_shape: tuple[int, int]):
        super().__init__()
        self.grid, self.factors = tuple(head.grid), [(dim, step, side) for dim, step, side in head.factors]
        self.block = (frame_shape[0] // self.grid[0], frame_shape[1] // self.grid[1])
        self.moves = [(dx, dy) for dy in range(-FLIGHT_REACH, FLIGHT_REACH + 1, 2)
                      for dx in range(-FLIGHT_REACH, FLIGHT_REACH + 1, 2) if (dx, dy) != (0, 0)]
        for f, index in enumerate(self.bin_indices()):
            self.register_buffer(f"bins_{f}", index, persistent=False)
        rows = torch.full((self.grid[0],), FLIGHT_STRENGTH)
        first_paddle_block = PADDLE_ROW * frame_shape[0] // GRID[0] // self.block[0]
        rows[first_paddle_block:] = 0.0
        self.strength = nn.Parameter(rows.view(1, 1, -1, 1))
        self.leave = nn.Parameter(rows.clone().view(1, 1, -1, 1))

    def bin_indices(self) -> list[torch.Tensor]:
        """Per factor, each move's bin: a move along a dim is split into the factors' steps in order."""
        indices = [[] for _ in self.factors]
        for dx, dy in self.moves:
            left = {-1: dx, -2: dy}
            for f, (dim, step, side) in enumerate(self.factors):
                bins = max(-side, min(side, round(left[dim] / step)))
                left[dim] -= bins * step
                indices[f].append(bins + side)
            if any(left.values()):
                raise ValueError(f"the shift head cannot make the move {(dx, dy)}")
        return [torch.tensor(index) for index in indices]

    def evidence(self, prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per move and block: lit content that arrives and moved alike last step, (B, moves, h, w);
        per block: lit content that was not there a step before, (B, 1, h, w))."""
        reach = 2 * FLIGHT_REACH
        cur, prev = cur.float().mean(1, keepdim=True), prev.float().mean(1, keepdim=True)
        height, width = cur.shape[-2:]
        padded_cur = F.pad(cur, (reach, reach, reach, reach))
        padded_prev = F.pad(prev, (reach, reach, reach, reach))
        at = lambda frame, dx, dy: frame[..., reach - dy:reach - dy + height, reach - dx:reach - dx + width]  # noqa: E731
        lit = lambda frame: (frame > LIT).float()  # noqa: E731
        same = lambda a, b: ((a - b).abs() < SAME).float()  # noqa: E731
        moved = []
        for dx, dy in self.moves:
            arriving = at(padded_cur, dx, dy)
            moved.append(lit(arriving) * same(arriving, at(padded_prev, 2 * dx, 2 * dy))
                         * (1 - same(arriving, at(padded_prev, dx, dy))))
        came = lit(cur) * (1 - same(cur, prev))
        return F.avg_pool2d(torch.cat(moved, dim=1), self.block), F.avg_pool2d(came, self.block)

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> list[torch.Tensor]:
        """Frames t-1, t -> per factor of the shift head, logits (B, bins, h, w) to add to its own."""
        moved, came = self.evidence(prev, cur)
        logits = []
        for f, (_, _, side) in enumerate(self.factors):
            index = getattr(self, f"bins_{f}").view(1, -1, 1, 1).expand_as(moved)
            best = moved.new_zeros(moved.shape[0], 2 * side + 1, *moved.shape[2:])
            best = best.scatter_reduce(1, index, moved, reduce="amax")
            stay = F.one_hot(torch.tensor(side), 2 * side + 1).to(came).view(1, -1, 1, 1)
            logits.append(self.strength * best - self.leave * came * stay)
        return logits


class WorldModel(nn.Module):
    def __init__(self, config: WorldConfig):
        super().__init__()
        self.config = config
        lam = config.lam_config
        self.decoder = PastDecoder(lam)
        first = self.decoder.frame_stack[0][0]
        self.decoder.frame_stack[0][0] = nn.Conv2d(config.past_frames * lam.in_channels, first.out_channels, 3,
                                                   stride=2, padding=1, bias=False)
        self.codebook = nn.Embedding(lam.codebook_size, lam.code_dim)
        self.key = nn.Embedding(config.num_actions, lam.code_dim) if config.key else None
        if self.key is not None:
            nn.init.zeros_(self.key.weight)          # the LAM's decoder until training finds a use for it
        self.flight = FlightPrior(self.decoder.shift_head, lam.frame_shape[1:]) if config.flight else None
        # where the codes are not read: the latent of the code the LAM gives a cell where nothing changed
        self.still = nn.Parameter(torch.zeros(lam.code_dim, *lam.grid)) if config.code_cells != "grid" else None

    @classmethod
    def from_lam(cls, lam: nn.Module, past_frames: int = 2, key: bool = False, flight: bool = False,
                 code_cells: str = "grid") -> "WorldModel":
        """A world model that draws what `lam`'s decoder draws (with `flight`, moved by the flight
        prior too; with code_cells "paddle-row", as if nothing changed outside the paddle's row):
        its weights, the extra past inputs at zero."""
        world = cls(WorldConfig(lam.config.to_dict(), past_frames=past_frames, key=key, flight=flight,
                                code_cells=code_cells))
        state = {name[len("decoder."):]: value for name, value in lam.state_dict().items() if name.startswith("decoder.")}
        name = "frame_stack.0.0.weight"
        wide = torch.zeros_like(world.decoder.state_dict()[name])
        wide[:, :state[name].shape[1]] = state[name]
        state[name] = wide
        world.decoder.load_state_dict(state)
        with torch.no_grad():
            world.codebook.weight.copy_(lam.codebook)
            if world.still is not None:
                blank = torch.zeros(1, *lam.config.frame_shape, device=lam.codebook.device)
                world.still.copy_(lam.codebook[lam.encode(blank, blank, blank)[0]].permute(2, 0, 1))
        return world

    @property
    def past_frames(self) -> int:
        return self.config.past_frames

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def latent(self, codes: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
        """Codes (B, 7, 5) (and the key, (B,)) -> what the decoder is conditioned on, (B, D, 7, 5)."""
        latent = self.codebook(codes.long()).permute(0, 3, 1, 2)
        if self.still is not None:
            read = torch.zeros(1, 1, *latent.shape[-2:], dtype=torch.bool, device=latent.device)
            read[:, :, PADDLE_ROW] = True
            latent = torch.where(read, latent, self.still.to(latent.dtype))
        if self.key is not None:
            if key is None:
                raise ValueError("this world model also takes the key pressed (`key`, int64 (B,))")
            latent = latent + self.key(key.long())[:, :, None, None]
        return latent

    def forward(self, past: torch.Tensor, codes: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """past: (B, P, C, 210, 160) in [0, 1], oldest first, frame t last; codes int64 (B, 7, 5);
        key int64 (B,) -> frame t+1, (B, C, 210, 160) in [0, 1]."""
        if past.dim() != 5 or past.shape[1] != self.past_frames:
            raise ValueError(f"expected the past as (B, {self.past_frames}, C, H, W), got {tuple(past.shape)}")
        cur = past[:, -1]
        changes = [past[:, i] - past[:, i - 1] for i in range(self.past_frames - 1, 0, -1)]   # newest first
        prior = None if self.flight is None else self.flight(past[:, -2], cur)
        return self.decoder(cur, self.latent(codes, key), torch.cat(changes, dim=1) if changes else None, prior)


def stack_past(frames: list[torch.Tensor], past_frames: int) -> torch.Tensor:
    """The last `past_frames` of `frames` (each (B, C, H, W), oldest first) as (B, P, C, H, W); where
    there are fewer, the oldest is repeated, as the loaders do at an episode's start."""
    frames = list(frames[-past_frames:])
    return torch.stack([frames[0]] * (past_frames - len(frames)) + frames, dim=1)


# ------------------------------------------------------------------------------------ checkpoint
def identity(module: nn.Module) -> dict:
    """{"sha256", "step"} of a loaded LAM or controller (model/checkpoint.with_weights attaches both)."""
    return {"sha256": getattr(module, "sha256", None), "step": getattr(module, "step", None)}


def save_world(path: str | Path, world: WorldModel, *, step: int, lam: dict, controller: dict,
               train_config: dict | None = None, metrics: dict | None = None) -> Path:
    """Atomic (temp file, fsync, rename) and torch.load(weights_only=True)-loadable, naming the LAM
    and the controller ({"sha256", "step"}) it was trained with."""
    save_checkpoint(path, world, world.config.to_dict(), step, checkpoint_format=WORLD_FORMAT, lam=dict(lam),
                    controller=dict(controller), train_config=train_config or {}, metrics=metrics or {})
    return Path(path)


def load_world(path: str | Path, device: str | torch.device = "cpu") -> WorldModel:
    """The world model in eval mode; `.step`, `.sha256`, `.lam` and `.controller` (the identities it
    was trained with) attached. Any problem with the file is one UserError naming it."""
    loaded = read_checkpoint_file(path, WORLD_FORMAT, "world model checkpoint")
    try:
        config = WorldConfig.from_dict(loaded.state["config"])
        lam, controller = dict(loaded.state.get("lam", {})), dict(loaded.state.get("controller", {}))
    except Exception as error:                  # noqa: BLE001 - the file's content, whatever its shape
        raise UserError(f"{path}: world model config unusable ({first_line(error)})") from None
    world = with_weights(WorldModel(config), loaded)
    world.lam, world.controller = lam, controller
    return world.to(device)


def check_belongs(world: WorldModel, lam: nn.Module, controller: nn.Module | None, path: str | Path) -> None:
    """Refuse a world model played with another LAM or controller than it was trained with: the codes
    (and the controller's choice of them) would mean something else to it."""
    for name, module, remedy in (("LAM", lam, "make world after make train"),
                                 ("controller", controller, "make world after make controller")):
        wanted = getattr(world, name.lower())
        if module is None or not wanted.get("sha256"):
            continue
        if wanted["sha256"] != module.sha256:
            raise UserError(f"{path}: this world model was trained with {name} {wanted['sha256'][:12]}, "
                            f"not {module.sha256[:12]}; retrain it ({remedy})")
    if world.codebook_size != lam.config.codebook_size:
        raise UserError(f"{path}: world model takes {world.codebook_size} codes, the LAM has {lam.config.codebook_size}")
