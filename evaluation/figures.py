"""Evaluation figures (PNG): codebook histogram, t-SNE of the code vectors, reconstruction grids with
difference heat-maps, and codes by gameplay event. Each function draws one figure into `path`."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")                    # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.code_analysis import EVENT_KINDS  # noqa: E402
from evaluation.examples import Example  # noqa: E402
from pipeline.shards import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Write `fig` as a PNG at `path` atomically (a half-written figure never appears) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def codebook_histogram(counts: Sequence[int], path: Path, title: str) -> Path:
    counts = np.asarray(counts)
    fig, (ax_index, ax_sorted) = plt.subplots(1, 2, figsize=(12, 3.5))
    # stairs, not bar: one artist instead of one rectangle per code
    ax_index.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color="tab:blue")
    ax_index.set(xlabel="code index", ylabel="uses (grid cells)", title=title, xlim=(-1, len(counts)))
    ordered = np.sort(counts)[::-1]
    ax_sorted.stairs(ordered, np.arange(len(counts) + 1) - 0.5, fill=True, color="tab:orange")
    ax_sorted.set(xlabel="codes, most used first", ylabel="uses", yscale="log" if ordered.max() > 0 else "linear",
                  title=f"{int((counts > 0).sum())} of {len(counts)} codes used")
    return save_figure(fig, path)


def code_tsne(codebook: np.ndarray, counts: Sequence[int], path: Path, seed: int = 0) -> Path:
    """2-D t-SNE of the code vectors, coloured by how often each code is used (unused ones hollow)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    counts = np.asarray(counts)
    perplexity = float(min(30, max(2, (len(codebook) - 1) // 3)))
    # exact gradients: for a few hundred points they are faster than Barnes-Hut and not approximate
    method = "exact" if len(codebook) <= 1024 else "barnes_hut"
    with threadpool_limits(1):            # a few hundred points: threads cost more than they give
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, max_iter=500,
                  random_state=seed).fit_transform(codebook)
    used = counts > 0
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.scatter(xy[~used, 0], xy[~used, 1], s=14, facecolors="none", edgecolors="0.6", label="unused")
    points = ax.scatter(xy[used, 0], xy[used, 1], s=18, c=np.log10(counts[used]), cmap="viridis", label="used")
    fig.colorbar(points, ax=ax, label="log10(uses)")
    ax.set(title="t-SNE of the code vectors", xticks=[], yticks=[])
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def reconstruction_grid(examples: Sequence[Example], path: Path) -> Path:
    """Rows of: frame t, frame t+1, prediction, |prediction - (t+1)| heat-map, |(t+1) - t| for reference,
    each at the frames' own pixels (a one-pixel miss of the ball stays one pixel; a plotting library's
    axes would resample it away), the pair's key on the left. Composed as one array and written by PIL:
    0.6 s a grid through matplotlib's axes was a tenth of the test suite's CPU time."""
    from PIL import Image, ImageDraw, ImageFont

    columns = ("frame t", "frame t+1", "prediction", "|prediction - (t+1)|", "|(t+1) - t|")
    height, width = examples[0].cur.shape[:2]
    gap, header, label = 8, 18, 96
    canvas = np.full((header + len(examples) * (height + gap), label + len(columns) * (width + gap), 3), 255, np.uint8)
    heat_colours = matplotlib.colormaps["inferno"]
    for row, example in enumerate(examples):
        gray = example.cur.ndim == 2
        tiles = [np.clip(image, 0, 1) for image in (example.cur, example.next, example.pred)]
        tiles = [np.repeat(tile[..., None], 3, axis=-1) if gray else tile for tile in tiles]
        for difference in (example.pred - example.next, example.next - example.cur):
            heat = np.abs(difference) if gray else np.abs(difference).mean(axis=-1)
            tiles.append(heat_colours(heat / max(0.25, float(heat.max())))[..., :3])
        top = header + row * (height + gap)
        for column, tile in enumerate(tiles):
            left = label + column * (width + gap)
            canvas[top:top + height, left:left + width] = np.round(tile * 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for column, title in enumerate(columns):
        draw.text((label + column * (width + gap) + width // 2, header // 2), title, fill=(0, 0, 0), font=font,
                  anchor="mm")
    for row, example in enumerate(examples):
        draw.text((label - gap, header + row * (height + gap) + height // 2), example.key, fill=(0, 0, 0),
                  font=font, anchor="rm")
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def codes_by_event(analysis: dict, path: Path) -> Path:
    """Top: NMI between each grid cell's code and each event. Bottom: at the most informative cell,
    the codes most over-represented when the event happens (lift over their overall frequency)."""
    kinds = [kind for kind in EVENT_KINDS if kind in analysis]
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.6 * len(kinds), 8), squeeze=False, layout="constrained")
    top = max([analysis[k]["nmi_max"] for k in kinds] + [1e-6])
    for (ax_map, ax_bar), kind in zip(axes.T, kinds):
        info = analysis[kind]
        image = ax_map.imshow(np.array(info["nmi_cells"]), cmap="magma", vmin=0, vmax=top)
        ax_map.set_title(f"{kind} ({info['transitions']} transitions)\nNMI max {info['nmi_max']:.3f}", fontsize=9)
        ax_map.set(xlabel="grid column", ylabel="grid row")
        codes = info["top_codes"]
        if codes:
            ax_bar.barh([f"code {c['code']}" for c in codes][::-1], [c["lift"] for c in codes][::-1], color="tab:green")
            ax_bar.axvline(1.0, color="0.4", lw=1, ls="--")
        else:
            ax_bar.text(0.5, 0.5, "too few transitions", ha="center", va="center", transform=ax_bar.transAxes)
            ax_bar.set_yticks([])
        ax_bar.set_title(f"cell {tuple(info['best_cell'])}: lift of codes", fontsize=9)
        ax_bar.set_xlabel("P(code | event) / P(code)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="NMI(code at cell, event)")
    return save_figure(fig, path)
