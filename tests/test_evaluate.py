"""Evaluation: metric functions against hand-computed values, and evaluate.py end to end (metrics.json
schema, figures, report wording, the side-by-side summary, clear errors)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from _latent import extracted_latents
from pipeline.code_analysis import cell_nmi, one_hot_codes, visible_effect
from pipeline.events import Elements
from pipeline.frames import to_model_input
from pipeline.metrics import ElementMeter, ReconstructionMeter, codebook_stats, code_counts, psnr_from_mse
from pipeline.shards import iter_samples, sha256_file


# ----------------------------------------------------------------------------- metric functions
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


def test_code_analysis_helpers():
    codes = np.zeros((40, 7, 5), np.int64)
    labels = np.array(["left", "right"] * 20)
    codes[:, 3, 2] = np.where(labels == "left", 7, 9)        # one cell determines the event
    nmi = cell_nmi(codes, labels)
    assert nmi[3, 2] == pytest.approx(1.0) and nmi.sum() == pytest.approx(1.0)
    hot = one_hot_codes(codes[:2], 256)
    assert hot.shape == (2, 35 * 256) and hot.sum() == 70 and hot[0, 17 * 256 + 7] == 1
    assert visible_effect({"paddle_x": 10, "next_paddle_x": 12, "ball_x": None, "next_ball_x": None})
    assert visible_effect({"paddle_x": 10, "next_paddle_x": 10, "ball_x": None, "next_ball_x": 80})
    assert not visible_effect({"paddle_x": 10, "next_paddle_x": 10, "ball_x": 5, "next_ball_x": 9})


# ----------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def reports(pair_shards, tiny_checkpoint, tmp_path_factory):
    """val and test evaluated into one reports/ folder: val takes the probe's train codes from the
    latent shards, test (no latent shards given, a small probe) encodes them. Returns (root, stdout of test)."""
    latent = extracted_latents(pair_shards, tiny_checkpoint, tmp_path_factory)
    root = tmp_path_factory.mktemp("reports")
    printed = {}
    for split, extra in (("val", ["--latent", str(latent)]),
                         ("test", ["--latent", str(root / "no-latents"), "--probe-limit", "40"])):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = evaluate.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--split", split,
                                  "--out", str(root / split), "--batch-size", "32", "--backend", "torch",
                                  "--no-progress", *extra])
        assert code == 0
        printed[split] = stdout.getvalue()
    return root, printed


def test_metrics_json_follows_the_schema(reports, pair_shards, tiny_checkpoint):
    metrics = json.loads((reports[0] / "val" / "metrics.json").read_text())
    manifest = json.loads((pair_shards / "manifest.json").read_text())
    assert {"split", "pairs", "color", "checkpoint", "model", "copy_baseline", "delta_psnr", "codebook",
            "elements"} <= set(metrics)
    assert metrics["split"] == "val" and metrics["pairs"] == manifest["splits"]["val"]["pairs"]
    assert metrics["color"] == "gray"
    assert metrics["checkpoint"] == {"sha256": sha256_file(tiny_checkpoint), "step": 20}
    for name in ("model", "copy_baseline"):
        assert set(metrics[name]) == {"psnr", "ssim", "l1", "l2", "psnr_changed"}
        assert all(isinstance(v, float) for v in metrics[name].values())
    assert metrics["delta_psnr"] == pytest.approx(metrics["model"]["psnr"] - metrics["random_codes"]["psnr"])
    book = metrics["codebook"]
    assert len(book["counts"]) == 256 and sum(book["counts"]) == metrics["pairs"] * 35
    assert book["used_fraction"] == pytest.approx(sum(c > 0 for c in book["counts"]) / 256)
    assert set(metrics["elements"]) == {"ball", "paddle", "bricks"}
    assert set(metrics["elements"]["ball"]) == {"model", "copy_baseline"}
    actions = metrics["actions"]                       # the recorder's pairs carry action labels
    assert actions["train_codes_from"] == "latent shards"
    assert 0 < actions["transitions"] < metrics["pairs"] + 1
    for name in ("codes_probe", "frame_probe", "majority"):
        assert 0.0 <= actions[name] <= 1.0


def test_copy_baseline_matches_a_hand_computation(reports, pair_shards):
    """Copying frame t, scored straight from the PNGs: the whole-split MSE convention, end to end."""
    manifest = json.loads((pair_shards / "manifest.json").read_text())
    squared, pixels, changed_squared, changed = 0.0, 0, 0.0, 0
    for shard in manifest["splits"]["test"]["shards"]:
        for _, members in iter_samples(pair_shards / shard["file"], pair_shards / shard["index"]):
            cur, nxt = (to_model_input(torch.from_numpy(np.array(Image.open(io.BytesIO(members[m])).convert("RGB"))))
                        for m in ("cur.png", "next.png"))
            error = (cur - nxt).double().pow(2)
            squared, pixels = squared + float(error.sum()), pixels + error.numel()
            changed_squared, changed = changed_squared + float(error[cur != nxt].sum()), changed + int((cur != nxt).sum())
    metrics = json.loads((reports[0] / "test" / "metrics.json").read_text())
    assert metrics["copy_baseline"]["l2"] == pytest.approx(squared / pixels, rel=1e-5)
    assert metrics["copy_baseline"]["psnr"] == pytest.approx(10 * math.log10(pixels / squared), rel=1e-5)
    assert metrics["copy_baseline"]["psnr_changed"] == pytest.approx(10 * math.log10(changed / changed_squared), rel=1e-5)


def test_figures_and_report_are_written(reports):
    out = reports[0] / "val"
    for name in ("codebook_histogram", "code_tsne", "reconstructions", "codes_by_event"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"({name}.png)" in (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    # a 20-step model cannot beat copying frame t, and the report must say so in plain words
    assert metrics["model"]["psnr"] < metrics["copy_baseline"]["psnr"]
    assert "The model does not beat copying frame t" in report.split("##")[0]
    assert "## Actions" in report and "majority class" in report


def test_summary_puts_splits_side_by_side(reports):
    summary = (reports[0] / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| val") or line.startswith("| test")]
    assert len(rows) == 2
    assert "Across splits the model's PSNR varies by" in summary
    assert "## Splits side by side" in (reports[0] / "test" / "report.md").read_text()


def test_prints_report_path_and_headline(reports):
    root, printed = reports
    assert f"report: {root / 'test' / 'report.md'}" in printed["test"]
    assert "PSNR" in printed["test"] and "copy frame t" in printed["test"] and "ΔPSNR" in printed["test"]
    actions = json.loads((root / "test" / "metrics.json").read_text())["actions"]
    assert actions["train_codes_from"] == "encoded now" and actions["train_transitions"] <= 40


@pytest.mark.parametrize("problem", ["no_checkpoint", "no_shards", "bad_split"])
def test_clear_errors(problem, pair_shards, tiny_checkpoint, tmp_path, capsys):
    args = {"--shards": str(pair_shards), "--checkpoint": str(tiny_checkpoint), "--split": "val"}
    if problem == "no_checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.pt")
    elif problem == "no_shards":
        args["--shards"] = str(tmp_path / "nowhere")
    else:
        args["--split"] = "dev"
    argv = [part for item in args.items() for part in item] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and (err.startswith("error: ") and len(err.splitlines()) == 1 or "invalid choice" in err)
    assert not (tmp_path / "out" / "metrics.json").exists()
