"""Train the latent action model (VQ-VAE) on pair shards.

    python train.py --shards shards/pairs --preset full|demo|tiny [--out DIR] [--run-dir DIR]
        [--iters N] [--batch-size B] [--rgb] [--no-compile] [--amp bf16|fp16|off]
        [--wandb offline|online|disabled] [--resume] [--set field=value ...]
    torchrun --nproc_per_node=N train.py ...        # DDP: NCCL on GPUs, gloo on CPUs

A step is one optimiser update; the first logged row is step 1 and step-000020.pt holds the state
after 20 steps. `--iters N` trains until step N, also after `--resume`. The pieces live in
training/: config, runtime, step, validate, logger, checkpointer; this file is the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from common.errors import UserError, check_output_dir, run_cli
from model import LatentActionModel
from model.checkpoint import model_config_from
from pipeline.loader import build_loader
from pipeline.shards import PAIRS_FORMAT, load_manifest, sha256_file
from training.checkpointer import Checkpointer, read_resume_checkpoint
from training.config import PRESETS, TrainConfig, build_config, fields_help, resumed_config
from training.logger import Logger
from training.runtime import Runtime, git_sha, graph_breaks, report_digests, setup_runtime, shutdown
from training.step import TrainStep, every, learning_rate, schedule_horizon
from training.throughput import Throughput
from training.validate import MoveProbe, Validator


def train(cfg: TrainConfig, resumed: dict | None = None) -> None:
    """Check the outputs and the data, start the runtime, run; `resumed` is the checkpoint to continue from."""
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or str(Path("runs") / cfg.run_name))
    check_output_dir(cfg.out, "--out")
    check_output_dir(cfg.run_dir, "--run-dir")
    manifest_sha = shards_identity(cfg.shards)
    if resumed is not None and resumed.get("shards_manifest_sha256") not in (None, manifest_sha):
        raise UserError(f"--resume: {Path(cfg.shards) / 'manifest.json'} changed since the checkpoint was written "
                        f"(sha256 {manifest_sha[:12]}, was {resumed['shards_manifest_sha256'][:12]}): the run cannot "
                        f"continue on other data; train into a new --out")
    rt = setup_runtime(cfg.device, cfg.amp, cfg.seed, cfg.deterministic, cfg.threads)
    try:
        run(cfg, rt, resumed, manifest_sha)
    finally:
        shutdown(rt)


def shards_identity(shards: str) -> str:
    """sha256 of the pair manifest (after checking it is one): a checkpoint remembers its data."""
    load_manifest(Path(shards), PAIRS_FORMAT)
    return sha256_file(Path(shards) / "manifest.json")


def run(cfg: TrainConfig, rt: Runtime, resumed: dict | None, manifest_sha: str) -> None:
    micro_batch, remainder = divmod(cfg.batch_size, rt.world_size * cfg.grad_accum)
    if remainder or micro_batch < 1:
        raise UserError(f"batch_size {cfg.batch_size} must be a multiple of world_size × grad_accum "
                        f"({rt.world_size} × {cfg.grad_accum})")
    sha = git_sha()
    if rt.main:
        print(f"train.py at git {sha}; config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)

    # ---- the model, its optimiser and step, the data, validation and checkpoints
    model_cfg = cfg.model_config()
    model = LatentActionModel(model_cfg).to(rt.device)
    if rt.distributed and cfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=rt.device.type == "cuda")
    train_step = TrainStep(model, optimizer, rt, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                           max_nonfinite=cfg.max_nonfinite, compile=cfg.compile, compile_backend=cfg.compile_backend)
    loaders = dict(grayscale=not cfg.rgb, seed=cfg.seed, backend=cfg.backend, device=rt.device,
                   rank=rt.rank, world_size=rt.world_size, context=cfg.context)
    train_loader = build_loader(cfg.shards, "train", micro_batch, shuffle=True, drop_last=True, with_keys=True,
                                **loaders)
    if len(train_loader) == 0:
        raise UserError(f"{cfg.shards}: the train split has fewer than one batch of {micro_batch} pairs per rank")
    # a fixed sample drawn across every validation episode, so best.pt is not chosen on a few of them
    val_loader = build_loader(cfg.shards, "val", micro_batch, shuffle=False, drop_last=False, with_keys=True,
                              sample=cfg.val_batches * micro_batch * rt.world_size, **loaders)
    validator = Validator(model, val_loader, cfg, rt, MoveProbe.build(cfg, rt, micro_batch))
    throughput = Throughput(model_cfg, rt.device, rt.amp_dtype, cfg.batch_size)
    checkpointer = Checkpointer(cfg, rt, model, train_step, train_loader, extra={"git_sha": sha, "shards_manifest_sha256": manifest_sha})

    # ---- resume: weights, optimiser, scaler, loader position, RNG
    step = 0
    if resumed is not None:
        step = checkpointer.restore(resumed)
        if rt.main:
            print(f"resumed from step {step} in {cfg.out}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    logger = Logger(Path(cfg.run_dir), cfg.run_name, cfg.wandb, step, rt.main,
                    {**dataclasses.asdict(cfg), "model": model_cfg.to_dict(), "parameters": n_params, "git_sha": sha,
                     "world_size": rt.world_size, "amp": str(rt.amp_dtype), "micro_batch": micro_batch})
    if rt.main:
        (Path(cfg.run_dir) / "model.txt").write_text(f"{n_params:,} parameters\n{model}\n")
        print(f"model: {n_params / 1e6:.2f}M parameters; amp {rt.amp_dtype or 'off'}; compile {cfg.compile}; "
              f"{rt.world_size} rank(s) × {cfg.grad_accum} micro-batch(es) of {micro_batch}", flush=True)
        print(validator.describe(), flush=True)
    print(f"[rank {rt.rank}/{rt.world_size}] on {rt.device}: {len(train_loader)} train batches per epoch", flush=True)

    batches = forever(train_loader)
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
        due = validator.due(step, last)
        if due:
            row.update(validator.run(due))
        checkpointer.save(step, last=last, val_loss=row.get("val/recon"))
        logger.log(step, row)
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


def forever(loader) -> Iterator[dict]:
    """Epoch after epoch; the loader's own state_dict() knows the position inside the epoch."""
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------ CLI
def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the latent action VQ-VAE on pair shards.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=fields_help())
    parser.add_argument("--shards", help="pair shard directory (manifest lam-pairs/1)")
    parser.add_argument("--preset", choices=list(PRESETS), help="default full; on --resume, the checkpoint's")
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


def command_line_values(args: argparse.Namespace) -> dict:
    """The dedicated flags as config fields (None: not given)."""
    return {"shards": args.shards, "out": args.out, "run_dir": args.run_dir, "iters": args.iters,
            "batch_size": args.batch_size, "amp": args.amp, "wandb": args.wandb,
            "rgb": True if args.rgb else None, "compile": False if args.no_compile else None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_config(args.preset or "full", args.set or [], command_line_values(args))


def resume_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """The latest checkpoint in --out and the run's config: the checkpoint's, with what the command
    line gives on top (each change printed)."""
    out = Path(args.out or TrainConfig.out)
    path, resumed = read_resume_checkpoint(out)
    saved = resumed["config"].get("train", {}) if isinstance(resumed["config"], dict) else {}
    cfg, changes = resumed_config(saved, model_config_from(resumed, path), args.preset, args.set or [],
                                  command_line_values(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming {path}: every setting as saved" + ("" if changes else ", none changed")
              + "".join(f"\n  {change}" for change in changes), flush=True)
    return cfg, resumed


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line, exit 2)."""
    return run_cli(cli, argv)


def cli(argv: Sequence[str] | None) -> int:
    args = argument_parser().parse_args(argv)
    check_output_dir(args.out or TrainConfig.out, "--out")        # before --resume looks inside it
    if args.run_dir:
        check_output_dir(args.run_dir, "--run-dir")
    if args.resume:
        train(*resume_from_args(args))
    else:
        train(config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
