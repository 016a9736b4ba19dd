"""The trainer's one config dataclass, its presets, and `--set field=value` parsing.

The model is a ModelConfig inside it (`cfg.model`): a named variant (`--model`, model/config.py's
VARIANTS), whose fields `--set` and the presets name beside the training fields (`--set width=0.25`,
`--set vq.codes=512`), so a new model field needs only its line in model/config.py.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Sequence

from common.cli import MAX_BATCH, MAX_SEED, MAX_THREADS, flag, without_none
from common.errors import UserError
from model import ModelConfig
from model.config import VARIANTS, levels_tuple, model_settings, resolve_model, setting_types
from model.inference import AMP_MODES
from pipeline.actions import ACTION_NAMES

WANDB_MODES = ("offline", "online", "disabled")
VQ_RESET_EVERY = 10_000             # the seed's dead-code reset interval
# Field defaults are the seed's `full` run; presets override some of them (model fields by name too).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # ~1M params at width 0.25 (eager beats compiled on a CPU). 1,300 steps: with the shift decoder
    # and FSQ codes (the ModelConfig defaults) the paddle drawn within 2 px rose 45 -> 60 -> 93 -> 94
    # -> 99 % and the ball 18 -> 66 % on the validation sample at steps 250 .. 1,250 of a 1,500-step
    # run, and `make demo` must stay within 20 minutes on a 2-core CPU (a step takes ~0.5 s there).
    # lr 2e-3: 3e-3 drew the paddle as well but the ball at 26 % instead of 70 % by step 1,000.
    # Resets every 200 steps (vq only): early on most codes lose every contest.
    "demo": dict(width=0.25, iters=1300, lr_decay_iters=1300, lr=2e-3, lr_min=1e-4, reset_every=200, val_every=250,
                 val_batches=8, metrics_every=250, hist_every=1300, image_every=250, ckpt_every=500, compile=False),
    # `make demo` on a CUDA machine: the full-width model for a few thousand steps (minutes on one
    # H100/H200), trained half of the time on its own snapped frames, which is what held the ball when
    # played forward on recorded codes (README, "Playing in the model"). Eager: the GPU demo must not
    # depend on a compile working on whatever torch the box brings; `make train` compiles.
    "gpu-demo": dict(iters=3300, lr_decay_iters=3300, own_frames=0.5, own_frames_start=300, val_every=500,
                     val_batches=16, metrics_every=500, hist_every=3300, image_every=1100, ckpt_every=1100,
                     compile=False),
    # For tests: every cadence <= 10 steps so a 20-step run exercises each of them; one thread, as
    # OpenMP threads spinning on a busy 2-core box are many times slower than one.
    "tiny": dict(width=0.0625, code_dim=32, batch_size=4, iters=20, lr_decay_iters=20, lr=3e-3, lr_min=1e-3, reset_every=5,
                 **{"vq.reset_buffer": 256}, val_every=5, val_batches=2, metrics_every=10, probe_pairs=32, hist_every=10, image_every=10,
                 ckpt_every=10, backend="torch", deterministic=True, threads=1),
}


@dataclass
class TrainConfig:
    preset: str = flag("full", "default full; on --resume, the checkpoint's", choices=tuple(PRESETS))
    shards: str = flag("shards/pairs", "pair shard directory (manifest lam-pairs/1)")
    out: str = flag("checkpoints/latent_action", "checkpoint directory: step-NNNNNN.pt and best.pt")
    run_dir: str = flag("", "metrics.jsonl, images, wandb files (default runs/<run name>)")
    run_name: str = ""                       # "" = <preset>-<date>-<time>
    rgb: bool = flag(False, "RGB frames (default grayscale); the model's in_channels follows")
    # The model: ModelConfig states its fields and their defaults; `--set` and the presets name them
    # flat beside the training fields (`--set width=0.25`). On --resume it is the checkpoint's.
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # VQ only: dead codes get fresh vectors this often, in steps (0 = never; default 10,000). A
    # training setting, so --resume may change it; a model without a VQ codebook has no such field.
    reset_every: int | None = flag(None, min=0)
    grad_checkpoint: bool = False            # recompute each conv stage in backward (memory for time)
    # Light supervision, off by default: the recorded action of this fraction of the train pairs (a
    # fixed, seeded choice) trains an action head on the codes (training/labels.py); the model then
    # gets the head (ModelConfig.action_classes).
    action_fraction: float = flag(0.0, min=0, max=1)
    # Training on the model's own frames (training/own_frames.py): this share of each batch's pairs
    # has the decoder start from the model's own drawing of frame t, from step own_frames_start on.
    own_frames: float = flag(0.0, min=0, max=1)
    own_frames_start: int = flag(0, min=0)
    # The encoder's moved view (ModelConfig.encoder_jitter) for this share of the schedule horizon,
    # then the pairs unmoved: the codes learn to name the move while the view moves, and the last
    # stretch lines their cells up with the decoder's again (docs/model.md: at 0.5 the paddle 74 -> 96 %,
    # the linear move probe 94 -> 89 % on seed 0).
    jitter_until: float = flag(1.0, min=0, max=1)
    # optimisation
    iters: int = flag(100_000, "train until this step (also after --resume)", min=1)
    batch_size: int = flag(32, "global batch per optimiser step (all ranks, all micro-batches)", min=1,
                           max=MAX_BATCH * 64)
    grad_accum: int = flag(1, min=1, max=MAX_BATCH)         # micro-batches per step
    lr: float = flag(3e-4, above=0)
    lr_min: float = flag(1e-4, above=0)
    lr_schedule: str = flag("cosine", choices=("cosine", "linear", "constant"))   # after warmup
    # Schedule horizon: lr reaches lr_min there and code resets stop. A preset's own length, not
    # --iters, so that a run stopped at any step (--iters k) and resumed is the same run. 0 = iters.
    lr_decay_iters: int = flag(100_000, min=0)
    warmup: int = flag(0, min=0)
    beta1: float = flag(0.9, min=0, below=1)
    beta2: float = flag(0.999, min=0, below=1)
    grad_clip: float = flag(1.0, min=0)      # max global grad norm; 0 = no clipping
    max_nonfinite: int = flag(5, min=1)      # stop after this many non-finite steps in a row
    # runtime
    device: str = flag("auto", choices=("auto", "cpu", "cuda"))
    backend: str = flag("auto", "data loader: auto (dali where it is installed, else torch), dali or torch",
                        choices=("auto", "dali", "torch"))
    compile: bool = flag(True, "torch.compile the model (--no-compile: eager)")
    compile_backend: str = "inductor"        # torch.compile backend (aot_eager: traced, no code generation)
    # torch.compile mode; reduce-overhead replays each step as CUDA graphs (on a GPU: far fewer kernel
    # launches from Python per step, which is what bounds a batch-32 step of this small model)
    compile_mode: str = flag("default", choices=("default", "reduce-overhead", "max-autotune",
                                                 "max-autotune-no-cudagraphs"))
    # conv weights (and so activations) in NHWC: the same numbers, 20 % faster steps on the 2-core CPU
    # (oneDNN's kernels prefer it); on a GPU it is what tensor-core convolutions want
    channels_last: bool = True
    # Off by default: SyncBatchNorm breaks torch.compile's graph at every norm, so DDP ranks normalise
    # their own micro-batch and average BatchNorm's running statistics before validation and checkpoints.
    sync_batchnorm: bool = False
    amp: str = flag("auto", "auto: bf16 where it is native (a GPU with bf16, a CPU with avx512_bf16 or AMX), else fp32",
                    choices=AMP_MODES)
    wandb: str = flag("", "default $WANDB_MODE, else offline", choices=WANDB_MODES)
    seed: int = flag(0, min=0, max=MAX_SEED)
    deterministic: bool = False
    threads: int = flag(0, min=0, max=MAX_THREADS)   # CPU threads per rank; 0 = the cores shared out among local ranks
    # cadences in steps (0 = never)
    val_every: int = flag(1000, min=0)       # validation loss (and best.pt)
    # validation sample: this many batches' pairs, drawn across every val episode (0 = all)
    val_batches: int = flag(50, min=0)
    metrics_every: int = flag(1000, min=0)   # PSNR / SSIM on validation, and the move probe
    probe_pairs: int = flag(1024, min=0)     # train pairs the validation's move probe is fitted on (0 = no probe)
    hist_every: int = flag(5000, min=0)      # codebook usage histogram
    image_every: int = flag(2500, min=0)     # example reconstructions
    ckpt_every: int = flag(10_000, min=0)
    # best.pt: "selection" maximises the mean of paddle and ball drawn within 2 px and the move probe
    # (training/validate.py, at the metrics cadence); "recon" minimises val/recon (the seed's rule)
    best_by: str = flag("selection", choices=("selection", "recon"))

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule must be cosine, linear or constant"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.backend in ("auto", "dali", "torch"), "backend must be auto, dali or torch"),
            (self.amp in AMP_MODES, "amp must be auto, bf16, fp16 or off"),
            (self.wandb in ("", *WANDB_MODES), "wandb must be offline, online or disabled"),
            (self.reset_every is None or self.reset_every >= 0, "reset_every must be >= 0"),
            (self.reset_every is None or self.model.quantizer == "vq",
             f"reset_every: this model has no VQ codebook to reset (quantizer is {self.model.quantizer!r})"),
            (self.best_by in ("selection", "recon"), f"best_by must be selection or recon, got {self.best_by!r}"),
            (self.iters >= 1, "iters must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            # (grad_accum 0 is refused by the line above; `or` keeps this line from dividing by it)
            (self.grad_accum < 1 or self.batch_size % self.grad_accum == 0, "batch_size must be divisible by grad_accum"),
            (0 < self.lr_min <= self.lr, "need 0 < lr_min <= lr"),
            (self.warmup >= 0 and self.lr_decay_iters >= 0, "warmup and lr_decay_iters must be >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (0 <= self.action_fraction <= 1, f"action_fraction must be in [0, 1], got {self.action_fraction}"),
            (0 <= self.jitter_until <= 1, f"jitter_until must be in [0, 1], got {self.jitter_until}"),
            (self.grad_clip >= 0 and self.max_nonfinite >= 1, "need grad_clip >= 0 and max_nonfinite >= 1"),
            (min(self.val_every, self.val_batches, self.metrics_every, self.hist_every, self.image_every,
                 self.ckpt_every) >= 0, "cadences and val_batches must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model = dataclasses.replace(self.model, in_channels=3 if self.rgb else 1)
        if self.model.quantizer == "vq" and self.reset_every is None:
            self.reset_every = VQ_RESET_EVERY
        if self.action_fraction > 0 and not self.model.action_classes:
            self.model = dataclasses.replace(self.model, action_classes=len(ACTION_NAMES))

    def micro_batch(self, world_size: int) -> int:
        """Pairs per forward pass: the global batch shared out over the ranks and the accumulation steps."""
        micro_batch, remainder = divmod(self.batch_size, world_size * self.grad_accum)
        if remainder or micro_batch < 1:
            raise UserError(f"batch_size {self.batch_size} must be a multiple of world_size × grad_accum "
                            f"({world_size} × {self.grad_accum})")
        return micro_batch

    def to_dict(self) -> dict:
        """The training settings, as a checkpoint's config["train"] holds them (config["model"] the model's)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def settable_types() -> dict[str, Any]:
    """What `--set` and the presets name, with each one's type: the training fields and, beside them,
    the model's (flat, or dotted inside a part: `vq.codes`, model/config.py)."""
    hints = typing.get_type_hints(TrainConfig)
    return {**{f.name: without_none(hints[f.name]) for f in fields(TrainConfig) if f.name != "model"},
            **{name: kind for name, kind in setting_types().items()}}


def parse_value(kind: Any, text: str) -> Any:
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if name == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if name == "int":
        return int(text.replace("_", ""))
    if name == "float":
        return float(text)
    if name.startswith("tuple"):
        return levels_tuple(text)
    return text


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`field=value` strings -> typed values; one clear UserError for an unknown field or bad value."""
    by_name = settable_types()
    values: dict[str, Any] = {}
    for item in settings:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in by_name:
            raise UserError(f"--set {item!r}: unknown field {name!r} (see --help for the fields)" if sep
                            else f"--set {item!r}: expected field=value")
        try:
            values[name] = parse_value(by_name[name], text.strip())
        except ValueError as error:
            raise UserError(f"--set {name}: bad value {text!r} ({error})") from None
    return values


def build_config(preset: str, settings: Sequence[str] = (), flags: dict[str, Any] | None = None,
                 model: str = "default") -> TrainConfig:
    """The model variant and the preset, then `--set` settings, then the dedicated flags (those that
    are not None)."""
    given = {**parse_settings(settings), **{name: value for name, value in (flags or {}).items() if value is not None}}
    return make_config(model, {"preset": preset, **PRESETS[preset]}, given)


def make_config(variant: str | ModelConfig, inherited: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from the model variant (a name, or a checkpoint's config) and flat settings
    (training and model fields side by side): `inherited` from a preset or a checkpoint, `given` by the user. A setting the model has no use for is dropped when
    inherited and one UserError when given; so is a value out of range."""
    types = settable_types()
    model_names = {name for name in types if name not in TRAIN_FIELDS}
    split = lambda values, model: {k: v for k, v in values.items() if (k in model_names) == model}  # noqa: E731
    values = {**inherited, **given}
    try:
        model = resolve_model(variant, split(inherited, True), split(given, True),
                              in_channels=3 if values.get("rgb") else 1)
    except ValueError as error:
        raise UserError(f"bad configuration: {error}") from None
    train = split(values, False)
    if model.quantizer != "vq":                    # dead-code resets exist only for a VQ codebook
        if "reset_every" in given:
            raise UserError(f"bad configuration: reset_every: this model has no VQ codebook to reset "
                            f"(quantizer is {model.quantizer!r})")
        train.pop("reset_every", None)
    if "jitter_until" in given and not model.encoder_jitter:
        raise UserError("bad configuration: jitter_until: the encoder's view is never moved "
                        "(set encoder_jitter > 0)")
    if "action_weight" in given and not train.get("action_fraction"):
        raise UserError("bad configuration: action_weight: there is no action head without labels "
                        "(set action_fraction > 0)")
    try:
        return TrainConfig(**train, model=model)
    except ValueError as error:
        raise UserError(f"bad configuration: {error}") from None


TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "model")


def fields_help() -> str:
    """The --help epilog: every field with its default, the model variants, and what each preset changes."""
    train = [f for f in fields(TrainConfig) if f.name != "model"]
    default = model_settings(ModelConfig())
    listed = "\n".join(f"  {f.name} = {f.default!r}" for f in train)
    model = "\n".join(f"  {name} = {default[name]!r}" if name in default else f"  {name}  (in variants that have it)"
                      for name in setting_types())
    variants = "\n".join(f"  {name}: {changes or '(the defaults)'}" for name, changes in
                         ((n, ", ".join(f"{k}={v}" for k, v in c.items() if v is not None)) for n, c in VARIANTS.items()))
    preset_help = "\n".join(f"  {name}: {overrides or '(the field defaults)'}" for name, overrides in PRESETS.items())
    return (f"fields for --set (defaults = the full preset):\n{listed}\n\n"
            f"model fields for --set (the default variant's values; vq.* only with quantizer=vq, shift.* only with "
            f"output=shift):\n{model}\n\nmodel variants (--model):\n{variants}\n\npresets:\n{preset_help}")
