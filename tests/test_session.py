"""control/session.py and `play.py session`: the ball-following policy, the session's score on a
hand-made game, the report's section, and the page played in headless Chromium against a stand-in
simulator whose physics is known."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import play
from control import Controller, ControllerConfig, save_controller
from control import session as play_session_module
from control.server import Game, StartFrame
from control.session import (browser_missing, follow_the_ball, goals, play_session, score_session,
                             write_session, write_session_report)
from control.simulator import Choice
from evaluation.events import BRICK_COLS, BRICK_ROWS, PADDLE_BOTTOM, PADDLE_TOP, Elements, detect_elements
from pipeline.actions import ACTION_NAMES

FULL = np.ones((BRICK_ROWS, BRICK_COLS), dtype=bool)


def elements(paddle_x, ball=None, bricks=FULL) -> Elements:
    return Elements(paddle_x=paddle_x, ball=ball, bricks=bricks)


def without(*cells) -> np.ndarray:
    bricks = FULL.copy()
    for cell in cells:
        bricks[cell] = False
    return bricks


# ------------------------------------------------------------------------------------ policy
def test_the_policy_fires_without_a_ball_and_follows_one():
    assert follow_the_ball(elements(50)) == "FIRE"
    assert follow_the_ball(elements(None)) == "FIRE"                  # no ball comes first
    # the paddle's centre is x + 8, the ball's x + 1
    assert follow_the_ball(elements(50, (100, 120))) == "RIGHT"
    assert follow_the_ball(elements(50, (20, 120))) == "LEFT"
    assert follow_the_ball(elements(50, (57, 120))) == "NOOP"           # centres 58 and 58
    assert follow_the_ball(elements(50, (61, 120))) == "NOOP"           # 4 px right: within the dead zone
    assert follow_the_ball(elements(50, (62, 120))) == "RIGHT"          # 5 px right
    assert follow_the_ball(elements(50, (53, 120))) == "NOOP"           # 4 px left
    assert follow_the_ball(elements(50, (52, 120))) == "LEFT"
    assert follow_the_ball(elements(None, (52, 120))) == "NOOP"         # no paddle to move


# ------------------------------------------------------------------------------------ score
# A hand-made game of 9 presses. Frame by frame: FIRE serves the ball; it vanishes in the field at
# frame 3 (a miss), leaves through the bottom after frame 4 (last seen at row 185: frame 5 is not
# scored); FIRE relaunches it, and frame 6 waits for it (a miss) without a paddle. Brick (5, 0) goes
# at frame 4 and stands again at frame 8 (came back); brick (5, 1) goes at frame 7 for good.
GAME = [elements(50),                                                   # 0: start, no ball
        elements(50, (100, 100)),                                       # 1
        elements(54, (100, 120)),                                       # 2
        elements(58),                                                   # 3: vanished in the field
        elements(54, (100, 185), without((5, 0))),                      # 4
        elements(54, None, without((5, 0))),                            # 5: out through the bottom
        elements(None, None, without((5, 0))),                          # 6: waiting after FIRE, no paddle
        elements(8, (50, 100), without((5, 0), (5, 1))),                # 7
        elements(8, (50, 110), without((5, 1))),                        # 8: brick (5, 0) back
        elements(12, (52, 120), without((5, 1)))]                       # 9
PRESSES = ["FIRE", "RIGHT", "RIGHT", "LEFT", "LEFT", "FIRE", "RIGHT", "LEFT", "RIGHT"]


def test_the_score_of_a_hand_made_game():
    score = score_session(GAME, PRESSES)
    assert score["steps"] == 9
    assert score["paddle"] == {"seen": pytest.approx(8 / 9), "missing_frames": 1}
    ball = score["ball"]
    assert (ball["scored_frames"], ball["seen_frames"]) == (8, 6) and ball["seen"] == pytest.approx(0.75)
    assert (ball["launches"], ball["lost_out_of_bottom"], ball["vanished_in_field"],
            ball["frames_waiting_after_fire"]) == (2, 1, 1, 1)
    assert score["bricks"] == {"start": 108, "end": 107, "broken": 1, "came_back": 1}
    left, right = score["presses"]["left"], score["presses"]["right"]
    # LEFT at 3 moved (58 -> 54), at 4 did not (54 -> 54), at 7 pushed into the wall (x = 8): left out
    assert (left["presses"], left["scored"], left["at_wall"], left["moved"]) == (3, 2, 1, 0.5)
    # RIGHT at 1, 2 and 8 moved; at 6 there was no paddle to move: left out
    assert (right["presses"], right["scored"], right["no_paddle"], right["moved"]) == (4, 3, 1, 1.0)
    assert score["actions"] == {"LEFT": 3, "RIGHT": 4, "FIRE": 2, "NOOP": 0}
    # seen before and after: steps 1 -> 2, 7 -> 8 and 8 -> 9, each a move of 10 px or more
    assert (ball["steps_seen_twice"], ball["moving"]) == (3, 1.0)
    assert [goal["met"] for goal in goals(score)] == [False, False, True, False]


def test_a_perfect_game_meets_the_goals_and_a_lost_paddle_fails_a_press():
    game = [elements(50, (100, 100))] + [elements(50 + 4 * i, (100 + 2 * i, 100 + 4 * i),
                                                  without(*[(5, c) for c in range(i)])) for i in range(1, 5)]
    score = score_session(game, ["RIGHT"] * 4)
    assert score["ball"]["seen"] == 1.0 and score["ball"]["launches"] == 0          # in play from the start
    assert score["ball"]["moving"] == 1.0
    assert score["bricks"]["broken"] == 4 and score["presses"]["right"]["moved"] == 1.0
    assert all(goal["met"] for goal in goals(score))
    lost = score_session([elements(50, (100, 100)), elements(None, (100, 104))], ["LEFT"])["presses"]["left"]
    assert (lost["scored"], lost["moved"], lost["paddle_lost"]) == (1, 0.0, 1)
    with pytest.raises(ValueError):
        score_session(game, ["RIGHT"] * 3)


# ------------------------------------------------------------------------------------ report
def test_the_section_follows_the_rollouts_report_and_replaces_an_earlier_one(tmp_path):
    assert write_session_report(tmp_path, "## A person-like session on the play page\n\nfirst\n").name == "session.md"
    report = tmp_path / "report.md"
    report.write_text("# Playing Breakout inside the model\n\n## Goals\n\nrollouts\n")
    write_session_report(tmp_path, "## A person-like session on the play page\n\nfirst\n")
    write_session_report(tmp_path, "## A person-like session on the play page\n\nsecond\n")
    text = report.read_text()
    assert text.count("## A person-like session") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Playing Breakout inside the model\n\n## Goals\n\nrollouts\n\n## A person-like")
    report.write_text(text + "\n## Later\n\nkept\n")                     # a section after ours stays
    write_session_report(tmp_path, "## A person-like session on the play page\n\nthird\n")
    text = report.read_text()
    assert "## Later\n\nkept" in text and "third" in text and "second" not in text
    assert text.count("## A person-like session") == 1


# ------------------------------------------------------------------------------------ browser
BRICK, BALL, PADDLE = 128 / 255, 110 / 255, 144 / 255       # k / 255: the served PNG holds them exactly
BALL_X, SERVE_Y, FALL_PX, LAST_Y = 120, 100, 20, 180


def start_frame() -> torch.Tensor:
    """A full wall, the paddle at x = 40, no ball."""
    frame = torch.zeros(1, 210, 160)
    frame[:, 57:93, 8:152] = BRICK
    frame[:, PADDLE_TOP:PADDLE_BOTTOM, 40:56] = PADDLE
    return frame


class BallScript:
    """A stand-in simulator whose physics is known: LEFT / RIGHT move the paddle 4 px; FIRE without a
    ball serves one at x = 120, row 100, and breaks the next brick of the bottom row; the ball falls
    20 rows a step and is gone below row 180. It keeps what it was asked and what it drew."""

    def __init__(self):
        self.pressed, self.drawn, self.broken = [], [], 0

    def codes(self, cur, prev, action, random_codes=None, before=None):
        self.pressed.append(ACTION_NAMES[int(action[0])])
        return Choice(action.view(-1, 1, 1).expand(-1, 7, 5).clone(), None)

    def draw(self, cur, choice, prev=None, older=None):
        action = ACTION_NAMES[int(choice.grid[0, 0, 0])]
        seen = detect_elements(cur[0])
        nxt = cur.clone()
        x = min(max(seen.paddle_x + {"LEFT": -4, "RIGHT": 4}.get(action, 0), 8), 136)
        nxt[..., PADDLE_TOP:PADDLE_BOTTOM, 8:152] = 0
        nxt[..., PADDLE_TOP:PADDLE_BOTTOM, x:x + 16] = PADDLE
        nxt[..., 93:PADDLE_TOP, 8:152] = 0                              # the ball lives below the wall
        y = None if seen.ball is None else seen.ball[1] + FALL_PX
        if seen.ball is None and action == "FIRE":
            y = SERVE_Y
            nxt[..., 87:93, 8 + 8 * self.broken:16 + 8 * self.broken] = 0
            self.broken += 1
        if y is not None and y <= LAST_Y:
            nxt[..., y:y + 4, BALL_X:BALL_X + 2] = BALL
        self.drawn.append(nxt)
        return nxt


def needs_browser():
    problem = browser_missing()
    if problem:
        pytest.skip(problem)


def as_uint8(frame: torch.Tensor) -> np.ndarray:
    return (frame[0] * 255).round().to(torch.uint8).numpy()


def test_a_ball_that_is_seen_but_frozen_in_place_is_not_in_play():
    # what a model did on the play page: the ball drawn mid-field, jittering by a pixel, for 300 steps
    game = [elements(50, (100, 100 + i % 2)) for i in range(7)]
    score = score_session(game, ["NOOP"] * 6)
    assert score["ball"]["seen"] == 1.0
    assert (score["ball"]["steps_seen_twice"], score["ball"]["moving"]) == (6, 0.0)
    ball_goals = [goal for goal in goals(score) if "ball" in goal["goal"]]
    assert [goal["met"] for goal in ball_goals] == [True, False]


def test_a_session_on_the_page_plays_what_the_page_shows_and_writes_its_record(tmp_path):
    needs_browser()
    script = BallScript()
    game = Game(script, [StartFrame(start_frame(), start_frame())], seed=0)
    session = play_session(game, 12)
    # what was pressed is what the server was asked; what was read is what it served
    assert session.actions == script.pressed and session.shown_actions == ["NOOP"] + session.actions
    assert len(session.frames) == 13 and np.array_equal(session.frames[0], as_uint8(start_frame()))
    for read, drawn in zip(session.frames[1:], script.drawn):
        assert np.array_equal(read, as_uint8(drawn[0]))
    # the policy: FIRE on the ballless start, follow the ball right, FIRE again once it left at row 200
    assert session.actions == ["FIRE"] + ["RIGHT"] * 5 + ["FIRE"] + ["RIGHT"] * 5
    assert all(action == follow_the_ball(e) for action, e in zip(session.actions, session.elements))
    assert session.steps_per_s > 0

    (tmp_path / "report.md").write_text("# Playing Breakout inside the model\n\n## Goals\n")
    result = write_session(tmp_path, session, {"checkpoint": "lam.pt", "controller": "c.pt", "seed": 0})
    saved = json.loads((tmp_path / "session.json").read_text())
    score = saved["score"]
    assert score["paddle"]["seen"] == 1.0 and score["presses"]["right"]["moved"] == 1.0
    assert score["ball"] == {"seen": 1.0, "scored_frames": 10, "seen_frames": 10, "launches": 2,
                             "lost_out_of_bottom": 2, "vanished_in_field": 0, "frames_waiting_after_fire": 0,
                             "moving": 1.0, "steps_seen_twice": 8}
    assert score["bricks"] == {"start": 108, "end": 106, "broken": 2, "came_back": 0}
    assert [row["pressed"] for row in saved["frames"]] == session.actions + [None]
    assert [row["paddle_x"] for row in saved["frames"]] == [40 + 4 * max(0, i - 1 - (i > 6)) for i in range(13)]
    sheet = Image.open(tmp_path / saved["contact_sheet"])
    assert sheet.format == "PNG" and sheet.width > 100
    report = (tmp_path / "report.md").read_text()
    assert result["report"] == str(tmp_path / "report.md")
    assert "## A person-like session on the play page" in report and "3 of 4 goals met" in report
    assert "session-contact-sheet.png" in report


# ------------------------------------------------------------------------------------ command
def test_without_a_browser_the_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(play_session_module, "CHROMIUM", tmp_path / "no-chromium")
    code = play.main(["session", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "no-chromium" in err[0] and "Chromium" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def controller_path(tmp_path_factory):
    torch.manual_seed(0)
    controller = Controller(ControllerConfig(channels=(4, 8, 8, 8, 8), hidden=16, action_dim=8))
    return save_controller(tmp_path_factory.mktemp("controller") / "controller.pt", controller.eval(), step=0)


def test_the_session_command_plays_a_real_model(tiny_checkpoint, controller_path, latent_dir, tmp_path, capsys):
    needs_browser()
    out = tmp_path / "play"
    code = play.main(["session", "--checkpoint", str(tiny_checkpoint), "--controller", str(controller_path),
                      "--latent", str(latent_dir), "--out", str(out), "--steps", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "session of 4 steps" in captured.out
    saved = json.loads((out / "session.json").read_text())
    assert saved["steps"] == 4 and len(saved["frames"]) == 5 and saved["checkpoint"] == str(tiny_checkpoint)
    assert (out / "session-contact-sheet.png").is_file() and (out / "session.md").is_file()
