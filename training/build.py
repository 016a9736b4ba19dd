"""Everything a training run needs before its first step, built from its config (train.py's loop
reads like nanoGPT's because the set-up lives here): the model, its optimiser and step, the data,
validation, throughput figures, checkpoints (and a resumed run's state put back into them) and the
logger."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from common.errors import UserError
from model import LatentActionModel
from model.config import ModelConfig
from model.inference import describe_amp
from pipeline.loader import LoaderConfig, open_loader
from pipeline.pair_set import PairSet
from training.checkpointer import Checkpointer
from training.config import TrainConfig
from training.labels import ActionLabels
from training.logger import Logger
from training.own_frames import OwnFrames
from training.resume import Resumed, restore
from training.runtime import Runtime, git_sha
from training.step import TrainStep, schedule_horizon
from training.throughput import Throughput
from training.validate import MoveProbe, Validator


@dataclass
class Run:
    """A run's parts, ready for the loop; `step` is the last step done (0, or the resumed one)."""

    cfg: TrainConfig
    rt: Runtime
    model: LatentActionModel
    train_step: TrainStep
    batches: Iterator[dict]
    validator: Validator
    throughput: Throughput
    checkpointer: Checkpointer
    logger: Logger
    step: int


def build_run(cfg: TrainConfig, rt: Runtime, resumed: Resumed | None, data: PairSet) -> Run:
    """The run's parts; `data` is its shard set, read once (train.py), which every part takes."""
    micro_batch = cfg.micro_batch(rt.world_size)
    sha = git_sha()
    if rt.main:
        print(f"train.py at git {sha}; precision {describe_amp(cfg.amp, rt.device)}; config:\n"
              + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)

    # ---- the model, its optimiser and step
    model = LatentActionModel(cfg.model).to(rt.device, memory_format=torch.channels_last if cfg.channels_last
                                            else torch.contiguous_format)
    model.set_grad_checkpoint(cfg.grad_checkpoint)
    if rt.distributed and cfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=rt.device.type == "cuda")
    labels = ActionLabels.build(data, cfg.action_fraction, cfg.seed)     # None: no light supervision
    own_frames = (OwnFrames(cfg.own_frames, cfg.own_frames_start, cfg.seed, palette_levels(data, cfg.model))
                  if cfg.own_frames else None)
    train_step = TrainStep(model, optimizer, rt, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, action_labels=labels,
                           max_nonfinite=cfg.max_nonfinite, compile=cfg.compile, compile_backend=cfg.compile_backend,
                           compile_mode=cfg.compile_mode, own_frames=own_frames,
                           jitter_until=round(cfg.jitter_until * schedule_horizon(cfg)) if cfg.jitter_until < 1 else None)

    # ---- the data: shuffled training batches; a fixed validation sample drawn across every val
    # episode, so best.pt is not chosen on a few of them
    loading = LoaderConfig(micro_batch, grayscale=not cfg.rgb, seed=cfg.seed, backend=cfg.backend, device=rt.device,
                           rank=rt.rank, world_size=rt.world_size, with_keys=True, context=cfg.model.context)
    # the model's own drawing of frame t is made from frame t-1: the training batches carry it
    train_loader = open_loader(data, "train", dataclasses.replace(
        loading, shuffle=True, drop_last=True, context=max(cfg.model.context, int(cfg.own_frames > 0))))
    if len(train_loader) == 0:
        raise UserError(f"{cfg.shards}: the train split has fewer than one batch of {micro_batch} pairs per rank")
    val_loader = open_loader(data, "val", dataclasses.replace(
        loading, shuffle=False, drop_last=False, sample=cfg.val_batches * micro_batch * rt.world_size))
    validator = Validator(model, val_loader, cfg, rt, MoveProbe.build(cfg, rt, data, loading))

    # ---- resume: weights, optimiser, scaler, loader position, RNG, best validation measure
    step, best_val = ((resumed.step, restore(resumed, model, train_step, train_loader, rt, cfg.best_by)) if resumed
                      else (0, math.inf))
    checkpointer = Checkpointer(cfg, rt, model, train_step, train_loader, best_val=best_val,
                                extra={"git_sha": sha, "shards_manifest_sha256": data.sha256})

    n_params = sum(p.numel() for p in model.parameters())
    logger = Logger(Path(cfg.run_dir), cfg.run_name, cfg.wandb, step, rt.main,
                    {**dataclasses.asdict(cfg), "parameters": n_params, "git_sha": sha,
                     "world_size": rt.world_size, "amp": str(rt.amp_dtype), "micro_batch": micro_batch})
    if rt.main:
        (Path(cfg.run_dir) / "model.txt").write_text(f"{n_params:,} parameters\n{model}\n")
        print(f"model: {cfg.model.variant}, {n_params / 1e6:.2f}M parameters; compile {cfg.compile}; "
              f"{rt.world_size} rank(s) × {cfg.grad_accum} micro-batch(es) of {micro_batch}", flush=True)
        print(validator.describe() + (f"; {labels.describe()}" if labels else ""), flush=True)
    print(f"[rank {rt.rank}/{rt.world_size}] on {rt.device}: {len(train_loader)} train batches per epoch", flush=True)
    return Run(cfg, rt, model, train_step, train_loader.forever(), validator,
               Throughput(cfg.model, rt.device, rt.amp_dtype, cfg.batch_size), checkpointer, logger, step)


def palette_levels(data: PairSet, model: ModelConfig) -> torch.Tensor | None:
    """The game's colours in the model's colour mode, from the pair manifest (None for shards packed
    before it recorded them: the own frames are then not snapped)."""
    palette = data.palette()
    return None if palette is None else palette.levels(model.in_channels)
