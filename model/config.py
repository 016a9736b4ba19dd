"""The model's hyper-parameters: one dataclass, saved as a plain dict in every checkpoint so a
checkpoint rebuilds its own architecture, and the named variants.

One decision is one field. The output is one field (`output`: sigmoid | residual | shift); the
quantiser is one field (`quantizer`: vq | fsq) and its settings live with it (`vq: VQConfig` or
`fsq: FSQConfig`: the other one does not exist, and the number of codes follows from the one that
does); the shift output's settings live in `shift`. A setting the model does not use cannot be set
(training/config.py turns that into one clear error naming the field).

Variants are named, like torchtitan's model flavours: `ModelConfig.named("seed")` is the seed's
model exactly, `ModelConfig()` (= "default") the measured choice (README "Ablation"), and every
variant `make ablate` measures is an entry of VARIANTS.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH, GRID

# The seed's channel progression; encoder and the decoder's frame stack share it.
BASE_CHANNELS = (64, 128, 256, 512, 512)
QUANTIZERS = ("vq", "fsq")
OUTPUTS = ("sigmoid", "residual", "shift")
SHIFT_INDEXING = ("destination", "source")     # ShiftConfig.indexed_by
ENCODER_INPUTS = ("pair", "pair_difference", "difference")
CONTEXTS = (0, 1)                     # frames before t the model sees: none (the seed), or frame t-1
# The shift head's block grid for each inner decoder stage (14x10, 27x20, 53x40, 105x80): the nearest
# grid that divides 210 x 160, so blocks are 15x16, 7x8, 3x4 and 2x2 px.
MOTION_GRIDS = ((14, 10), (30, 20), (70, 40), (105, 80))
# Upper bounds past which a model cannot work: codes are stored as uint16 (pipeline/latent.code_dtype);
# a cell's vector feeds every FiLM layer (100,000,000 dims: an allocation failure); a dead-code reset
# buffer holds that many vectors; an action head that many classes.
MAX_CODES = 65536
MAX_CODE_DIM = 4096
MAX_RESET_BUFFER = 1 << 20
MAX_ACTION_CLASSES = 256


def levels_tuple(value: Any) -> tuple[int, ...]:
    """FSQ levels from a tuple, a list or "8,8,4"."""
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(f"levels must be comma-separated integers >= 2, got {value!r}") from None
    levels = tuple(int(v) for v in value)
    if not levels or min(levels) < 2:
        raise ValueError(f"levels must be integers >= 2, got {value!r}")
    return levels


@dataclass
class VQConfig:
    """Nearest of `codes` learnt vectors (the seed's quantiser, model/quantizer.py)."""

    codes: int = 256
    commitment_weight: float = 0.25       # β in ||z - sg(e)||²
    codebook_weight: float = 1.0          # weight of ||sg(z) - e||²
    entropy_weight: float = 0.05          # weight of the differentiable codebook-entropy term
    entropy_temperature: float = 0.5      # τ of the soft assignments, relative to the 8th-neighbour gap
    reset_buffer: int = 4096              # recent encoder outputs kept for dead-code resets

    def __post_init__(self):
        if not 2 <= self.codes <= MAX_CODES:
            raise ValueError(f"vq.codes must be in [2, {MAX_CODES}], got {self.codes}")
        for name in ("commitment_weight", "codebook_weight", "entropy_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"vq.{name} must be >= 0, got {getattr(self, name)}")
        if not self.entropy_temperature > 0:
            raise ValueError(f"vq.entropy_temperature must be > 0, got {self.entropy_temperature}")
        if not 1 <= self.reset_buffer <= MAX_RESET_BUFFER:     # it holds this many encoder outputs
            raise ValueError(f"vq.reset_buffer must be in [1, {MAX_RESET_BUFFER}], got {self.reset_buffer}")

    @property
    def size(self) -> int:
        return self.codes


@dataclass
class FSQConfig:
    """Each cell's vector projected to len(levels) scalars, each rounded to its levels (model/fsq.py);
    the codes are the grid points: prod(levels) of them."""

    levels: tuple[int, ...] = (8, 8, 4)

    def __post_init__(self):
        self.levels = levels_tuple(self.levels)
        if not 2 <= self.size <= MAX_CODES:
            raise ValueError(f"fsq.levels {','.join(map(str, self.levels))} make {self.size} codes; 2 to {MAX_CODES} fit")

    @property
    def size(self) -> int:
        return math.prod(self.levels)


@dataclass
class ShiftConfig:
    """The shift output (model/motion.py): each block of the frame copies frame t's pixels from a
    whole-pixel shift away, plus a residual for what appears."""

    max_x: int = 24                       # largest shift across, px (the paddle moves up to 24)
    max_y: int = 8                        # largest shift down, px (the ball moves up to 8)
    # inner decoder stage whose cells choose a shift: 0..3 = 14x10 .. 105x80 (blocks of 15x16 .. 2x2 px);
    # 2 (3x4 px blocks) lets the 2x4 px ball move without the bricks beside it
    stage: int = 2
    code_vote: bool = True                # the codes' 3x3 neighbourhood votes on each block's shift directly
    # whose block a shift belongs to: "destination" (each block of t+1 picks where its pixels come
    # from: a gather) or "source" (each block of t picks where its pixels go: a splat); model/motion.py
    indexed_by: str = "destination"

    def __post_init__(self):
        if not (0 <= self.max_x <= FRAME_WIDTH // 2 and 0 <= self.max_y <= FRAME_HEIGHT // 2):
            # the head scores every shift: past half the frame there is nothing left to move into view
            raise ValueError(f"shift.max_x and shift.max_y must be in [0, {FRAME_WIDTH // 2}] and "
                             f"[0, {FRAME_HEIGHT // 2}], got {self.max_x}, {self.max_y}")
        if not 0 <= self.stage < len(MOTION_GRIDS):
            raise ValueError(f"shift.stage must be in 0..{len(MOTION_GRIDS) - 1}, got {self.stage}")
        if self.indexed_by not in SHIFT_INDEXING:
            raise ValueError(f"shift.indexed_by must be one of {', '.join(SHIFT_INDEXING)}, got {self.indexed_by!r}")

    @property
    def grid(self) -> tuple[int, int]:
        return MOTION_GRIDS[self.stage]


@dataclass
class ActionCodeConfig:
    """Genie's split: one small code per frame beside the grid, and grid dropout (model/lam.py).

    What the past tells (the ball's flight, a brick breaking) should come from the decoder's view of
    frames t-1 and t, the player's choice from a code. The action code is read from every cell's
    encoder output and quantised like FSQ (`levels`: "8" is 8 codes); `grid_dropout` of the training
    pairs get a learnt "no grid" latent instead of the grid's, so the decoder learns to draw t+1 from
    the past and the action code alone, which is how the model is played."""

    levels: tuple[int, ...] = (8,)
    grid_dropout: float = 0.5

    def __post_init__(self):
        self.levels = levels_tuple(self.levels)
        if not 2 <= self.size <= MAX_CODES:                   # stored as uint16 (pipeline/latent.code_dtype)
            raise ValueError(f"action_code.levels {','.join(map(str, self.levels))} make {self.size} codes; "
                             f"2 to {MAX_CODES} fit")
        if not 0 <= self.grid_dropout < 1:
            raise ValueError(f"action_code.grid_dropout must be in [0, 1), got {self.grid_dropout}")

    @property
    def size(self) -> int:
        return math.prod(self.levels)


# Parts that exist only in some variants: the field that holds them, and the field (and value) that
# decides whether they do.
PARTS: dict[str, tuple[type, str, str | None]] = {
    "vq": (VQConfig, "quantizer", "vq"),
    "fsq": (FSQConfig, "quantizer", "fsq"),
    "shift": (ShiftConfig, "output", "shift"),
    "action_code": (ActionCodeConfig, "action_code", None),       # present when set at all
}


@dataclass
class ModelConfig:
    variant: str = "default"              # the named variant it was built from (VARIANTS), then changed by --set
    in_channels: int = 1                  # 1 gray (default), 3 RGB
    width: float = 1.0                    # channel multiplier for small presets (grid and codes unchanged)
    code_dim: int = 128                   # each cell's latent vector
    # t+1 - t alone: the encoder cannot spend codes on the static scene, only on what changed.
    encoder_input: str = "difference"     # pair: concat(t, t+1) (seed) | pair_difference: concat(t, t+1 - t) | difference
    # per cell, how well each whole-pixel move explains the change, beside the encoder's conv features
    # (model/motion.match_features)
    encoder_match: bool = False
    # In training, the encoder sees each pair moved across by a random shift of up to this many px
    # (the decoder sees it unmoved), so codes cannot name where things are, only how they moved.
    encoder_jitter: int = 0
    # With frame t-1 the ball's velocity is in the input (LAPO feeds o_{t-1}, o_t, o_{t+1}), so the
    # codes need not carry it. 1: the encoder also sees t - (t-1) (or t-1 itself, for "pair"), and
    # the decoder's frame stack concat(t, t - (t-1)).
    context: int = 0                      # 0: frames t, t+1 (seed) | 1: frame t-1 too
    # Frame t reaches the decoder at every resolution, so codes need not redraw the scene.
    decoder_skips: bool = True            # add the decoder's own frame-t features to each upsampling stage
    # The codes FiLM the decoder at its 7x5 bottleneck; True: every upsampling stage too (the default
    # until the move prior; with the prior, the bottleneck alone drew the ball in 88-91 % of the test
    # pairs on three seeds, every stage in 85 / 11 / 85 %: docs/model.md "A move prior").
    latent_every_stage: bool = False
    # sigmoid: the seed's; residual: clamp(t + zero-initialised change), which starts as a copy of t
    # (33 dB); shift: frame t's blocks moved by whole pixels + change (model/motion.py), so moving
    # objects are copied, not redrawn (README "The model").
    output: str = "shift"
    shift: ShiftConfig | None = field(default_factory=ShiftConfig)
    # vq: nearest of vq.codes learnt vectors (the seed) | fsq: rounded scalars (model/fsq.py). fsq by
    # measurement: the vq codes lumped paddle moves of 2 and 16 px together (README "Ablation").
    quantizer: str = "fsq"
    vq: VQConfig | None = None
    fsq: FSQConfig | None = field(default_factory=FSQConfig)
    action_code: ActionCodeConfig | None = None
    # Plain MSE is 99.7 % unchanged pixels, which a copy of t already gets right.
    changed_pixel_weight: float = 10.0    # loss weight of pixels that differ between t and t+1 (1: plain MSE)
    # Light supervision (off: 0): a linear head on the code grid predicts the recorded action of the
    # few labelled pairs (TrainConfig.action_fraction sets it), LAOM-style.
    action_classes: int = 0               # actions the head tells apart (Breakout: 4); 0 = no head
    action_weight: float = 0.001          # its cross-entropy's weight: at 1 it swamps a recon loss near 1e-4
    # The move prior (off: 0), no labels: a linear head on each cell's code predicts which way the
    # content around the cell moved across, read from the pair's pixels (model/move_target.py), so
    # the codes say the move's direction, not only where the paddle lands. Its squared error's weight.
    motion_weight: float = 3e-5

    def __post_init__(self):
        for name, (kind, _, _) in PARTS.items():          # parts given as dicts (a checkpoint, --set)
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
        for name in ("width", "changed_pixel_weight", "action_weight", "motion_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (got {getattr(self, name)})")
        checks = [
            (self.in_channels in (1, 3), f"in_channels must be 1 (gray) or 3 (RGB), got {self.in_channels}"),
            (0 < self.width <= 4, f"width must be in (0, 4], got {self.width}"),
            (0 <= self.encoder_jitter <= FRAME_WIDTH // 2,
             f"encoder_jitter must be in [0, {FRAME_WIDTH // 2}] px, got {self.encoder_jitter}"),
            (1 <= self.code_dim <= MAX_CODE_DIM, f"code_dim must be in [1, {MAX_CODE_DIM}], got {self.code_dim}"),
            (self.encoder_input in ENCODER_INPUTS,
             f"encoder_input must be one of {', '.join(ENCODER_INPUTS)}, got {self.encoder_input!r}"),
            (self.context in CONTEXTS, f"context must be 0 (frames t, t+1) or 1 (frame t-1 too), got {self.context!r}"),
            (self.output in OUTPUTS, f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}"),
            (self.quantizer in QUANTIZERS, f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}"),
            (self.changed_pixel_weight >= 1, f"changed_pixel_weight must be >= 1, got {self.changed_pixel_weight}"),
            (self.action_classes == 0 or 2 <= self.action_classes <= MAX_ACTION_CLASSES,
             f"action_classes must be 0 (no action head) or in [2, {MAX_ACTION_CLASSES}], got {self.action_classes}"),
            (self.action_weight >= 0, f"action_weight must be >= 0, got {self.action_weight}"),
            (self.motion_weight >= 0, f"motion_weight must be >= 0, got {self.motion_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name, (kind, selector, value) in PARTS.items():
            if value is None:
                continue
            wanted = getattr(self, selector) == value
            if wanted and getattr(self, name) is None:
                setattr(self, name, kind())
            elif not wanted and getattr(self, name) is not None:
                raise ValueError(f"{name}: this model has no {name} part ({selector} is {getattr(self, selector)!r})")

    # ------------------------------------------------------------------------------------ derived
    @property
    def codebook_size(self) -> int:
        """How many codes a cell can take: what the quantiser's settings make."""
        return (self.vq if self.quantizer == "vq" else self.fsq).size

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(max(8, int(round(c * self.width))) for c in BASE_CHANNELS)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, FRAME_HEIGHT, FRAME_WIDTH)

    @property
    def grid(self) -> tuple[int, int]:
        return GRID

    # ------------------------------------------------------------------------------------ variants
    @classmethod
    def named(cls, name: str, **changes) -> "ModelConfig":
        """The variant `name` (VARIANTS), with `changes` on top."""
        if name not in VARIANTS:
            raise ValueError(f"no model variant {name!r} (there are: {', '.join(VARIANTS)})")
        return cls(**{**VARIANTS[name], "variant": name, **changes})

    # ------------------------------------------------------------------------------------ saving
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """A saved config. Checkpoints written before the variants had a flat config (`motion`,
        `residual_output`, `codebook_size`, ...): `from_legacy` reads those."""
        if "variant" not in values:
            return from_legacy(values)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        if "motion_weight" not in values:
            # saved before the move prior existed: no such model had one
            values = {**values, "motion_weight": 0.0}
        if isinstance(values.get("shift"), dict) and "indexed_by" not in values["shift"]:
            # saved before the field existed: every shift output then was a gather
            values = {**values, "shift": {**values["shift"], "indexed_by": "destination"}}
        return cls(**values)


# The named variants, each as its changes to ModelConfig's defaults. "default" is the measured choice;
# the others are the seed and what `make ablate` measures against it (README "Ablation").
# The variants before the move prior FiLM'd every stage and had no prior: they keep the settings
# they were measured with (docs/model.md), as FSQ_SHIFT's fields.
FSQ_SHIFT = dict(latent_every_stage=True, motion_weight=0.0)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # the seed's model exactly: the encoder sees concat(t, t+1), the decoder frame t only through its
    # 7x5 stack and ends in a sigmoid, nearest-code VQ 256 x 128, plain MSE
    "seed": dict(encoder_input="pair", decoder_skips=False, latent_every_stage=False, output="sigmoid", shift=None,
                 quantizer="vq", vq=VQConfig(), fsq=None, changed_pixel_weight=1.0, motion_weight=0.0),
    # three rounds ago: t+1 = t + change, codes on every stage, nearest-code VQ
    "vq-residual": dict(FSQ_SHIFT, output="residual", shift=None, quantizer="vq", vq=VQConfig(), fsq=None),
    "vq-shift": dict(FSQ_SHIFT, quantizer="vq", vq=VQConfig(), fsq=None),
    # the default until the move prior: the shift output, FSQ codes FiLM-ing every upsampling stage
    "fsq-shift": dict(FSQ_SHIFT),
    "blocks-7x8": dict(FSQ_SHIFT, shift=ShiftConfig(stage=1)),
    "match": dict(FSQ_SHIFT, encoder_match=True),
    "context": dict(FSQ_SHIFT, context=1),
    # Genie's split: frame t-1, a per-frame action code and grid dropout
    "split": dict(FSQ_SHIFT, context=1, action_code=ActionCodeConfig()),
}


# ------------------------------------------------------------------------------------ old checkpoints
# What a flat config's missing fields were before they existed: the seed's settings.
LEGACY_SEED = dict(encoder_input="pair", decoder_skips=False, latent_every_stage=False, residual_output=False,
                   changed_pixel_weight=1.0, context=0, motion="none", encoder_match=False, quantizer="vq",
                   motion_codes=False, codebook_size=256, fsq_levels="8,8,4", motion_max_x=24, motion_max_y=8,
                   motion_stage=2, motion_weight=0.0)
LEGACY_VQ = ("commitment_weight", "codebook_weight", "entropy_weight", "entropy_temperature", "reset_buffer")
# training settings old checkpoints saved with the model's fields (the train config holds them too)
LEGACY_TRAINING = ("reset_every", "grad_checkpoint")


def from_legacy(values: dict) -> ModelConfig:
    """A flat, pre-variant config (one field per option, some doing nothing) as today's ModelConfig:
    fields it lacks take the seed's values its weights were trained with."""
    flat = {**LEGACY_SEED, **{k: v for k, v in values.items() if k not in LEGACY_TRAINING}}
    output = "shift" if flat.pop("motion") == "shift" else ("residual" if flat.pop("residual_output") else "sigmoid")
    flat.pop("residual_output", None)
    shift = ShiftConfig(flat.pop("motion_max_x"), flat.pop("motion_max_y"), flat.pop("motion_stage"),
                        flat.pop("motion_codes"), indexed_by="destination")
    codes, levels = flat.pop("codebook_size"), flat.pop("fsq_levels")
    vq = VQConfig(codes, **{name: flat.pop(name) for name in LEGACY_VQ if name in flat})
    for name in LEGACY_VQ:
        flat.pop(name, None)
    quantizer = flat["quantizer"]
    return ModelConfig(**flat, variant="legacy", output=output, shift=shift if output == "shift" else None,
                       vq=vq if quantizer == "vq" else None, fsq=FSQConfig(levels) if quantizer == "fsq" else None)


# ------------------------------------------------------------------------------------ settings by name
# `--set` names a model field flat (`context=1`) or, inside a part, dotted (`vq.codes=512`,
# `shift.stage=1`). Not settable by name: the variant (`--model` picks it), the colour mode (`--rgb`)
# and the parts as a whole (the field that decides them does: `quantizer=vq`, `output=shift`).
NOT_SETTINGS = ("variant", "in_channels", *PARTS)


class NotInThisModel(ValueError):
    """A setting of a part the model does not have."""


def setting_types() -> dict[str, Any]:
    """Every model setting's name -> its type (bool, int, float, str or tuple for FSQ levels)."""
    types = {f.name: f.type for f in fields(ModelConfig) if f.name not in NOT_SETTINGS}
    for part, (kind, _, _) in PARTS.items():
        types.update({f"{part}.{f.name}": f.type for f in fields(kind)})
    return types


def model_settings(config: ModelConfig) -> dict[str, Any]:
    """The config as settings by name: the flat fields and the dotted fields of the parts it has."""
    values = {name: getattr(config, name) for name in setting_types() if "." not in name}
    for part in PARTS:
        if getattr(config, part) is not None:
            values.update({f"{part}.{key}": value for key, value in dataclasses.asdict(getattr(config, part)).items()})
    return values


def resolve_model(base: str | ModelConfig, inherited: dict[str, Any], given: dict[str, Any], **fixed) -> ModelConfig:
    """The variant named `base` (or a config, a checkpoint's) with settings on top: `inherited` (a
    preset's: those of a part the model does not have are dropped) and `given` (the user's: such a
    one is an error naming it). `fixed`: fields set by other means (in_channels). A part the
    settings bring in (quantizer=vq, an action_code.* field) starts from its defaults."""
    start = ModelConfig.named(base) if isinstance(base, str) else base
    variant = start.variant
    values = {**model_settings(start), **inherited, **given}
    parts: dict[str, dict] = {}
    for part, (_, selector, wanted) in PARTS.items():
        prefix = part + "."
        present = values.get(selector) == wanted if wanted else any(
            k.startswith(prefix) for k in (*model_settings(start), *given))
        mine = {k[len(prefix):]: values.pop(k) for k in list(values) if k.startswith(prefix)}
        if present:
            parts[part] = mine
            continue
        stray = sorted(prefix + k for k in mine if prefix + k in given)
        if stray:
            because = f"{selector} is {values.get(selector)!r}" if wanted else "the variant has none"
            raise NotInThisModel(f"{stray[0]}: this model has no {part} part ({because}); variant {variant!r}")
    return ModelConfig(**values, **{part: kind_values for part, kind_values in parts.items()},
                       **{part: None for part in PARTS if part not in parts}, variant=variant, **fixed)
