"""A person-like session on the play page, the end-to-end check of play: a policy that follows the
ball (FIRE when there is none) plays the real page in headless Chromium, one key press at a time,
seeing only what the page shows, and the session is scored from the served frames' pixels.

- `follow_the_ball`: the policy, on a frame's detected elements (evaluation/events.py).
- `drive_page`: load the page, restart, then each step read the frame the page shows (img#frame's
  PNG data URL), decide, press the page's key (the arrows, space, the down arrow) and wait for the
  page to show the next step (#step). Every served frame and every press is kept.
- `score_session`: paddle seen, ball seen while in play, bricks broken, presses that moved the
  paddle; `record_session` plays a game through the real server (`play_session`) and writes
  session.json, a contact sheet of every 10th frame and the report's section (`write_session`).
"""
from __future__ import annotations

import base64
import importlib.util
import io
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from evaluation.events import BALL_STEP_PX, BALL_WIDTH, Elements, ball_moved, detect_elements
from evaluation.formatting import pct
from pipeline.shards import atomic_write_bytes, atomic_write_json

from control.controllability import PADDLE_MAX_X, PADDLE_MIN_X
from control.figures import contact_sheet
from control.report import SESSION_TITLE, session_section
from control.server import make_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=800,1000")
PAGE_TIMEOUT_S = 60.0               # one model step on a loaded CPU takes well under a second
# The page's own keys for each action (control/static/play.js), as WebDriver key codes.
ACTION_KEYS = {"LEFT": "\ue012", "RIGHT": "\ue014", "FIRE": " ", "NOOP": "\ue015"}

PADDLE_WIDTH = 16                   # px; 8 once the ball has reached the top wall, which the detector does not say
FOLLOW_DEAD_ZONE_PX = 4             # the paddle's centre this close to the ball's: stay (NOOP)
# A ball last seen with its top at or below this row that then vanishes has left through the bottom
# (a life lost: the ball is out of play until the next FIRE); one that vanishes above it was erased.
# The ball is seen down to row 192 and moves at most 8 rows a step, so the game's ball on its way out
# is last seen at row 185 or further down (the recorded test episodes: 187 to 192); 180 leaves a
# margin for a model's ball.
OUT_OF_PLAY_Y = 180
SHEET_EVERY = 10                    # the contact sheet shows every 10th frame
# Goals (issue "Play forward for 200 steps"; the moving ball: a frozen ball met the ball goal).
PADDLE_GOAL, BALL_GOAL, BALL_MOVING_GOAL, BRICKS_GOAL = 1.0, 0.90, 0.90, 3


# ------------------------------------------------------------------------------------ the policy
def follow_the_ball(elements: Elements, dead_zone: int = FOLLOW_DEAD_ZONE_PX) -> str:
    """What a person does: FIRE when no ball is seen, else move the paddle's centre toward the
    ball's (LEFT / RIGHT), NOOP when within `dead_zone` px of it or with no paddle to move."""
    if elements.ball is None:
        return "FIRE"
    if elements.paddle_x is None:
        return "NOOP"
    gap = (elements.ball[0] + BALL_WIDTH / 2) - (elements.paddle_x + PADDLE_WIDTH / 2)
    if abs(gap) <= dead_zone:
        return "NOOP"
    return "RIGHT" if gap > 0 else "LEFT"


# ------------------------------------------------------------------------------------ the browser
def browser_missing() -> str | None:
    """What the session needs and this machine lacks, in words; None when all is there."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if not missing:
        return None
    return (f"a play session drives the page in headless Chromium; missing: {', '.join(missing)} "
            f"(apt-get install -y chromium chromium-driver; pip install selenium)")


def check_browser() -> None:
    problem = browser_missing()
    if problem:
        raise UserError(problem)


@contextmanager
def headless_chromium() -> Iterator:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for option in BROWSER_FLAGS:
        options.add_argument(option)
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as error:         # a driver that does not match the browser, a crash
        raise UserError(f"headless Chromium did not start: {first_line(error.msg or str(error))}") from None
    try:
        yield driver
    finally:
        driver.quit()


def first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no reason given"


# Counts the frames the page shows (each show() sets img#frame's src, even to the same picture) and
# wakes the waiting script when a frame or an error appears; it watches the page, it changes nothing.
WATCH_JS = """
window.__session = {shown: 0, waiting: []};
const wake = () => { const w = window.__session.waiting; window.__session.waiting = []; w.forEach(f => f()); };
new MutationObserver(() => { window.__session.shown++; wake(); })
  .observe(document.getElementById("frame"), {attributes: true, attributeFilter: ["src"]});
new MutationObserver(wake).observe(document.getElementById("error"), {attributes: true, childList: true});
"""
# Resolves with the page's state once it has shown more than `after` frames (or an error).
WAIT_JS = """
const after = arguments[0], done = arguments[arguments.length - 1];
const read = () => {
  const error = document.getElementById("error");
  return {shown: window.__session.shown, step: document.getElementById("step").textContent,
          action: document.getElementById("action").textContent,
          frame: document.getElementById("frame").getAttribute("src") || "",
          error: error.hidden ? null : error.textContent};
};
const check = () => {
  const state = read();
  if (state.shown > after || state.error !== null) done(state); else window.__session.waiting.push(check);
};
check();
"""


class PageError(UserError):
    """The page did not do what a press asks: an error on it, no next step, a step too many."""


@dataclass
class Session:
    """What the page showed and what was pressed: frames[i] is step i's frame as served (uint8,
    (H, W) gray or (H, W, 3)); actions[i] the key pressed on frames[i], which produced frames[i + 1];
    shown_actions[i] the action the page names for frames[i] (NOOP at the restart)."""

    frames: list[np.ndarray]
    elements: list[Elements]
    actions: list[str]
    shown_actions: list[str]
    seconds: float                      # from the first press to the last frame read

    @property
    def steps_per_s(self) -> float | None:
        return len(self.actions) / self.seconds if self.seconds > 0 else None


def decode_frame(data_url: str) -> np.ndarray:
    if not data_url.startswith("data:image/png;base64,"):
        raise PageError(f"the page shows no PNG frame (img#frame src {data_url[:40]!r})")
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def wait_for_frame(driver, after: int, what: str) -> dict:
    from selenium.common.exceptions import TimeoutException

    try:
        state = driver.execute_async_script(WAIT_JS, after)
    except TimeoutException:
        raise PageError(f"the page did not show {what} within {PAGE_TIMEOUT_S:.0f} s") from None
    if state["error"] is not None:
        raise PageError(f"the page says: {state['error']}")
    return state


def drive_page(url: str, steps: int, policy: Callable[[Elements], str] = follow_the_ball,
               released: Callable[[], None] = lambda: None) -> Session:
    """Play `steps` steps on the page at `url` in headless Chromium: a restart, then each step the
    policy's key for the frame the page shows, waiting for the page to show the next step.
    `released` is called once each press's key is up again (PacedGame's release)."""
    with headless_chromium() as driver:
        driver.set_script_timeout(PAGE_TIMEOUT_S)
        driver.get(url)
        driver.execute_script(WATCH_JS)
        state = wait_for_frame(driver, -1, "its first frame")    # the page's own GET /api/state
        if not state["frame"]:
            state = wait_for_frame(driver, state["shown"], "its first frame")
        driver.find_element("id", "restart").click()
        state = wait_for_frame(driver, state["shown"], "the restarted game")
        if state["step"] != "0":
            raise PageError(f"after a restart the page shows step {state['step']}, not 0")
        body = driver.find_element("tag name", "body")
        frames, shown, actions = [decode_frame(state["frame"])], [state["action"]], []
        elements = [detect_elements(frames[0])]
        began = time.perf_counter()
        for step in range(1, steps + 1):
            action = policy(elements[-1])
            body.send_keys(ACTION_KEYS[action])             # key down and up
            released()
            state = wait_for_frame(driver, state["shown"], f"step {step} after {action}")
            if (state["step"], state["action"]) != (str(step), action):
                raise PageError(f"pressed {action} for step {step}, but the page shows step {state['step']} "
                                f"after {state['action']}: a press did not make exactly one step")
            actions.append(action)
            frames.append(decode_frame(state["frame"]))
            shown.append(state["action"])
            elements.append(detect_elements(frames[-1]))
        return Session(frames, elements, actions, shown, time.perf_counter() - began)


class PacedGame:
    """The game, each step held until the key that asked for it is up again. While a key is down the
    page keeps stepping (play.js's held-key loop), so an answer that came back between the WebDriver's
    key-down and key-up (a fast model, a loaded machine) would make a second step, and the session
    wants exactly one per press."""

    def __init__(self, game):
        self.game = game
        self.presses = threading.Semaphore(0)
        self.asked = 0                      # steps the page asked for

    def release(self) -> None:
        self.presses.release()

    def step(self, action: str) -> dict:
        self.asked += 1
        if not self.presses.acquire(timeout=PAGE_TIMEOUT_S):
            raise RuntimeError("a step that no key press asked for")       # the server answers 500
        return self.game.step(action)

    def state(self) -> dict:
        return self.game.state()

    def restart(self) -> dict:
        return self.game.restart()


@contextmanager
def serving(game) -> Iterator[str]:
    """The real play server for `game` on a free local port, in a thread; yields the page's URL."""
    server = make_server("127.0.0.1", 0, game)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ the score
def share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def score_session(elements: Sequence[Elements], actions: Sequence[str]) -> dict:
    """elements[0] is the start frame (a recorded one), elements[i] the frame actions[i - 1] produced.
    Only generated frames are scored for the paddle and the ball; bricks count from the start frame."""
    if len(elements) != len(actions) + 1:
        raise ValueError(f"{len(elements)} frames for {len(actions)} presses: expected one frame more")
    generated = elements[1:]
    return {"steps": len(actions),
            "paddle": {"seen": share([e.paddle_x is not None for e in generated]),
                       "missing_frames": sum(e.paddle_x is None for e in generated)},
            "ball": ball_in_play(elements, actions),
            "bricks": bricks_broken(elements),
            "presses": {"left": presses_that_moved(elements, actions, "LEFT"),
                        "right": presses_that_moved(elements, actions, "RIGHT")},
            "actions": {name: actions.count(name) for name in ACTION_KEYS}}


def ball_in_play(elements: Sequence[Elements], actions: Sequence[str]) -> dict:
    """The share of generated frames, while the ball is in play, that show it.

    In play: from the frame after a FIRE pressed while the ball was out of play (the first FIRE,
    unless the start frame shows a ball) or from a frame that shows one; out of play from the first
    frame without it once it was last seen at or below OUT_OF_PLAY_Y (it left through the bottom).
    So every frame after the first FIRE is scored except those after the ball left through the
    bottom and before the FIRE that relaunches it: a ball that vanishes higher up (erased) counts as
    missing until it is seen again, and so do the frames between a launching FIRE and the ball's
    appearing (counted apart too: frames_waiting_after_fire).

    "moving": of the steps whose frame before and after both show the ball, the share in which it
    moved at least BALL_STEP_PX px across or down, as the game's ball does."""
    first = elements[0].ball
    in_play, last_y, waiting = first is not None, None if first is None else first[1], False
    scored = seen = lost = vanished = launches = waited = seen_twice = moved = 0
    for i in range(1, len(elements)):
        ball = elements[i].ball
        if actions[i - 1] == "FIRE" and not in_play:
            in_play, last_y, waiting = True, None, True
            launches += 1
        if ball is not None:
            in_play, last_y, waiting = True, ball[1], False
            scored, seen = scored + 1, seen + 1
            step = ball_moved(elements[i - 1], elements[i])
            seen_twice, moved = seen_twice + (step is not None), moved + bool(step)
        elif not in_play:
            continue
        elif last_y is not None and last_y >= OUT_OF_PLAY_Y:
            in_play, lost = False, lost + 1
        else:
            vanished += elements[i - 1].ball is not None
            waited += waiting
            scored += 1
    return {"seen": share([True] * seen + [False] * (scored - seen)), "scored_frames": scored, "seen_frames": seen,
            "launches": launches, "lost_out_of_bottom": lost, "vanished_in_field": vanished,
            "frames_waiting_after_fire": waited,
            "moving": share([True] * moved + [False] * (seen_twice - moved)), "steps_seen_twice": seen_twice}


def bricks_broken(elements: Sequence[Elements]) -> dict:
    """Bricks the start frame shows and the last does not, each gone for good from when it first
    went; a brick cell that stands again after it was gone (or where the start had none) came back,
    which the game never does."""
    start = elements[0].bricks
    gone, back = ~start, np.zeros_like(start)
    for e in elements[1:]:
        back |= e.bricks & gone
        gone |= ~e.bricks
    broken = start & ~elements[-1].bricks & ~back
    return {"start": int(start.sum()), "end": int(elements[-1].bricks.sum()), "broken": int(broken.sum()),
            "came_back": int(back.sum())}


def presses_that_moved(elements: Sequence[Elements], actions: Sequence[str], action: str) -> dict:
    """Presses of LEFT (RIGHT) whose next frame shows the paddle's left edge left (right) of where it
    was. Left out: presses on a frame without a paddle, and presses toward a wall the paddle touches
    (left edge <= 8 for LEFT, >= 144 for RIGHT); a next frame without a paddle is a failure."""
    at_wall = (lambda x: x <= PADDLE_MIN_X) if action == "LEFT" else (lambda x: x >= PADDLE_MAX_X)
    toward = (lambda a, b: b < a) if action == "LEFT" else (lambda a, b: b > a)
    pressed = [i for i, a in enumerate(actions) if a == action]
    scored = [i for i in pressed if elements[i].paddle_x is not None and not at_wall(elements[i].paddle_x)]
    moved = [i for i in scored if elements[i + 1].paddle_x is not None
             and toward(elements[i].paddle_x, elements[i + 1].paddle_x)]
    return {"moved": share([i in moved for i in scored]), "presses": len(pressed), "scored": len(scored),
            "at_wall": sum(elements[i].paddle_x is not None and at_wall(elements[i].paddle_x) for i in pressed),
            "no_paddle": sum(elements[i].paddle_x is None for i in pressed),
            "paddle_lost": sum(elements[i + 1].paddle_x is None for i in scored)}


def goals(score: dict) -> list[dict]:
    """The issue's goals for a session, each with its value and whether it is met."""
    paddle, ball, bricks = score["paddle"]["seen"], score["ball"]["seen"], score["bricks"]["broken"]
    moving = score["ball"]["moving"]
    return [{"goal": "paddle seen in every frame", "value": paddle, "met": paddle is not None and paddle >= PADDLE_GOAL},
            {"goal": f"ball seen in ≥ {BALL_GOAL:.0%} of the frames while in play (after FIRE)", "value": ball,
             "met": ball is not None and ball >= BALL_GOAL},
            {"goal": f"the ball moves (≥ {BALL_STEP_PX} px a step, as the game's does) in "
                     f"≥ {BALL_MOVING_GOAL:.0%} of the steps it is seen before and after", "value": moving,
             "met": moving is not None and moving >= BALL_MOVING_GOAL},
            {"goal": f"≥ {BRICKS_GOAL} bricks broken (and none back)", "value": bricks,
             "met": bricks >= BRICKS_GOAL and score["bricks"]["came_back"] == 0}]


# ------------------------------------------------------------------------------------ the record
def to_tensor(frame: np.ndarray) -> torch.Tensor:
    """A served frame (H, W) or (H, W, 3) uint8 -> (C, H, W) float in [0, 1], for the contact sheet."""
    array = torch.from_numpy(frame).float() / 255
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


def frame_rows(session: Session) -> list[dict]:
    rows = []
    for i, e in enumerate(session.elements):
        rows.append({"step": i, "shown_action": session.shown_actions[i],
                     "pressed": session.actions[i] if i < len(session.actions) else None,
                     "paddle_x": e.paddle_x, "ball": None if e.ball is None else list(e.ball), "balls": e.balls,
                     "bricks": int(e.bricks.sum())})
    return rows


def write_contact_sheet(path: Path, session: Session) -> Path:
    """Every SHEET_EVERY-th frame, labelled with its step and the key that produced it."""
    picked = range(0, len(session.frames), SHEET_EVERY)
    labels = [f"{i} start" if i == 0 else f"{i} {session.actions[i - 1]}" for i in picked]
    return contact_sheet(path, [to_tensor(session.frames[i]) for i in picked], columns=10, labels=labels)


def write_session_report(out: Path, section: str) -> Path:
    """The section, in place of any earlier one, at the end of out/report.md (the rollouts' report)
    when there is one, else alone in out/session.md."""
    report = out / "report.md"
    if not report.is_file():
        path = out / "session.md"
        atomic_write_bytes(path, section.encode())
        return path
    text = report.read_text()
    start = text.find(SESSION_TITLE + "\n")
    if start >= 0:                      # an earlier session's section: up to the next section, if any
        end = text.find("\n## ", start + len(SESSION_TITLE))
        text = text[:start] + ("" if end < 0 else text[end + 1:])
    atomic_write_bytes(report, (text.rstrip("\n") + "\n\n" + section).encode())
    return report


def play_session(game, steps: int) -> Session:
    """`steps` steps of `game` played by the policy through the real server and page; the steps the
    page asked the server for confirm that it made one step per press and no more."""
    paced = PacedGame(game)
    with serving(paced) as url:
        session = drive_page(url, steps, released=paced.release)
    if paced.asked != steps:
        raise PageError(f"the page asked for {paced.asked} steps for {steps} presses")
    return session


def play_without_browser(game, steps: int, policy: Callable[[Elements], str] = follow_the_ball) -> Session:
    """The same policy and the same frames (the server's PNGs), on the game's own step API without
    the page, the server or a browser: a session's figures where Chromium is not installed, and
    several starts cheaply (bench/ablate.py). The end-to-end check stays `play_session`."""
    state = game.restart()
    frames, shown, actions = [decode_frame(state["frame"])], [state["action"]], []
    elements = [detect_elements(frames[0])]
    began = time.perf_counter()
    for _ in range(steps):
        action = policy(elements[-1])
        state = game.step(action)
        actions.append(action)
        frames.append(decode_frame(state["frame"]))
        shown.append(state["action"])
        elements.append(detect_elements(frames[-1]))
    return Session(frames, elements, actions, shown, time.perf_counter() - began)


def write_session(out: Path, session: Session, about: dict) -> dict:
    """session.json, the contact sheet and the report's section, into `out`; returns what
    session.json holds (and where the report went). `about`: what was played (checkpoints, seed)."""
    score = score_session(session.elements, session.actions)
    out.mkdir(parents=True, exist_ok=True)
    sheet = write_contact_sheet(out / "session-contact-sheet.png", session)
    result = {**about, "steps": len(session.actions), "steps_per_s": session.steps_per_s,
              "seconds": round(session.seconds, 2),
              "policy": f"follow the ball (FIRE without one; NOOP within {FOLLOW_DEAD_ZONE_PX} px)",
              "rules": {"out_of_play_y": OUT_OF_PLAY_Y, "wall_left_x": PADDLE_MIN_X, "wall_right_x": PADDLE_MAX_X,
                        "ball_step_px": BALL_STEP_PX, "sheet_every": SHEET_EVERY},
              "score": score, "goals": goals(score), "contact_sheet": sheet.name, "frames": frame_rows(session)}
    atomic_write_json(out / "session.json", result)
    result["report"] = str(write_session_report(out, session_section(result)))
    return result


def record_session(game, out: Path, steps: int, about: dict, browser: bool = True) -> dict:
    session = play_session(game, steps) if browser else play_without_browser(game, steps)
    return write_session(out, session, {**about, "browser": browser})


def summary(result: dict) -> str:
    """One line for the command line."""
    score = result["score"]
    left, right = score["presses"]["left"], score["presses"]["right"]
    rate = result["steps_per_s"]
    return (f"session of {result['steps']} steps ({'n/a' if rate is None else f'{rate:.1f}'} steps/s): "
            f"paddle seen {pct(score['paddle']['seen'], 0)}, ball while in play {pct(score['ball']['seen'], 0)} "
            f"of {score['ball']['scored_frames']} frames (moving in {pct(score['ball']['moving'], 0)} of "
            f"{score['ball']['steps_seen_twice']} steps), bricks broken {score['bricks']['broken']} "
            f"(back {score['bricks']['came_back']}), presses that moved: LEFT {pct(left['moved'], 0)} of "
            f"{left['scored']}, RIGHT {pct(right['moved'], 0)} of {right['scored']}; report: {result['report']}")
