"""Train the world model (control/world.py) by streaming latent shards: it starts from the LAM's
decoder and learns to draw frame t+1 from the past frames and the codes the controller gives for
the recorded key press, then from its own short snapped rollouts.

    python -m control.world_train --latent shards/latent [--checkpoint checkpoints/latent_action/best.pt]
        [--controller checkpoints/controller/controller.pt] [--out checkpoints/world] [--steps 600]

Writes `<out>/world.pt` (format "lam-world/1": atomic, weights_only-loadable, naming the LAM and the
controller it was trained with) and `<out>/metrics.json`. `play.py rollout | serve | session
--world <out>/world.pt` play it.

Why the controller's codes and not the recorded ones: the recorded codes come from the encoder,
which saw frame t+1, so they name where the ball went; a player's key press does not, and the
controller's codes for it get about a third of the changed cells right. Trained on those, the model
must take what the player does not decide (the ball's flight above all) from the past frames.

Why its own rollouts: played forward, each input is the model's own snapped drawing. After
`rollout_from` of the steps on recorded frames, each window is played `rollout_steps` steps from its
recorded past: the controller chooses codes on the model's own frames, each drawing is snapped to
the palette and fed back (no gradient through the snapping), and every step is scored against the
recording (GameNGen's and scheduled sampling's lesson; training/own_frames.py is the LAM's one-step
version). `context_noise` adds Gaussian noise of a random strength to the past frames it sees
(GameNGen's noise augmentation).
This file is the command and its training loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from common.cli import add_config_flags, check_fields, config_values, flag
from common.device import model_threads, resolve_device, torch_threads
from common.errors import UserError, check_output_dir, run_cli
from common.lock import FolderLock
from model import load_checkpoint
from model.checkpoint import file_sha256, finished_run
from model.lam import CHANGED
from pipeline.loader import BackgroundIterator
from pipeline.palette import read_palette, snap
from pipeline.shards import LATENT_FORMAT, atomic_write_json, load_manifest

from control.checkpoint import load_controller
from control.data import FrameCache, latent_identity
from control.network import Controller
from control.world import MAX_PAST_FRAMES, PADDLE_ROW, WorldModel, identity, save_world
from control.world_data import fixed_batches, window_batches

CHECKPOINT_NAME = "world.pt"
# the codes it learns from (see `codes_for`): the controller's for the recorded key everywhere; the
# same with the paddle's row of the grid the recording's; or the recording's (the LAM encoder's) everywhere
CODE_SOURCES = ("controller", "paddle-row", "recorded")


@dataclass
class WorldTrainConfig:
    latent: Path = flag(help="latent shard directory (lam-latent/1)")
    checkpoint: Path = flag(Path("checkpoints/latent_action/best.pt"), "the LAM whose decoder it starts from")
    controller: Path = flag(Path("checkpoints/controller/controller.pt"), "the controller whose codes it learns from")
    out: Path = flag(Path("checkpoints/world"), "world.pt and metrics.json")
    steps: int = flag(600, "optimiser steps", min=1)
    rollout_steps: int = flag(3, "steps of its own snapped rollouts, a loss on each (1: one step from recorded "
                                 "frames throughout)", min=1, max=8)
    rollout_from: float = flag(0.3, "share of the steps trained one step from recorded frames before the "
                                    "rollouts begin", min=0, max=1)
    past_frames: int = flag(2, "frames it sees: t-1 and t (2), also t-2 (3), ...", min=1, max=MAX_PAST_FRAMES)
    key: bool = flag(False, "also read the real key pressed, beside the codes")
    codes: str = flag("paddle-row", "the codes it learns from: the controller's for the recorded key; the same "
                                    "with the paddle's row of the grid from the recording; or the recorded ones "
                                    "(the LAM encoder's, which saw frame t+1)", choices=CODE_SOURCES)
    context_noise: float = flag(0.0, "largest std of Gaussian noise on the past frames it sees (GameNGen); "
                                     "each sample draws its own strength up to it; 0: none", min=0, max=1)
    snap: bool = flag(True, "snap its own drawings to the palette before they are fed back (as play does)")
    batch_size: int = flag(16, min=1)
    lr: float = flag(3e-4, "AdamW learning rate (cosine to a tenth of it)", above=0)
    weight_decay: float = flag(1e-4, min=0)
    grad_clip: float = flag(1.0, min=0)
    shuffle_buffer: int = flag(256, "windows mixed across episodes before batching", min=1)
    val_batches: int = flag(4, "validation batches (the val split's windows, the same every time)", min=0)
    seed: int = flag(0, min=0)
    log_every: int = flag(25, min=1)
    ckpt_every: int = flag(200, "the checkpoint is rewritten (atomically) this often and at the end", min=1)
    device: str = flag("auto", "where it trains", choices=("auto", "cpu", "cuda"))
    threads: int = flag(0, "torch CPU threads; 0: the cores less one, which reads the shards beside it", min=0)
    reuse: bool = flag(False, "keep <out>/world.pt when it finished training with these settings, this LAM and "
                              "this controller (nothing to train); otherwise train afresh")

    def __post_init__(self):
        self.latent, self.out = Path(self.latent), Path(self.out)
        self.checkpoint, self.controller = Path(self.checkpoint), Path(self.controller)
        check_fields(self)                  # the flags' rules, for a config built in Python too
        if self.shuffle_buffer < self.batch_size:
            raise UserError(f"--shuffle-buffer ({self.shuffle_buffer}) must be at least --batch-size ({self.batch_size})")
        if not (self.latent / "manifest.json").is_file():
            raise UserError(f"{self.latent}: no latent shards here (no manifest.json; run `make extract`)")
        check_output_dir(self.out, "--out")

    @property
    def window_past(self) -> int:
        """Frames before each window's first step: the world model's, and at least t-1 for the controller."""
        return max(self.past_frames, 2)

    def to_dict(self) -> dict:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


# ------------------------------------------------------------------------------------ one window
def changed_weighted_mse(pred: torch.Tensor, target: torch.Tensor, cur: torch.Tensor, weight: float) -> torch.Tensor:
    """The LAM's loss: squared error, the pixels that differ between the frame moved and the target
    weighted `weight` (otherwise 99.7 % of the pixels are ones the copy of frame t gets right)."""
    changed = ((target - cur).abs() > CHANGED).float()
    return ((1 + (weight - 1) * changed) * (pred.float() - target).pow(2)).mean()


def with_noise(past: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    if strength <= 0:
        return past
    sigma = torch.rand(past.shape[0], 1, 1, 1, 1, generator=generator).to(past.device) * strength
    noise = torch.randn(past.shape, generator=generator).to(past.device)
    return (past + sigma * noise).clamp(0, 1)


def codes_for(source: str, controller: Controller, cur: torch.Tensor, prev: torch.Tensor, key: torch.Tensor,
              recorded: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """The codes one training step draws from (CODE_SOURCES).

    Why the paddle's row from the recording: with sticky actions (pipeline/record.py) the paddle's
    move after a key press is a draw, not a function of the key and the past, and the controller's
    codes name one such draw that is often not the recorded one. Trained against the recorded frame,
    a model that trusts those codes is wrong half the time, so it learns to hedge: a squared loss
    pays best for half a paddle in each likely place, which snapping splits into two paddles. The
    recorded codes name the draw that happened, so the model learns to follow the codes for the
    paddle (in play the controller's codes are a plausible draw), while the ball, the bricks and the
    rest still come from the controller's codes, which do not know where the ball goes."""
    if source == "recorded":
        return recorded
    codes = controller.codes(cur, key, prev, prev_codes=before if controller.config.prev_codes else None)
    if source == "paddle-row":
        codes = codes.clone()
        codes[:, PADDLE_ROW] = recorded[:, PADDLE_ROW]
    return codes


def play_window(world: WorldModel, controller: Controller, batch: dict, horizon: int, config: WorldTrainConfig,
                levels: torch.Tensor | None, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
    """`horizon` steps of the world model from each window's recorded past, fed its own snapped
    drawings: (the mean of the steps' losses, each step's loss)."""
    frames, actions = batch["frames"].to(device), batch["actions"].to(device)
    window_past = frames.shape[1] - actions.shape[1]
    history = frames[:, :window_past]                   # the frames played so far, oldest first
    weight = world.config.lam_config.changed_pixel_weight
    total, losses, before = 0.0, [], None
    for k in range(horizon):
        cur, prev, key = history[:, -1], history[:, -2], actions[:, k]
        codes = codes_for(config.codes, controller, cur, prev, key, batch["codes"][:, k].to(device), before)
        pred = world(with_noise(history[:, -world.past_frames:], config.context_noise, generator), codes, key)
        loss = changed_weighted_mse(pred, frames[:, window_past + k], cur, weight)
        total, before = total + loss, codes
        losses.append(loss.item())
        drawn = pred.detach().float().clamp(0, 1)
        if levels is not None:
            drawn = snap(drawn, levels)
        history = torch.cat([history[:, 1:], drawn[:, None].to(history.dtype)], dim=1)
    return total / horizon, losses


@torch.no_grad()
def validate(world: WorldModel, controller: Controller, batches: list[dict], config: WorldTrainConfig,
             levels: torch.Tensor | None, device: torch.device) -> dict | None:
    """Each rollout step's loss over the fixed val windows (no noise), in eval mode."""
    if not batches:
        return None
    was_training = world.training
    world.eval()
    try:
        steps = [play_window(world, controller, batch, config.rollout_steps, config, levels, device)[1]
                 for batch in batches]
    finally:
        world.train(was_training)
    per_step = [sum(column) / len(column) for column in zip(*steps)]
    return {"loss_per_step": per_step, "loss": sum(per_step) / len(per_step)}


# ------------------------------------------------------------------------------------ training
def train(config: WorldTrainConfig, progress=print) -> dict:
    device = resolve_device(config.device)
    with torch_threads((config.threads or model_threads(os.cpu_count() or 1)) if device.type == "cpu" else None):
        return train_world(config, device, progress)


def load_parts(config: WorldTrainConfig, device: torch.device):
    """The LAM, the controller and the palette, checked to belong to the latent shards and each other."""
    lam = load_checkpoint(config.checkpoint, device)
    controller = load_controller(config.controller, device)
    latent_lam = latent_identity(config.latent).get("sha256")
    if latent_lam and latent_lam != lam.sha256:
        raise UserError(f"{config.latent} holds the codes of LAM {latent_lam[:12]}, not of {config.checkpoint} "
                        f"({lam.sha256[:12]}); extract them again (make extract)")
    trained_on = controller.lam.get("sha256")
    if trained_on and trained_on != lam.sha256:
        raise UserError(f"{config.controller} was trained on the codes of LAM {trained_on[:12]}, not of "
                        f"{config.checkpoint} ({lam.sha256[:12]}); retrain it (make controller)")
    if lam.action_codes:
        raise UserError(f"{config.checkpoint}: a LAM with a per-frame action code (split) is played from its own "
                        f"decoder; the world model takes a code grid")
    if controller.config.in_channels != lam.config.in_channels or controller.config.target != "grid":
        raise UserError(f"{config.controller}: does not predict this LAM's code grid")
    palette = read_palette(load_manifest(config.latent, LATENT_FORMAT)) if config.snap else None
    levels = None if palette is None else palette.levels(lam.config.in_channels).to(device)
    return lam, controller.eval(), levels


def train_world(config: WorldTrainConfig, device: torch.device, progress) -> dict:
    torch.manual_seed(config.seed)
    lam, controller, levels = load_parts(config, device)
    world = WorldModel.from_lam(lam, config.past_frames, config.key).to(device).train()
    if device.type == "cpu":
        # oneDNN's NHWC convolutions, as the controller and extraction use (BENCHMARKS.md "Stages")
        world.to(memory_format=torch.channels_last)
    owners = {"lam": identity(lam), "controller": identity(controller)}
    del lam                                                   # only its decoder's weights were wanted
    grayscale = world.config.lam_config.in_channels == 1
    cache = FrameCache(grayscale)
    val = fixed_batches(config.latent, "val", config.batch_size, config.val_batches, config.window_past,
                        config.rollout_steps, grayscale=grayscale, cache=cache) if config.val_batches else []
    reading = BackgroundIterator(lambda: window_batches(config.latent, config.batch_size, config.window_past,
                                                        config.rollout_steps, grayscale=grayscale,
                                                        shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                                                        cache=cache),
                                 depth=2, device=torch.device("cpu"), name="world-data")
    try:
        return fit(config, world, controller, levels, device, iter(reading), val, owners, progress)
    finally:
        reading.close()


def fit(config: WorldTrainConfig, world: WorldModel, controller: Controller, levels: torch.Tensor | None,
        device: torch.device, batches, val: list[dict], owners: dict, progress) -> dict:
    """The loop: one step from recorded frames first, then the model's own rollouts."""
    optimizer = torch.optim.AdamW(world.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr * 0.1)
    noise = torch.Generator().manual_seed(config.seed)
    rollouts_begin = int(round(config.rollout_from * config.steps)) + 1
    before = validate(world, controller, val, config, levels, device)
    if before:
        progress(f"val before training (the LAM's decoder on these codes): loss per step "
                 + " ".join(f"{v:.5f}" for v in before["loss_per_step"]))
    history, window, started = [], [], time.perf_counter()
    for step in range(1, config.steps + 1):
        horizon = config.rollout_steps if step >= rollouts_begin else 1
        loss, _ = play_window(world, controller, next(batches), horizon, config, levels, device, noise)
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step}: non-finite loss {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(world.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            history.append({"step": step, "horizon": horizon, "loss": sum(window) / len(window)})
            progress(f"step {step}/{config.steps}  rollout {horizon}  loss {history[-1]['loss']:.5f}  "
                     f"{(time.perf_counter() - started) / step:.2f} s/step")
            window = []
        if step % config.ckpt_every == 0 and step != config.steps:
            save_world(config.out / CHECKPOINT_NAME, world, step=step, train_config=config.to_dict(), **owners)
    seconds = time.perf_counter() - started
    after = validate(world, controller, val, config, levels, device)
    metrics = {"training": {"steps": config.steps, "rollouts_from_step": min(rollouts_begin, config.steps + 1),
                            "seconds": round(seconds, 1), "seconds_per_step": round(seconds / config.steps, 3),
                            "device": str(device), "threads": torch.get_num_threads(), "loss": history},
               "val": {"before": before, "after": after}, **owners}
    save_world(config.out / CHECKPOINT_NAME, world, step=config.steps, train_config=config.to_dict(), metrics=metrics,
               **owners)
    return metrics


# ------------------------------------------------------------------------------------ reuse
# Settings that say where and how it trains, not what it learns (`--reuse`).
RUN_LOCAL_SETTINGS = frozenset({"out", "device", "threads", "reuse", "log_every", "ckpt_every"})


def finished_before(config: WorldTrainConfig) -> bool:
    """`--reuse`: <out> holds a world model that finished `config.steps` steps with these settings,
    trained with the very LAM and controller files given now (their bytes' sha256), and its metrics.json."""
    state = finished_run(config.out / CHECKPOINT_NAME, config.steps, config.to_dict(), RUN_LOCAL_SETTINGS)
    return (state is not None
            and dict(state.get("lam") or {}).get("sha256") == file_sha256(config.checkpoint)
            and dict(state.get("controller") or {}).get("sha256") == file_sha256(config.controller))


# ------------------------------------------------------------------------------------ cli
def parse_args(argv: Sequence[str] | None) -> WorldTrainConfig:
    parser = argparse.ArgumentParser(description="Train the world model that is played, from the LAM's decoder, "
                                                 "on the controller's codes and its own rollouts.")
    add_config_flags(parser, WorldTrainConfig)
    return WorldTrainConfig(**config_values(parser.parse_args(argv), WorldTrainConfig))


def run(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.reuse and finished_before(config):
        print(f"world model: {config.out / CHECKPOINT_NAME} finished {config.steps} steps with these settings, "
              f"this LAM and this controller: nothing to train")
        return 0
    print("world model config: " + json.dumps(config.to_dict(), sort_keys=True), flush=True)
    with FolderLock(config.out):                # one writer of --out, from training to metrics.json
        metrics = train(config, progress=lambda line: print(line, flush=True))
        atomic_write_json(config.out / "metrics.json", metrics)
    val = metrics["val"]
    if val["after"]:
        print("val loss per rollout step, before -> after: " + ", ".join(
            f"{b:.5f} -> {a:.5f}" for b, a in zip(val["before"]["loss_per_step"], val["after"]["loss_per_step"])))
    print(f"trained {metrics['training']['steps']} steps in {metrics['training']['seconds']:.0f} s\n"
          f"checkpoint: {config.out / CHECKPOINT_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
