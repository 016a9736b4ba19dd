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
LAM's (`lam.codebook`); the key's embedding starts at zero. So an untrained world model without
`momentum` draws what the LAM's decoder draws (tested), and training moves it from there.

`momentum`: the ball's flight from the past, as the LAM itself reads it. A frozen copy of the LAM's
encoder reads the last step, (t-1, t), into the codes of that change: where the ball went last
step, which is where it goes next unless it bounces. Per cell a gate mixes the latent of those
codes with the latent of the player's codes: it starts open (the last step's codes) everywhere but
in the paddle's row (the player's), and learns from there, from both latents, where each belongs.
Why: the decoder already knows how to fly the ball given a code that says how it moves (with the
recorded codes it holds the ball for 200 steps); what it cannot do is guess that code from a key
press. Untrained, with the controller's codes, this keeps the ball in 88-100 % of frames for 100
steps where the LAM's decoder keeps it in 12-50 % (docs/world-model.md).

Checkpoints use model/checkpoint.py's format with format "lam-world/1", the config, and the
identities (sha256, step) of the LAM and the controller it was trained with: played with any other,
its codes would mean something else, so that is refused (`check_belongs`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from model.checkpoint import first_line, read_checkpoint_file, save_checkpoint, with_weights
from model.config import ModelConfig
from evaluation.events import PADDLE_TOP
from model.fsq import ScalarQuantizer
from model.networks import Decoder, Encoder
from model.quantizer import Quantizer
from pipeline.actions import ACTION_NAMES
from pipeline.frames import FRAME_HEIGHT, GRID

WORLD_FORMAT = "lam-world/1"
MAX_PAST_FRAMES = 4
PADDLE_ROW = PADDLE_TOP * GRID[0] // FRAME_HEIGHT          # the code grid's row the paddle is drawn in (6 of 0..6)
GATE_OPEN = 4.0                       # the gate's starting bias: sigmoid(4) = 0.98 (the last step), sigmoid(-4) the player's


@dataclass
class WorldConfig:
    model: dict                          # the LAM's ModelConfig (as a dict): the decoder's architecture
    past_frames: int = 2                 # frames it sees: t-1 and t (2), also t-2 (3), ...
    key: bool = False                    # the real key press beside the codes (an embedding added to every cell)
    momentum: bool = False               # the LAM's codes of the last step, gated per cell (see the module's doc)
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
        if self.momentum and self.past_frames < 2:
            raise ValueError("momentum reads the last step, so it needs past_frames >= 2")

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
    """The LAM's decoder whose frame stack also reads the past: concat(t, t - (t-1), (t-1) - (t-2), ...)."""

    def frame_input(self, cur: torch.Tensor, past_changes: torch.Tensor | None) -> torch.Tensor:
        return cur if past_changes is None else torch.cat([cur, past_changes], dim=1)


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
        self.reader = LastStep(lam) if config.momentum else None
        if self.reader is not None:
            # the gate's say from both latents starts at zero; its bias per cell starts open (the last
            # step's codes) everywhere but the paddle's row, which the player decides
            self.gate = nn.Conv2d(2 * lam.code_dim, 1, 3, padding=1)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            opening = torch.full((1, 1, *lam.grid), GATE_OPEN)
            opening[:, :, PADDLE_ROW] = -GATE_OPEN
            self.gate_bias = nn.Parameter(opening)

    @classmethod
    def from_lam(cls, lam: nn.Module, past_frames: int = 2, key: bool = False, momentum: bool = False) -> "WorldModel":
        """A world model that draws what `lam`'s decoder draws: its weights, the extra past inputs at
        zero (with `momentum`, the last step's codes gated in as the module's doc says)."""
        world = cls(WorldConfig(lam.config.to_dict(), past_frames=past_frames, key=key, momentum=momentum))
        state = {name[len("decoder."):]: value for name, value in lam.state_dict().items() if name.startswith("decoder.")}
        name = "frame_stack.0.0.weight"
        wide = torch.zeros_like(world.decoder.state_dict()[name])
        wide[:, :state[name].shape[1]] = state[name]
        state[name] = wide
        world.decoder.load_state_dict(state)
        with torch.no_grad():
            world.codebook.weight.copy_(lam.codebook)
        if world.reader is not None:
            world.reader.encoder.load_state_dict(lam.encoder.state_dict())
            world.reader.quantizer.load_state_dict(lam.quantizer.state_dict())
        return world

    def train(self, mode: bool = True) -> "WorldModel":
        super().train(mode)
        if self.reader is not None:
            self.reader.eval()                   # frozen: the LAM's reading, BatchNorm's statistics included
        return self

    @property
    def past_frames(self) -> int:
        return self.config.past_frames

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def latent(self, codes: torch.Tensor, key: torch.Tensor | None, past: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, 7, 5) (and the key, (B,); the past frames for `momentum`) -> what the decoder is
        conditioned on, (B, D, 7, 5)."""
        latent = self.codebook(codes.long()).permute(0, 3, 1, 2)
        if self.reader is not None:
            before = self.codebook(self.reader(past)).permute(0, 3, 1, 2)
            gate = torch.sigmoid(self.gate(torch.cat([latent, before], dim=1)) + self.gate_bias)
            latent = latent + gate * (before - latent)
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
        return self.decoder(cur, self.latent(codes, key, past), torch.cat(changes, dim=1) if changes else None)


class LastStep(nn.Module):
    """A frozen copy of the LAM's encoder and quantiser: the past frames -> the codes of the last
    step, (t-1 -> t), int64 (B, 7, 5); a context LAM also gets t-2 (t-1 again where the world
    model sees no further back)."""

    def __init__(self, lam: ModelConfig):
        super().__init__()
        self.encoder = Encoder(lam)
        self.quantizer = ScalarQuantizer(lam.fsq.levels, lam.code_dim) if lam.quantizer == "fsq" else \
            Quantizer(lam.vq, lam.code_dim)
        self.context = lam.context
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, past: torch.Tensor) -> torch.Tensor:
        prev, cur = past[:, -2], past[:, -1]
        older = (past[:, -3] if past.shape[1] > 2 else prev) if self.context else None
        return self.quantizer(self.encoder(prev, cur, older))[1]


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
