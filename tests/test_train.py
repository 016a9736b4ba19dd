"""train.py: checkpoints, metrics and cadences, exact resume, DDP on CPU, and clear errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from model import CHECKPOINT_FORMAT, LatentActionModel, load_checkpoint
from training.cli import argument_parser, config_from_args
from training.config import TrainConfig
from training.resume import resumed_config
from training.step import learning_rate

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(shards: Path, root: Path, iters: int, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--preset", "tiny", "--out", str(root / "ckpt"), "--run-dir", str(root / "run"),
            "--iters", str(iters), "--no-compile", "--wandb", "disabled", *extra]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------------------ the tiny run
def test_checkpoint_loads_weights_only_without_wrapper_prefixes(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 20
    assert not [key for key in state["model"] if key.startswith(("_orig_mod.", "module."))]
    assert state["config"]["train"]["preset"] == "tiny" and state["config"]["model"]["width"] == 0.0625
    for key in ("optimizer", "scaler", "schedule", "rng", "loader", "best"):
        assert key in state
    assert (tiny_checkpoint.parent / "step-000010.pt").is_file() and (tiny_checkpoint.parent / "best.pt").is_file()
    assert not list(tiny_checkpoint.parent.glob(".*tmp*"))          # no temp file left behind

    lam = load_checkpoint(tiny_checkpoint, "cpu")
    assert isinstance(lam, LatentActionModel) and not lam.training
    cur = torch.rand(2, 1, 210, 160)
    codes = lam.encode(cur, cur)
    assert codes.shape == (2, 7, 5) and codes.dtype == torch.int64 and int(codes.max()) < 256
    pred = lam.decode(cur, codes)
    assert pred.shape == (2, 1, 210, 160) and 0 <= float(pred.min()) and float(pred.max()) <= 1


def test_metrics_rows_start_at_step_1_and_cadences_fire(tiny_checkpoint):
    run_dir = tiny_checkpoint.parent.parent / "run"
    logged = rows(run_dir)
    assert [row["step"] for row in logged] == list(range(1, 21))
    for row in logged:
        for term in ("loss", "recon", "commitment", "codebook", "entropy"):
            assert isinstance(row[f"train/{term}"], float)
        assert row["samples_per_s"] > 0 and row["lr"] > 0
    steps_with = lambda key: [row["step"] for row in logged if key in row]
    assert steps_with("val/recon") == [5, 10, 15, 20]
    assert steps_with("val/psnr") == steps_with("val/ssim") == steps_with("codebook/used_fraction") == [10, 20]
    assert steps_with("codebook/counts") == [10, 20]
    assert steps_with("codebook/reset_codes") == []        # FSQ has no codebook to reset (VQ's: the resume tests)
    counts = logged[-1]["codebook/counts"]
    assert len(counts) == 256 and sum(counts) > 0
    assert 0 < logged[-1]["codebook/used_fraction"] <= 1 and logged[-1]["codebook/perplexity"] >= 1
    assert steps_with("images/reconstruction") == [10, 20]
    assert (run_dir / logged[-1]["images/reconstruction"]).is_file()


def test_validation_labels_examples_by_pair_key_and_computes_ssim_only_when_due(pair_shards, tmp_path, monkeypatch):
    """Images and histograms reach the logger as arguments, not as keys in the scalar row; the
    example reconstructions are labelled by their pair keys; SSIM is computed only for the metrics."""
    import evaluation.figures
    import training.validate
    from pipeline.pair_index import episode_and_step

    labels, with_ssim = [], []
    grid, meter = evaluation.figures.reconstruction_grid, training.validate.ReconstructionMeter
    monkeypatch.setattr(evaluation.figures, "reconstruction_grid",
                        lambda examples, path: labels.append([e.key for e in examples]) or grid(examples, path))
    monkeypatch.setattr(training.validate, "ReconstructionMeter",
                        lambda device, ssim=True: with_ssim.append(ssim) or meter(device, ssim))
    assert train.main(tiny_args(pair_shards, tmp_path, 10)) == 0      # tiny: val/recon at 5, metrics at 10
    assert with_ssim == [False, False, True, False]                      # per pass: the model's meter, the copy's
    assert len(labels) == 1 and labels[0] and all(episode_and_step(key) for key in labels[0])
    logged = rows(tmp_path / "run")
    assert not [key for row in logged for key in row if key.startswith("_")]


def test_tiny_training_lowers_the_loss(tiny_checkpoint):
    recon = [row["train/recon"] for row in rows(tiny_checkpoint.parent.parent / "run")]
    first, last = sum(recon[:5]) / 5, sum(recon[-5:]) / 5
    assert last < 0.9 * first, (first, last)


# ------------------------------------------------------------------------------ resume
def test_resume_gives_bitwise_the_same_weights_as_an_uninterrupted_run(pair_shards, tmp_path):
    # Reset every 3 steps: the run is stopped at 4, between two resets that draw random replacements.
    # The schedule horizon is the preset's (tiny: 20 steps) whatever --iters says, as a user would run it.
    common = ("--model", "vq-shift", "--set", "ckpt_every=4", "--set", "reset_every=3")
    assert train.main(tiny_args(pair_shards, tmp_path / "straight", 8, *common)) == 0
    assert train.main(tiny_args(pair_shards, tmp_path / "stopped", 4, *common)) == 0
    assert train.main(tiny_args(pair_shards, tmp_path / "stopped", 8, "--resume", *common)) == 0

    straight = torch.load(tmp_path / "straight/ckpt/step-000008.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped/ckpt/step-000008.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert straight["loader"] == resumed["loader"]
    losses = lambda run: [(row["step"], row["train/loss"]) for row in rows(run)]
    assert losses(tmp_path / "stopped/run") == losses(tmp_path / "straight/run")


def test_resume_with_a_corrupt_checkpoint_is_one_clear_error(pair_shards, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step-000004.pt").write_bytes(b"not a checkpoint at all")
    assert train.main(tiny_args(pair_shards, tmp_path, 8, "--resume")) == 2
    assert "step-000004.pt: not a readable checkpoint" in error_line(capsys)


def test_resume_with_nothing_to_resume_is_one_clear_error(pair_shards, tmp_path, capsys):
    assert train.main(tiny_args(pair_shards, tmp_path, 8, "--resume")) == 2
    assert "no step-*.pt checkpoint" in error_line(capsys)


def test_resume_with_a_foreign_checkpoint_is_one_clear_error(pair_shards, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"encoder.nonsense": torch.zeros(1)},
                "config": {"model": {"width": 0.0625, "code_dim": 32}, "train": {}}, "step": 4},
               tmp_path / "ckpt" / "step-000004.pt")
    assert train.main(tiny_args(pair_shards, tmp_path, 8, "--resume")) == 2
    assert "does not fit this run" in error_line(capsys)


# ------------------------------------------------------------------------------ DDP
# ------------------------------------------------------------------------------ logging, config, errors
def test_wandb_offline_creates_its_run_directory(pair_shards, tmp_path):
    args = tiny_args(pair_shards, tmp_path, 2)
    args[args.index("--wandb") + 1] = "offline"
    assert train.main(args) == 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_rgb_flag_trains_an_rgb_model(pair_shards, tmp_path):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--rgb")) == 0
    assert load_checkpoint(tmp_path / "ckpt" / "step-000002.pt").config.in_channels == 3


def test_missing_shards_is_one_clear_error_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_args(tmp_path / "nowhere", tmp_path, 2)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: shard directory not found"]


def test_manifest_of_another_format_is_one_clear_error(pair_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(pair_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format"] = "lam-latent/1"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert train.main(tiny_args(shards, tmp_path, 2)) == 2
    assert "format is 'lam-latent/1', expected 'lam-pairs/1'" in error_line(capsys)


@pytest.mark.parametrize("setting, message", [
    ("no_such_field=3", "unknown field 'no_such_field'"),
    ("iters=many", "--set iters: bad value 'many'"),
    ("amp=fp8", "amp must be"),
    ("compile", "expected field=value"),
    ("context=2", "bad configuration: context must be 0 (frames t, t+1) or 1 (frame t-1 too), got 2"),
    ("vq.codes=512", "bad configuration: vq.codes: this model has no vq part (quantizer is 'fsq')"),
    ("reset_every=5", "bad configuration: reset_every: this model has no VQ codebook to reset (quantizer is 'fsq')"),
    ("action_weight=0.5", "bad configuration: action_weight: there is no action head without labels"),
    ("fsq.levels=8,x", "--set fsq.levels: bad value '8,x'"),
])
def test_bad_set_is_one_clear_error(pair_shards, tmp_path, capsys, setting, message):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", setting)) == 2
    assert message in error_line(capsys)


def test_non_finite_loss_stops_with_a_clear_error(pair_shards, tmp_path, capsys, monkeypatch):
    forward = LatentActionModel.forward

    def poisoned(self, cur, nxt, prev=None, action=None, start=None):
        out = forward(self, cur, nxt, prev, action, start)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(LatentActionModel, "forward", poisoned)
    assert train.main(tiny_args(pair_shards, tmp_path, 5, "--set", "max_nonfinite=2")) == 2
    captured = capsys.readouterr().err
    assert "non-finite loss at step 1" in captured and "(2/2 in a row): stopping" in captured
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("step-*.pt"))


def test_context_run_feeds_prev_to_training_and_validation(context_checkpoint, pair_shards, tmp_path, monkeypatch):
    """--set context=1 builds a context model and loaders with prev, and every forward (training
    steps and validation) gets the batch's prev: frame t-1, not frame t, wherever the pair has one."""
    state = torch.load(context_checkpoint, weights_only=True)
    assert state["config"]["model"]["context"] == 1
    assert state["model"]["decoder.frame_stack.0.0.weight"].shape[1] == 2

    forward, seen = LatentActionModel.forward, []

    def recording(self, cur, nxt, prev=None, action=None, start=None):
        seen.append((self.training, None if prev is None else bool((prev != cur).any())))
        return forward(self, cur, nxt, prev, action, start)

    monkeypatch.setattr(LatentActionModel, "forward", recording)
    assert train.main(tiny_args(pair_shards, tmp_path, 5, "--set", "context=1")) == 0
    assert None not in {differs for _, differs in seen}
    # steps and validation both got frame t-1 (not a copy of frame t) in some batch
    assert {training for training, differs in seen if differs} == {True, False}


def test_help_lists_the_fields(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("ckpt_every", "vq.entropy_weight", "grad_accum", "reset_every", "backend", "grad_checkpoint",
                 "fsq.levels", "shift.stage", "seed:", "split:"):
        assert name in text


def test_set_overrides_preset_and_flags_override_set(pair_shards, tmp_path):
    args = argument_parser().parse_args(["--preset", "demo", "--set", "lr=0.001", "--set", "rgb=true", "--set",
                                         "iters=5", "--iters", "7", "--no-compile", "--out", str(tmp_path),
                                         "--shards", str(pair_shards)])
    cfg, resumed = config_from_args(args)
    assert (cfg.lr, cfg.rgb, cfg.iters, cfg.compile, cfg.model.width, resumed) == (0.001, True, 7, False, 0.25, None)
    assert cfg.model.in_channels == 3


def test_model_defaults_are_model_configs_and_training_settings_are_not_architecture():
    """ModelConfig alone states the model's defaults (TrainConfig and the networks take them from it);
    reset_every and grad_checkpoint are training fields, so --resume may change them."""
    from model import ModelConfig
    from model.config import VQConfig

    assert TrainConfig().model == ModelConfig()
    vq = LatentActionModel(ModelConfig.named("vq-shift", width=0.0625)).quantizer
    assert vq.entropy_temperature == VQConfig.entropy_temperature
    saved = TrainConfig(reset_every=5, model=ModelConfig.named("vq-shift")).to_dict()
    cfg, changes = resumed_config(saved, ModelConfig.named("vq-shift", width=0.0625),
                                  settings=["reset_every=7", "grad_checkpoint=true", "width=0.5"])
    assert (cfg.reset_every, cfg.grad_checkpoint, cfg.model.width) == (7, True, 0.0625)
    assert "reset_every: 5 -> 7 (from the command line)" in changes
    assert "grad_checkpoint: False -> True (from the command line)" in changes
    assert "width: the checkpoint's 0.0625 kept (the architecture comes from the checkpoint)" in changes


def test_named_variants_on_the_command_line(pair_shards, tmp_path):
    """--model picks a variant; --set changes its fields; a preset's setting for a part the model
    lacks is dropped (tiny sets vq.reset_buffer and reset_every), the user's is refused."""
    seed, _ = config_from_args(argument_parser().parse_args(["--shards", str(pair_shards), "--preset", "tiny", "--model", "seed", "--out", str(tmp_path)]))
    assert (seed.model.variant, seed.model.output, seed.model.vq.reset_buffer, seed.reset_every) == ("seed", "sigmoid", 256, 5)
    default, _ = config_from_args(argument_parser().parse_args(["--shards", str(pair_shards), "--preset", "tiny", "--out", str(tmp_path)]))
    assert (default.model.variant, default.model.vq, default.reset_every) == ("default", None, None)
    vq, _ = config_from_args(argument_parser().parse_args(["--shards", str(pair_shards), "--preset", "tiny", "--set", "quantizer=vq", "--set",
                                                          "vq.codes=512", "--out", str(tmp_path)]))
    assert (vq.model.codebook_size, vq.model.fsq, vq.reset_every) == (512, None, 5)
    fsq, _ = config_from_args(argument_parser().parse_args(["--shards", str(pair_shards), "--preset", "tiny", "--set", "fsq.levels=8,8,8",
                                                           "--out", str(tmp_path)]))
    assert fsq.model.codebook_size == 512


def test_learning_rate_decays_from_lr_to_lr_min():
    cfg = TrainConfig(iters=100, lr_decay_iters=100, lr=3e-4, lr_min=1e-4)
    lrs = [learning_rate(cfg, step) for step in range(100)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(cfg, 500) == pytest.approx(1e-4)


def test_two_ddp_ranks_compiled_without_graph_breaks(pair_shards, tmp_path):
    """The multi-GPU path (per-rank BatchNorm, statistics averaged; no SyncBatchNorm) traced by
    torch.compile under DDP with gloo in whole graphs (no break, step 1 included), on one machine
    (`torchrun --standalone`): one writer of the log and the checkpoints, every rank's loader position
    saved, the same weights on every rank. aot_eager traces and partitions the graphs as inductor
    would, without generating C++ (minutes on this CPU). Shifts of ±1 px (as tests/test_compile.py):
    the same code in the graph, fewer unrolled shifts to trace (the launch took 16.7 s instead of
    19.5 on a quiet 2-core CPU). DDP without compile, and its --resume: tests/test_scale_out.py."""
    args = [a for a in tiny_args(pair_shards, tmp_path, 3, "--set", "ckpt_every=3", "--set", "shift.max_x=1",
                                 "--set", "shift.max_y=1") if a != "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *args, "--set", "compile_backend=aot_eager"], env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "torch.compile: 0 graph break(s) in step 1, 0 graph break(s) after step 1" in output
    assert "[rank 0/2]" in output and "[rank 1/2]" in output
    assert "identical on all 2 ranks" in output                     # weight digests all-gathered at the end
    assert output.count("train.py at git") == 1                    # only rank 0 prints the config
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "step-000003.pt"]
    assert [row["step"] for row in rows(tmp_path / "run")] == [1, 2, 3]    # one writer
    state = torch.load(tmp_path / "ckpt" / "step-000003.pt", weights_only=True)
    assert state["world_size"] == 2 and [s["rank"] for s in state["loader"]] == [0, 1]


# ------------------------------------------------------------------------------------ best.pt
def test_selection_score_is_the_mean_of_what_was_measured():
    from training.validate import selection_score

    assert selection_score({"val/paddle_within_2px": 0.9, "val/ball_within_2px": 0.3, "val/move_probe_codes": 0.6}) \
        == pytest.approx(0.6)
    assert selection_score({"val/paddle_within_2px": 0.9, "val/ball_within_2px": None}) == pytest.approx(0.9)
    assert selection_score({"val/recon": 0.1}) is None


@pytest.mark.parametrize("best_by, key, pick", [("selection", "val/selection", max), ("recon", "val/recon", min)])
def test_best_checkpoint_is_the_step_with_the_best_validation_measure(pair_shards, tmp_path, best_by, key, pick):
    """best.pt holds the step whose validation measure was best: the drawing-and-probe score by
    default, val/recon with best_by=recon (the seed's rule). Measured every 3 steps here."""
    args = tiny_args(pair_shards, tmp_path, 12, *[part for name in ("val_every", "metrics_every", "hist_every",
                                                                   "image_every") for part in ("--set", f"{name}=3")],
                     "--set", f"best_by={best_by}")
    assert train.main(args) == 0
    measured = [row for row in rows(tmp_path / "run") if row.get(key) is not None]
    assert [row["step"] for row in measured] == [3, 6, 9, 12]
    if best_by == "selection":
        assert all(row["val/selection"] == pytest.approx(np.mean([row[name] for name in (
            "val/paddle_within_2px", "val/ball_within_2px", "val/move_probe_codes") if row.get(name) is not None]))
            for row in measured)
    best = pick(measured, key=lambda row: row[key])          # the first of equals, as the checkpointer keeps it
    state = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    assert state["step"] == best["step"] and state["best"]["by"] == best_by


def test_a_bf16_run_trains_on_any_cpu(pair_shards, tmp_path, capsys):
    """The bf16 path that `--amp auto` takes on a CPU with native bf16 (avx512_bf16, AMX), forced here
    so that CI, on AVX2 boxes that emulate bf16, runs it too: a few tiny steps, finite and logged."""
    assert train.main(tiny_args(pair_shards, tmp_path, 3, "--amp", "bf16")) == 0
    assert "precision bf16 (--amp bf16)" in capsys.readouterr().out
    logged = rows(tmp_path / "run")
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all(math.isfinite(row["train/loss"]) for row in logged)
