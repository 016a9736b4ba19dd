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
from torch import nn

from common.errors import UserError
from evaluation.events import PADDLE_TOP
from model.checkpoint import first_line, read_checkpoint_file, save_checkpoint, with_weights
from model.config import ModelConfig
from model.networks import Decoder
from pipeline.actions import ACTION_NAMES
from pipeline.frames import FRAME_HEIGHT, GRID

WORLD_FORMAT = "lam-world/1"
MAX_PAST_FRAMES = 4
PADDLE_ROW = PADDLE_TOP * GRID[0] // FRAME_HEIGHT          # the code grid's row the paddle is drawn in (6 of 0..6)


@dataclass
class WorldConfig:
    model: dict                          # the LAM's ModelConfig (as a dict): the decoder's architecture
    past_frames: int = 2                 # frames it sees: t-1 and t (2), also t-2 (3), ...
    key: bool = False                    # the real key press beside the codes (an embedding added to every cell)
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

    @classmethod
    def from_lam(cls, lam: nn.Module, past_frames: int = 2, key: bool = False) -> "WorldModel":
        """A world model that draws what `lam`'s decoder draws: its weights, the extra past inputs at zero."""
        world = cls(WorldConfig(lam.config.to_dict(), past_frames=past_frames, key=key))
        state = {name[len("decoder."):]: value for name, value in lam.state_dict().items() if name.startswith("decoder.")}
        name = "frame_stack.0.0.weight"
        wide = torch.zeros_like(world.decoder.state_dict()[name])
        wide[:, :state[name].shape[1]] = state[name]
        state[name] = wide
        world.decoder.load_state_dict(state)
        with torch.no_grad():
            world.codebook.weight.copy_(lam.codebook)
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
        return self.decoder(cur, self.latent(codes, key), torch.cat(changes, dim=1) if changes else None)


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
    """Written by model/checkpoint.save_checkpoint (atomic, weights-only loadable), naming the LAM
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
