"""Encoder and decoder conv stacks. Five stride-2 convs take 210×160 to 7×5; five transposed convs
take 7×5 back to exactly 210×160 (output_padding chosen per layer and per dimension)."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.conv import Conv2d, ConvTranspose2d, layout_of
from model.motion import MATCH_REACH, ShiftHead, match_features, match_shifts, shift_frame
from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH


def conv_sizes(size: int, layers: int = 5) -> list[int]:
    """Spatial sizes after each k3/s2/p1 conv: 210 -> [105, 53, 27, 14, 7], 160 -> [80, 40, 20, 10, 5]."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 2 * 1 - 3) // 2 + 1)
    return sizes


def output_paddings(size: int, layers: int = 5) -> list[int]:
    """output_padding for each k3/s2/p1 transposed conv retracing conv_sizes(size) backwards:
    out = 2·in - 1 + output_padding, so 7->14 needs 1 and 14->27 needs 0."""
    sizes = conv_sizes(size, layers)[::-1]
    return [target - (2 * source - 1) for source, target in zip(sizes, sizes[1:])]


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module):
    """Momentum 0 while a checkpointed stage is recomputed in backward (and the batch counter put
    back), so BatchNorm's running statistics are updated once per step, as without checkpointing."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class Stages(nn.Sequential):
    """A sequence of stages that can recompute each stage in backward (gradient checkpointing)."""

    grad_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self:
            x = self.run(stage, x)
        return x

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, first to last (for skip connections)."""
        found = []
        for stage in self:
            x = self.run(stage, x)
            found.append(x)
        return found

    def run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # The compiled graph applies BatchNorm's buffer updates once whatever it recomputes.
                return checkpoint(stage, x, use_reentrant=False)
            return checkpoint(stage, x, use_reentrant=False,
                              context_fn=lambda s=stage: (contextlib.nullcontext(), frozen_batchnorm_stats(s)))
        return stage(x)


def down_stack(in_channels: int, channels: Sequence[int]) -> Stages:
    """Five conv(k3, s2, p1) + BatchNorm + ReLU stages."""
    stages, previous = [], in_channels
    for c in channels:
        stages.append(nn.Sequential(Conv2d(previous, c, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
        previous = c
    return Stages(*stages)


class Encoder(nn.Module):
    """Frame pair -> conv stack -> 1×1 conv to code_dim × 7 × 5. The pair enters as concat(t, t+1)
    (2C channels, the seed), concat(t, t+1 - t) (2C), or t+1 - t alone (C); see ModelConfig.encoder_input.
    With context 1 the previous change comes too: concat(t-1, t, t+1), concat(t, t+1 - t, t - (t-1))
    or concat(t+1 - t, t - (t-1)), C more channels."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_mode, self.context = config.encoder_input, config.context
        self.jitter = config.encoder_jitter
        frames_in = (1 if self.input_mode == "difference" else 2) + self.context
        self.stack = down_stack(frames_in * config.in_channels, config.channels)
        # per cell, how well each whole-pixel move explains the change (model/motion.match_features),
        # beside the conv features: the move, wherever in the cell it happens
        self.match_shifts = match_shifts(*MATCH_REACH) if config.encoder_match else []
        self.project = Conv2d(config.channels[-1] + len(self.match_shifts), config.code_dim, 1)

    def forward(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.jitter:
            cur, nxt, prev = moved_across([cur, nxt, prev], self.jitter)
        features = self.stack(self.input(cur, nxt, prev))
        if self.match_shifts:
            matches = match_features(cur, nxt, self.match_shifts, tuple(features.shape[-2:]))
            features = torch.cat([features, matches.to(features.dtype)], dim=1)
        return self.project(features)

    def input(self, cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        if self.input_mode == "pair":
            parts = [prev, cur, nxt] if self.context else [cur, nxt]
        elif self.input_mode == "pair_difference":
            parts = [cur, nxt - cur] + ([cur - prev] if self.context else [])
        else:
            parts = [nxt - cur] + ([cur - prev] if self.context else [])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def moved_across(frames: list[torch.Tensor | None], reach: int) -> list[torch.Tensor | None]:
    """The same frames, each sample moved across by its own random whole-pixel shift in [-reach,
    reach] (zeros shifted in); one shift per sample for all of its frames. The encoder sees its
    pair moved, the decoder the frame as it is: a code that names where the paddle lands is then
    off by the shift, one that names how far it moved is not (ModelConfig.encoder_jitter)."""
    first = next(f for f in frames if f is not None)
    batch, width = first.shape[0], first.shape[-1]
    shift = torch.randint(-reach, reach + 1, (batch, 1), device=first.device)
    source = torch.arange(width, device=first.device) - shift                   # (B, W): out[x] = in[x - s]
    inside = ((source >= 0) & (source < width)).view(batch, 1, 1, width)
    index = source.clamp(0, width - 1).view(batch, 1, 1, width)
    return [None if f is None else f.gather(-1, index.expand_as(f)) * inside.to(f.dtype) for f in frames]


class FiLM(nn.Module):
    """Per-cell scale and shift of the frame features from the quantised latent. γ starts at 0
    (1 + γ multiplies), so an untrained FiLM passes the frame features through. On a finer stage
    each cell's scale and shift cover its own patch (nearest upsampling); they are computed on the
    7 × 5 grid first, as a 1 × 1 conv commutes with that upsampling: convolving the upsampled
    128-channel latent instead took a third of a training step at 105 × 80."""

    def __init__(self, code_dim: int, features: int):
        super().__init__()
        self.to_scale_shift = Conv2d(code_dim, 2 * features, 1)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, features: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        scale_shift = self.to_scale_shift(latent.to(features.dtype))
        if scale_shift.shape[-2:] == features.shape[-2:]:
            gamma, beta = scale_shift.chunk(2, dim=1)
            return features * (1 + gamma) + beta
        rows, run = nearest_layout(tuple(scale_shift.shape[-2:]), tuple(features.shape[-2:]), features.device)
        if run is None:
            gamma, beta = F.interpolate(scale_shift, size=features.shape[-2:], mode="nearest").chunk(2, dim=1)
            return features * (1 + gamma) + beta
        # Nearest upsampling without making it: each output row takes its cell row's values
        # (index_select, small), and each run of `run` columns shares one cell, so the scale and shift
        # broadcast over it. The same values as interpolate's, without the full-size scale/shift (and
        # its backward: a full-size cat and a pooling) that took a fifth of a training step on a CPU.
        batch, channels, height, width = features.shape
        if layout_of(features) == torch.channels_last:
            # Channels-last features, seen as they lie, (B, H, W / run, run, C): the scale and shift
            # broadcast over each run with the channels innermost. The NCHW view
            # below on NHWC memory made each pass stride across channels: 5x slower forward on a CPU.
            gamma, beta = scale_shift.index_select(2, rows).permute(0, 2, 3, 1).unsqueeze(3).chunk(2, dim=-1)
            cells = features.permute(0, 2, 3, 1).view(batch, height, width // run, run, channels)
            return (cells * (1 + gamma) + beta).view(batch, height, width, channels).permute(0, 3, 1, 2)
        gamma, beta = scale_shift.index_select(2, rows).unsqueeze(-1).chunk(2, dim=1)
        cells = features.view(batch, channels, height, width // run, run)
        return (cells * (1 + gamma) + beta).view(batch, channels, height, width)


def nearest_layout(grid: tuple[int, int], size: tuple[int, int], device: torch.device
                   ) -> tuple[torch.Tensor, int | None]:
    """For nearest upsampling from `grid` to `size` (F.interpolate's own index rule): the grid row of
    every output row, and how many output columns share a grid column when they come in equal runs
    (None otherwise)."""
    rows, run = _nearest_sources(grid, size)
    # (traced by torch.compile, the tensor is made in the graph; asking for the mode there breaks it)
    inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
    return _index_tensor(rows, device, inference), run


@functools.lru_cache(maxsize=None)
def _index_tensor(values: tuple[int, ...], device: torch.device, inference: bool) -> torch.Tensor:
    """One tensor per layout and device, made once: not a host-to-device copy at every forward. One
    per mode too: a tensor made under inference_mode (extraction, evaluation) can never be saved for
    backward, and a process that evaluates and then trains would otherwise meet it in training."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=None)
def _nearest_sources(grid: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, ...], int | None]:
    """nearest_layout's numbers, computed by F.interpolate itself on index ramps (so its rounding is
    the rule), as plain ints."""
    def sources(cells: int, out: int) -> list[int]:
        index = torch.arange(cells, dtype=torch.float32).view(1, 1, cells)
        return F.interpolate(index, size=out, mode="nearest").view(out).long().tolist()

    rows, cols = sources(grid[0], size[0]), sources(grid[1], size[1])
    run = size[1] // grid[1]
    even = size[1] % grid[1] == 0 and cols == [column // run for column in range(size[1])]
    return tuple(rows), run if even else None


def fold_layouts_when_compiled() -> None:
    """Before torch.compile traces a model: nearest_layout's numbers, a pure function of the shapes, are
    taken as its result instead of traced (tracing the tensor ops inside breaks the graph). Marked by
    whoever compiles, not here at import: the mark imports torch._dynamo (1.5 s on a CPU), which
    extraction, evaluation and play never need."""
    torch.compiler.assume_constant_result(_nearest_sources.__wrapped__)


class Decoder(nn.Module):
    """Frame t -> its own conv stack (512 × 7 × 5) -> FiLM from the quantised latent -> five
    transposed convs 512 -> 512 -> 256 -> 128 -> 64 -> C -> the output. No skip connections from the
    encoder: what frame t+1 has that frame t lacks must pass through the codes.

    ModelConfig decides: `decoder_skips` adds the frame stack's own features to the upsampling stage
    of the same resolution (they carry frame t only); `latent_every_stage` FiLMs every upsampling
    stage with the latent (a cell's code governs its own patch); `context` 1 feeds the frame stack
    concat(t, t - (t-1)) instead of t (what moved last step, nothing of t+1); `output` is a sigmoid
    (the seed), clamp(frame t + change) ("residual"), or clamp(frame t moved block by block + change)
    ("shift", model/motion.py), the blocks being the cells of inner stage `shift.stage`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        channels, code_dim = config.channels, config.code_dim
        self.skips, self.output, self.context = config.decoder_skips, config.output, config.context
        self.frame_stack = down_stack((1 + self.context) * config.in_channels, channels)
        self.film = FiLM(code_dim, channels[-1])
        widths = [channels[-1], *reversed(channels[:-1]), config.in_channels]     # 512, 512, 256, 128, 64, C
        pads = list(zip(output_paddings(FRAME_HEIGHT), output_paddings(FRAME_WIDTH)))
        stages = []
        for i, (source, target) in enumerate(zip(widths, widths[1:])):
            up = ConvTranspose2d(source, target, 3, stride=2, padding=1, output_padding=pads[i],
                                    bias=i == len(pads) - 1)
            last = i == len(pads) - 1
            stages.append(nn.Sequential(up) if last else nn.Sequential(up, nn.BatchNorm2d(target), nn.ReLU(inplace=True)))
        self.up_stack = Stages(*stages)
        # One FiLM after each inner upsampling stage (14×10 .. 105×80).
        self.stage_films = (nn.ModuleList(FiLM(code_dim, w) for w in widths[1:-1]) if config.latent_every_stage
                            else None)
        shift = config.shift
        self.motion_stage = shift.stage if shift else None
        self.shift_indexed_by = shift.indexed_by if shift else None
        self.shift_head = (ShiftHead(widths[1 + shift.stage], shift.max_x, shift.max_y, shift.grid,
                                     code_dim if shift.code_vote else 0) if shift else None)
        if self.output != "sigmoid":
            # The change starts at zero: an untrained model copies frame t (33 dB) instead of
            # having to learn to redraw the whole screen first.
            nn.init.zeros_(self.up_stack[-1][0].weight)
            nn.init.zeros_(self.up_stack[-1][0].bias)

    def frame_input(self, cur: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([cur, cur - prev], dim=1) if self.context else cur

    def forward(self, cur: torch.Tensor, latent: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        frame_features = self.frame_stack.outputs(self.frame_input(cur, prev))   # 105×80, 53×40, 27×20, 14×10, 7×5
        x = self.film(frame_features[-1], latent)
        inner, shifts = len(self.up_stack) - 1, None
        for i, stage in enumerate(self.up_stack):
            x = self.up_stack.run(stage, x)
            if i == inner:
                break
            if self.skips:
                x = x + frame_features[inner - 1 - i]
            if self.stage_films is not None:
                x = self.stage_films[i](x, latent)
            if i == self.motion_stage:
                shifts = self.shift_head(x, latent)
        if self.output == "shift":
            return (shift_frame(cur, shifts, self.shift_indexed_by) + x.float()).clamp(0, 1)
        if self.output == "residual":
            return (cur + x).clamp(0, 1)
        return torch.sigmoid(x)
