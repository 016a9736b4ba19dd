"""evaluation/metrics.py against hand-computed values: whole-split PSNR, changed-pixel PSNR, SSIM,
codebook usage and per-element errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation.events import Elements
from evaluation.metrics import ElementMeter, ReconstructionMeter, code_counts, codebook_stats, psnr_from_mse


def test_psnr_uses_the_whole_split_mse_not_a_mean_of_batches():
    target = torch.zeros(3, 1, 16, 16)
    cur = torch.zeros(3, 1, 16, 16)
    pred = torch.zeros(3, 1, 16, 16)
    pred[0] = 0.1                       # batch 1: one frame off by 0.1 everywhere
    pred[1, :, 0, 0] = 0.1              # batch 2: two frames, one pixel off by 0.1
    meter = ReconstructionMeter()
    meter.update(pred[:1], target[:1], cur[:1])
    meter.update(pred[1:], target[1:], cur[1:])
    got = meter.compute()
    pixels = 3 * 16 * 16
    mse = (256 * 0.01 + 0.01) / pixels
    assert got["l2"] == pytest.approx(mse, rel=1e-6)
    assert got["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    per_batch = np.mean([10 * math.log10(1 / 0.01), 10 * math.log10(1 / (0.01 / 512))])
    assert abs(got["psnr"] - per_batch) > 5          # the two conventions really differ here
    assert got["l1"] == pytest.approx((256 * 0.1 + 0.1) / pixels, rel=1e-6)


def test_psnr_on_changed_pixels_only():
    cur = torch.zeros(1, 1, 16, 16)
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 0, :2] = 1.0            # two pixels change between t and t+1
    pred = target.clone()
    pred[0, 0, 0, 0] = 0.5               # one of them predicted half-way
    pred[0, 0, 5, 5] = 0.2               # an error on an unchanged pixel does not count here
    meter = ReconstructionMeter()
    meter.update(pred, target, cur)
    got = meter.compute()
    assert got["psnr_changed"] == pytest.approx(10 * math.log10(1 / (0.25 / 2)), rel=1e-6)
    copy = ReconstructionMeter()
    copy.update(cur, target, cur)
    assert copy.compute()["psnr_changed"] == pytest.approx(0.0, abs=1e-9)   # MSE 1 on the changed pixels


def test_perfect_prediction_and_ssim():
    frames = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    meter = ReconstructionMeter()
    meter.update(frames, frames, frames)
    got = meter.compute()
    assert got["psnr"] is None and got["psnr_changed"] is None        # infinite: JSON null
    assert got["ssim"] == pytest.approx(1.0, abs=1e-5) and got["l1"] == 0
    assert psnr_from_mse(0.01) == pytest.approx(20.0)


def test_codebook_usage_and_perplexity():
    half = codebook_stats(np.array([5, 5, 0, 0]))
    assert half["used_fraction"] == 0.5 and half["perplexity"] == pytest.approx(2.0)
    assert codebook_stats(np.array([7, 0, 0, 0]))["perplexity"] == pytest.approx(1.0)
    assert codebook_stats(np.ones(256, int))["perplexity"] == pytest.approx(256.0)
    skewed = codebook_stats(np.array([3, 1]))
    p = np.array([0.75, 0.25])
    assert skewed["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    counts = code_counts(torch.tensor([[0, 3], [3, 3]]), 4)
    assert counts.tolist() == [1, 0, 0, 3]


def test_element_errors():
    bricks = np.ones((6, 18), bool)
    broken = bricks.copy()
    broken[2, 3] = False
    cur = Elements(paddle_x=50, ball=(60, 100), bricks=bricks)
    truth = Elements(paddle_x=54, ball=(63, 104), bricks=broken)
    pred = Elements(paddle_x=55, ball=None, bricks=bricks)
    meter = ElementMeter()
    meter.update(pred, truth, cur)
    meter.update(truth, truth, cur)                   # a perfect prediction
    got = meter.compute()
    assert got["paddle"]["mean_abs_error_px"] == 0.5 and got["paddle"]["within_2px"] == 1.0
    assert got["paddle"]["moved_pairs"] == 2 and got["paddle"]["moved_within_2px"] == 1.0
    assert got["ball"]["missing"] == 0.5 and got["ball"]["within_2px"] == 0.5 and got["ball"]["mean_error_px"] == 0
    assert got["bricks"]["broken_pairs"] == 2 and got["bricks"]["broken_shown"] == 0.5
    assert got["bricks"]["cell_accuracy"] == pytest.approx((107 + 108) / 216)
    assert got["bricks"]["map_accuracy"] == 0.5


def breakout_like_frames(seed: int) -> torch.Tensor:
    """Black frames with a few bright blocks (bricks, a paddle, a ball), as the metrics see them."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.zeros(3, 1, 64, 48)
    for _ in range(12):
        y, x = torch.randint(0, 58, (1,), generator=generator), torch.randint(0, 40, (1,), generator=generator)
        frames[:, :, y:y + 4, x:x + 8] = torch.rand(1, generator=generator)
    return frames


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_is_torchmetrics_ssim_within_float_rounding(channels):
    """The separable SSIM gives torchmetrics' numbers (its defaults, data range 1): within float32
    rounding of them, and nearer their float64 result than their own float32 result is."""
    from torchmetrics.functional.image.ssim import _ssim_update

    from evaluation.metrics import ssim_per_frame

    target = breakout_like_frames(0).repeat(1, channels, 1, 1)
    generator = torch.Generator().manual_seed(1)
    for pred in (target.roll(3, dims=-1), (target + 0.03 * torch.randn(target.shape, generator=generator)).clamp(0, 1),
                 breakout_like_frames(2).repeat(1, channels, 1, 1)):
        mine = ssim_per_frame(pred, target)
        theirs = _ssim_update(pred, target, data_range=1.0)
        exact = _ssim_update(pred.double(), target.double(), data_range=1.0)
        assert mine.shape == (3,)
        assert torch.allclose(mine.double(), theirs.double(), atol=1e-4)
        assert (mine.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + 1e-6


def test_the_meter_averages_ssim_over_frames_across_batches():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    target, pred = breakout_like_frames(3), breakout_like_frames(4)
    meter, reference = ReconstructionMeter(), StructuralSimilarityIndexMeasure(data_range=1.0)
    for rows in (slice(0, 1), slice(1, 3)):
        meter.update(pred[rows], target[rows], target[rows])
        reference.update(pred[rows], target[rows])
    assert meter.compute()["ssim"] == pytest.approx(float(reference.compute()), abs=1e-5)
    without = ReconstructionMeter(ssim=False)
    without.update(pred, target, target)
    assert without.compute()["ssim"] is None



@pytest.mark.parametrize("channels", [1, 3])
def test_the_reconstruction_grid_shows_every_frame_at_its_own_pixels(channels, tmp_path):
    """A one-pixel miss must stay visible: each row holds frame t, frame t+1 and the prediction
    unresampled (their exact bytes), and the error map of a perfect prediction is one flat colour,
    the heat map's zero."""
    import matplotlib
    from PIL import Image

    from evaluation.examples import Example
    from evaluation.figures import reconstruction_grid

    rng = np.random.default_rng(0)
    shape = (21, 16) if channels == 1 else (21, 16, 3)
    frames = [rng.integers(0, 256, shape).astype(np.float32) / 255 for _ in range(6)]
    examples = [Example(f"00001_{i:06d}", frames[i], frames[i + 1], frames[i + 1], 1) for i in (0, 2, 4)]
    grid = np.asarray(Image.open(reconstruction_grid(examples, tmp_path / "grid.png")).convert("RGB"))

    def places(tile: np.ndarray) -> int:
        """How often `tile` (h, w, 3 uint8) appears in the grid, pixel for pixel."""
        h, w = tile.shape[:2]
        windows = np.lib.stride_tricks.sliding_window_view(grid, (h, w, 3))[..., 0, :, :, :]
        return int(np.all(windows == tile, axis=(-3, -2, -1)).sum())

    def as_tile(frame: np.ndarray) -> np.ndarray:
        return np.round((np.repeat(frame[..., None], 3, -1) if frame.ndim == 2 else frame) * 255).astype(np.uint8)

    for example in examples:
        assert places(as_tile(example.cur)) == 1, example.key
        assert places(as_tile(example.next)) == 2, example.key          # frame t+1 and the prediction
    zero = np.round(np.asarray(matplotlib.colormaps["inferno"](0.0)[:3]) * 255).astype(np.uint8)
    assert places(np.broadcast_to(zero, (*shape[:2], 3))) == len(examples)
