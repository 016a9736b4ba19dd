"""The demo model's training step on a CPU: this round's three levers, each beside what it replaced.

    python -m bench step

- The shift head's gather (model/motion.GatherShifted): the weights broadcast one per block over
  4-pixel runs, and their gradient one `.sum((1, 3, 5))` over interleaved dims (before, kept here
  as `BlockGather`), against each block's weight repeated along whole rows and the gradient summed
  rows first from one reused buffer (now). Forward + backward of the demo's four factors; the two
  give the same bits (checked in the run).
- FiLM on channels-last features (model/networks.FiLM): an NCHW view of NHWC memory (before)
  against the features seen as they lie (now). Forward + backward at the three sizes the demo
  FiLMs with runs; same values (checked).
- Freed memory kept in the heap (common/memory.keep_freed_memory) against glibc's default, in the
  real training loop (train.py, 120 steps of the demo preset on recorded Breakout): each side is a
  fresh process, as the allocator setting is per process. Also the whole step before this round
  (both old ops and the default allocator) against now.
- The reconstruction grid (evaluation/figures.reconstruction_grid: the trainer's logged image and
  the report's figure), 8 pairs of real frames: matplotlib's axes (before, kept here as
  `matplotlib_grid`) against one composed array written by PIL (now).

Pairs alternate; medians of the runs.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import ROOT, markdown_table, median_ms, pair_shards, recorded_videos
from model import ModelConfig
from model.motion import GatherShifted, ShiftHead

TRAIN_STEPS = 120


# ------------------------------------------------------------------------------ the baselines
class BlockGather(torch.autograd.Function):
    """GatherShifted as it was: the frame seen block by block, one weight broadcast per block."""

    @staticmethod
    def forward(ctx, frame, weights, dim, step):
        blocks, reach = _blocks(frame.shape, weights), step * (weights.shape[1] // 2)
        padded = F.pad(frame, (reach, reach) if dim == -1 else (0, 0, reach, reach))
        per_block = weights.reshape(weights.shape[0], weights.shape[1], 1, weights.shape[2], 1, weights.shape[3], 1)
        out = frame.new_empty(blocks, dtype=torch.result_type(frame, weights))
        for i in range(weights.shape[1]):
            source = padded.narrow(dim, 2 * reach - step * i, frame.shape[dim]).view(blocks)
            if i == 0:
                torch.mul(source, per_block[:, i], out=out)
            else:
                out.addcmul_(source, per_block[:, i])
        ctx.save_for_backward(padded, weights)
        ctx.dim, ctx.step, ctx.shape = dim, step, frame.shape
        return out.view(frame.shape)

    @staticmethod
    def backward(ctx, grad):
        padded, weights = ctx.saved_tensors
        dim, step, shape = ctx.dim, ctx.step, ctx.shape
        blocks, reach = _blocks(shape, weights), step * (weights.shape[1] // 2)
        grad = grad.contiguous().view(blocks)
        per_block = weights.reshape(weights.shape[0], weights.shape[1], 1, weights.shape[2], 1, weights.shape[3], 1)
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[1] else None
        grad_padded = torch.zeros_like(padded, dtype=grad.dtype) if ctx.needs_input_grad[0] else None
        for i in range(weights.shape[1]):
            offset = 2 * reach - step * i
            if grad_weights is not None:
                grad_weights[:, i] = (grad * padded.narrow(dim, offset, shape[dim]).view(blocks)).sum((1, 3, 5))
            if grad_padded is not None:
                grad_padded.narrow(dim, offset, shape[dim]).view(blocks).addcmul_(grad, per_block[:, i])
        grad_frame = None if grad_padded is None else grad_padded.narrow(dim, reach, shape[dim])
        return grad_frame, grad_weights, None, None


def _blocks(shape, weights):
    batch, channels, height, width = shape
    grid_h, grid_w = weights.shape[-2:]
    return batch, channels, grid_h, height // grid_h, grid_w, width // grid_w


def film_nchw_view(film, features, latent):
    """FiLM's forward as it was: the NCHW view whatever the features' memory layout."""
    from model.networks import nearest_layout

    scale_shift = film.to_scale_shift(latent.to(features.dtype))
    rows, run = nearest_layout(tuple(scale_shift.shape[-2:]), tuple(features.shape[-2:]), features.device)
    gamma, beta = scale_shift.index_select(2, rows).unsqueeze(-1).chunk(2, dim=1)
    batch, channels, height, width = features.shape
    cells = features.view(batch, channels, height, width // run, run)
    return (cells * (1 + gamma) + beta).view(batch, channels, height, width)


def matplotlib_grid(examples, path: Path) -> Path:
    """The reconstruction grid as it was drawn before: one matplotlib axes per image."""
    import matplotlib.pyplot as plt
    import numpy as np

    from evaluation.figures import save_figure

    columns = ("frame t", "frame t+1", "prediction", "|prediction - (t+1)|", "|(t+1) - t|")
    fig, axes = plt.subplots(len(examples), len(columns), figsize=(2.3 * len(columns), 2.9 * len(examples)),
                             squeeze=False)
    for row, example in zip(axes, examples):
        for ax, image in zip(row[:3], (example.cur, example.next, example.pred)):
            ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
        for ax, difference in zip(row[3:], (example.pred - example.next, example.next - example.cur)):
            heat = np.abs(difference)
            ax.imshow(heat, cmap="inferno", vmin=0, vmax=max(0.25, float(heat.max())))
        row[0].set_ylabel(example.key, fontsize=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ measuring
def alternate(before, now, rounds: int = 3) -> tuple[float, float]:
    results = {"before": [], "now": []}
    for _ in range(rounds):
        results["before"].append(median_ms(before))
        results["now"].append(median_ms(now))
    return statistics.median(results["before"]), statistics.median(results["now"])


def gather_row() -> list:
    """Forward + backward of the demo shift head's four factors on a batch of 32."""
    config = ModelConfig(width=0.25)
    head = ShiftHead(8, config.shift.max_x, config.shift.max_y, config.shift.grid)
    generator = torch.Generator().manual_seed(0)
    frame = torch.rand(32, 1, 210, 160, generator=generator)
    weights = [torch.rand(32, size, *config.shift.grid, generator=generator).softmax(1) for size in head.sizes]
    grad = torch.rand(32, 1, 210, 160, generator=generator)

    def pass_of(gather):
        def run():
            leaves = [w.clone().requires_grad_() for w in weights]
            out = frame.clone().requires_grad_()            # the later factors' input needs its gradient
            moved = out
            for (dim, step, _), w in zip(head.factors, leaves):
                moved = gather.apply(moved, w, dim, step)
            moved.backward(grad)
            return moved.detach(), out.grad, [w.grad for w in leaves]
        return run

    old, new = pass_of(BlockGather)(), pass_of(GatherShifted)()
    # the output is the same bits; the weights' gradients sum in another order
    same = torch.equal(old[0], new[0]) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(
        [old[1], *old[2]], [new[1], *new[2]]))
    before, now = alternate(pass_of(BlockGather), pass_of(GatherShifted))
    return [f"shift head gather, 4 factors ({sum(head.sizes)} shifts), batch 32, forward + backward", "ms",
            f"per block: {before:.1f}", f"per row: {now:.1f}", f"{before / now:.2f}x", "output the same bits, gradients within rounding" if same else "NO"]


def film_rows() -> list[list]:
    from model.networks import FiLM

    rows = []
    for channels, height, width in ((16, 105, 80), (32, 53, 40), (64, 27, 20)):
        torch.manual_seed(0)
        film = FiLM(128, channels).to(memory_format=torch.channels_last)
        torch.nn.init.normal_(film.to_scale_shift.weight, std=0.1)
        features = torch.rand(32, channels, height, width).contiguous(memory_format=torch.channels_last)
        latent = torch.rand(32, 128, 7, 5).contiguous(memory_format=torch.channels_last)
        grad = torch.rand(32, channels, height, width).contiguous(memory_format=torch.channels_last)

        def pass_of(forward):
            def run():
                leaf = features.clone().requires_grad_()
                out = forward(leaf)
                out.backward(grad)
                return out.detach(), leaf.grad
            return run

        old_forward, new_forward = (lambda x: film_nchw_view(film, x, latent)), (lambda x: film(x, latent))
        old, new = pass_of(old_forward)(), pass_of(new_forward)()
        same = torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
        before, now = alternate(pass_of(old_forward), pass_of(new_forward))
        rows.append([f"FiLM at {height}×{width}, {channels} channels, batch 32, forward + backward", "ms",
                     f"NCHW view: {before:.1f}", f"NHWC view: {now:.1f}", f"{before / now:.2f}x",
                     "the same bits" if same else "NO"])
    return rows


def grid_row() -> list:
    """The trainer's and the report's reconstruction grid of 8 pairs of recorded frames (gray)."""
    import numpy as np
    from PIL import Image

    from evaluation.examples import Example
    from evaluation.figures import reconstruction_grid

    pngs = sorted(recorded_videos().rglob("*.png"))[:17]
    frames = [np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255 for path in pngs]
    examples = [Example(f"00000_{i:06d}", frames[i], frames[i + 1], np.clip(frames[i + 1] + 0.02, 0, 1), 0)
                for i in range(0, 16, 2)]
    with tempfile.TemporaryDirectory() as out:
        before, now = alternate(lambda: matplotlib_grid(examples, Path(out) / "before.png"),
                                lambda: reconstruction_grid(examples, Path(out) / "now.png"))
    return ["reconstruction grid, 8 pairs (drawn every image_every steps and by evaluate.py)", "ms",
            f"matplotlib axes: {before:.0f}", f"one array, PIL: {now:.0f}", f"{before / now:.1f}x",
            "the frames' own pixels now (matplotlib resampled them)"]


# ------------------------------------------------------------------------------ the real loop
CHILD = """
import json, resource, sys, time
sys.argv = ["train.py"]
variant, shards, out = {variant!r}, {shards!r}, {out!r}
if variant == "before":
    import bench.bench_step as old, model.motion as motion, model.networks as networks
    motion.GatherShifted = old.BlockGather
    networks.FiLM.forward = lambda self, f, l: old.film_nchw_view(self, f, l)
import train
from common.memory import keep_freed_memory
if variant == "now":
    assert keep_freed_memory()
argv = ["--shards", shards, "--preset", "demo", "--out", out + "/ckpt", "--run-dir", out + "/run",
        "--wandb", "disabled", "--iters", "{steps}"] + sum(
        (["--set", f"{{name}}=0"] for name in ("val_every", "metrics_every", "image_every", "hist_every", "ckpt_every")), [])
started = time.perf_counter()
train.cli(argv)                               # not train.main: that keeps freed memory itself
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
rows = [json.loads(line) for line in open(out + "/run/metrics.jsonl")]
print(json.dumps({{"seconds": seconds, "user": usage.ru_utime, "sys": usage.ru_stime,
                  "loss": rows[-1]["train/loss"]}}))
"""


def train_once(variant: str, shards: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        code = CHILD.format(variant=variant, shards=str(shards), out=out, steps=TRAIN_STEPS)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"training child ({variant}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def training_rows() -> tuple[list[list], list[str]]:
    shards = pair_shards(recorded_videos())
    variants = ("before", "default heap", "now")
    runs = {name: [] for name in variants}
    for _ in range(2):
        for name in variants:
            runs[name].append(train_once(name, shards))
    median = {name: {key: statistics.median(r[key] for r in found) for key in ("seconds", "user", "sys")}
              for name, found in runs.items()}
    rate = {name: TRAIN_STEPS / m["seconds"] for name, m in median.items()}
    cpu = lambda name: f"{median[name]['user']:.0f} user + {median[name]['sys']:.0f} kernel"  # noqa: E731
    rows = [[f"train.py, demo preset, {TRAIN_STEPS} steps (no validation): glibc's default heap or freed memory kept",
             "steps/s", f"default: {rate['default heap']:.2f}", f"kept: {rate['now']:.2f}",
             f"{rate['now'] / rate['default heap']:.2f}x",
             "the same bits" if runs["now"][0]["loss"] == runs["default heap"][0]["loss"] else "NO"],
            [f"train.py, demo preset, {TRAIN_STEPS} steps: before this round (old ops, default heap) and now",
             "steps/s", f"before: {rate['before']:.2f}", f"now: {rate['now']:.2f}",
             f"{rate['now'] / rate['before']:.2f}x",
             f"loss at step {TRAIN_STEPS}: {runs['before'][0]['loss']:.5f} / {runs['now'][0]['loss']:.5f}"]]
    notes = [f"- CPU seconds of the {TRAIN_STEPS}-step runs (the process, medians): before {cpu('before')}, "
             f"default heap {cpu('default heap')}, now {cpu('now')}. The kernel's share is the page faults of "
             "activations that glibc handed back to the kernel after every step.",
             "- Same result: the gather's output is the same bits and its gradients agree within float rounding "
             "(they are summed in another order); FiLM's output and the features' gradient are the same bits (its weights' gradient sums in another order). Rounding that "
             "differs in the last place sends a training run along another path: the last row's two runs end "
             f"at different losses after {TRAIN_STEPS} steps, as two runs on different CPUs do."]
    return rows, notes


def run() -> str:
    rows = [gather_row(), *film_rows(), grid_row()]
    train_table, notes = training_rows()
    rows += train_table
    return "\n".join([
        "## Training step on a CPU: this round's levers", "",
        "The demo model (width 0.25, batch 32, channels-last, fp32, eager) as `make demo` trains it. The op rows "
        "alternate their two sides in one process (medians); the train.py rows are fresh processes, two of each, "
        "alternating (medians).", "",
        markdown_table(["what", "unit", "before", "now", "speed-up", "same result"], rows), "", *notes])
