"""The move prior (ModelConfig.motion_weight, model/move_target.py): each cell's code is asked, through
a linear head, which way the content around the cell moved across, read from the pair's pixels;
on by default (3e-5), 0 turns it off."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from model import LatentActionModel, ModelConfig
from pipeline.frames import GRID
from model.move_target import horizontal_move_target

from test_train import error_line, rows, tiny_args

PADDLE_ROW = slice(189, 193)            # the paddle's 4 rows, in the grid's bottom row of cells (180-210)


def frames_with_paddle(x_before: int, x_after: int) -> tuple[torch.Tensor, torch.Tensor]:
    cur, nxt = torch.zeros(1, 1, 210, 160), torch.zeros(1, 1, 210, 160)
    cur[0, 0, PADDLE_ROW, x_before:x_before + 16] = 0.5
    nxt[0, 0, PADDLE_ROW, x_after:x_after + 16] = 0.5
    return cur, nxt


@pytest.mark.parametrize("x_before, x_after, sign", [(40, 41, 1), (40, 45, 1), (100, 99, -1), (100, 70, -1)])
def test_the_target_says_which_way_the_paddle_moved_in_its_cells(x_before, x_after, sign):
    target, moved = horizontal_move_target(*frames_with_paddle(x_before, x_after), GRID)
    assert target.shape == moved.shape == (1, *GRID)
    assert moved[0, :-1].sum() == 0                        # nothing moved in the rows above the paddle's
    bottom = target[0, -1][moved[0, -1] > 0]
    assert len(bottom) >= 1 and bool((bottom * sign > 0.9).all())


def test_no_target_where_nothing_moved_or_something_only_vanished():
    still = horizontal_move_target(*frames_with_paddle(60, 60), GRID)[1]
    cur = torch.zeros(1, 1, 210, 160)
    cur[0, 0, 60:66, 40:56] = 0.6                           # a brick broken: it vanishes, nothing appears
    broken = horizontal_move_target(cur, torch.zeros_like(cur), GRID)[1]
    assert still.sum() == 0 and broken.sum() == 0


def test_the_target_reads_the_recorded_paddle_moves_of_real_frames(videos):
    """On real Breakout frames, the bottom row's target agrees in sign with the paddle's move that
    the emulator's RAM records, on the pairs where the paddle moved."""
    agree = total = 0
    for episode in sorted(videos.iterdir()):
        metas = [json.loads(line) for line in (episode / "meta.jsonl").read_text().splitlines()]
        for meta in metas:
            if meta["paddle_x"] is None or meta["next_paddle_x"] is None or meta["paddle_x"] == meta["next_paddle_x"]:
                continue
            cur, nxt = (torch.from_numpy(np.asarray(Image.open(episode / f"{t}.png").convert("L"), dtype=np.float32)
                                         / 255)[None, None] for t in (meta["t"], meta["t"] + 1))
            target, moved = horizontal_move_target(cur, nxt, GRID)
            said = target[0, -1][moved[0, -1] > 0]
            total += 1
            agree += len(said) > 0 and np.sign(said.mean().item()) == np.sign(meta["next_paddle_x"] - meta["paddle_x"])
    assert total >= 20 and agree / total >= 0.85, (agree, total)


def test_the_prior_is_the_heads_weighted_error_over_the_cells_that_moved():
    torch.manual_seed(0)
    cur, nxt = frames_with_paddle(40, 45)
    model = LatentActionModel(ModelConfig(width=0.125, motion_weight=0.5)).train()
    out = model(cur, nxt)
    target, moved = horizontal_move_target(cur, nxt, GRID)
    guess = model.motion_head(model.quantizer(model.encoder(cur, nxt))[0])[:, 0]
    torch.testing.assert_close(out["motion"], 0.5 * ((guess - target) ** 2 * moved).sum() / moved.sum())
    assert out["motion"] > 0
    assert torch.isclose(out["loss"], out["recon"] + out["commitment"] + out["codebook"] + out["entropy"]
                         + out["action"] + out["motion"])
    out["motion"].backward()                              # the prior's gradient reaches the encoder (straight-through)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    plain = LatentActionModel(ModelConfig(width=0.125, motion_weight=0.0))       # off: no head, no term
    assert plain.motion_head is None and float(plain(cur, nxt)["motion"]) == 0
    assert not any(name.startswith("motion_head") for name in plain.state_dict())
    assert LatentActionModel(ModelConfig.named("fsq-shift", width=0.125)).motion_head is None


def test_a_checkpoint_saved_before_the_prior_loads_without_one():
    """Configs saved before the field existed had no prior (today's default has one)."""
    saved = ModelConfig.named("fsq-shift", width=0.125).to_dict()
    del saved["motion_weight"]
    assert ModelConfig.from_dict(saved) == ModelConfig.named("fsq-shift", width=0.125)
    assert ModelConfig().motion_weight > 0 and not ModelConfig().latent_every_stage


def test_a_run_with_the_prior_logs_it_and_its_checkpoint_loads(pair_shards, tmp_path):
    from model.inference import load_model

    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", "motion_weight=0.01")) == 0
    assert all(row["train/motion"] > 0 for row in rows(tmp_path / "run"))
    checkpoint = tmp_path / "ckpt" / "step-000002.pt"
    assert "motion_head.weight" in torch.load(checkpoint, weights_only=True)["model"]
    model, _ = load_model(checkpoint, torch.device("cpu"))
    assert model.config.motion_weight == 0.01 and model.motion_head is not None


@pytest.mark.parametrize("value, message", [("-1", "motion_weight must be >= 0"),
                                            ("nan", "motion_weight must be a finite number")])
def test_a_bad_weight_is_one_line(pair_shards, tmp_path, capsys, value, message):
    assert train.main(tiny_args(pair_shards, tmp_path, 2, "--set", f"motion_weight={value}")) == 2
    assert message in error_line(capsys)
