"""The model's hyper-parameters: one dataclass, saved as a plain dict in every checkpoint so a
checkpoint rebuilds its own architecture."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from model.motion import MOTIONS
from pipeline.frames import CODEBOOK_SIZE, FRAME_HEIGHT, FRAME_WIDTH, GRID

# The seed's channel progression; encoder and the decoder's frame stack share it.
BASE_CHANNELS = (64, 128, 256, 512, 512)
QUANTIZERS = ("vq", "fsq")
ENCODER_INPUTS = ("pair", "pair_difference", "difference")
CONTEXTS = (0, 1)                     # frames before t the model sees: none (the seed), or frame t-1
# The seed's own model: the encoder sees concat(t, t+1), the decoder sees frame t only through its
# 7x5 stack and ends in a sigmoid, the loss is plain MSE. `--set` each of these to get it.
SEED_LITERAL = dict(encoder_input="pair", decoder_skips=False, latent_every_stage=False, residual_output=False,
                    changed_pixel_weight=1.0, context=0, motion="none",
                    encoder_match=False, quantizer="vq", motion_codes=False)
# Training settings that checkpoints before TrainConfig took them saved with the model's fields.
MOVED_TO_TRAINING = ("reset_every", "grad_checkpoint")
# The shift head's block grid for each inner decoder stage (14x10, 27x20, 53x40, 105x80): the nearest
# grid that divides 210 x 160, so blocks are 15x16, 7x8, 3x4 and 2x2 px.
MOTION_GRIDS = ((14, 10), (30, 20), (70, 40), (105, 80))


@dataclass
class ModelConfig:
    in_channels: int = 1                  # 1 gray (default), 3 RGB
    width: float = 1.0                    # channel multiplier for small presets (codebook/grid unchanged)
    codebook_size: int = CODEBOOK_SIZE
    code_dim: int = 128
    commitment_weight: float = 0.25       # β in ||z - sg(e)||²
    codebook_weight: float = 1.0          # weight of ||sg(z) - e||²
    entropy_weight: float = 0.05          # weight of the differentiable codebook-entropy term
    entropy_temperature: float = 0.5      # τ of the soft assignments, relative to the 8th-neighbour gap; see Quantizer.entropy_loss
    reset_buffer: int = 4096              # recent encoder outputs kept for dead-code resets
    # vq: nearest of codebook_size learnt code vectors (the seed) | fsq: each cell's vector projected
    # to len(fsq_levels) scalars, each rounded to its number of levels (model/fsq.py). fsq by
    # measurement: the vq codes lumped paddle moves of 2 and 16 px together (README "Ablation").
    quantizer: str = "fsq"
    fsq_levels: str = "8,8,4"             # levels per scalar; their product must be codebook_size
    # per cell, how well each whole-pixel move (up to motion_max_x / _y) explains the change, beside
    # the encoder's conv features (model/motion.match_features)
    encoder_match: bool = False
    # Whether the codes carry the action (DESIGN.md "Model"). The defaults are the measured choice
    # (val split, README "Ablation": paddle-move probe from codes 79 % against 55 % seed-literal);
    # SEED_LITERAL above is the seed's setting, one --set each away.
    # t+1 - t alone: the encoder cannot spend codes on the static scene, only on what changed.
    encoder_input: str = "difference"     # pair: concat(t, t+1) (seed) | pair_difference: concat(t, t+1 - t) | difference
    # Frame t reaches the decoder at every resolution, so codes need not redraw the scene.
    decoder_skips: bool = True            # add the decoder's own frame-t features to each upsampling stage
    # A paddle move need not survive five upsamplings from the 7x5 bottleneck.
    latent_every_stage: bool = True       # FiLM every upsampling stage with its cell's code, not only the bottleneck
    # Starts as a copy of t (33 dB): training goes into the change, not into redrawing the screen.
    residual_output: bool = True          # prediction = clamp(t + zero-initialised change); False: sigmoid (seed)
    # Plain MSE is 99.7 % unchanged pixels, which a copy of t already gets right.
    changed_pixel_weight: float = 10.0    # loss weight of pixels that differ between t and t+1 (1: plain MSE)
    # With frame t-1 the ball's velocity is in the input (LAPO feeds o_{t-1}, o_t, o_{t+1}), so the
    # codes need not carry it. 1: the encoder also sees t - (t-1) (or t-1 itself, for "pair"), and
    # the decoder's frame stack concat(t, t - (t-1)).
    context: int = 0                      # 0: frames t, t+1 (seed) | 1: frame t-1 too
    # Moving objects are copied from frame t, not redrawn (model/motion.py): the prediction is
    # clamp(shifted t + change), each block of the frame choosing its own shift.
    motion: str = "shift"                 # none | shift
    motion_max_x: int = 24                # largest shift across, px (the paddle moves up to 24)
    motion_max_y: int = 8                 # largest shift down, px (the ball moves up to 8)
    # inner decoder stage whose cells choose a shift: 0..3 = 14x10 .. 105x80 (blocks of 15x16 .. 2x2 px);
    # 2 (3x4 px blocks) lets the 2x4 px ball move without the bricks beside it
    motion_stage: int = 2
    motion_codes: bool = True             # the codes' 3x3 neighbourhood votes on each block's shift directly
    # Light supervision (off: 0): a linear head on the code grid predicts the recorded action of the
    # few labelled pairs (TrainConfig.action_fraction), LAOM-style.
    action_classes: int = 0               # actions the head tells apart (Breakout: 4); 0 = no head
    action_weight: float = 0.001          # its cross-entropy's weight: at 1 it swamps a recon loss near 1e-4

    def __post_init__(self):
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB), got {self.in_channels}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in [2, 65536], got {self.codebook_size}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        for name in ("commitment_weight", "codebook_weight", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input must be one of {', '.join(ENCODER_INPUTS)}, got {self.encoder_input!r}")
        if self.changed_pixel_weight < 1:
            raise ValueError(f"changed_pixel_weight must be >= 1, got {self.changed_pixel_weight}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {self.motion!r}")
        if self.motion_max_x < 0 or self.motion_max_y < 0:
            raise ValueError(f"motion_max_x and motion_max_y must be >= 0, got {self.motion_max_x}, {self.motion_max_y}")
        if not 0 <= self.motion_stage < len(MOTION_GRIDS):
            raise ValueError(f"motion_stage must be in 0..{len(MOTION_GRIDS) - 1}, got {self.motion_stage}")
        if self.action_classes < 0 or self.action_classes == 1:
            raise ValueError(f"action_classes must be 0 (no action head) or >= 2, got {self.action_classes}")
        if self.action_weight < 0:
            raise ValueError(f"action_weight must be >= 0, got {self.action_weight}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.quantizer == "fsq" and math.prod(self.fsq_level_list) != self.codebook_size:
            raise ValueError(f"fsq_levels {self.fsq_levels!r} make {math.prod(self.fsq_level_list)} codes, "
                             f"not codebook_size {self.codebook_size}")
        if self.reset_buffer < 1:
            raise ValueError(f"reset_buffer must be >= 1, got {self.reset_buffer}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be 0 (frames t, t+1) or 1 (frame t-1 too), got {self.context!r}")

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(max(8, int(round(c * self.width))) for c in BASE_CHANNELS)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, FRAME_HEIGHT, FRAME_WIDTH)

    @property
    def fsq_level_list(self) -> list[int]:
        try:
            levels = [int(part) for part in self.fsq_levels.split(",")]
        except ValueError:
            levels = []
        if not levels or min(levels) < 2:
            raise ValueError(f"fsq_levels must be comma-separated integers >= 2, got {self.fsq_levels!r}")
        return levels

    @property
    def motion_grid(self) -> tuple[int, int]:
        return MOTION_GRIDS[self.motion_stage]

    @property
    def grid(self) -> tuple[int, int]:
        return GRID

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """A saved config; fields it lacks predate them, so they take the seed-literal values its
        weights were trained with, not today's defaults. Training settings older checkpoints saved
        here are dropped: the checkpoint's train config holds them too."""
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in values.items() if name not in MOVED_TO_TRAINING}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return cls(**{**SEED_LITERAL, **values})
