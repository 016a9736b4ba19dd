"""Evaluation numbers: reconstruction quality over a whole split, codebook usage, and per-element
errors (ball, paddle, bricks) of a predicted frame against the true one.

Conventions (DESIGN, "Evaluation"): frames in [0, 1] in the model's colour mode; PSNR is
10·log10(1 / MSE) with the MSE taken over every pixel of the split (sums accumulated across batches,
never a mean of per-batch PSNRs, which would weight easy batches up); L2 is that MSE, L1 the mean
absolute error over the split; SSIM is the mean over frames (torchmetrics' definition and defaults,
computed here: `ssim_per_frame`); `psnr_changed` is the PSNR over the pixels where frame t and
frame t+1 differ, the ones a model must get right to beat copying frame t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from evaluation.events import Elements, bricks_broken


# SSIM as torchmetrics' StructuralSimilarityIndexMeasure computes it by default: a Gaussian window of
# sigma 1.5 over int(3.5 * 1.5 + 0.5) * 2 + 1 = 11 taps, reflect padding, k1 0.01, k2 0.03.
SSIM_SIGMA, SSIM_TAPS, SSIM_K1, SSIM_K2 = 1.5, 11, 0.01, 0.03


def psnr_from_mse(mse: float) -> float | None:
    """10·log10(1/MSE) for frames in [0, 1]; None (JSON null) for a perfect match, where it is infinite."""
    return None if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def gaussian_taps(taps: int = SSIM_TAPS, sigma: float = SSIM_SIGMA) -> list[float]:
    """The normalised 1-D Gaussian (torchmetrics' `_gaussian`, in float32 as it computes it)."""
    offsets = torch.arange((1 - taps) / 2, (1 + taps) / 2, 1, dtype=torch.float32)
    weights = torch.exp(-torch.pow(offsets / sigma, 2) / 2)
    return (weights / weights.sum()).tolist()


def _gaussian_along(x: torch.Tensor, dim: int, taps: Sequence[float]) -> torch.Tensor:
    """`x` filtered along `dim` by `taps` without padding (the output is len(taps) - 1 shorter)."""
    size = x.shape[dim] - len(taps) + 1
    out = x.narrow(dim, 0, size) * taps[0]
    for offset, weight in enumerate(taps[1:], 1):
        out.add_(x.narrow(dim, offset, size), alpha=weight)
    return out


@torch.no_grad()
def ssim_per_frame(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame, float (B, C, H, W) in [0, 1] (data range 1) -> (B,): the mean over its
    pixels and channels of torchmetrics' SSIM map. The 11 x 11 Gaussian window is separable, so it is
    applied as two passes of 11 shifted adds instead of a 121-tap convolution: 3.5x faster on a CPU
    (BENCHMARKS.md "Stages"), and closer to the float64 result (within 2e-6 per frame on Breakout
    frames, where torchmetrics' own float32 result is within 4e-5)."""
    taps = gaussian_taps()
    pad = (len(taps) - 1) // 2
    pred, target = (F.pad(frames.float(), (pad, pad, pad, pad), mode="reflect") for frames in (pred, target))
    stacked = torch.cat((pred, target, pred * pred, target * target, pred * target))
    mu_pred, mu_target, pred_sq, target_sq, pred_target = _gaussian_along(
        _gaussian_along(stacked, -1, taps), -2, taps).split(len(pred))
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_pred_sq, mu_target_sq, mu_both = mu_pred.pow(2), mu_target.pow(2), mu_pred * mu_target
    sigma_pred_sq = torch.clamp(pred_sq - mu_pred_sq, min=0.0)
    sigma_target_sq = torch.clamp(target_sq - mu_target_sq, min=0.0)
    upper = 2 * (pred_target - mu_both) + c2
    lower = sigma_pred_sq + sigma_target_sq + c2
    ssim = ((2 * mu_both + c1) * upper) / ((mu_pred_sq + mu_target_sq + c1) * lower)
    return ssim.flatten(1).mean(-1)


class ReconstructionMeter:
    """PSNR, SSIM, L1, L2 and changed-pixel PSNR of predictions of frame t+1, accumulated over a split.
    The trainer's validation and evaluate.py both use it; under DDP `compute()` sums every rank's
    share (each rank must call it)."""

    def __init__(self, device: str | torch.device = "cpu", ssim: bool = True):
        # here, not at the top: torchmetrics loads matplotlib, which the trainer's import should not
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)       # sums SSE and count: whole-split MSE
        # SSIM's Gaussian filtering is most of the metric cost on a CPU: optional
        self.ssim = ssim
        # |error| sum, pixels, changed-pixel squared error sum, changed pixels, per-frame SSIM sum, frames;
        # float64 as they grow large
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, cur: torch.Tensor) -> None:
        """pred, target, cur: float (B, C, H, W) in [0, 1]; `cur` (frame t) marks the changed pixels."""
        pred, target = pred.float().clamp(0, 1), target.float()
        self.psnr.update(pred, target)
        ssim = (ssim_per_frame(pred, target) if self.ssim else pred.new_zeros(0)).sum(dtype=torch.float64)
        error = pred - target
        changed = cur.float() != target
        count = lambda n: error.new_tensor(n, dtype=torch.float64)   # noqa: E731
        self.sums += torch.stack([error.abs().sum(dtype=torch.float64), count(error.numel()),
                                  error[changed].pow(2).sum(dtype=torch.float64), changed.sum(dtype=torch.float64),
                                  ssim, count(len(pred))])

    def compute(self) -> dict[str, float | None]:
        abs_error, pixels, changed_sq_error, changed_pixels, ssim_sum, frames = self._summed()
        if pixels == 0:
            raise ValueError("no frames were scored")
        with self.psnr.sync_context():                 # every rank's SSE and count (a no-op on one process)
            mse = float(self.psnr.sum_squared_error) / float(self.psnr.total)
        return {"psnr": psnr_from_mse(mse), "ssim": ssim_sum / frames if self.ssim else None,
                "l1": abs_error / pixels, "l2": mse,
                "psnr_changed": psnr_from_mse(changed_sq_error / changed_pixels) if changed_pixels else None}

    def changed_fraction(self) -> float:
        """The share of pixels that differ between frame t and the target: the part copying gets wrong."""
        _, pixels, _, changed_pixels, _, _ = self._summed()
        return changed_pixels / pixels if pixels else 0.0

    def _summed(self) -> list[float]:
        """The sums, every rank's share added under DDP (each rank must call it)."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        return sums.tolist()


# ----------------------------------------------------------------------------------- codebook
def code_counts(codes: torch.Tensor | np.ndarray, codebook_size: int) -> np.ndarray:
    """How often each code index occurs in `codes` (any shape), int64 (codebook_size,)."""
    flat = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes).ravel().astype(np.int64)
    return np.bincount(flat, minlength=codebook_size)[:codebook_size]


def codebook_stats(counts: np.ndarray) -> dict:
    """Fraction of codes used at least once and the perplexity exp(H) of the code distribution
    (1 when one code does everything, codebook_size when all are used equally)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum()
    if total == 0:
        raise ValueError("no codes were counted")
    p = counts[counts > 0] / total
    return {"used_fraction": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "counts": counts.tolist()}


# ----------------------------------------------------------------------------------- elements
def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


@dataclass
class ElementMeter:
    """Ball, paddle and brick errors of one kind of prediction (the model's, or copying frame t),
    detected from pixels in the predicted and the true frame t+1 (`evaluation.events`)."""

    tolerance_px: int = 2
    paddle_errors: list = field(default_factory=list)       # |x error| per pair where both show a paddle
    paddle_pairs: int = 0
    paddle_missing: int = 0
    paddle_moved: int = 0
    paddle_moved_hits: int = 0
    ball_errors: list = field(default_factory=list)         # distance per pair where both show the ball
    ball_pairs: int = 0
    ball_missing: int = 0
    ball_spurious: int = 0
    no_ball_pairs: int = 0
    brick_cells_equal: int = 0
    brick_cells: int = 0
    brick_maps_equal: int = 0
    brick_pairs: int = 0
    broken_pairs: int = 0
    broken_shown: int = 0
    bricks_broken_true: int = 0                             # bricks present in frame t, gone in the true t+1
    bricks_broken_pred: int = 0                             # ... gone in the prediction

    @classmethod
    def merged(cls, meters: Sequence["ElementMeter"]) -> "ElementMeter":
        """One meter holding what all of `meters` saw (DDP ranks' shares, in rank order): counts add,
        per-pair errors are joined in order, so the means are those of one pass over the split."""
        joined = cls(tolerance_px=meters[0].tolerance_px)
        for meter in meters:
            for name in (f.name for f in fields(cls) if f.name != "tolerance_px"):
                setattr(joined, name, getattr(joined, name) + getattr(meter, name))
        return joined

    def update(self, pred: Elements, truth: Elements, cur: Elements) -> None:
        self._update_paddle(pred, truth, cur)
        self._update_ball(pred, truth)
        self._update_bricks(pred, truth, cur)

    def _update_paddle(self, pred: Elements, truth: Elements, cur: Elements) -> None:
        if truth.paddle_x is None:
            return
        self.paddle_pairs += 1
        moved = cur.paddle_x is not None and cur.paddle_x != truth.paddle_x
        self.paddle_moved += moved
        if pred.paddle_x is None:
            self.paddle_missing += 1
            return
        error = abs(pred.paddle_x - truth.paddle_x)
        self.paddle_errors.append(error)
        self.paddle_moved_hits += moved and error <= self.tolerance_px

    def _update_ball(self, pred: Elements, truth: Elements) -> None:
        if truth.ball is None:
            self.no_ball_pairs += 1
            self.ball_spurious += pred.ball is not None
            return
        self.ball_pairs += 1
        if pred.ball is None:
            self.ball_missing += 1
            return
        self.ball_errors.append(math.dist(pred.ball, truth.ball))

    def _update_bricks(self, pred: Elements, truth: Elements, cur: Elements) -> None:
        equal = pred.bricks == truth.bricks
        self.brick_cells_equal += int(equal.sum())
        self.brick_cells += equal.size
        self.brick_maps_equal += bool(equal.all())
        self.brick_pairs += 1
        self.bricks_broken_true += bricks_broken(cur, truth)
        self.bricks_broken_pred += bricks_broken(cur, pred)
        broken = cur.bricks & ~truth.bricks
        if broken.any():
            self.broken_pairs += 1
            self.broken_shown += bool((~pred.bricks[broken]).all())

    def compute(self) -> dict:
        tol = self.tolerance_px
        paddle_errors, ball_errors = np.array(self.paddle_errors, float), np.array(self.ball_errors, float)
        return {
            "paddle": {"pairs": self.paddle_pairs,
                       "mean_abs_error_px": float(paddle_errors.mean()) if paddle_errors.size else None,
                       f"within_{tol}px": _rate(int((paddle_errors <= tol).sum()), self.paddle_pairs),
                       "missing": _rate(self.paddle_missing, self.paddle_pairs),
                       "moved_pairs": self.paddle_moved,
                       f"moved_within_{tol}px": _rate(self.paddle_moved_hits, self.paddle_moved)},
            "ball": {"pairs": self.ball_pairs,
                     "mean_error_px": float(ball_errors.mean()) if ball_errors.size else None,
                     f"within_{tol}px": _rate(int((ball_errors <= tol).sum()), self.ball_pairs),
                     "missing": _rate(self.ball_missing, self.ball_pairs),
                     "spurious": _rate(self.ball_spurious, self.no_ball_pairs)},
            "bricks": {"pairs": self.brick_pairs,
                       "cell_accuracy": _rate(self.brick_cells_equal, self.brick_cells),
                       "map_accuracy": _rate(self.brick_maps_equal, self.brick_pairs),
                       "broken_pairs": self.broken_pairs,
                       "broken_shown": _rate(self.broken_shown, self.broken_pairs),
                       "broken_per_pair": _rate(self.bricks_broken_true, self.brick_pairs),
                       "broken_per_pair_pred": _rate(self.bricks_broken_pred, self.brick_pairs)},
        }
