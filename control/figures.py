"""Pictures of rollouts: side-by-side GIFs (recorded | model | |difference|), the curves against the
horizon, and the controllability bars."""
from __future__ import annotations

import io
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


def side_by_side(real: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """One GIF frame: recorded | model | |difference| (the difference in red, brighter = more wrong)."""
    left, middle = to_uint8_image(real), to_uint8_image(model)
    diff = np.abs(left.astype(np.int16) - middle.astype(np.int16)).max(axis=2).astype(np.uint8)
    heat = np.zeros_like(left)
    heat[..., 0] = diff
    gap = np.full((left.shape[0], GAP_PX, 3), 64, dtype=np.uint8)
    return np.concatenate([left, gap, middle, gap, heat], axis=1)


def write_gif(path: Path, real: torch.Tensor, model: torch.Tensor) -> Path:
    """real, model: (T, C, H, W) -> an animated GIF, frame 0 the shared start."""
    images = []
    for frame_real, frame_model in zip(real, model):
        image = Image.fromarray(side_by_side(frame_real, frame_model))
        images.append(image.resize((image.width * GIF_SCALE, image.height * GIF_SCALE), Image.NEAREST))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def rollout_curves(curves: dict, path: Path) -> Path:
    """PSNR (all and changed pixels), paddle error and ball found, against the horizon."""
    h = curves["horizon"]
    value = lambda name: [np.nan if v is None else v for v in curves[name]]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(h, value("psnr"), label="model, all pixels", color="C0")
    axes[0].plot(h, value("psnr_copy"), label="copy start frame, all pixels", color="C1")
    axes[0].plot(h, value("psnr_changed"), "--", label="model, changed pixels", color="C0")
    axes[0].plot(h, value("psnr_changed_copy"), "--", label="copy, changed pixels", color="C1")
    axes[0].set(xlabel="steps after the start frame", ylabel="PSNR (dB)", title="frame quality")
    axes[0].legend(fontsize=8)
    axes[1].plot(h, value("paddle_error_px"), label="model", color="C0")
    axes[1].plot(h, value("paddle_error_px_copy"), label="copy start frame", color="C1")
    axes[1].plot(h, [100 * v for v in value("paddle_lost")], ":", label="model: paddle lost (%)", color="C3")
    axes[1].set(xlabel="steps", ylabel="px", title="paddle x error")
    axes[1].legend(fontsize=8)
    axes[2].plot(h, value("ball_found"), label="ball found where it is on screen", color="C0")
    axes[2].plot(h, value("ball_phantom"), ":", label="ball drawn where there is none", color="C3")
    axes[2].set(xlabel="steps", ylabel="fraction", title="ball", ylim=(-0.02, 1.02))
    axes[2].legend(fontsize=8)
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
