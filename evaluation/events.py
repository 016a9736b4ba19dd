"""Breakout's elements and gameplay events, read from pixels alone.

Works on any frame the project handles: the recorder's RGB PNGs, the model's gray inputs and its
(blurry) predictions. Everything is measured on one gray image with PIL's luma (the shared
`to_model_input`), so a detector gives the same answer on an RGB frame and on its gray version.

Screen layout (ALE Breakout, 210 x 160, measured on the emulator and fixed for the game):
- score line rows 5..14: three score digits, the lives digit at columns 100..111, player number;
  digits are drawn in 4 x 2 pixel blocks, 3 blocks wide and 5 high;
- play field columns 8..151 (side walls outside), rows 32..192 (top wall above);
- bricks: 6 rows of 18, each 8 px wide and 6 px high, from row 57;
- paddle: rows 189..192, 16 px wide (8 after the ball reaches the top wall), left edge x in 8..144;
- ball: 2 px wide, 4 px high.

Labels (pipeline/record.py's meta.jsonl, from console RAM) use the same coordinates: `paddle_x` is
the paddle's left edge, `ball_x`/`ball_y` the ball's top-left pixel (null while the ball is not in
play), so detections and labels compare directly (`ball_from_label` drops off-screen positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH, to_model_input

# A pixel belongs to an object when its gray value is above this. The darkest object (blue bricks)
# has luma 85/255 = 0.33 and the background is 0, so 0.2 keeps every object and, in a blurry
# prediction, only pixels the model drew at more than about half of an object's brightness.
FOREGROUND = 0.2

FIELD_LEFT, FIELD_RIGHT = 8, 152            # play-field columns [left, right)
FIELD_TOP, FIELD_BOTTOM = 32, 193           # play-field rows [top, bottom): below 193 the ball is gone
BRICK_TOP, BRICK_ROWS, BRICK_COLS = 57, 6, 18
BRICK_HEIGHT, BRICK_WIDTH = 6, 8
PADDLE_TOP, PADDLE_BOTTOM = 189, 193        # paddle rows [top, bottom)
PADDLE_MIN_RUN = 4                          # narrower column runs in the paddle rows are the ball
BALL_HEIGHT, BALL_WIDTH = 4, 2
BALL_MIN_PIXELS = 2                         # fewer lit pixels in a ball-sized window: no ball
# Next to a brick or the paddle only pixels this bright count as ball: the ball's own are 0.43 (luma
# 110), while a soft prediction bleeds dimmer halos around objects that would pass for a ball.
BALL_NEAR_OBJECT = 0.3
BRICK_FULL = 0.5                            # a cell more than half lit is a brick (the ball fills < 17 %)
BRICK_PIXELS = BRICK_HEIGHT * BRICK_WIDTH
# Grain: pixels this far above the background where the screen is empty. Dim enough to count what
# the eye sees as noise on black, though the element detectors (FOREGROUND) ignore it.
GRAIN_LEVEL = 0.05
# The game's ball moves 4 to 8 px (across or down) every step while in play: of 5,721 recorded steps
# with it labelled in both frames (the recorder's RAM labels), 9 (0.2 %) moved less than 2 px and 36
# less than 4. A ball seen in place step after step is drawn, not played (a model kept one frozen
# mid-field for a whole session).
BALL_STEP_PX = 2
BALL_MARGIN = 2                             # px around a ball that belong to it, not to grain or another ball
SECOND_BALL_PIXELS = BALL_HEIGHT * BALL_WIDTH // 2

LIVES_TOP, LIVES_LEFT = 5, 100              # the lives digit's top-left pixel
DIGIT_BLOCK_H, DIGIT_BLOCK_W = 2, 4
# Digit glyphs of the score line as 5 rows of 3 blocks (read off the emulator's screen).
DIGIT_GLYPHS = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", ".#.", ".#.", ".#.", ".#."),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
}
_GLYPH_LOOKUP = {tuple("".join(rows)): digit for digit, rows in DIGIT_GLYPHS.items()}


@dataclass(frozen=True)
class Elements:
    """What one frame shows: paddle left edge, ball top-left (x, y) or None, brick map, lives digit;
    and, for judging generated frames, how many balls (0, 1, or 2 for two or more), the lit pixels of
    the brick rows, and the grain on the empty background (lit pixels where nothing is drawn)."""

    paddle_x: int | None
    ball: tuple[int, int] | None
    bricks: np.ndarray = field(repr=False)       # bool (BRICK_ROWS, BRICK_COLS)
    lives: int | None = None
    balls: int = 0
    brick_pixels: int = 0
    grain: float = 0.0


@dataclass(frozen=True)
class TransitionEvents:
    """Gameplay events of one transition t -> t+1."""

    paddle: str                  # "left" | "right" | "none" (the paddle's left edge moved)
    ball_bounced: bool           # vertical velocity changed sign at frame t (needs frame t-1)
    bricks_broken: int           # bricks present at t and gone at t+1
    life_lost: bool
    life_source: str             # "meta" (recorder's lives) | "pixels" (lives digit) | "ball" (ball vanished)

    def names(self) -> list[str]:
        """The events that happened, as labels for figures and tables."""
        names = [] if self.paddle == "none" else [f"paddle_{self.paddle}"]
        names += ["bounce"] * self.ball_bounced + ["brick"] * (self.bricks_broken > 0)
        names += ["life_lost"] * self.life_lost
        return names


# ------------------------------------------------------------------------------------ frames
def to_gray(frame) -> np.ndarray:
    """Any frame -> float32 (210, 160) gray in [0, 1].

    Accepts uint8 (H, W, 3) RGB or (H, W) / (H, W, 1) gray, as decoded from PNG, and float
    (C, H, W) or (H, W) in [0, 1], as the model takes and gives; a 3-channel float frame is RGB."""
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(frame if frame.flags.writeable else frame.copy())
    frame = frame.detach().cpu()
    if frame.dtype == torch.uint8:
        if frame.ndim == 2:
            frame = frame[..., None]
        gray = to_model_input(frame, grayscale=True)[0]
    else:
        frame = frame.to(torch.float32)
        if frame.ndim == 3 and frame.shape[0] == 3:
            # float RGB: back to uint8 so the luma is exactly the shared (PIL) formula
            rgb = (frame.clamp(0, 1) * 255).round().to(torch.uint8).movedim(0, -1)
            gray = to_model_input(rgb, grayscale=True)[0]
        else:
            gray = frame.reshape(frame.shape[-2:])
    if tuple(gray.shape) != (FRAME_HEIGHT, FRAME_WIDTH):
        raise ValueError(f"expected a {FRAME_HEIGHT}x{FRAME_WIDTH} frame, got {tuple(gray.shape)}")
    return gray.numpy()


def above_background(frame) -> np.ndarray:
    """float (210, 160): brightness above the background level (the median of the empty band between
    bricks and paddle): 0 on a real frame, but a model's prediction may lay a gray veil over the screen."""
    gray = to_gray(frame)
    return gray - float(np.median(gray[BRICK_TOP + BRICK_ROWS * BRICK_HEIGHT:PADDLE_TOP, FIELD_LEFT:FIELD_RIGHT]))


# --------------------------------------------------------------------------------- detectors
def detect_bricks(mask: np.ndarray) -> np.ndarray:
    """bool (6, 18): which brick cells are filled."""
    cells = mask[BRICK_TOP:BRICK_TOP + BRICK_ROWS * BRICK_HEIGHT, FIELD_LEFT:FIELD_RIGHT]
    cells = cells.reshape(BRICK_ROWS, BRICK_HEIGHT, BRICK_COLS, BRICK_WIDTH)
    return cells.mean(axis=(1, 3)) > BRICK_FULL


def _column_runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D bool array as (start, stop) pairs."""
    padded = np.concatenate([[False], columns, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def paddle_span(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, stop) columns of the paddle, or None: the widest run of lit columns in the paddle rows
    (a run narrower than PADDLE_MIN_RUN is the ball passing through those rows)."""
    rows = mask[PADDLE_TOP:PADDLE_BOTTOM, FIELD_LEFT:FIELD_RIGHT]
    runs = [run for run in _column_runs(rows.sum(axis=0) >= 2) if run[1] - run[0] >= PADDLE_MIN_RUN]
    if not runs:
        return None
    start, stop = max(runs, key=lambda run: run[1] - run[0])
    return start + FIELD_LEFT, stop + FIELD_LEFT


def detect_ball(mask: np.ndarray, bricks: np.ndarray, paddle: tuple[int, int] | None,
                bright: np.ndarray | None = None) -> tuple[int, int] | None:
    """Top-left (x, y) of the ball, or None when it is not visible (see `detect_balls`)."""
    balls = detect_balls(mask, bricks, paddle, bright)
    return balls[0] if balls else None


def detect_balls(mask: np.ndarray, bricks: np.ndarray, paddle: tuple[int, int] | None,
                 bright: np.ndarray | None = None, most: int = 2) -> list[tuple[int, int]]:
    """Top-left (x, y) of up to `most` balls, the clearest first (Breakout has one; a generated frame
    may draw two).

    A ball is what is left in the play field once bricks and paddle are masked out; its position is
    the ball-sized window holding most lit pixels (robust to stray pixels in predictions), and the
    next ball is searched with that one (and a margin) blanked; it must light half a ball's pixels. A ball overlapping a standing brick
    is hidden by it, as on screen. `bright` (pixels above BALL_NEAR_OBJECT) decides the one-pixel
    ring around bricks and paddle; without it the ring is left out entirely."""
    objects = np.zeros_like(mask)
    brick_pixels = np.repeat(np.repeat(bricks, BRICK_HEIGHT, 0), BRICK_WIDTH, 1)
    objects[BRICK_TOP:BRICK_TOP + brick_pixels.shape[0], FIELD_LEFT:FIELD_RIGHT] = brick_pixels
    if paddle is not None:
        objects[PADDLE_TOP:PADDLE_BOTTOM, paddle[0]:paddle[1]] = True
    ring = _dilate(objects) & ~objects
    halo = ring if bright is None else ring & ~bright
    rest = (mask & ~objects & ~halo)[FIELD_TOP:FIELD_BOTTOM, FIELD_LEFT:FIELD_RIGHT].copy()
    found = []
    while len(found) < most and rest.sum() >= BALL_MIN_PIXELS:
        window = _box_sums(rest, BALL_HEIGHT, BALL_WIDTH)
        y, x = np.unravel_index(np.argmax(window), window.shape)
        # a further ball must be half a ball's pixels: a few stray pixels beside a smeared ball are its smear
        if window[y, x] < (BALL_MIN_PIXELS if not found else SECOND_BALL_PIXELS):
            break
        ys, xs = np.nonzero(rest[y:y + BALL_HEIGHT, x:x + BALL_WIDTH])
        found.append((int(x + xs.min() + FIELD_LEFT), int(y + ys.min() + FIELD_TOP)))
        rest[max(0, y - BALL_MARGIN):y + BALL_HEIGHT + BALL_MARGIN, max(0, x - BALL_MARGIN):x + BALL_WIDTH + BALL_MARGIN] = False
    return found


def background_grain(level: np.ndarray, balls: list[tuple[int, int]]) -> float:
    """The share of the empty play field (above and below the brick rows, above the paddle) lit above
    GRAIN_LEVEL, the balls and their margins left out: 0 on a recorded frame."""
    lit = level[FIELD_TOP:PADDLE_TOP, FIELD_LEFT:FIELD_RIGHT] > GRAIN_LEVEL
    empty = np.ones_like(lit)
    empty[BRICK_TOP - FIELD_TOP:BRICK_TOP - FIELD_TOP + BRICK_ROWS * BRICK_HEIGHT] = False
    for x, y in balls:
        top, left = y - FIELD_TOP - BALL_MARGIN, x - FIELD_LEFT - BALL_MARGIN
        empty[max(0, top):top + BALL_HEIGHT + 2 * BALL_MARGIN, max(0, left):left + BALL_WIDTH + 2 * BALL_MARGIN] = False
    return float((lit & empty).sum() / max(1, empty.sum()))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by one pixel in all eight directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return wide


def _box_sums(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Count of True in every height x width window (top-left indexed), by an integral image."""
    integral = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (integral[height:, width:] - integral[:-height, width:]
            - integral[height:, :-width] + integral[:-height, :-width])


def read_lives(mask: np.ndarray) -> int | None:
    """The lives digit of the score line, or None when the glyph is not a known digit."""
    blocks = mask[LIVES_TOP:LIVES_TOP + 5 * DIGIT_BLOCK_H, LIVES_LEFT:LIVES_LEFT + 3 * DIGIT_BLOCK_W]
    blocks = blocks.reshape(5, DIGIT_BLOCK_H, 3, DIGIT_BLOCK_W).mean(axis=(1, 3)) > 0.5
    return _GLYPH_LOOKUP.get(tuple("#" if lit else "." for lit in blocks.ravel()))


def detect_elements(frame) -> Elements:
    """Paddle, ball, bricks and lives of one frame (see `to_gray` for accepted frame types)."""
    level = above_background(frame)
    mask = level > FOREGROUND
    bricks = detect_bricks(mask)
    paddle = paddle_span(mask)
    balls = detect_balls(mask, bricks, paddle, bright=level > BALL_NEAR_OBJECT)
    brick_rows = mask[BRICK_TOP:BRICK_TOP + BRICK_ROWS * BRICK_HEIGHT, FIELD_LEFT:FIELD_RIGHT]
    return Elements(paddle_x=None if paddle is None else paddle[0], ball=balls[0] if balls else None, bricks=bricks,
                    lives=read_lives(mask), balls=len(balls), brick_pixels=int(brick_rows.sum()),
                    grain=background_grain(level, balls))


# ------------------------------------------------------------------------------------ events
def paddle_motion(cur: Elements, nxt: Elements) -> str:
    if cur.paddle_x is None or nxt.paddle_x is None or cur.paddle_x == nxt.paddle_x:
        return "none"
    return "right" if nxt.paddle_x > cur.paddle_x else "left"


def ball_bounced(before: Elements | None, cur: Elements, nxt: Elements) -> bool:
    """Vertical velocity changed sign around frame t; unknown (False) without frame t-1 or a ball."""
    if before is None or before.ball is None or cur.ball is None or nxt.ball is None:
        return False
    v_in, v_out = cur.ball[1] - before.ball[1], nxt.ball[1] - cur.ball[1]
    return v_in * v_out < 0


def ball_moved(before: Elements, after: Elements) -> bool | None:
    """Did the ball move as the game's does, at least BALL_STEP_PX across or down? None unless both
    frames show one."""
    if before.ball is None or after.ball is None:
        return None
    return max(abs(after.ball[0] - before.ball[0]), abs(after.ball[1] - before.ball[1])) >= BALL_STEP_PX


def bricks_broken(cur: Elements, nxt: Elements) -> int:
    return int((cur.bricks & ~nxt.bricks).sum())


def life_lost(cur: Elements, nxt: Elements, meta: dict | None = None) -> tuple[bool, str]:
    """(lost, source). The recorder's `life_lost` when the pair carries it; else the lives digit on
    screen; else (digit unreadable, e.g. a blurry prediction) the ball vanishing below the paddle.

    The digit changes in the same frame as the console's lives counter, some steps after the ball
    left; the last life is never seen on screen (the game ends with the digit still at 1)."""
    if meta and "life_lost" in meta:
        return bool(meta["life_lost"]), "meta"
    if cur.lives is not None and nxt.lives is not None:
        return nxt.lives < cur.lives, "pixels"
    fell = cur.ball is not None and cur.ball[1] >= PADDLE_TOP - 2 * BALL_HEIGHT and nxt.ball is None
    return fell, "ball"


def transition_events(before: Elements | None, cur: Elements, nxt: Elements,
                      meta: dict | None = None) -> TransitionEvents:
    """Events of transition t -> t+1 from the elements of frames t-1 (or None), t and t+1."""
    lost, source = life_lost(cur, nxt, meta)
    return TransitionEvents(paddle=paddle_motion(cur, nxt), ball_bounced=ball_bounced(before, cur, nxt),
                            bricks_broken=bricks_broken(cur, nxt), life_lost=lost, life_source=source)


def sequence_events(elements: Sequence[Elements], metas: Sequence[dict] | None = None) -> list[TransitionEvents]:
    """Events of consecutive frames' elements (transition t uses frames t-1, t, t+1)."""
    return [transition_events(elements[t - 1] if t > 0 else None, elements[t], elements[t + 1],
                              metas[t] if metas is not None else None)
            for t in range(len(elements) - 1)]


# ------------------------------------------------------------------------------------ labels
def ball_from_label(ball_x: int | None, ball_y: int | None) -> tuple[int, int] | None:
    """The recorder's ball position -> (x, y) where the screen shows it, or None when it is not in
    play or outside the play field (under a side wall, below the paddle)."""
    if ball_x is None or ball_y is None:
        return None
    x, y = int(ball_x), int(ball_y)
    if not (FIELD_LEFT <= x < FIELD_RIGHT and FIELD_TOP <= y < FIELD_BOTTOM):
        return None
    return x, y


def events_from_labels(metas: Sequence[dict]) -> list[dict]:
    """Ground-truth events of consecutive transitions from the recorder's RAM fields, to hold the
    pixel detectors against: paddle motion, vertical bounce at frame t, life lost, reward."""
    out = []
    for t, meta in enumerate(metas):
        cur = ball_from_label(meta["ball_x"], meta["ball_y"])
        nxt = ball_from_label(meta["next_ball_x"], meta["next_ball_y"])
        prev = ball_from_label(metas[t - 1]["ball_x"], metas[t - 1]["ball_y"]) if t > 0 else None
        moved = meta["next_paddle_x"] - meta["paddle_x"]
        bounced = None not in (prev, cur, nxt) and (cur[1] - prev[1]) * (nxt[1] - cur[1]) < 0
        lost = bool(meta.get("life_lost", False))
        out.append({"paddle": "none" if moved == 0 else ("right" if moved > 0 else "left"),
                    "ball_bounced": bounced, "life_lost": lost, "reward": meta.get("reward", 0)})
    return out


def count_events(events: Iterable[TransitionEvents]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        for name in event.names():
            counts[name] = counts.get(name, 0) + 1
    return counts
