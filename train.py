"""Train the latent action model (VQ-VAE) on pair shards.

    python train.py --shards shards/pairs --preset full|demo|tiny [--model default|seed|...] [--out DIR]
        [--run-dir DIR] [--iters N] [--batch-size B] [--rgb] [--no-compile] [--amp bf16|fp16|off]
        [--wandb offline|online|disabled] [--resume] [--set field=value ...]
    torchrun --nproc_per_node=N train.py ...        # DDP: NCCL on GPUs, gloo on CPUs

A step is one optimiser update; the first logged row is step 1 and step-000020.pt holds the state
after 20 steps. `--iters N` trains until step N, also after `--resume`. The pieces live in
training/: cli (flags, --set) and config, build (the set-up), resume, runtime, step, validate,
logger, checkpointer; this file is the loop.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from common.errors import check_output_dir, run_cli
from pipeline.loader import resolve_backend
from pipeline.pair_set import PairSet
from training.build import build_run
from training.cli import argument_parser, config_from_args
from training.config import TrainConfig
from training.resume import Resumed, check_same_shards
from training.runtime import Runtime, graph_breaks, report_digests, setup_runtime, shutdown
from training.step import every, learning_rate, schedule_horizon


def train(cfg: TrainConfig, resumed: Resumed | None = None) -> None:
    """Check the outputs and the data, start the runtime, run; `resumed` is the checkpoint to continue from."""
    check_output_dir(cfg.out, "--out")
    check_output_dir(cfg.run_dir, "--run-dir")
    data = PairSet.open(cfg.shards)           # the run's data, read and checked once, handed to every part
    data.require_val_pairs()
    if resumed is not None:
        check_same_shards(resumed, data.sha256, cfg.shards)
        if resumed.step >= cfg.iters:
            print(f"train: {cfg.out} holds run {cfg.run_name}, finished at step {resumed.step} (--iters {cfg.iters}): "
                  f"nothing to train", flush=True)
            return
    backend, why = resolve_backend(cfg.backend)
    cfg = dataclasses.replace(cfg, backend=backend)          # the checkpoint records the loader that ran
    rt = setup_runtime(cfg.device, cfg.amp, cfg.seed, cfg.deterministic, cfg.threads)
    if rt.main:
        print(f"loader: {backend} ({why})", flush=True)
    try:
        run(cfg, rt, resumed, data)
    finally:
        shutdown(rt)


def run(cfg: TrainConfig, rt: Runtime, resumed: Resumed | None, data: PairSet) -> None:
    r = build_run(cfg, rt, resumed, data)         # model, optimiser, data, validation, checkpoints, logger
    model, step = r.model, r.step
    progress = tqdm(total=cfg.iters, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1,
                    disable=not rt.main)
    model.train()
    first_step_breaks = None          # torch.compile's graph breaks in step 1 (a resumed run has none to count)
    timer = time.perf_counter()
    while step < cfg.iters:
        # ---- one optimiser update (a non-finite one is skipped and not counted)
        lr = learning_rate(cfg, step)
        outcome = r.train_step(r.batches, lr, step)
        if outcome.skipped:
            if rt.main:
                tqdm.write(outcome.skipped, file=sys.stderr)
            continue
        step += 1
        row = {f"train/{name}": value for name, value in outcome.terms.items()}
        if step == 1 and cfg.compile:
            # counted apart: step 1 of a VQ model seeds the codebook (a broadcast under DDP), a one-off graph
            first_step_breaks = graph_breaks(reset=True)

        # ---- VQ: dead codes get fresh vectors (not in the last interval: a new code needs steps to learn)
        if cfg.reset_every and every(step, cfg.reset_every) and step <= schedule_horizon(cfg) - cfg.reset_every:
            row["codebook/reset_codes"] = model.reset_dead_codes()      # collective under DDP

        # ---- speed of the update alone: validation and checkpoint time is left out below
        row.update({"lr": lr, "grad_norm": outcome.grad_norm, **r.throughput.row(time.perf_counter() - timer)})
        if outcome.loss_scale is not None:     # fp16: an update the scaler skipped is still a step; say so
            row.update({"amp/loss_scale": outcome.loss_scale, "amp/skipped_updates": r.train_step.overflow_skips})

        # ---- validation, then checkpoints (best.pt by the validation selection score), then the log row
        last = step == cfg.iters
        validation = r.validator(step, last)
        row.update(validation.scalars)
        r.checkpointer.save(step, last=last, row=row)
        r.logger.log(step, row, validation.code_counts, validation.examples)
        progress.set_postfix(loss=f"{outcome.terms['loss']:.4f}", recon=f"{outcome.terms['recon']:.5f}", refresh=False)
        progress.update(1)
        timer = time.perf_counter()

    progress.close()
    r.logger.close()
    if cfg.compile and rt.main:
        in_step_1 = "" if first_step_breaks is None else f"{first_step_breaks} graph break(s) in step 1, "
        print(f"torch.compile: {in_step_1}{graph_breaks()} graph break(s) after step 1", flush=True)
    if r.train_step.scaler.is_enabled() and rt.main:
        print(f"fp16: {r.train_step.overflow_skips} of {step} steps were updates the GradScaler skipped for overflow "
              f"(loss scale now {r.train_step.scaler.get_scale():g})", flush=True)
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
