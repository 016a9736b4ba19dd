"""Train the controller (frame t, frame t-1, real action -> the LAM's 7 x 5 code grid) by streaming
latent shards, then score it on the test split.

    python -m control.train --latent shards/latent --out checkpoints/controller [--steps 1500]

Writes `<out>/controller.pt` (format "lam-controller/1", model/checkpoint.py's format),
`<out>/metrics.json` (the scores: control/scores.py) and `<out>/report.md` (control/report.py).
This file is the command and its training loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from common.cli import MAX_BATCH, MAX_SEED, MAX_THREADS, add_config_flags, check_fields, config_values, flag
from common.device import resolve_device, torch_threads
from common.errors import UserError, check_output_dir, run_cli
from common.lock import FolderLock
from evaluation.formatting import pct
from model.checkpoint import finished_run
from model.inference import autocast, autocast_dtype, describe_amp
from pipeline.frames import CODEBOOK_SIZE
from pipeline.loader import BackgroundIterator
from pipeline.shards import LATENT_FORMAT, atomic_write_json, load_manifest

from control.checkpoint import save_controller
from control.data import FRAME_CACHE_GB, FrameCache, latent_identity, targets, training_batches
from control.network import Controller, ControllerConfig, grid_bytes, most_common_grids
from control.report import write_controller_report
from control.scores import score_controller

CHECKPOINT_NAME = "controller.pt"


@dataclass
class ControllerTrainConfig:
    latent: Path = flag(help="latent shard directory (lam-latent/1)")
    out: Path = flag(Path("checkpoints/controller"), "controller.pt, metrics.json and report.md")
    steps: int = flag(1500, "optimiser steps", min=1)
    batch_size: int = flag(32, min=1, max=MAX_BATCH)
    lr: float = flag(1e-3, "AdamW learning rate (cosine to a tenth of it)", above=0)
    weight_decay: float = flag(1e-4, min=0)
    shuffle_buffer: int = flag(256, "samples mixed across episodes before batching (held decoded)",
                                 min=1, max=65536)
    seed: int = flag(0, min=0, max=MAX_SEED)
    log_every: int = flag(50, min=1)
    ckpt_every: int = flag(500, "the checkpoint is rewritten (atomically) this often and at the end", min=1)
    eval_split: str = flag("test", choices=("train", "val", "test"))
    eval_batch_size: int = flag(64, min=1, max=MAX_BATCH)
    use_prev: bool = True
    prev_codes: bool = flag(False, "also see the codes of the step before (control/network.py)")
    channels: tuple[int, ...] = flag((16, 32, 64, 96, 128), "widths of the five stride-2 stages", min=1,
                                    max=4096)
    hidden: int = flag(192, min=1, max=4096)
    device: str = flag("cpu", "where the controller trains", choices=("auto", "cpu", "cuda"))
    # As train.py's: bf16 only where it is native (emulated bf16 is several times slower than fp32).
    # Measured on the 2-core avx512_bf16 box: a step 1.8x faster (BENCHMARKS.md "Stages"). The scores
    # and the rollouts run the trained controller in fp32 either way.
    amp: str = flag("auto", "training precision: auto (bf16 where native: a CPU with avx512_bf16 or AMX, a GPU "
                            "with bf16; fp32 elsewhere), bf16, or off (fp32)", choices=("auto", "bf16", "off"))
    # 0 is every core, not the cores less one (common/device.model_threads): the frames are decoded
    # once and cached (frame_cache_gb), so after the first epoch the reading thread is idle; measured
    # on the 2-core AVX2 box, `make demo`'s 800 steps: 217 samples/s on 2 threads, 144 on 1.
    threads: int = flag(0, "torch CPU threads of the network; 0: every core", min=0, max=MAX_THREADS)
    frame_cache_gb: float = flag(FRAME_CACHE_GB, "decoded frames kept across epochs (control/data.FrameCache)",
                                 min=0)
    max_grids: int = flag(65536, "answer with one of this many most common grids seen; 0: cell by cell", min=0)
    reuse: bool = flag(False, "keep <out>/controller.pt when it finished training with these settings on the "
                              "codes of the same LAM (nothing is trained), instead of training afresh")

    def __post_init__(self):
        self.latent, self.out = Path(self.latent), Path(self.out)
        check_fields(self)                  # the flags' rules, for a config built in Python too
        if self.shuffle_buffer < self.batch_size:
            raise UserError(f"--shuffle-buffer ({self.shuffle_buffer}) must be at least --batch-size ({self.batch_size})")
        if not self.latent.is_dir():
            raise UserError(f"{self.latent}: latent shard directory not found (run `make extract`)")
        check_output_dir(self.out, "--out")

    def to_dict(self) -> dict:
        values = asdict(self)
        values.update(latent=str(self.latent), out=str(self.out), channels=list(self.channels))
        return values


# ------------------------------------------------------------------------------------ training
def lam_codes(latent: Path) -> dict:
    """What the LAM that made the latents takes, from the manifest's `checkpoint`: its colour mode
    (the frames in the shards are RGB either way, so the controller sees what that LAM's decoder
    works in), and what the controller must predict: the code grid (of `codebook_size` codes), or a
    LAM's per-frame action code (of `action_codes`), which is how such a LAM is played."""
    checkpoint = load_manifest(latent, LATENT_FORMAT).get("checkpoint", {})
    split = int(checkpoint.get("action_codes") or 0)
    return {"in_channels": 1 if checkpoint.get("color", "gray") == "gray" else 3,
            "target": "action" if split else "grid",
            "codebook_size": split or int(checkpoint.get("codebook_size") or CODEBOOK_SIZE)}


def train(config: ControllerTrainConfig, progress=print) -> dict:
    device = resolve_device(config.device)
    cores = os.cpu_count() or 1
    with FolderLock(config.out), \
            torch_threads((config.threads or cores) if device.type == "cpu" else None):
        return train_controller(config, device, progress)


def train_controller(config: ControllerTrainConfig, device: torch.device, progress) -> dict:
    """The loop. Batches are read and decoded in a thread of their own, a few steps ahead."""
    torch.manual_seed(config.seed)
    controller = Controller(ControllerConfig(**lam_codes(config.latent), use_prev=config.use_prev,
                                             prev_codes=config.prev_codes, channels=config.channels,
                                             hidden=config.hidden)).to(device)
    if device.type == "cpu":
        # oneDNN's NHWC convolutions: a training step 1.3x faster on the 2-core box (BENCHMARKS.md "Stages")
        controller.to(memory_format=torch.channels_last)
    grayscale = controller.config.in_channels == 1
    cache = FrameCache(grayscale, config.frame_cache_gb)
    reading = BackgroundIterator(lambda: training_batches(config.latent, config.batch_size, grayscale=grayscale,
                                                          shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                                                          cache=cache),
                                 depth=2, device=torch.device("cpu"), name="controller-data")
    try:
        return fit(config, controller, device, iter(reading), progress)
    finally:
        reading.close()


def fit(config: ControllerTrainConfig, controller: Controller, device: torch.device, batches, progress) -> dict:
    grayscale, target = controller.config.in_channels == 1, controller.config.target
    dtype = autocast_dtype(config.amp, device)
    optimizer = torch.optim.AdamW(controller.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr * 0.1)
    code_counts = torch.zeros(*controller.cells, controller.config.codebook_size, dtype=torch.int64)
    grid_counts = Counter()                               # every whole code grid seen, by its bytes
    lam = latent_identity(config.latent)
    history, started, window = [], time.perf_counter(), []
    for step in range(1, config.steps + 1):
        controller.train()
        batch = next(batches)
        wanted = targets(batch, target)
        code_counts += F.one_hot(wanted, controller.config.codebook_size).sum(0)
        if target == "grid":
            grid_counts.update(grid_bytes(batch["codes"]))
        with autocast(device, dtype):
            logits = controller.cell_logits(batch["cur"].to(device), batch["action"].to(device),
                                            batch["prev"].to(device), targets(batch, target, before=True).to(device))
        loss = F.cross_entropy(logits.float(), wanted.to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step}: non-finite loss {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            history.append({"step": step, "loss": sum(window) / len(window)})
            progress(f"step {step}/{config.steps}  loss {history[-1]['loss']:.4f}  "
                     f"{step * config.batch_size / (time.perf_counter() - started):.0f} samples/s")
            window = []
        if (step % config.ckpt_every == 0 or step == config.steps) and target == "grid":
            controller.set_seen_grids(most_common_grids(grid_counts, config.max_grids))
        if step % config.ckpt_every == 0 and step != config.steps:
            save_controller(config.out / CHECKPOINT_NAME, controller, step=step, lam=lam,
                            train_config=config.to_dict())
    majority = code_counts.argmax(-1)                     # (7, 5) (or (1, 1)): each cell's most common code
    metrics = {"training": {"steps": config.steps, "samples_seen": int(code_counts[0, 0].sum()),
                         "grids_seen": len(grid_counts), "grids_kept": len(controller.seen_grids),
                         "seconds": round(time.perf_counter() - started, 1), "loss": history},
               "lam": lam, "majority_codes": majority.tolist(),
               config.eval_split: score_controller(controller, config.latent, config.eval_split, code_counts,
                                                   grayscale, config.eval_batch_size, device)}
    save_controller(config.out / CHECKPOINT_NAME, controller, step=config.steps, lam=lam,
                    train_config=config.to_dict(), metrics=metrics)
    return metrics


# Settings that say where and how a controller trains, not what it learns (`--reuse`).
RUN_LOCAL_SETTINGS = frozenset({"out", "device", "threads", "frame_cache_gb", "reuse", "log_every", "ckpt_every",
                                "eval_batch_size"})


def finished_before(config: ControllerTrainConfig) -> bool:
    """`--reuse`: <out> holds a controller that finished `config.steps` steps with these settings, on the
    codes of the LAM the latents come from (and its metrics.json)."""
    state = finished_run(config.out / CHECKPOINT_NAME, config.steps, config.to_dict(), RUN_LOCAL_SETTINGS)
    return state is not None and dict(state.get("lam") or {}) == latent_identity(config.latent)


# ------------------------------------------------------------------------------------ cli
def parse_args(argv: Sequence[str] | None) -> ControllerTrainConfig:
    parser = argparse.ArgumentParser(description="Train the action -> latent code controller on latent shards.")
    add_config_flags(parser, ControllerTrainConfig)
    return ControllerTrainConfig(**config_values(parser.parse_args(argv), ControllerTrainConfig))


def run(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.reuse and finished_before(config):
        print(f"controller: {config.out / CHECKPOINT_NAME} finished {config.steps} steps with these settings on the "
              f"codes of this LAM: nothing to train")
        return 0
    print("controller config: " + json.dumps(config.to_dict(), sort_keys=True))
    print(f"controller: precision {describe_amp(config.amp, resolve_device(config.device))}")
    with FolderLock(config.out):                # one writer of --out, from training to the report
        metrics = train(config)
        atomic_write_json(config.out / "metrics.json", metrics)
        checkpoint = config.out / CHECKPOINT_NAME
        report = write_controller_report(config.out, metrics, config.eval_split, checkpoint)
    scores = metrics[config.eval_split]
    print(f"{config.eval_split}: per-cell accuracy {pct(scores['accuracy'])} (most common code "
          f"{pct(scores['majority_accuracy'])}); changed cells {pct(scores['changed_accuracy'])} of "
          f"{pct(scores['changed_fraction'])}; LEFT vs RIGHT changes the grid on {pct(scores['action_effect'], 0)} "
          f"of frames")
    print(f"checkpoint: {checkpoint}\nreport: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
