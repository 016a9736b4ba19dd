"""The trainer's one config dataclass, its presets, and `--set field=value` parsing.

Model fields sit flat beside the training fields (so `--set width=0.25` works); `model_config()`
picks them out by ModelConfig's own field names, so a new model field needs only its line here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Sequence

from common.errors import UserError
from model import ModelConfig
from model.inference import AMP_MODES

# Field defaults are the seed's `full` run; presets override some of them.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # ~1M params at width 0.25 (eager beats compiled on a CPU). 600 steps: with the action-carrying
    # model (ModelConfig defaults) the paddle-move probe peaked near step 500 and fell after (73 %,
    # 76 %, 66 % at 250, 500, 750) while PSNR held, and a step costs ~2.6x the seed-literal one's.
    # lr 2e-3: in 500-step trials of the seed model it reached 34 dB val PSNR where 1e-3 reached 30
    # and 3e-4 19. Resets every 200 steps (not 10k): early on most codes lose every contest.
    "demo": dict(width=0.25, iters=600, lr_decay_iters=600, lr=2e-3, lr_min=1e-4, reset_every=200, val_every=200,
                 val_batches=8, metrics_every=200, hist_every=600, image_every=200, ckpt_every=300, compile=False),
    # For tests: every cadence <= 10 steps so a 20-step run exercises each of them; one thread, as
    # OpenMP threads spinning on a busy 2-core box are many times slower than one.
    "tiny": dict(width=0.0625, code_dim=32, batch_size=4, iters=20, lr_decay_iters=20, lr=3e-3, lr_min=1e-3, reset_every=5,
                 reset_buffer=256, val_every=5, val_batches=2, metrics_every=10, probe_pairs=32, hist_every=10, image_every=10,
                 ckpt_every=10, backend="torch", deterministic=True, threads=1),
}


@dataclass
class TrainConfig:
    preset: str = "full"
    shards: str = "shards/pairs"
    out: str = "checkpoints/latent_action"   # step-NNNNNN.pt and best.pt
    run_dir: str = ""                        # metrics.jsonl, images, wandb files; "" = runs/<run_name>
    run_name: str = ""                       # "" = <preset>-<date>-<time>
    # model: every ModelConfig field but in_channels, which `rgb` gives (on --resume the
    # architecture comes from the checkpoint)
    rgb: bool = False
    width: float = 1.0                       # channel multiplier on 64, 128, 256, 512, 512
    codebook_size: int = 256
    code_dim: int = 128
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    entropy_weight: float = 0.05
    entropy_temperature: float = 0.5
    reset_every: int = 10_000                # dead-code reset interval in steps (0 = never)
    reset_buffer: int = 4096
    grad_checkpoint: bool = False
    encoder_input: str = "difference"        # pair (seed) | pair_difference | difference; see ModelConfig
    decoder_skips: bool = True
    latent_every_stage: bool = True
    residual_output: bool = True
    changed_pixel_weight: float = 10.0
    context: int = 0                         # 1: frame t-1 too (loader, encoder, decoder); see ModelConfig
    # optimisation
    iters: int = 100_000
    batch_size: int = 32                     # global batch per optimiser step (all ranks, all micro-batches)
    grad_accum: int = 1                      # micro-batches per step
    lr: float = 3e-4
    lr_min: float = 1e-4
    lr_schedule: str = "cosine"              # cosine | linear | constant (after warmup)
    # Schedule horizon: lr reaches lr_min there and code resets stop. A preset's own length, not
    # --iters, so that a run stopped at any step (--iters k) and resumed is the same run. 0 = iters.
    lr_decay_iters: int = 100_000
    warmup: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0                   # max global grad norm; 0 = no clipping
    max_nonfinite: int = 5                   # stop after this many non-finite steps in a row
    # runtime
    device: str = "auto"                     # auto | cpu | cuda
    backend: str = "dali"                    # data loader: dali | torch
    compile: bool = True
    compile_backend: str = "inductor"        # torch.compile backend (aot_eager: traced, no code generation)
    # Off by default: SyncBatchNorm breaks torch.compile's graph at every norm, so DDP ranks normalise
    # their own micro-batch and average BatchNorm's running statistics before validation and checkpoints.
    sync_batchnorm: bool = False
    amp: str = "auto"                        # auto (bf16 on CUDA if supported, else off) | bf16 | fp16 | off
    wandb: str = ""                          # offline | online | disabled; "" = $WANDB_MODE or offline
    seed: int = 0
    deterministic: bool = False
    threads: int = 0                         # CPU threads per rank; 0 = the cores shared out among local ranks
    # cadences in steps (0 = never)
    val_every: int = 1000                    # validation loss (and best.pt)
    val_batches: int = 50                    # validation sample: this many batches' pairs, drawn across every val episode (0 = all)
    metrics_every: int = 1000                # PSNR / SSIM on validation, and the move probe
    probe_pairs: int = 1024                  # train pairs the validation's move probe is fitted on (0 = no probe)
    hist_every: int = 5000                   # codebook usage histogram
    image_every: int = 2500                  # example reconstructions
    ckpt_every: int = 10_000

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule must be cosine, linear or constant"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.backend in ("dali", "torch"), "backend must be dali or torch"),
            (self.amp in AMP_MODES, "amp must be auto, bf16, fp16 or off"),
            (self.wandb in ("", "offline", "online", "disabled"), "wandb must be offline, online or disabled"),
            (self.iters >= 1, "iters must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0, "batch_size must be divisible by grad_accum"),
            (0 < self.lr_min <= self.lr, "need 0 < lr_min <= lr"),
            (self.warmup >= 0 and self.lr_decay_iters >= 0, "warmup and lr_decay_iters must be >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.grad_clip >= 0 and self.max_nonfinite >= 1, "need grad_clip >= 0 and max_nonfinite >= 1"),
            (min(self.val_every, self.val_batches, self.metrics_every, self.hist_every, self.image_every,
                 self.ckpt_every) >= 0, "cadences and val_batches must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model_config()        # validates the model fields

    def model_config(self) -> ModelConfig:
        shared = {name: getattr(self, name) for name in model_field_names()}
        return ModelConfig(in_channels=3 if self.rgb else 1, **shared)

    def with_model(self, model: ModelConfig) -> "TrainConfig":
        """This config with the architecture of `model` (a checkpoint's)."""
        return dataclasses.replace(self, rgb=model.in_channels == 3,
                                   **{name: getattr(model, name) for name in model_field_names()})


def model_field_names() -> list[str]:
    """ModelConfig's fields that TrainConfig carries under the same name (all but in_channels)."""
    return [f.name for f in fields(ModelConfig) if f.name != "in_channels"]


def parse_value(field: dataclasses.Field, text: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind == "int":
        return int(text.replace("_", ""))
    if kind == "float":
        return float(text)
    return text


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`field=value` strings -> typed values; one clear UserError for an unknown field or bad value."""
    by_name = {f.name: f for f in fields(TrainConfig)}
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


def build_config(preset: str, settings: Sequence[str] = (), flags: dict[str, Any] | None = None) -> TrainConfig:
    """Preset, then `--set` settings, then the dedicated flags (those that are not None)."""
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset], **parse_settings(settings)}
    values.update({name: value for name, value in (flags or {}).items() if value is not None})
    try:
        return TrainConfig(**values)
    except ValueError as error:
        raise UserError(f"bad configuration: {error}") from None


def resumed_config(saved: dict, model: ModelConfig, preset: str | None = None, settings: Sequence[str] = (),
                   flags: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: every field as the checkpoint saved it, so a resume is the same
    run; then what the command line gives (a different --preset, --set, flags) overrides, except the
    architecture, which is the checkpoint's. Returns the config and one line per field that changed."""
    known = {f.name for f in fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in known}
    if preset is not None and preset != values.get("preset"):
        values.update({"preset": preset, **PRESETS[preset]})
    values.update(parse_settings(settings))
    values.update({name: value for name, value in (flags or {}).items() if value is not None})
    architecture = {"rgb": model.in_channels == 3, **{name: getattr(model, name) for name in model_field_names()}}
    kept = [name for name, value in architecture.items() if name in values and values[name] != value]
    values.update(architecture)
    try:
        cfg = TrainConfig(**values)
    except ValueError as error:
        raise UserError(f"bad configuration: {error}") from None
    changes = [f"{name}: {saved[name]!r} -> {getattr(cfg, name)!r} (from the command line)"
               for name in sorted(known) if name in saved and saved[name] != getattr(cfg, name)]
    changes += [f"{name}: the checkpoint's {architecture[name]!r} kept (the architecture comes from the checkpoint)"
                for name in kept]
    return cfg, changes


def fields_help() -> str:
    """The --help epilog: every field with its default, and what each preset changes."""
    field_help = "\n".join(f"  {f.name} = {f.default!r}" for f in fields(TrainConfig))
    preset_help = "\n".join(f"  {name}: {overrides or '(the field defaults)'}" for name, overrides in PRESETS.items())
    return f"fields for --set (defaults = the full preset):\n{field_help}\n\npresets:\n{preset_help}"
