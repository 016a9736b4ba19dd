"""Train the latent action model (VQ-VAE) on pair shards.

    python train.py --shards shards/pairs --preset full|demo|tiny [--out DIR] [--run-dir DIR]
        [--iters N] [--batch-size B] [--rgb] [--no-compile] [--amp bf16|fp16|off]
        [--wandb offline|online|disabled] [--resume] [--set field=value ...]
    torchrun --nproc_per_node=N train.py ...        # DDP: NCCL on GPUs, gloo on CPUs

A step is one optimiser update; the first logged row is step 1 and step-000020.pt holds the state
after 20 steps. `--iters N` trains until step N, also after `--resume`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import CHECKPOINT_FORMAT, LatentActionModel, ModelConfig, clean_state_dict, read_checkpoint
from model.checkpoint import model_config_from
from pipeline.errors import UserError, run_cli
from pipeline.shards import PAIRS_FORMAT, atomic_write_bytes, load_manifest

LOSS_TERMS = ("loss", "recon", "commitment", "codebook", "entropy")

# ------------------------------------------------------------------------------------------ config
# Field defaults are the seed's `full` run; presets override some of them.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # ~0.8M params; ~4.5 steps/s on a free 2-core CPU (eager beats compiled there), so 2000 steps
    # plus validation fit in 10 minutes. lr 2e-3: in 500-step trials it reached 34 dB val PSNR where
    # 1e-3 reached 30 and 3e-4 19. Resets every 200 steps (not 10k): early on most codes lose every
    # nearest-code contest.
    "demo": dict(width=0.25, iters=2000, lr_decay_iters=2000, lr=2e-3, lr_min=1e-4, reset_every=200, val_every=400, val_batches=8,
                 metrics_every=400, hist_every=800, image_every=400, ckpt_every=800, compile=False),
    # For tests: every cadence <= 10 steps so a 20-step run exercises each of them; one thread, as
    # OpenMP threads spinning on a busy 2-core box are many times slower than one.
    "tiny": dict(width=0.0625, code_dim=32, batch_size=4, iters=20, lr_decay_iters=20, lr=3e-3, lr_min=1e-3, reset_every=5,
                 reset_buffer=256, val_every=5, val_batches=2, metrics_every=10, hist_every=10, image_every=10,
                 ckpt_every=10, backend="torch", deterministic=True, threads=1),
}


@dataclass
class TrainConfig:
    preset: str = "full"
    shards: str = "shards/pairs"
    out: str = "checkpoints/latent_action"   # step-NNNNNN.pt and best.pt
    run_dir: str = ""                        # metrics.jsonl, images, wandb files; "" = runs/<run_name>
    run_name: str = ""                       # "" = <preset>-<date>-<time>
    # model (architecture fields come from the checkpoint on --resume)
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
    amp: str = "auto"                        # auto (bf16 on CUDA if supported, else off) | bf16 | fp16 | off
    wandb: str = ""                          # offline | online | disabled; "" = $WANDB_MODE or offline
    seed: int = 0
    deterministic: bool = False
    threads: int = 0                         # CPU threads per rank; 0 = the cores shared out among local ranks
    # cadences in steps (0 = never)
    val_every: int = 1000                    # validation loss (and best.pt)
    val_batches: int = 50                    # batches per validation pass (0 = the whole split)
    metrics_every: int = 1000                # PSNR / SSIM on validation
    hist_every: int = 5000                   # codebook usage histogram
    image_every: int = 2500                  # example reconstructions
    ckpt_every: int = 10_000

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule must be cosine, linear or constant"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.backend in ("dali", "torch"), "backend must be dali or torch"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "amp must be auto, bf16, fp16 or off"),
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
        return ModelConfig(in_channels=3 if self.rgb else 1, width=self.width, codebook_size=self.codebook_size,
                           code_dim=self.code_dim, commitment_weight=self.commitment_weight,
                           codebook_weight=self.codebook_weight, entropy_weight=self.entropy_weight,
                           entropy_temperature=self.entropy_temperature, reset_every=self.reset_every,
                           reset_buffer=self.reset_buffer, grad_checkpoint=self.grad_checkpoint)


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


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Preset, then --set overrides, then the dedicated flags."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {"preset": args.preset, **PRESETS[args.preset]}
    for item in args.set or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in by_name:
            raise UserError(f"--set {item!r}: unknown field {name!r} (see --help for the fields)" if sep
                            else f"--set {item!r}: expected field=value")
        try:
            values[name] = parse_value(by_name[name], text.strip())
        except ValueError as error:
            raise UserError(f"--set {name}: bad value {text!r} ({error})") from None
    flags = {"shards": args.shards, "out": args.out, "run_dir": args.run_dir, "iters": args.iters,
             "batch_size": args.batch_size, "amp": args.amp, "wandb": args.wandb}
    values.update({name: value for name, value in flags.items() if value is not None})
    if args.rgb:
        values["rgb"] = True
    if args.no_compile:
        values["compile"] = False
    try:
        return TrainConfig(**values)
    except ValueError as error:
        raise UserError(f"bad configuration: {error}") from None


def argument_parser() -> argparse.ArgumentParser:
    field_help = "\n".join(f"  {f.name} = {f.default!r}" for f in fields(TrainConfig))
    preset_help = "\n".join(f"  {name}: {overrides or '(the field defaults)'}" for name, overrides in PRESETS.items())
    parser = argparse.ArgumentParser(
        description="Train the latent action VQ-VAE on pair shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"fields for --set (defaults = the full preset):\n{field_help}\n\npresets:\n{preset_help}")
    parser.add_argument("--shards", help="pair shard directory (manifest lam-pairs/1)")
    parser.add_argument("--preset", choices=list(PRESETS), default="full")
    parser.add_argument("--out", help="checkpoint directory (default checkpoints/latent_action)")
    parser.add_argument("--run-dir", dest="run_dir", help="metrics.jsonl, images, wandb (default runs/<run name>)")
    parser.add_argument("--iters", type=int, help="train until this step")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="global batch per step")
    parser.add_argument("--rgb", action="store_true", help="RGB frames (default grayscale)")
    parser.add_argument("--no-compile", dest="no_compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"])
    parser.add_argument("--wandb", choices=["offline", "online", "disabled"])
    parser.add_argument("--resume", action="store_true", help="continue from the latest step-*.pt in --out")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE", help="set any config field (repeatable)")
    return parser


# ------------------------------------------------------------------------------------------ runtime
@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device=cuda asked for, but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks sharing a CPU box split its cores rather than each taking all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, world_size, local_rank, device)


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if cfg.amp == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if bf16 else None), False
    return {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True), "off": (None, False)}[cfg.amp]


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------ data
def build_loaders(cfg: TrainConfig, rt: Runtime, micro_batch: int):
    from pipeline.loader import build_loader

    common = dict(grayscale=not cfg.rgb, seed=cfg.seed, backend=cfg.backend, device=rt.device.type,
                  rank=rt.rank, world_size=rt.world_size)
    train = build_loader(cfg.shards, "train", micro_batch, shuffle=True, drop_last=True, **common)
    val = build_loader(cfg.shards, "val", micro_batch, shuffle=False, drop_last=False, **common)
    if len(train) == 0:
        raise UserError(f"{cfg.shards}: the train split has fewer than one batch of {micro_batch} pairs per rank")
    return train, val


def forever(loader) -> Iterator[dict]:
    """Epoch after epoch; the loader's own state_dict() knows the position inside the epoch."""
    while True:
        for batch in loader:
            yield batch


# ------------------------------------------------------------------------------------------ helpers
def schedule_horizon(cfg: TrainConfig) -> int:
    """The step the schedule plans for: lr reaches lr_min there and code resets stop one interval
    before. It does not follow --iters (unless lr_decay_iters is 0), so a run stopped at step k and
    resumed to n is the same run as one straight to n."""
    return cfg.lr_decay_iters or cfg.iters


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """lr for update number `step` + 1: linear warmup, then cosine (or linear) decay from lr to lr_min
    over the schedule horizon, lr_min after."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, schedule_horizon(cfg) - cfg.warmup))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.lr_min) * progress
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def average_batchnorm_stats(model: torch.nn.Module, rt: Runtime) -> None:
    """On CPU DDP (no SyncBatchNorm) each rank's running statistics drift apart; average them before
    validation and checkpoints so every rank, and the checkpoint, holds the same model."""
    if not rt.distributed or rt.device.type == "cuda":
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer.div_(rt.world_size)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    if not rt.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model: LatentActionModel, loader, cfg: TrainConfig, rt: Runtime, autocast) -> dict:
    """Validation pass over this rank's share (val_batches in all), summed across ranks: recon loss,
    PSNR over the whole pass (10·log10(1/MSE)), SSIM, copy-frame-t PSNR, and code counts."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    model.eval()
    limit = math.ceil(cfg.val_batches / rt.world_size) if cfg.val_batches else None
    sq_err = copy_sq_err = ssim_sum = pixels = frames = 0.0
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64, device=rt.device)
    first = None
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        cur, nxt = batch["cur"], batch["next"]
        with autocast:
            out = model(cur, nxt)
        pred = out["pred"].float().clamp(0, 1)
        sq_err += F.mse_loss(pred, nxt, reduction="sum").item()
        copy_sq_err += F.mse_loss(cur, nxt, reduction="sum").item()
        ssim_sum += ssim(pred, nxt, data_range=1.0, reduction="sum").item()
        pixels += nxt.numel()
        frames += nxt.shape[0]
        counts += torch.bincount(out["codes"].reshape(-1), minlength=counts.numel()).double()
        if first is None:
            first = (cur[:4].float().cpu(), nxt[:4].float().cpu(), pred[:4].cpu())
    model.train()
    sq_err, copy_sq_err, ssim_sum, pixels, frames = all_sum([sq_err, copy_sq_err, ssim_sum, pixels, frames], rt)
    if rt.distributed:
        dist.all_reduce(counts)
    if frames == 0:
        return {}
    mse, copy_mse = sq_err / pixels, copy_sq_err / pixels
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {"val/recon": mse, "val/psnr": 10 * math.log10(1 / max(mse, 1e-12)),
            "val/psnr_copy": 10 * math.log10(1 / max(copy_mse, 1e-12)), "val/ssim": ssim_sum / frames,
            "codebook/used_fraction": (counts > 0).double().mean().item(), "codebook/perplexity": math.exp(entropy),
            "_counts": counts.long().cpu().tolist(), "_examples": first}


def reconstruction_grid(examples: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Rows of [frame t | frame t+1 | prediction | 4×|error|] as one uint8 image (H, W, C)."""
    cur, nxt, pred = examples
    rows = [torch.cat([c, n, p, (4 * (n - p).abs()).clamp(0, 1)], dim=2) for c, n, p in zip(cur, nxt, pred)]
    grid = torch.cat(rows, dim=1)                                   # (C, rows·H, 4·W)
    image = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return image[..., 0] if image.shape[2] == 1 else image


class Logger:
    """metrics.jsonl (one row per step, step 1 first) plus wandb; rank 0 only."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_step: int, enabled: bool, extra_config: dict):
        self.enabled, self.run_dir, self.wandb = enabled, run_dir, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():     # drop rows a crashed run wrote after its last checkpoint
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(row + "\n" for row in rows).encode())
        elif not resume_step:
            self.path.write_text("")
        self.file = open(self.path, "a")
        mode = cfg.wandb or os.environ.get("WANDB_MODE") or "offline"
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.run_name)      # wandb ids allow only these
            self.wandb = wandb.init(project="latent-actions", name=cfg.run_name, id=run_id, resume="allow",
                                    dir=str(run_dir), mode=mode, config={**asdict(cfg), **extra_config})

    def log(self, step: int, row: dict, histogram: bool = False, image: bool = False) -> None:
        """Scalars every step; the code-count histogram and a reconstruction PNG when asked."""
        if not self.enabled:
            return
        counts, examples = row.pop("_counts", None), row.pop("_examples", None)
        if counts is not None and histogram:
            row["codebook/counts"] = counts
        image_path = None
        if examples is not None and image:
            from PIL import Image

            image_path = self.run_dir / "images" / f"step-{step:06d}.png"
            image_path.parent.mkdir(exist_ok=True)
            Image.fromarray(reconstruction_grid(examples)).save(image_path)
            row["images/reconstruction"] = str(image_path.relative_to(self.run_dir))
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            import wandb

            payload = {k: v for k, v in row.items() if k not in ("codebook/counts", "images/reconstruction")}
            if "codebook/counts" in row:
                edges = np.arange(len(counts) + 1)
                payload["codebook/histogram"] = wandb.Histogram(np_histogram=(np.asarray(counts), edges))
            if image_path is not None:
                payload["images/reconstruction"] = wandb.Image(str(image_path), caption="t | t+1 | pred | 4×err")
            self.wandb.log(payload, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


# ------------------------------------------------------------------------------------------ checkpoints
def plain(value: Any) -> Any:
    """Numpy values inside loader/RNG state -> lists and Python scalars, so torch.load(weights_only=True) works."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": plain(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to memory, then temp file + fsync + rename: a crash never leaves a half-written .pt."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def latest_checkpoint(out: Path) -> Path:
    found = sorted(out.glob("step-*.pt")) if out.is_dir() else []
    if not found:
        raise UserError(f"--resume: no step-*.pt checkpoint in {out}")
    return found[-1]


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of the parameters and BatchNorm statistics: what must agree across DDP ranks (the
    quantiser's usage counts and recent-output buffer are per rank by design)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("quantizer.") and name != "quantizer.codebook":
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig, resume: bool) -> None:
    out = Path(cfg.out)
    resumed = None
    if resume:
        path = latest_checkpoint(out)
        resumed = read_checkpoint(path)
        saved = resumed["config"].get("train", {}) if isinstance(resumed["config"], dict) else {}
        # The architecture comes from the checkpoint; so do the run's name and directory unless given.
        model_cfg = model_config_from(resumed, path)
        arch = {"rgb": model_cfg.in_channels == 3, "width": model_cfg.width,
                "codebook_size": model_cfg.codebook_size, "code_dim": model_cfg.code_dim}
        changed = {name: value for name, value in arch.items() if getattr(cfg, name) != value}
        if changed and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: architecture comes from {path}: {changed}", flush=True)
        cfg = dataclasses.replace(cfg, **arch, run_name=cfg.run_name or saved.get("run_name", ""),
                                  run_dir=cfg.run_dir or saved.get("run_dir", ""))
    load_manifest(Path(cfg.shards), PAIRS_FORMAT)
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=str(Path("runs") / cfg.run_name))

    rt = setup_runtime(cfg)
    try:
        run(cfg, rt, resumed)
    finally:
        if rt.distributed:
            dist.destroy_process_group()


def run(cfg: TrainConfig, rt: Runtime, resumed: dict | None) -> None:
    model_cfg = cfg.model_config()
    micro_batch, remainder = divmod(cfg.batch_size, rt.world_size * cfg.grad_accum)
    if remainder or micro_batch < 1:
        raise UserError(f"batch_size {cfg.batch_size} must be a multiple of world_size × grad_accum "
                        f"({rt.world_size} × {cfg.grad_accum})")
    sha = git_sha()
    if rt.main:
        print(f"train.py at git {sha}; config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)

    model = LatentActionModel(model_cfg).to(rt.device)
    if rt.distributed and rt.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=rt.device.type == "cuda")
    amp_dtype, use_scaler = amp_settings(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=use_scaler)
    train_loader, val_loader = build_loaders(cfg, rt, micro_batch)

    step, best_val, nonfinite_in_a_row = 0, math.inf, 0
    if resumed is not None:
        try:
            model.load_state_dict(clean_state_dict(resumed["model"]))
            optimizer.load_state_dict(resumed["optimizer"])
            scaler.load_state_dict(resumed["scaler"])
            loader_states = resumed["loader"]
            train_loader.load_state_dict(loader_states[rt.rank if len(loader_states) == rt.world_size else 0])
            set_rng_state(resumed["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            raise UserError(f"--resume: checkpoint in {cfg.out} does not fit this run ({str(error).splitlines()[0]})") from None
        step, best_val = int(resumed["step"]), float(resumed["best_val_loss"])
        if rt.main:
            print(f"resumed from step {step} in {cfg.out}", flush=True)
        if rt.main and len(loader_states) != rt.world_size:
            print(f"warning: checkpoint was written by {len(loader_states)} rank(s), this run has "
                  f"{rt.world_size}: data order is not resumed exactly", flush=True)

    # DDP buffers are not broadcast: quantiser statistics are synchronised by the quantiser itself,
    # BatchNorm statistics by SyncBatchNorm (GPU) or averaging (CPU, average_batchnorm_stats).
    step_model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                     broadcast_buffers=False) if rt.distributed else model
    if cfg.compile:
        step_model = torch.compile(step_model)
    autocast = (torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    n_params = sum(p.numel() for p in model.parameters())
    logger = Logger(cfg, Path(cfg.run_dir), step, rt.main,
                    {"model": model_cfg.to_dict(), "parameters": n_params, "git_sha": sha, "world_size": rt.world_size,
                     "amp": str(amp_dtype), "micro_batch": micro_batch})
    if rt.main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "model.txt").write_text(f"{n_params:,} parameters\n{model}\n")
        print(f"model: {n_params / 1e6:.2f}M parameters; amp {amp_dtype or 'off'}; compile {cfg.compile}; "
              f"{rt.world_size} rank(s) × {cfg.grad_accum} micro-batch(es) of {micro_batch}", flush=True)
    print(f"[rank {rt.rank}/{rt.world_size}] on {rt.device}: {len(train_loader)} train batches per epoch", flush=True)

    def checkpoint_state() -> dict:
        loader_states = [plain(train_loader.state_dict())]
        if rt.distributed:
            loader_states = [None] * rt.world_size
            dist.all_gather_object(loader_states, plain(train_loader.state_dict()))
        return {"format": CHECKPOINT_FORMAT, "model": clean_state_dict(model.state_dict()),
                "config": {"model": model_cfg.to_dict(), "train": asdict(cfg)}, "step": step,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "schedule": {"kind": cfg.lr_schedule, "lr": learning_rate(cfg, step - 1), "lr_min": cfg.lr_min,
                             "warmup": cfg.warmup, "horizon": schedule_horizon(cfg)},
                "rng": rng_state(), "loader": loader_states, "best_val_loss": best_val,
                "git_sha": sha, "world_size": rt.world_size}

    batches = forever(train_loader)
    progress = None
    if rt.main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.iters, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1)
    model.train()
    timer = time.perf_counter()
    while step < cfg.iters:
        # ---- one optimiser step: grad_accum micro-batches, finite check, update
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        terms: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1 or not rt.distributed
            with (contextlib.nullcontext() if sync else step_model.no_sync()), autocast:
                out = step_model(batch["cur"], batch["next"])
            scaler.scale(out["loss"] / cfg.grad_accum).backward()
            values = torch.stack([out[name].detach().float() for name in LOSS_TERMS]).tolist()   # one sync
            for name, value in zip(LOSS_TERMS, values):
                terms[name] = terms.get(name, 0.0) + value / cfg.grad_accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
        loss_finite = all_sum([float(math.isfinite(terms["loss"]))], rt)[0] == rt.world_size
        # fp16: an overflowing gradient is the GradScaler's business (it skips that update and lowers
        # its scale; the step still counts); a non-finite loss is ours.
        finite = loss_finite and (use_scaler or math.isfinite(grad_norm))
        if not finite:
            # Skip the update (the step is not counted), and stop if it keeps happening.
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(terms["loss"]) else "gradient"
            message = (f"non-finite {what} at step {step + 1} (loss {terms['loss']}, grad norm {grad_norm}); "
                       f"update skipped ({nonfinite_in_a_row}/{cfg.max_nonfinite} in a row)")
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                raise UserError(f"{message}: stopping; try a lower lr, --amp off or grad_clip")
            if rt.main:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stderr)
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        nonfinite_in_a_row = 0
        step += 1

        # ---- after the update: code resets, logging, validation, checkpoints
        row: dict[str, Any] = {f"train/{name}": value for name, value in terms.items()}
        if every(step, cfg.reset_every) and step <= schedule_horizon(cfg) - cfg.reset_every:
            # Not in the last interval: a reset code needs steps to be learnt. Collective under DDP.
            row["codebook/reset_codes"] = model.reset_dead_codes()
        elapsed, timer = time.perf_counter() - timer, time.perf_counter()
        row.update({"lr": lr, "grad_norm": grad_norm, "steps_per_s": 1 / elapsed,
                    "samples_per_s": cfg.batch_size / elapsed})
        last = step == cfg.iters
        wants = {"val": every(step, cfg.val_every) or last, "metrics": every(step, cfg.metrics_every) or last,
                 "hist": every(step, cfg.hist_every) or last, "image": every(step, cfg.image_every) or last}
        if any(wants.values()) or every(step, cfg.ckpt_every):
            average_batchnorm_stats(model, rt)
        if any(wants.values()):
            results = evaluate(model, val_loader, cfg, rt, autocast)
            if results:
                row["val/recon"] = results["val/recon"]
                keys = ["val/psnr", "val/psnr_copy", "val/ssim", "codebook/used_fraction", "codebook/perplexity"]
                if wants["metrics"]:
                    row.update({k: results[k] for k in keys})
                row["_counts"], row["_examples"] = results["_counts"], results["_examples"]
            if rt.device.type == "cuda":
                row["gpu/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
                row["gpu/memory_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        improved = "val/recon" in row and row["val/recon"] < best_val
        if improved:
            best_val = row["val/recon"]
        if every(step, cfg.ckpt_every) or last or improved:
            state = checkpoint_state()          # collective under DDP
            if rt.main:
                if every(step, cfg.ckpt_every) or last:
                    save_checkpoint(Path(cfg.out) / f"step-{step:06d}.pt", state)
                if improved:
                    save_checkpoint(Path(cfg.out) / "best.pt", state)
        logger.log(step, row, histogram=wants["hist"], image=wants["image"])
        if any(wants.values()) or every(step, cfg.ckpt_every):
            timer = time.perf_counter()      # validation and checkpoint time is not training speed
        if progress is not None:
            progress.set_postfix(loss=f"{terms['loss']:.4f}", recon=f"{terms['recon']:.5f}", refresh=False)
            progress.update(1)

    if progress is not None:
        progress.close()
    digest = weights_digest(model)
    digests = [digest]
    if rt.distributed:
        digests = [None] * rt.world_size
        dist.all_gather_object(digests, digest)
    logger.close()
    if rt.main:
        same = len(set(digests)) == 1
        print(f"done at step {step}; weights digest {digest}"
              + (f"; identical on all {rt.world_size} ranks" if rt.distributed and same else "")
              + (f"; RANKS DIFFER: {digests}" if not same else ""), flush=True)
        if not same:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")


# ------------------------------------------------------------------------------------------ entry
def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit code (user mistakes: one `error:` line, exit 2)."""
    try:
        args = argument_parser().parse_args(argv)
    except SystemExit as exit_:            # --help, or argparse's own usage error
        return int(exit_.code or 0)
    try:
        cfg = build_config(args)
        train(cfg, args.resume)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
