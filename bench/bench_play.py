"""Playing forward on a CPU: the levers that made the demo's rollouts and controller cheaper,
each beside what it replaced, alternating in one process (medians).

    python -m bench play

- Snapping a generated frame to the game's palette (pipeline/palette.snap): the nearest level by
  a (B, K, H, W) distance tensor and an argmin across K (before), against a binary search among the
  sorted gray levels' midpoints (now; colours keep the distances, with K last).
- The controller's training step on one thread (the cores less the one that reads the shards,
  before) against every core (now: its frames are decoded once and cached, so the reading thread is
  idle after the first epoch).
- A rollout's GIF (control/figures.write_gif: 200 steps, three gray panels side by side) written from
  RGB frames, which PIL quantises to a palette frame by frame (before), against gray frames (now).
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import median_ms
from control.figures import write_gif
from control.network import Controller, ControllerConfig
from pipeline.palette import snap

GRAY_LEVELS = torch.tensor([0, 74, 111, 142, 170, 180, 200, 255], dtype=torch.float32).view(-1, 1) / 255


def snap_by_distances(frames: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The baseline: every pixel's distance to every level, (B, K, H, W), and the argmin across K."""
    colours = levels.to(frames.dtype)
    distance = (frames.unsqueeze(1) - colours.view(1, *colours.shape, 1, 1)).pow(2).sum(2)
    return colours[distance.argmin(1)].permute(0, 3, 1, 2).contiguous()


def snap_rows() -> list[list]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, frames, levels in (
            ("gray, 12 frames (a rollout step)", torch.rand(12, 1, 210, 160, generator=generator), GRAY_LEVELS),
            ("RGB, 12 frames, 8 colours", torch.rand(12, 3, 210, 160, generator=generator),
             torch.rand(8, 3, generator=generator))):
        assert torch.equal(snap(frames, levels), snap_by_distances(frames, levels))
        before = statistics.median(median_ms(lambda: snap_by_distances(frames, levels)) for _ in range(2))
        after = statistics.median(median_ms(lambda: snap(frames, levels)) for _ in range(2))
        rows.append([f"palette snap, {name}", "ms", f"distances + argmin: {before:.1f}", f"now: {after:.1f}",
                     f"{before / after:.2f}x"])
    return rows


def controller_rows() -> list[list]:
    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    controller = Controller(ControllerConfig(in_channels=1, target="grid", codebook_size=256))
    controller.to(memory_format=torch.channels_last)            # as control/train.py trains it on a CPU
    optimizer = torch.optim.AdamW(controller.parameters(), lr=1e-3)
    batch = 32
    cur, prev = torch.rand(batch, 1, 210, 160), torch.rand(batch, 1, 210, 160)
    action, codes = torch.randint(0, 4, (batch,)), torch.randint(0, 256, (batch, 7, 5))

    def step():
        loss = F.cross_entropy(controller.cell_logits(cur, action, prev, None), codes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results = {1: [], cores: []}
    previous = torch.get_num_threads()
    try:
        for _ in range(2):
            for threads in results:
                torch.set_num_threads(threads)
                results[threads].append(median_ms(step, reps=5))
    finally:
        torch.set_num_threads(previous)
    one, every = (statistics.median(results[t]) for t in (1, cores))
    return [["controller training step, batch 32 (cached frames: no decoding beside it)", "ms",
             f"one thread: {one:.0f}", f"{cores} threads: {every:.0f}", f"{one / every:.2f}x"]]


def gif_frames(path: Path) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(path.read_bytes()))
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


def game_like_frames(steps: int, offset: int) -> torch.Tensor:
    """(steps + 1, 1, 210, 160) Breakout-like gray frames: walls, six rows of bricks in the palette's
    levels, a paddle and a ball that move."""
    frames = torch.zeros(steps + 1, 1, 210, 160)
    frames[:, :, 17:32, :] = GRAY_LEVELS[3]
    frames[:, :, 32:, :8] = frames[:, :, 32:, -8:] = GRAY_LEVELS[3]
    for row in range(6):
        frames[:, :, 57 + 6 * row:63 + 6 * row, 8:-8] = GRAY_LEVELS[1 + row]
    for t in range(steps + 1):
        paddle = 8 + (3 * t + offset) % 128
        frames[t, :, 189:193, paddle:paddle + 16] = GRAY_LEVELS[2]
        ball_x, ball_y = 8 + (2 * t + offset) % 140, 100 + (4 * t) % 80
        frames[t, :, ball_y:ball_y + 4, ball_x:ball_x + 2] = GRAY_LEVELS[2]
    return frames


def gif_rows(steps: int = 200) -> list[list]:
    """The demo's rollout GIF: the start and `steps` frames of three panels (recorded, recorded codes,
    controller) side by side."""
    panels = [game_like_frames(steps, offset) for offset in (0, 3, 7)]
    seconds = {"rgb": [], "gray": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = {kind: Path(folder) / f"{kind}.gif" for kind in seconds}
        for _ in range(2):
            for kind in seconds:
                shown = panels if kind == "gray" else [frames.expand(-1, 3, -1, -1) for frames in panels]
                started = time.perf_counter()
                write_gif(paths[kind], shown)
                seconds[kind].append(time.perf_counter() - started)
        same = all(np.array_equal(a, b) for a, b in zip(gif_frames(paths["rgb"]), gif_frames(paths["gray"])))
    assert same, "the gray GIF's frames differ from the RGB one's"
    before, after = (min(seconds[kind]) for kind in ("rgb", "gray"))
    return [[f"rollout GIF, {steps} steps of 3 gray panels (the same pixels, checked)", "s",
             f"RGB frames: {before:.2f}", f"gray frames: {after:.2f}", f"{before / after:.2f}x"]]


def run() -> str:
    rows = snap_rows() + controller_rows() + gif_rows()
    table = ["| what | unit | before | now | speed-up |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(["## Playing forward: palette snap, the controller's threads, the rollout GIFs", "",
                      "Each pair alternates in one process; medians of the runs (the GIFs: the faster of "
                      "two). The snap's two ways give equal frames, and the GIFs' two ways equal pixels "
                      "(checked in the run).", "", *table])
