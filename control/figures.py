"""Pictures of rollouts: side-by-side GIFs (recorded | recorded codes | controller), the curves
against the horizon, contact sheets of long sessions, and the controllability bars."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")          # no display on the boxes this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from evaluation.figures import save_figure  # noqa: E402
from pipeline.shards import atomic_write_bytes  # noqa: E402

GIF_SCALE = 2
GIF_FRAME_MS = 120
GAP_PX = 4
FIGURE_DPI = 110               # the curves' small print stays legible


def to_uint8_image(frame: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 (gray repeated), for images."""
    array = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = array.transpose(1, 2, 0)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def side_by_side(panels: list[torch.Tensor]) -> np.ndarray:
    """One GIF frame: the panels (C, H, W) left to right, a gray gap between them."""
    images = [to_uint8_image(panel) for panel in panels]
    gap = np.full((images[0].shape[0], GAP_PX, 3), 64, dtype=np.uint8)
    return np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1)


def write_gif(path: Path, panels: list[torch.Tensor]) -> Path:
    """panels: each (T, C, H, W), shown side by side -> an animated GIF, frame 0 the shared start.
    Gray panels make gray ("L") frames: the same pixels as the RGB ones, which PIL would quantise to
    a palette frame by frame (6x the time: 3 s of each 200-step GIF on a 2-core CPU)."""
    gray = all(frames.shape[1] == 1 for frames in panels)
    images = []
    for frames in zip(*panels):
        array = side_by_side(list(frames))
        image = Image.fromarray(array[..., 0] if gray else array)
        images.append(image.resize((image.width * GIF_SCALE, image.height * GIF_SCALE), Image.NEAREST))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def contact_sheet(path: Path, frames: list[torch.Tensor], columns: int = 10, labels: list[str] | None = None) -> Path:
    """frames (C, H, W) in a grid, `columns` to a row, each with its label above it: a long session at a glance."""
    rows = math.ceil(len(frames) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, frame in enumerate(frames):
        ax = axes.flat[i]
        ax.imshow(to_uint8_image(frame), interpolation="nearest")
        if labels:
            ax.set_title(labels[i], fontsize=7)
    return save_figure(fig, path, dpi=FIGURE_DPI)


KIND_STYLE = {"codes": ("recorded codes", "C0"), "controller": ("controller", "C2"), "copy": ("copy start frame", "C1")}


def rollout_curves(curves: dict, path: Path) -> Path:
    """Each kind against the horizon: PSNR (beside copying the start frame), paddle, ball, bricks and grain."""
    h = curves["horizon"]
    kinds = [kind for kind in ("codes", "controller") if kind in curves]
    value = lambda kind, name: [np.nan if v is None else v for v in curves[kind][name]]  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for kind in ("copy", *kinds):
        label, colour = KIND_STYLE[kind]
        axes[0].plot(h, value(kind, "psnr"), label=label, color=colour)
    axes[0].set(xlabel="steps after the start frame", ylabel="PSNR (dB)", title="frame quality")
    for kind in kinds:
        label, colour = KIND_STYLE[kind]
        axes[1].plot(h, value(kind, "paddle_found"), label=f"{label}: paddle found", color=colour)
        axes[1].plot(h, value(kind, "paddle_within_2px"), ":", label=f"{label}: within 2 px", color=colour)
        axes[2].plot(h, value(kind, "ball_found"), label=f"{label}: ball found", color=colour)
        axes[2].plot(h, value(kind, "ball_phantom"), ":", label=f"{label}: ball where none", color=colour)
        axes[2].plot(h, value(kind, "two_balls"), "--", label=f"{label}: two balls", color=colour)
        axes[3].plot(h, value(kind, "bricks_lost_model"), label=f"{label}: bricks lost", color=colour)
        axes[3].plot(h, [100 * v for v in value(kind, "grain")], ":", label=f"{label}: grain (% of empty px)",
                     color=colour)
    if kinds:
        axes[3].plot(h, value(kinds[0], "bricks_lost_real"), label="recording: bricks lost", color="k")
    axes[1].set(xlabel="steps", ylabel="share of starts", title="paddle", ylim=(-0.02, 1.02))
    axes[2].set(xlabel="steps", ylabel="share of starts", title="ball", ylim=(-0.02, 1.02))
    axes[3].set(xlabel="steps", ylabel="bricks (brick pixels / 48)", title="bricks and grain")
    for ax in axes:
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=FIGURE_DPI)


def controllability_bars(scores: dict, path: Path, goal: float) -> Path:
    labels, controller, floor = ["always LEFT", "always RIGHT"], [], []
    for direction in ("left", "right"):
        controller.append(scores["controller"][direction]["success"] or 0.0)
        floor.append(scores["random_codes"][direction]["success"] or 0.0)
    x = np.arange(2)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.18, controller, 0.36, label="controller codes")
    ax.bar(x + 0.18, floor, 0.36, label="random codes (floor)")
    ax.axhline(goal, color="k", linestyle="--", linewidth=1, label=f"goal {goal:.0%}")
    ax.set_xticks(x, labels)
    ax.set(ylim=(0, 1.05), ylabel="starts where the paddle moved that way",
           title=f"controllability: {scores['steps']} steps from {scores['starts']} test frames")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=FIGURE_DPI)
