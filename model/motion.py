"""A decoder output that moves the pixels of frame t (ModelConfig.output = "shift").

Breakout's moving things are small, bright and rigid: a 16 × 4 px paddle that moves up to 24 px
across in one step, a 2 × 4 px ball that moves 2–8 px each way. A decoder that must *draw* them at
their new place from FiLM-ed features learns to erase them instead (a squared loss pays best for
drawing nothing where the place is uncertain). This head lets it *copy* them: for every block of
the frame (7 × 8 px when the 27 × 20 decoder stage chooses) it predicts where the block's
pixels come from, as a softmax over whole-pixel shifts, across (±max_x) then down (±max_y), and
gathers frame t accordingly. Identity (shift 0) keeps a block as it was, so static content needs no
mask; what appears from nothing (score digits, a broken brick's black) is the residual's job.

Why a softmax over shifts and not a warp field (grid_sample): a bilinear warp sees only its four
neighbours, so over a black background a paddle 22 px away gives it no gradient at all. The softmax
scores every shift on every step, and the right one lowers the loss wherever the object lands.
Shifts are per destination block, so pred(p) = Σ_dy v_p(dy) Σ_dx h_q(dx) t(q_y, q_x − dx) with
q = (p_y − dy, p_x): across first, then down (a separable approximation of the 2-D kernel that is
exact inside a block).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.conv import Conv2d

# How far the encoder's matching features test moves (ModelConfig.encoder_match): Breakout's paddle
# moves up to 24 px across in a step, the ball up to 8 px each way.
MATCH_REACH = (24, 8)


def shift_factors(reach: int) -> list[tuple[int, int]]:
    """Shifts up to ±`reach` px as a coarse shift plus a fine one, [(step, bins each side), ...]:
    ±24 is 7 steps of 7 px plus −3..3 (14 choices, not 49), ±8 is 3 steps of 3 px plus −1..1.
    Every shift in range is one (coarse, fine) pair, and the head is cheaper by the ratio."""
    if reach <= 3:
        return [(1, reach)]
    fine = max(1, round(math.sqrt(reach) / 1.5))
    step = 2 * fine + 1
    return [(step, math.ceil((reach - fine) / step)), (1, fine)]


class ShiftHead(nn.Module):
    """Features (B, F, h, w) of an inner decoder stage -> for each block of `grid` (a grid that divides
    the frame: 27 × 20 features choose for 30 × 20 blocks of 7 × 8 px), probabilities over the
    coarse and fine shifts across (±max_x) and down (±max_y); see `shift_factors`.

    Starts at identity with half of each factor's weight on shift 0: sharp enough that an untrained
    model still resembles frame t, spread enough that every shift has a gradient."""

    def __init__(self, features: int, max_x: int, max_y: int, grid: tuple[int, int], code_dim: int = 0):
        super().__init__()
        self.grid = tuple(grid)
        # (dim, step, bins each side) per factor: across first, then down
        self.factors = [(-1, step, side) for step, side in shift_factors(max_x) if side] + \
                       [(-2, step, side) for step, side in shift_factors(max_y) if side]
        self.sizes = [2 * side + 1 for _, _, side in self.factors]
        self.to_logits = Conv2d(features, max(1, sum(self.sizes)), 3, padding=1)
        nn.init.zeros_(self.to_logits.weight)
        bias, start = torch.zeros(self.to_logits.out_channels), 0
        for size in self.sizes:
            bias[start + size // 2] = math.log(size - 1)          # p(shift 0) = 1/2
            start += size
        with torch.no_grad():
            self.to_logits.bias.copy_(bias)
        # The codes' own say: a 3 x 3 conv over the code grid, so a block's shift can come from its
        # cell's code and its neighbours' (the paddle crosses cells), not only from what the decoder's
        # features make of frame t (which can guess a move from the scene and leave the codes idle).
        self.from_codes = Conv2d(code_dim, self.to_logits.out_channels, 3, padding=1) if code_dim else None
        if self.from_codes is not None:
            nn.init.zeros_(self.from_codes.weight)
            nn.init.zeros_(self.from_codes.bias)

    def forward(self, features: torch.Tensor, latent: torch.Tensor | None = None) -> list[tuple[int, int, torch.Tensor]]:
        """Features, and the quantised latent (B, D, 7, 5) when the head reads the codes ->
        [(dim, step, probabilities (B, bins, *grid) in fp32)] per factor, to apply in order."""
        logits = self.to_logits(features).float()
        if tuple(logits.shape[-2:]) != self.grid:
            logits = F.interpolate(logits, size=self.grid, mode="bilinear", align_corners=False)
        if self.from_codes is not None:
            logits = logits + F.interpolate(self.from_codes(latent.to(features.dtype)).float(), size=self.grid,
                                            mode="nearest")
        chunks = logits[:, :sum(self.sizes)].split(self.sizes, dim=1)
        return [(dim, step, chunk.softmax(1)) for (dim, step, _), chunk in zip(self.factors, chunks)]


def shift_frame(frame: torch.Tensor, factors: list[tuple[int, int, torch.Tensor]],
                indexed_by: str = "destination") -> torch.Tensor:
    """Frame (B, C, H, W) moved block by block, one factor after the other: each factor's
    probabilities (B, 2k+1, h, w) weigh shifts of step·(i − k) px along its dim (positive moves
    content right / down) for every block of an h × w grid that divides the frame. Pixels from
    outside the frame are 0, and so are the few a coarse step past the wanted shift pushed out of
    the frame before the fine step brought them back (Breakout's edges are walls and black).

    `indexed_by` says whose block the probabilities belong to (ShiftConfig.indexed_by):
    "destination", each block of the output chooses where its pixels come from (a gather, a backward
    warp); "source", each block of frame t chooses where its pixels go (a splat, a forward warp)."""
    out = frame.float()
    move = _gather_shifted if indexed_by == "destination" else _splat_shifted
    for dim, step, weights in factors:
        out = move(out, weights, dim, step)
    return out


def _gather_shifted(frame: torch.Tensor, weights: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """Σ_i weights[:, i] · frame shifted by step·(i − k) along `dim` (zeros shifted in). The weights
    broadcast over each block instead of being upsampled to the frame: a full-size copy per shift
    and its backward (a scatter-add) cost 20× the shifting itself on a CPU."""
    _check_blocks(frame, weights)
    return GatherShifted.apply(frame, weights, dim, step)


def _check_blocks(frame: torch.Tensor, weights: torch.Tensor) -> None:
    height, width = frame.shape[-2:]
    grid_h, grid_w = weights.shape[-2:]
    if height % grid_h or width % grid_w:
        raise ValueError(f"a {grid_h}x{grid_w} block grid does not divide a {height}x{width} frame")


class GatherShifted(torch.autograd.Function):
    """_gather_shifted with its backward written out. The op is memory-bound (each shift is a pass
    over the frame), and autograd's own backward of the plain loop made a zero-filled padded copy per
    shift for the frame's gradient and a product per shift for the weights'; here the frame's gradient
    is accumulated in place into one padded buffer, and the forward accumulates in place too.

    The frame is seen as rows of blocks, (B, C, grid_h, block_h, W), and each block's weight is
    repeated across its block_w columns once per call (`_per_row`), so every pass over the frame
    runs along whole rows: broadcasting one weight per block over 4-pixel runs made each pass 4x
    slower on a CPU. The op was a fifth of the demo model's training step; with the weights' gradient
    summed rows first it is 2.3x faster (BENCHMARKS.md, "Training step on a CPU"): the same output
    bits, the weights' gradient within float rounding (summed in another order)."""

    @staticmethod
    def forward(ctx, frame: torch.Tensor, weights: torch.Tensor, dim: int, step: int) -> torch.Tensor:
        rows, reach = _rows(frame.shape, weights), step * (weights.shape[1] // 2)
        padded = F.pad(frame, (reach, reach) if dim == -1 else (0, 0, reach, reach))
        per_row = _per_row(weights, frame.shape[-1])
        # promote_types of the dtypes, not result_type of the tensors: torch.compile traces the first
        # and breaks its graph at the second
        out = frame.new_empty(rows, dtype=torch.promote_types(frame.dtype, weights.dtype))
        for i in range(weights.shape[1]):
            # output[x] = frame[x − shift] = padded[x − shift + reach], shift = step·i − reach
            source = padded.narrow(dim, 2 * reach - step * i, frame.shape[dim]).view(rows)
            if i == 0:
                torch.mul(source, per_row[:, i], out=out)
            else:
                out.addcmul_(source, per_row[:, i])
        ctx.save_for_backward(padded, weights)
        ctx.dim, ctx.step, ctx.shape = dim, step, frame.shape
        return out.view(frame.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, weights = ctx.saved_tensors
        dim, step, shape = ctx.dim, ctx.step, ctx.shape
        rows, reach = _rows(shape, weights), step * (weights.shape[1] // 2)
        batch, bins, grid_h, grid_w = weights.shape
        grad = grad.contiguous().view(rows)
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[1] else None
        grad_padded = torch.zeros_like(padded, dtype=grad.dtype) if ctx.needs_input_grad[0] else None
        per_row = _per_row(weights, shape[-1]) if grad_padded is not None else None
        product = grad.new_empty(rows) if grad_weights is not None else None
        for i in range(bins):
            offset = 2 * reach - step * i
            if grad_weights is not None:
                # One reused buffer, summed over the block's rows (a pass along whole rows), then its
                # columns, then the channels: 3x faster than one .sum over interleaved dims.
                torch.mul(grad, padded.narrow(dim, offset, shape[dim]).view(rows), out=product)
                grad_weights[:, i] = product.sum(3).view(batch, shape[1], grid_h, grid_w, -1).sum(-1).sum(1)
            if grad_padded is not None:
                grad_padded.narrow(dim, offset, shape[dim]).view(rows).addcmul_(grad, per_row[:, i])
        grad_frame = None if grad_padded is None else grad_padded.narrow(dim, reach, shape[dim])
        return grad_frame, grad_weights, None, None


def _splat_shifted(frame: torch.Tensor, weights: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """Σ_i frame · weights[:, i] (the weight of the block each pixel starts in), shifted by
    step·(i − k) along `dim`: what leaves the frame is dropped, what nothing moved into is 0."""
    _check_blocks(frame, weights)
    return SplatShifted.apply(frame, weights, dim, step)


class SplatShifted(torch.autograd.Function):
    """_splat_shifted, the transpose of GatherShifted: the same passes along whole rows of blocks,
    with the weights read where a pixel starts instead of where it lands. Why a model would want it:
    a block of frame t knows what it holds (the paddle, a wall), so "the paddle's blocks move d px"
    needs only the move d from the codes, where a gather's destination blocks must also know where
    the paddle lands (docs/model.md, "Codes that name the move")."""

    @staticmethod
    def forward(ctx, frame: torch.Tensor, weights: torch.Tensor, dim: int, step: int) -> torch.Tensor:
        rows, reach = _rows(frame.shape, weights), step * (weights.shape[1] // 2)
        size = frame.shape[dim]
        out_shape = list(frame.shape)
        out_shape[dim] += 2 * reach
        padded = frame.new_zeros(out_shape, dtype=torch.promote_types(frame.dtype, weights.dtype))
        per_row = _per_row(weights, frame.shape[-1])
        source = frame.contiguous().view(rows)
        for i in range(weights.shape[1]):
            # a pixel at x lands at x + shift = padded[x + shift + reach], shift + reach = step·i
            padded.narrow(dim, step * i, size).view(rows).addcmul_(source, per_row[:, i])
        ctx.save_for_backward(frame, weights)
        ctx.dim, ctx.step = dim, step
        return padded.narrow(dim, reach, size).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        frame, weights = ctx.saved_tensors
        dim, step = ctx.dim, ctx.step
        rows, reach = _rows(frame.shape, weights), step * (weights.shape[1] // 2)
        batch, bins, grid_h, grid_w = weights.shape
        size = frame.shape[dim]
        padded = F.pad(grad, (reach, reach) if dim == -1 else (0, 0, reach, reach))
        source = frame.contiguous().view(rows)
        grad_frame = torch.zeros_like(source, dtype=grad.dtype) if ctx.needs_input_grad[0] else None
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[1] else None
        per_row = _per_row(weights, frame.shape[-1]) if grad_frame is not None else None
        product = grad.new_empty(rows) if grad_weights is not None else None
        for i in range(bins):
            landed = padded.narrow(dim, step * i, size).view(rows)
            if grad_weights is not None:
                torch.mul(landed, source, out=product)
                grad_weights[:, i] = product.sum(3).view(batch, frame.shape[1], grid_h, grid_w, -1).sum(-1).sum(1)
            if grad_frame is not None:
                grad_frame.addcmul_(landed, per_row[:, i])
        return None if grad_frame is None else grad_frame.view(frame.shape), grad_weights, None, None


def _rows(shape: torch.Size, weights: torch.Tensor) -> tuple[int, ...]:
    """(B, C, grid_h, block_h, W): a frame of `shape` seen as rows of blocks."""
    batch, channels, height, width = shape
    return batch, channels, weights.shape[-2], height // weights.shape[-2], width


def _per_row(weights: torch.Tensor, width: int) -> torch.Tensor:
    """(B, bins, h, w) -> (B, bins, 1, h, 1, width): each block's weight repeated across its columns,
    to multiply a frame seen as `_rows` (broadcast over the channels and the block's rows)."""
    batch, bins, grid_h, grid_w = weights.shape
    return weights.unsqueeze(-1).expand(batch, bins, grid_h, grid_w, width // grid_w).reshape(
        batch, bins, 1, grid_h, 1, width)


# ------------------------------------------------------------------------------------ matching
def match_shifts(max_x: int, max_y: int) -> list[tuple[int, int]]:
    """Candidate moves (dx, dy) the encoder's matching features test: every shift across (the paddle
    moves 0..24 px in whole pixels, only across), and a lattice of even shifts that also go down
    (the ball moves ±2..8 px each way, in even steps)."""
    across = [(dx, 0) for dx in range(-max_x, max_x + 1)]
    reach_x, reach_y = min(max_x, max_y) // 2 * 2, max_y // 2 * 2
    both = [(dx, dy) for dy in range(-reach_y, reach_y + 1, 2) if dy for dx in range(-reach_x, reach_x + 1, 2)]
    return across + both


@torch.no_grad()
def match_features(cur: torch.Tensor, nxt: torch.Tensor, shifts: list[tuple[int, int]],
                   grid: tuple[int, int]) -> torch.Tensor:
    """How well each candidate move explains each cell's change, (B, len(shifts), *grid) in [−1, 1]:
    with a = mean |t+1 − t| over the cell and b = mean |t+1 − (t moved by s)|, (a − b) / (a + b):
    1 when s explains the change exactly, 0 when it does no better than no move (and wherever
    nothing changed), towards −1 when it only makes things worse.

    Why: a cell's code must name how far the paddle moved, not where it is. The encoder's convs see
    a moved paddle as a change at some position; these features are the same wherever in the cell
    the move happens (FlowNet's correlation layer, with whole-pixel moves and cell pooling)."""
    cur, nxt = cur.float().mean(1, keepdim=True), nxt.float().mean(1, keepdim=True)
    height, width = cur.shape[-2:]
    reach_x = max(abs(dx) for dx, _ in shifts)
    reach_y = max(abs(dy) for _, dy in shifts)
    padded = F.pad(cur, (reach_x, reach_x, reach_y, reach_y))
    cell = (height // grid[0], width // grid[1])
    costs = [F.avg_pool2d((nxt - padded[..., reach_y - dy:reach_y - dy + height, reach_x - dx:reach_x - dx + width]).abs(),
                          cell) for dx, dy in shifts]
    still = F.avg_pool2d((nxt - cur).abs(), cell)
    moved = torch.cat(costs, dim=1)
    return (still - moved) / (still + moved + 1e-4)
