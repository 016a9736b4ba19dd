"""Train the latent action model (VQ-VAE) on pair shards.

    python train.py --shards shards/pairs --preset full|demo|tiny [--out DIR] [--run-dir DIR]
        [--iters N] [--batch-size B] [--rgb] [--no-compile] [--amp bf16|fp16|off]
        [--wandb offline|online|disabled] [--resume] [--set field=value ...]
    torchrun --nproc_per_node=N train.py ...        # DDP: NCCL on GPUs, gloo on CPUs

A step is one optimiser update; the first logged row is step 1 and step-000020.pt holds the state
after 20 steps. `--iters N` trains until step N, also after `--resume`. The pieces live in
training/: cli (flags, --set) and config, resume, runtime, step, validate, logger, checkpointer;
this file is the loop.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from common.errors import UserError, check_output_dir, run_cli
from model import LatentActionModel
from pipeline.loader import build_loader
from pipeline.shards import PAIRS_FORMAT, manifest_sha256
from training.checkpointer import Checkpointer
from training.cli import argument_parser, config_from_args
from training.config import TrainConfig
from training.labels import ActionLabels
from training.logger import Logger
from training.resume import Resumed, check_same_shards, restore
from training.runtime import Runtime, git_sha, graph_breaks, report_digests, setup_runtime, shutdown
from training.step import TrainStep, every, learning_rate, schedule_horizon
from training.throughput import Throughput
from training.validate import MoveProbe, Validator


def train(cfg: TrainConfig, resumed: Resumed | None = None) -> None:
    """Check the outputs and the data, start the runtime, run; `resumed` is the checkpoint to continue from."""
    check_output_dir(cfg.out, "--out")
    check_output_dir(cfg.run_dir, "--run-dir")
    manifest_sha = manifest_sha256(Path(cfg.shards), PAIRS_FORMAT)     # a checkpoint remembers its data
    if resumed is not None:
        check_same_shards(resumed, manifest_sha, cfg.shards)
    rt = setup_runtime(cfg.device, cfg.amp, cfg.seed, cfg.deterministic, cfg.threads)
    try:
        run(cfg, rt, resumed, manifest_sha)
    finally:
        shutdown(rt)


def run(cfg: TrainConfig, rt: Runtime, resumed: Resumed | None, manifest_sha: str) -> None:
    micro_batch = cfg.micro_batch(rt.world_size)
    sha = git_sha()
    if rt.main:
        print(f"train.py at git {sha}; config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)

    # ---- the model, its optimiser and step, the data, validation and checkpoints
    model = LatentActionModel(cfg.model).to(rt.device, memory_format=torch.channels_last if cfg.channels_last
                                            else torch.contiguous_format)
    model.set_grad_checkpoint(cfg.grad_checkpoint)
    if rt.distributed and cfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=rt.device.type == "cuda")
    labels = ActionLabels.build(cfg.shards, cfg.action_fraction, cfg.seed)     # None: no light supervision
    train_step = TrainStep(model, optimizer, rt, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, action_labels=labels,
                           max_nonfinite=cfg.max_nonfinite, compile=cfg.compile, compile_backend=cfg.compile_backend)
    loaders = dict(grayscale=not cfg.rgb, seed=cfg.seed, backend=cfg.backend, device=rt.device,
                   rank=rt.rank, world_size=rt.world_size, context=cfg.model.context)
    train_loader = build_loader(cfg.shards, "train", micro_batch, shuffle=True, drop_last=True, with_keys=True,
                                **loaders)
    if len(train_loader) == 0:
        raise UserError(f"{cfg.shards}: the train split has fewer than one batch of {micro_batch} pairs per rank")
    # a fixed sample drawn across every validation episode, so best.pt is not chosen on a few of them
    val_loader = build_loader(cfg.shards, "val", micro_batch, shuffle=False, drop_last=False, with_keys=True,
                              sample=cfg.val_batches * micro_batch * rt.world_size, **loaders)
    validator = Validator(model, val_loader, cfg, rt, MoveProbe.build(cfg, rt, micro_batch))
    throughput = Throughput(cfg.model, rt.device, rt.amp_dtype, cfg.batch_size)
    # ---- resume: weights, optimiser, scaler, loader position, RNG, best validation measure
    step, best_val = ((resumed.step, restore(resumed, model, train_step, train_loader, rt, cfg.best_by)) if resumed
                      else (0, math.inf))
    checkpointer = Checkpointer(cfg, rt, model, train_step, train_loader, best_val=best_val,
                                extra={"git_sha": sha, "shards_manifest_sha256": manifest_sha})

    n_params = sum(p.numel() for p in model.parameters())
    logger = Logger(Path(cfg.run_dir), cfg.run_name, cfg.wandb, step, rt.main,
                    {**dataclasses.asdict(cfg), "parameters": n_params, "git_sha": sha,
                     "world_size": rt.world_size, "amp": str(rt.amp_dtype), "micro_batch": micro_batch})
    if rt.main:
        (Path(cfg.run_dir) / "model.txt").write_text(f"{n_params:,} parameters\n{model}\n")
        print(f"model: {n_params / 1e6:.2f}M parameters; amp {rt.amp_dtype or 'off'}; compile {cfg.compile}; "
              f"{rt.world_size} rank(s) × {cfg.grad_accum} micro-batch(es) of {micro_batch}", flush=True)
        print(validator.describe() + (f"; {labels.describe()}" if labels else ""), flush=True)
    print(f"[rank {rt.rank}/{rt.world_size}] on {rt.device}: {len(train_loader)} train batches per epoch", flush=True)

    batches = train_loader.forever()
    progress = tqdm(total=cfg.iters, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1,
                    disable=not rt.main)
    model.train()
    timer = time.perf_counter()
    while step < cfg.iters:
        # ---- one optimiser update (a non-finite one is skipped and not counted)
        lr = learning_rate(cfg, step)
        outcome = train_step(batches, lr, step)
        if outcome.skipped:
            if rt.main:
                tqdm.write(outcome.skipped, file=sys.stderr)
            continue
        step += 1
        row = {f"train/{name}": value for name, value in outcome.terms.items()}
        if step == 1 and cfg.compile:
            graph_breaks(reset=True)     # step 1 seeds the codebook (a broadcast under DDP): a one-off graph

        # ---- dead codes get fresh vectors (not in the last interval: a new code needs steps to learn)
        if every(step, cfg.reset_every) and step <= schedule_horizon(cfg) - cfg.reset_every:
            row["codebook/reset_codes"] = model.reset_dead_codes()      # collective under DDP

        # ---- speed of the update alone: validation and checkpoint time is left out below
        row.update({"lr": lr, "grad_norm": outcome.grad_norm, **throughput.row(time.perf_counter() - timer)})
        if outcome.loss_scale is not None:     # fp16: an update the scaler skipped is still a step; say so
            row.update({"amp/loss_scale": outcome.loss_scale, "amp/skipped_updates": train_step.overflow_skips})

        # ---- validation, then checkpoints (best.pt by validation loss), then the log row
        last = step == cfg.iters
        validation = validator(step, last)
        row.update(validation.scalars)
        checkpointer.save(step, last=last, row=row)
        logger.log(step, row, validation.code_counts, validation.examples)
        progress.set_postfix(loss=f"{outcome.terms['loss']:.4f}", recon=f"{outcome.terms['recon']:.5f}", refresh=False)
        progress.update(1)
        timer = time.perf_counter()

    progress.close()
    logger.close()
    if cfg.compile and rt.main:
        print(f"torch.compile: {graph_breaks()} graph break(s) after step 1", flush=True)
    if train_step.scaler.is_enabled() and rt.main:
        print(f"fp16: {train_step.overflow_skips} of {step} steps were updates the GradScaler skipped for overflow "
              f"(loss scale now {train_step.scaler.get_scale():g})", flush=True)
    report_digests(model, rt, step)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line, exit 2)."""
    return run_cli(cli, argv)


def cli(argv: Sequence[str] | None) -> int:
    train(*config_from_args(argument_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
