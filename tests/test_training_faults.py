"""The trainer's fault handling: a non-finite step is skipped without a trace (fp32 and fp16),
--resume is the same run, validation covers every episode, accumulation matches a big batch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from model import LatentActionModel, ModelConfig
from model.config import VQConfig
from pipeline.loader import PairLoader, build_loader, spread_sample
from training.resume import latest_checkpoint
from training.runtime import Runtime
from training.step import TrainStep


def tiny_args(shards: Path, root: Path, iters: int, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--preset", "tiny", "--out", str(root / "ckpt"), "--run-dir", str(root / "run"),
            "--iters", str(iters), "--no-compile", "--wandb", "disabled", *extra]


def poison_batches(monkeypatch, at: set[int]) -> list[list[str]]:
    """Make train.py's batch stream (PairLoader.forever) yield, before its batches number `at` (0-based),
    a copy of that batch with one NaN pixel and keys of its own. Returns the poisoned batches' keys as
    they come."""
    original, poisoned = PairLoader.forever, []

    def forever(loader):
        for number, batch in enumerate(original(loader)):
            if number in at:
                bad = {**batch, "cur": batch["cur"].clone(), "key": [f"nan-{key}" for key in batch["key"]]}
                bad["cur"][0, 0, 100, 80] = float("nan")
                poisoned.append(bad["key"])
                yield bad
            yield batch

    monkeypatch.setattr(PairLoader, "forever", forever)
    return poisoned


def final_state(root: Path, step: int) -> dict:
    return torch.load(root / "ckpt" / f"step-{step:06d}.pt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert a["loader"] == b["loader"]


# ------------------------------------------------------------------------------ skipped steps
def test_a_nan_batch_leaves_no_trace_and_names_its_keys(pair_shards, tmp_path, monkeypatch, capsys):
    # Batch 0 is poisoned too: on the first step the quantiser would seed its codebook from it.
    common = ("--model", "vq-shift", "--set", "reset_every=3", "--set", "ckpt_every=6")
    assert train.main(tiny_args(pair_shards, tmp_path / "clean", 6, *common)) == 0
    poisoned = poison_batches(monkeypatch, at={0, 3})
    assert train.main(tiny_args(pair_shards, tmp_path / "poisoned", 6, *common)) == 0
    err = capsys.readouterr().err
    assert len(poisoned) == 2
    for keys in poisoned:
        assert keys[0] in err                                   # the message names the batch
    assert "non-finite loss at step 1" in err and "non-finite loss at step 4" in err, err
    clean, dirty = final_state(tmp_path / "clean", 6), final_state(tmp_path / "poisoned", 6)
    assert_same_training_state(clean, dirty)
    for name, value in dirty["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name


def test_fp16_training_goes_on_after_a_skipped_step(pair_shards, tmp_path, monkeypatch, capsys):
    poison_batches(monkeypatch, at={1})
    assert train.main(tiny_args(pair_shards, tmp_path, 4, "--amp", "fp16")) == 0
    assert "non-finite loss at step 2" in capsys.readouterr().err
    state = final_state(tmp_path, 4)
    assert state["scaler"]["scale"] < 65536.0                    # backed off as for an overflow
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_logs_the_loss_scale_and_the_updates_the_scaler_skipped(pair_shards, tmp_path, monkeypatch, capsys):
    """A loss scale far too high makes the fp16 gradients overflow: the GradScaler skips those updates
    and halves its scale each time. The steps still count; the log says how many were skipped."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: real_scaler(*args, **kwargs, init_scale=2.0 ** 40))
    assert train.main(tiny_args(pair_shards, tmp_path, 6, "--amp", "fp16", "--set", "ckpt_every=3")) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    scales = [row["amp/loss_scale"] for row in rows]
    lowered = [after < before for before, after in zip(scales, scales[1:])]
    assert scales[0] == 2.0 ** 40 and sum(lowered) >= 1
    skipped = [row["amp/skipped_updates"] for row in rows]
    assert skipped[:-1] == list(np.cumsum(lowered)) and skipped[-1] >= skipped[-2]
    assert f"fp16: {skipped[-1]} of 6 steps were updates the GradScaler skipped" in capsys.readouterr().out
    # the count goes on across --resume
    monkeypatch.setattr(torch.amp, "GradScaler", real_scaler)
    assert train.main(tiny_args(pair_shards, tmp_path, 7, "--amp", "fp16", "--resume")) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 7 and row["amp/skipped_updates"] >= skipped[-1]


def test_fp32_logs_no_loss_scale(tiny_checkpoint):
    rows = (tiny_checkpoint.parent.parent / "run" / "metrics.jsonl").read_text().splitlines()
    assert not any("amp/loss_scale" in json.loads(line) for line in rows)


# ------------------------------------------------------------------------------ resume
def test_resume_without_flags_is_the_same_run(pair_shards, tmp_path, capsys):
    """No --preset and no --set on resume: every setting comes from the checkpoint (a fallback to
    `full` would change lr, schedule, resets and compile)."""
    common = ("--set", "ckpt_every=4", "--model", "vq-shift", "--set", "reset_every=3", "--set", "lr=0.002")
    assert train.main(tiny_args(pair_shards, tmp_path / "straight", 8, *common)) == 0
    assert train.main(tiny_args(pair_shards, tmp_path / "stopped", 4, *common)) == 0
    capsys.readouterr()
    root = tmp_path / "stopped"
    assert train.main(["--out", str(root / "ckpt"), "--iters", "8", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "iters: 4 -> 8 (from the command line)" in out
    assert "lr:" not in out and "preset:" not in out
    assert_same_training_state(final_state(tmp_path / "straight", 8), final_state(root, 8))
    saved = final_state(root, 8)["config"]["train"]
    assert (saved["preset"], saved["lr"], saved["compile"]) == ("tiny", 0.002, False)


def test_resume_lists_what_the_command_line_changes(pair_shards, tmp_path, capsys):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", "ckpt_every=2")) == 0
    capsys.readouterr()
    assert train.main(tiny_args(pair_shards, tmp_path, 4, "--resume", "--set", "lr=0.001", "--set", "width=0.5")) == 0
    out = capsys.readouterr().out
    assert "lr: 0.003 -> 0.001 (from the command line)" in out
    assert "width: the checkpoint's 0.0625 kept" in out


def test_resume_from_a_checkpoint_with_the_old_config_layout(pair_shards, tmp_path, capsys):
    """Checkpoints written before TrainConfig held the model's settings in `cfg.model` saved them flat in
    config["train"], and reset_every / grad_checkpoint in config["model"] too: they resume, with
    reset_every from the training settings and the architecture from the model's."""
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", "ckpt_every=2", "--model", "vq-shift", "--set", "reset_every=3")) == 0
    path = tmp_path / "ckpt" / "step-000002.pt"
    state = torch.load(path, weights_only=True)
    model = state["config"]["model"]
    shift, vq = model["shift"], model["vq"]
    flat = {**{k: v for k, v in model.items() if k not in ("variant", "output", "shift", "vq", "fsq", "action_code")},
            "motion": "shift", "residual_output": False, "motion_max_x": shift["max_x"], "motion_max_y": shift["max_y"],
            "motion_stage": shift["stage"], "motion_codes": shift["code_vote"], "codebook_size": vq["codes"],
            "fsq_levels": "8,8,4", **{k: v for k, v in vq.items() if k != "codes"}}
    state["config"] = {"model": {**flat, "reset_every": 3, "grad_checkpoint": False},
                       "train": {**state["config"]["train"], **{k: v for k, v in flat.items() if k != "in_channels"}}}
    torch.save(state, path)
    capsys.readouterr()
    assert train.main(tiny_args(pair_shards, tmp_path, 4, "--resume")) == 0
    out = capsys.readouterr().out
    assert "iters: 2 -> 4 (from the command line)" in out and "kept" not in out
    resumed = torch.load(tmp_path / "ckpt" / "step-000004.pt", weights_only=True)["config"]
    # the same architecture, now named: a flat config reads as the variant "legacy"
    assert resumed["train"]["reset_every"] == 3 and resumed["model"] == {**model, "variant": "legacy"}


def test_resume_refuses_a_loader_change_that_breaks_exact_resume(pair_shards, tmp_path, capsys):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", "ckpt_every=2")) == 0
    capsys.readouterr()
    assert train.main(tiny_args(pair_shards, tmp_path, 4, "--resume", "--batch-size", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differently built loader" in err[0] and "batch_size 4 != 2" in err[0]


def test_resume_against_changed_shards_is_one_clear_error(pair_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(pair_shards, shards)
    assert train.main(tiny_args(shards, tmp_path, 2, "--set", "ckpt_every=2")) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["seed"] = 1                                          # e.g. re-packed with another split
    (shards / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train.main(tiny_args(shards, tmp_path, 4, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: ") and "changed since the checkpoint" in err[0]


def test_latest_checkpoint_is_the_highest_step_number(tmp_path):
    for step in (999_999, 1_000_000, 20):
        (tmp_path / f"step-{step:06d}.pt").write_bytes(b"")
    (tmp_path / ".step-2000000.pt.tmp-77").write_bytes(b"")     # a killed write: never a candidate
    assert latest_checkpoint(tmp_path).name == "step-1000000.pt"


# ------------------------------------------------------------------------------ validation
def test_validation_sample_spreads_over_every_episode(pair_shards):
    full = build_loader(pair_shards, "val", 4, shuffle=False, drop_last=False, backend="torch", device="cpu")
    pairs, episodes = full.coverage
    sample = build_loader(pair_shards, "val", 4, shuffle=False, drop_last=False, backend="torch", device="cpu",
                          sample=8, seed=3)
    assert sample.coverage == (8, episodes) and pairs > 8
    again = build_loader(pair_shards, "val", 4, shuffle=False, drop_last=False, backend="torch", device="cpu",
                         sample=8, seed=3)
    assert [b["cur"].sum() for b in sample] == [b["cur"].sum() for b in again]     # fixed for a seed


class RecordingLoader:
    """A loader that notes the key of every pair it yields, and is otherwise the loader it wraps."""

    def __init__(self, loader):
        self.loader, self.keys = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.keys += batch["key"]
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def test_training_validates_on_a_sample_from_every_val_episode(videos, tmp_path, monkeypatch):
    """The shared shards have one val episode, where any sample covers every episode: these have three."""
    from pipeline.pack import pack
    from pipeline.pair_index import episode_and_step

    shards = tmp_path / "pairs"
    pack(videos, shards, seed=0, fractions=(0.34, 0.5, 0.16), pairs_per_shard=16, workers=1, progress=False)
    everything = build_loader(shards, "val", 4, shuffle=False, drop_last=False, with_keys=True, backend="torch",
                              device="cpu")
    val_pairs = [key for batch in everything for key in batch["key"]]
    val_episodes = {episode_and_step(key)[0] for key in val_pairs}
    assert len(val_episodes) == 3
    import training.build

    validated, real_validator = [], training.build.Validator

    def recording_validator(model, loader, *args, **kwargs):
        validated.append(RecordingLoader(loader))
        return real_validator(model, validated[-1], *args, **kwargs)

    monkeypatch.setattr(training.build, "Validator", recording_validator)
    assert train.main(tiny_args(shards, tmp_path, 5, "--set", "val_every=5")) == 0
    keys = validated[0].keys
    sample = 2 * 4                                               # tiny: val_batches 2 of micro-batch 4
    assert len(keys) == len(set(keys)) == sample < len(val_pairs)
    assert {episode_and_step(key)[0] for key in keys} == val_episodes
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert (row["val/pairs"], row["val/episodes"]) == (sample, 3)


def test_spread_sample_draws_from_each_episode_in_proportion():
    episodes = np.repeat(np.arange(5), [400, 100, 100, 300, 100])
    chosen = spread_sample(episodes, 100, seed=0)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100 and (np.diff(chosen) > 0).all()
    per_episode = np.bincount(episodes[chosen], minlength=5)
    assert per_episode.tolist() == [40, 10, 10, 30, 10]
    assert spread_sample(episodes, 3, seed=0).size == 3


def test_training_logs_the_validation_coverage_and_loss(tiny_checkpoint):
    rows = [json.loads(line) for line in (tiny_checkpoint.parent.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [row for row in rows if "val/recon" in row]
    assert validated and all(row["val/loss"] > 0 and row["val/pairs"] > 0 and row["val/episodes"] >= 1
                             for row in validated)
    assert all("samples_per_s" in row for row in rows)
    probed = [row for row in rows if "val/psnr" in row]         # the move probe rides on the metrics cadence
    assert probed and all(0 <= row["val/move_probe_codes"] <= 1 and 0 < row["val/move_probe_majority"] <= 1
                          for row in probed)


# ------------------------------------------------------------------------------ accumulation
def accumulated_update(grad_accum: int, batches: list[dict], config: ModelConfig, train_mode: bool) -> dict:
    torch.manual_seed(0)
    model = LatentActionModel(config)
    model.train(train_mode)
    vq = config.quantizer == "vq"
    if vq:
        with torch.no_grad():                   # the same codebook in both runs (not seeded from a batch)
            model.quantizer.codebook.copy_(0.1 * torch.randn(model.quantizer.codebook.shape,
                                                             generator=torch.Generator().manual_seed(3)))
            model.quantizer.initialised.fill_(True)
        model.quantizer._seeded = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = TrainStep(model, optimizer, Runtime(0, 1, 0, torch.device("cpu")), grad_accum=grad_accum)
    assert step(iter(batches), 1.0, 0).skipped is None
    # VQ's codebook moves by its own (EMA-like) rules; FSQ's projections are plain weights and compared
    return {k: v - before[k] for k, v in model.state_dict().items()
            if v.is_floating_point() and not (vq and "quantizer" in k)}


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_accumulation_matches_one_batch_of_k_times_the_size(train_mode, quantizer):
    """k micro-batches of n give the update of one batch of k·n, exactly up to float error when
    BatchNorm uses running statistics and the codebook-entropy term (a batch statistic) is off; with
    BatchNorm normalising each micro-batch by its own statistics the updates agree only closely."""
    frames = torch.rand(8, 1, 210, 160, generator=torch.Generator().manual_seed(1))
    nxt = (frames + 0.1 * torch.rand(frames.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    config = (ModelConfig(width=0.0625, code_dim=32, quantizer="vq", vq=VQConfig(entropy_weight=0.0), fsq=None) if quantizer == "vq"
              else ModelConfig(width=0.0625, code_dim=32))
    whole = accumulated_update(1, [{"cur": frames, "next": nxt}], config, train_mode)
    parts = accumulated_update(4, [{"cur": frames[i:i + 2], "next": nxt[i:i + 2]} for i in range(0, 8, 2)],
                               config, train_mode)
    a = torch.cat([v.flatten() for v in whole.values()])
    b = torch.cat([v.flatten() for v in parts.values()])
    if not train_mode:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert cosine > 0.5, float(cosine)
