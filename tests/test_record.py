"""The ALE recorder: real Breakout episodes, labels that agree with the pixels, byte-identical
output for a seed, and no half-written episode that looks complete."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import run_cli
from pipeline import record as recorder
from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH

BALL_AND_PADDLE_RGB = (200, 72, 72)
META_FIELDS = {"t", "action", "action_name", "reward", "lives", "life_lost", "terminal", "policy",
               "paddle_x", "ball_x", "ball_y", "next_paddle_x", "next_ball_x", "next_ball_y"}


def read_meta(episode: Path) -> list[dict]:
    return [json.loads(line) for line in (episode / "meta.jsonl").read_text().splitlines()]


def frame(episode: Path, n: int) -> np.ndarray:
    return np.asarray(Image.open(episode / f"{n}.png"))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_episodes_are_frames_plus_one_label_line_per_transition(videos):
    episodes = sorted(p for p in videos.iterdir())
    assert [p.name for p in episodes] == [f"ep{i:04d}-{'random' if i % 3 == 2 else 'tracker'}" for i in range(6)]
    for episode in episodes:
        meta = read_meta(episode)
        frames = sorted(int(p.stem) for p in episode.glob("*.png"))
        assert frames == list(range(len(meta) + 1))
        assert [line["t"] for line in meta] == list(range(len(meta)))
        first = Image.open(episode / "0.png")
        assert (first.mode, first.size) == ("RGB", (FRAME_WIDTH, FRAME_HEIGHT))
        for line, following in zip(meta, meta[1:]):
            assert set(line) == META_FIELDS
            # the next_ fields of t describe the same frame as the plain fields of t + 1
            assert [line[f"next_{k}"] for k in ("paddle_x", "ball_x", "ball_y")] == \
                   [following[k] for k in ("paddle_x", "ball_x", "ball_y")]
            assert following["lives"] <= line["lives"]
        assert meta[0]["action_name"] in {"NOOP", "FIRE", "RIGHT", "LEFT"}


def test_play_is_varied(videos):
    meta = [line for episode in videos.iterdir() for line in read_meta(episode)]
    moves = [np.sign(line["next_paddle_x"] - line["paddle_x"]) for line in meta]
    assert {-1, 0, 1} <= set(moves)                     # left, right and standing still
    assert sum(line["reward"] for line in meta) > 0     # bricks break
    assert {line["action_name"] for line in meta} == {"NOOP", "FIRE", "RIGHT", "LEFT"}
    assert any(line["ball_x"] is None for line in meta) and any(line["ball_x"] is not None for line in meta)


def test_labels_match_the_pixels(videos):
    """Ball and paddle positions, checked where the ball is visible in full (below the bricks, away
    from the walls and the paddle) and where the paddle is not under a wall."""
    checked_ball = checked_paddle = 0
    for episode in videos.iterdir():
        for line in read_meta(episode):
            for prefix, n in (("", line["t"]), ("next_", line["t"] + 1)):
                pixels = frame(episode, n)
                x, y = line[f"{prefix}ball_x"], line[f"{prefix}ball_y"]
                if x is not None and 8 <= x <= 150 and 93 <= y <= 184:
                    assert (pixels[y:y + 4, x:x + 2] == BALL_AND_PADDLE_RGB).all()
                    assert not (pixels[y - 1, x:x + 2] == BALL_AND_PADDLE_RGB).all(-1).any()   # top edge
                    checked_ball += 1
                px = line[f"{prefix}paddle_x"]
                if 8 <= px <= 144:
                    assert (pixels[189:193, px:px + 8] == BALL_AND_PADDLE_RGB).all()
                    assert not (pixels[189:193, px - 1] == BALL_AND_PADDLE_RGB).all(-1).any()   # left edge
                    checked_paddle += 1
            if line["ball_x"] is None:     # not in play: no ball anywhere in the empty play area
                play_area = frame(episode, line["t"])[93:189, 8:152]
                assert not play_area.any()
    assert checked_ball > 100 and checked_paddle > 200


def test_same_seed_gives_identical_files_with_any_worker_count(tmp_path):
    one = recorder.record(tmp_path / "a", episodes=3, max_steps=300, seed=7, workers=1, progress=False)
    two = recorder.record(tmp_path / "b", episodes=3, max_steps=300, seed=7, workers=2, progress=False)
    assert [p.name for p in one] == [p.name for p in two]
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")
    # the random episode plays until it has lost every life
    meta = read_meta(one[2])
    assert sum(line["life_lost"] for line in meta) == 5 and meta[-1]["terminal"] and meta[-1]["lives"] == 0
    assert len(meta) < 300

    other = recorder.record(tmp_path / "c", episodes=1, max_steps=20, seed=8, progress=False)
    assert (other[0] / "5.png").read_bytes() != (one[0] / "5.png").read_bytes()


def test_interrupted_episode_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash_after_some_frames(plan, options, folder):
        recorder.save_frame(np.zeros((FRAME_HEIGHT, FRAME_WIDTH, 3), np.uint8), folder / "0.png")
        raise KeyboardInterrupt

    out = tmp_path / "videos"
    monkeypatch.setattr(recorder, "play_episode", crash_after_some_frames)
    with pytest.raises(KeyboardInterrupt):
        recorder.record(out, episodes=2, max_steps=5, progress=False)
    assert list(out.iterdir()) == []

    stale = out / f".ep0000-tracker{recorder.PARTIAL_MARK}999"     # left by a killed recording
    stale.mkdir()
    monkeypatch.undo()
    recorder.record(out, episodes=1, max_steps=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["ep0000-tracker"]


def test_cli_skip_existing_and_bad_flags(tmp_path, capsys):
    out = tmp_path / "videos"
    assert run_cli(recorder.main, ["--out", str(out), "--episodes", "1", "--max-steps", "2", "--no-progress"]) == 0
    before = all_files(out)
    assert run_cli(recorder.main, ["--out", str(out), "--episodes", "3", "--max-steps", "2", "--skip-existing"]) == 0
    assert "already holds episodes" in capsys.readouterr().out
    assert all_files(out) == before

    for flags in (["--episodes", "0", "--max-steps", "2"], ["--episodes", "1", "--max-steps", "2", "--sticky", "1.5"]):
        assert run_cli(recorder.main, ["--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
