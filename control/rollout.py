"""Long rollouts: from recorded test frames the model plays `horizon` steps, each generated frame fed
back in, and every step is scored against the recording. Two kinds side by side (DESIGN "Control
and play"), beside copying the start frame:

- `codes`: the codes extracted from the recording for each step: the decoder's drift alone;
- `controller`: the controller's codes for the recorded action: what a player gets.

Per step, over every start: PSNR; paddle found and within 2 px of the recording's; ball found
where the recording shows one, and of those found in the step before too, the share that moved as
the game's ball does (a frozen ball is found, not played); a ball where it shows none, two balls;
brick pixels lost since the start frame (in bricks) beside the recording's, and whether they agree
within one brick (+10 %); bricks that come back after they were gone; grain on the empty
background. Paddle, ball and bricks come from the pixel detectors (evaluation/events.py), the same
on recorded and generated frames.
PSNR is 10·log10(1/MSE) with the MSE over every pixel of every start at that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from evaluation.events import BRICK_PIXELS, Elements, ball_moved, detect_elements
from evaluation.metrics import ReconstructionMeter

from control.data import NONE, Episode
from control.simulator import Choice, Simulator

KINDS = ("codes", "controller")
# A LAM with a per-frame action code can also be played from the recording's action codes alone, with
# no grid: how the decoder fares when only the player's choice is given.
ACTION_ONLY = "action_codes"
TOLERANCE_PX = 2
BRICKS_SLACK = 1.0          # brick pixels lost may differ from the recording's by one brick ...
BRICKS_SLACK_SHARE = 0.1    # ... plus 10 % of the recording's


# ------------------------------------------------------------------------------------ starts
@dataclass(frozen=True)
class Start:
    episode: int            # index into the episode list
    t: int                  # start frame index


def rollout_starts(episodes: list[Episode], horizon: int, count: int) -> list[Start]:
    """Up to `count` starts spread evenly over every (episode, t) that has `horizon` recorded steps after it."""
    eligible = [Start(e, t) for e, episode in enumerate(episodes) for t in range(episode.steps - horizon + 1)]
    if len(eligible) <= count:
        return eligible
    picks = np.linspace(0, len(eligible) - 1, count).round().astype(int)
    return [eligible[i] for i in picks]


def start_frames(episodes: list[Episode], starts: list[Start]) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames t, frames t-1) of the starts, (B, C, 210, 160); frame t itself at an episode's start."""
    cur = torch.stack([episodes[s.episode].frames[s.t] for s in starts])
    prev = torch.stack([episodes[s.episode].frames[max(s.t - 1, 0)] for s in starts])
    return cur, prev


def older_frames(sim: Simulator, episodes: list[Episode], starts: list[Start]) -> list[torch.Tensor]:
    """The recorded frames before t-1 that the simulator's world model sees (t-2, ..., oldest first;
    frame 0 where the episode has none): none for the LAM's decoder or a world model of t-1 and t."""
    count = 0 if sim.world is None else sim.world.past_frames - 2
    return [torch.stack([episodes[s.episode].frames[max(s.t - back, 0)] for s in starts])
            for back in range(count + 1, 1, -1)]


@dataclass
class Recorded:
    """What the recording did after each start: actions (B, H), codes (B, H, 7, 5), action codes
    (B, H) when the LAM has them, frames t+1..t+H; and the codes of the transition into the start
    frame (`before`, negative at an episode's first frame)."""

    actions: torch.Tensor
    codes: torch.Tensor
    action_codes: torch.Tensor | None
    frames: torch.Tensor
    before: Choice


def codes_before(episode: Episode, t: int) -> Choice:
    """The recorded codes of transition t-1 -> t, each (1, ...): what the controller saw last."""
    grid = episode.codes[t - 1] if t > 0 else torch.full_like(episode.codes[0], NONE)
    action = None if episode.action_codes is None else episode.action_codes[t - 1] if t > 0 else torch.tensor(NONE)
    return Choice(grid[None], None if action is None else action.view(1))


def recorded_steps(episodes: list[Episode], starts: list[Start], horizon: int) -> Recorded:
    pick = lambda part, offset=0: torch.stack([getattr(episodes[s.episode], part)[s.t + offset:s.t + offset + horizon]  # noqa: E731
                                               for s in starts])
    has_actions = all(episodes[s.episode].action_codes is not None for s in starts)
    before = [codes_before(episodes[s.episode], s.t) for s in starts]
    return Recorded(pick("actions"), pick("codes"), pick("action_codes") if has_actions else None, pick("frames", 1),
                    Choice(torch.cat([b.grid for b in before]),
                           torch.cat([b.action for b in before]) if has_actions else None))


def play(sim: Simulator, kind: str, cur: torch.Tensor, prev: torch.Tensor, recorded: Recorded,
         older: list[torch.Tensor] | None = None):
    """One kind of rollout from the starts: the generated frames, step by step. The recorded keys
    go with the recorded codes too (a world model with a key input reads them)."""
    if kind == "codes":
        return sim.rollout(cur, prev, recorded.actions, codes=recorded.codes, action_codes=recorded.action_codes,
                           older=older)
    if kind == ACTION_ONLY:
        return sim.rollout(cur, prev, recorded.actions, action_codes=recorded.action_codes, older=older)
    return sim.rollout(cur, prev, recorded.actions, before=recorded.before, older=older)


# ------------------------------------------------------------------------------------ scoring
@dataclass
class StepCounts:
    """One step's tallies of one kind of rollout, over every start."""

    frames: int = 0
    paddle_shown: int = 0          # recorded frames with a paddle
    paddle_found: int = 0
    paddle_within: int = 0
    paddle_errors: list = field(default_factory=list)
    ball_shown: int = 0            # recorded frames with a ball
    ball_found: int = 0
    ball_errors: list = field(default_factory=list)
    ball_found_twice: int = 0      # ... found in this frame and the one before
    ball_moved: int = 0            # ... and moved at least BALL_STEP_PX between them
    no_ball: int = 0
    phantom: int = 0
    two_balls: int = 0
    bricks_lost_real: float = 0.0  # summed over starts, in bricks
    bricks_lost_model: float = 0.0
    bricks_off: int = 0            # starts whose loss differs from the recording's by more than the slack
    bricks_back: int = 0           # starts where a brick that was gone stands again (by this step)
    grain: float = 0.0

    def update(self, model: Elements, real: Elements, start: Elements, back: bool, before: Elements) -> None:
        """`before`: the model's frame one step earlier (the start frame at step 1)."""
        self.frames += 1
        if real.paddle_x is not None:
            self.paddle_shown += 1
            if model.paddle_x is not None:
                self.paddle_found += 1
                error = abs(model.paddle_x - real.paddle_x)
                self.paddle_errors.append(error)
                self.paddle_within += error <= TOLERANCE_PX
        if real.ball is not None:
            self.ball_shown += 1
            if model.ball is not None:
                self.ball_found += 1
                self.ball_errors.append(math.dist(model.ball, real.ball))
                moved = ball_moved(before, model)
                self.ball_found_twice += moved is not None
                self.ball_moved += bool(moved)
        else:
            self.no_ball += 1
            self.phantom += model.ball is not None
        self.two_balls += model.balls > 1
        lost_real = (start.brick_pixels - real.brick_pixels) / BRICK_PIXELS
        lost_model = (start.brick_pixels - model.brick_pixels) / BRICK_PIXELS
        self.bricks_lost_real += lost_real
        self.bricks_lost_model += lost_model
        self.bricks_off += abs(lost_model - lost_real) > BRICKS_SLACK + BRICKS_SLACK_SHARE * max(lost_real, 0)
        self.bricks_back += back
        self.grain += model.grain

    def compute(self) -> dict:
        rate = lambda hits, n: hits / n if n else None  # noqa: E731
        mean = lambda values: float(np.mean(values)) if len(values) else None  # noqa: E731
        return {"paddle_found": rate(self.paddle_found, self.paddle_shown),
                "paddle_within_2px": rate(self.paddle_within, self.paddle_shown),
                "paddle_error_px": mean(self.paddle_errors),
                "ball_found": rate(self.ball_found, self.ball_shown), "ball_error_px": mean(self.ball_errors),
                "ball_moving": rate(self.ball_moved, self.ball_found_twice),
                "ball_phantom": rate(self.phantom, self.no_ball), "two_balls": rate(self.two_balls, self.frames),
                "bricks_lost_real": rate(self.bricks_lost_real, self.frames),
                "bricks_lost_model": rate(self.bricks_lost_model, self.frames),
                "bricks_off": rate(self.bricks_off, self.frames), "bricks_back": rate(self.bricks_back, self.frames),
                "grain": rate(self.grain, self.frames)}


class KindMeter:
    """Every step of one kind of rollout: PSNR (evaluate.py's meter) and the element tallies."""

    def __init__(self, horizon: int):
        self.frames = [ReconstructionMeter(ssim=False) for _ in range(horizon)]
        self.counts = [StepCounts() for _ in range(horizon)]

    def curves(self) -> dict[str, list]:
        scores = [meter.compute() for meter in self.frames]
        counts = [c.compute() for c in self.counts]
        return {"psnr": [s["psnr"] for s in scores], "psnr_changed": [s["psnr_changed"] for s in scores],
                **{name: [c[name] for c in counts] for name in counts[0]}}


class BricksGone:
    """Per start, the brick cells that were gone in the start frame or any generated frame so far:
    one that stands again has come back, which the game never does."""

    def __init__(self, start: list[Elements]):
        self.gone = [~e.bricks for e in start]
        self.came_back = [False] * len(start)

    def update(self, frames: list[Elements]) -> list[bool]:
        for i, e in enumerate(frames):
            self.came_back[i] |= bool((e.bricks & self.gone[i]).any())
            self.gone[i] |= ~e.bricks
        return list(self.came_back)


@dataclass
class RolloutResult:
    curves: dict            # {"horizon", "copy": {...}, "codes": {...}, "controller": {...}}
    starts: list[Start]
    gif_frames: dict[int, dict[str, torch.Tensor]]   # start index -> {"real", kind...}: (H+1, C, H, W)


def run_rollouts(sim: Simulator, episodes: list[Episode], horizon: int, count: int, batch_size: int,
                 gif_starts: int = 3, kinds: tuple[str, ...] = KINDS) -> RolloutResult:
    """Roll out from `count` recorded start frames, each kind from the same starts, scoring every step."""
    starts = rollout_starts(episodes, horizon, count)
    if not starts:
        longest = max(e.steps for e in episodes)
        raise ValueError(f"no episode has {horizon} steps (the longest has {longest}); lower --horizon")
    keep = gif_start_indices(starts, gif_starts)
    meters = {kind: KindMeter(horizon) for kind in kinds}
    copy = [ReconstructionMeter(ssim=False) for _ in range(horizon)]
    gifs: dict[int, dict[str, torch.Tensor]] = {}
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        (cur, prev), recorded = start_frames(episodes, chunk), recorded_steps(episodes, chunk, horizon)
        start_elements = [detect_elements(frame) for frame in cur]
        real_elements = [[detect_elements(frame) for frame in recorded.frames[:, h]] for h in range(horizon)]
        for h in range(horizon):
            copy[h].update(cur, recorded.frames[:, h], cur)
        kept = {i: {"real": torch.cat([cur[i:i + 1], recorded.frames[i]])} for i in range(len(chunk)) if first + i in keep}
        for kind in kinds:
            frames = play(sim, kind, cur, prev, recorded, older_frames(sim, episodes, chunk))
            gone, drawn = BricksGone(start_elements), {i: [cur[i]] for i in kept}
            before = start_elements
            for h, model in enumerate(frames):
                model = model.cpu()
                meters[kind].frames[h].update(model, recorded.frames[:, h], cur)
                found = [detect_elements(frame) for frame in model]
                for elements, real, begin, back, earlier in zip(found, real_elements[h], start_elements,
                                                                gone.update(found), before):
                    meters[kind].counts[h].update(elements, real, begin, back, earlier)
                before = found
                for i in drawn:
                    drawn[i].append(model[i])
            for i, frames_i in drawn.items():
                kept[i][kind] = torch.stack(frames_i)
        gifs.update({first + i: frames for i, frames in kept.items()})
    copy_scores = [meter.compute() for meter in copy]
    curves = {"horizon": list(range(1, horizon + 1)),
              "copy": {"psnr": [s["psnr"] for s in copy_scores], "psnr_changed": [s["psnr_changed"] for s in copy_scores]},
              **{kind: meter.curves() for kind, meter in meters.items()}}
    return RolloutResult(curves, starts, gifs)


def gif_start_indices(starts: list[Start], count: int) -> set[int]:
    """`count` starts spread evenly over all of them (and so over the episodes)."""
    if count <= 0:
        return set()
    return set(np.linspace(0, len(starts) - 1, min(count, len(starts))).round().astype(int).tolist())
