"""Playing inside the model: the controller picks the codes for an action, the LAM decoder draws the
next frame, and that frame is fed back in. Scored against recorded test episodes (rollouts) and by
whether LEFT and RIGHT move the paddle (controllability).

Conventions, shared with evaluate.py: frames in [0, 1] in the LAM's colour mode; PSNR is
10·log10(1/MSE) with the MSE over every pixel of every start at that horizon; "changed pixels" at
horizon h are those where the recorded frame t+h differs from the start frame t, so the copy baseline
("the screen never changes") cannot score well by matching the static background. Paddle and ball
come from the pixel detectors (pipeline/events.py), the same on recorded and generated frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from evaluation.events import detect_elements

from control.data import Episode
from control.network import LEFT, RIGHT, Controller

PADDLE_MIN_X, PADDLE_MAX_X = 8, 144      # the paddle's left edge range (pipeline/record.py)


@dataclass
class Simulator:
    """One model step: codes from the controller (or at random), the next frame from the decoder."""

    lam: torch.nn.Module
    controller: Controller | None
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def codes(self, cur: torch.Tensor, prev: torch.Tensor, action: torch.Tensor,
              random_codes: torch.Generator | None = None) -> torch.Tensor:
        if random_codes is not None or self.controller is None:
            size = self.lam.config.codebook_size
            return torch.randint(0, size, (cur.shape[0], 7, 5), generator=random_codes).to(self.device)
        return self.controller.codes(cur, action.to(self.device), prev)

    @torch.no_grad()
    def decode(self, cur: torch.Tensor, codes: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The LAM's next frame; `prev` is frame t-1 (a LAM with context uses it; None: frame t)."""
        return self.lam.decode(cur, codes, prev).float().clamp_(0, 1)

    @torch.no_grad()
    def rollout(self, start: torch.Tensor, prev: torch.Tensor, actions: torch.Tensor,
                random_codes: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """start, prev: (B, C, 210, 160); actions int64 (B, H) -> the H generated frames, one per step.
        After the first step, frame t-1 (for the controller and the LAM) is the previous generated frame."""
        cur, prev = start.to(self.device), prev.to(self.device)
        for step in range(actions.shape[1]):
            nxt = self.decode(cur, self.codes(cur, prev, actions[:, step], random_codes), prev)
            yield nxt
            prev, cur = cur, nxt


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


def start_batch(episodes: list[Episode], starts: list[Start], horizon: int, actions: torch.Tensor | None = None):
    """(start frames, frames t-1, actions (B, horizon), recorded frames t+1..t+horizon or None)."""
    cur = torch.stack([episodes[s.episode].frames[s.t] for s in starts])
    prev = torch.stack([episodes[s.episode].frames[max(s.t - 1, 0)] for s in starts])
    if actions is None:
        actions = torch.stack([episodes[s.episode].actions[s.t:s.t + horizon] for s in starts])
        real = torch.stack([episodes[s.episode].frames[s.t + 1:s.t + 1 + horizon] for s in starts])
        return cur, prev, actions, real
    return cur, prev, actions, None


# ------------------------------------------------------------------------------------ rollout metrics
def psnr(sq_error: float, count: int) -> float | None:
    if count == 0:
        return None
    mse = sq_error / count
    return None if mse <= 0 else 10.0 * math.log10(1.0 / mse)


@dataclass
class HorizonMeter:
    """Per-horizon sums over every start: squared errors (model and copy), paddle and ball findings."""

    horizon: int
    sums: dict = field(default_factory=dict)

    def __post_init__(self):
        names = ("sse", "sse_copy", "pixels", "sse_changed", "sse_copy_changed", "changed",
                 "paddle_err", "paddle_err_copy", "paddle_pairs", "paddle_lost", "paddle_real",
                 "ball_real", "ball_found", "ball_err", "ball_pairs", "ball_phantom", "ball_absent",
                 "bricks_broken_real", "bricks_broken_model", "starts")
        self.sums = {name: np.zeros(self.horizon) for name in names}

    def update(self, h: int, start: torch.Tensor, real: torch.Tensor, model: torch.Tensor,
               start_elements: list, real_elements: list, model_elements: list) -> None:
        """h: 0-based step; tensors (B, C, 210, 160) on CPU; elements: detect_elements of each frame."""
        s = self.sums
        error, copy_error = (model - real).pow(2), (start - real).pow(2)
        changed = real != start
        s["sse"][h] += float(error.sum(dtype=torch.float64))
        s["sse_copy"][h] += float(copy_error.sum(dtype=torch.float64))
        s["pixels"][h] += real.numel()
        s["sse_changed"][h] += float(error[changed].sum(dtype=torch.float64))
        s["sse_copy_changed"][h] += float(copy_error[changed].sum(dtype=torch.float64))
        s["changed"][h] += int(changed.sum())
        s["starts"][h] += len(real)
        for first, truth, drawn in zip(start_elements, real_elements, model_elements):
            if truth.paddle_x is not None:
                s["paddle_real"][h] += 1
                if drawn.paddle_x is None:
                    s["paddle_lost"][h] += 1
                elif first.paddle_x is not None:
                    s["paddle_err"][h] += abs(drawn.paddle_x - truth.paddle_x)
                    s["paddle_err_copy"][h] += abs(first.paddle_x - truth.paddle_x)
                    s["paddle_pairs"][h] += 1
            if truth.ball is not None:
                s["ball_real"][h] += 1
                if drawn.ball is not None:
                    s["ball_found"][h] += 1
                    s["ball_err"][h] += math.dist(drawn.ball, truth.ball)
                    s["ball_pairs"][h] += 1
            else:
                s["ball_absent"][h] += 1
                s["ball_phantom"][h] += drawn.ball is not None
            s["bricks_broken_real"][h] += int((first.bricks & ~truth.bricks).sum())
            s["bricks_broken_model"][h] += int((first.bricks & ~drawn.bricks).sum())

    def curves(self) -> dict[str, list]:
        s = self.sums
        ratio = lambda num, den: [float(a / b) if b else None for a, b in zip(num, den)]  # noqa: E731
        return {"horizon": list(range(1, self.horizon + 1)),
                "psnr": [psnr(a, b) for a, b in zip(s["sse"], s["pixels"])],
                "psnr_copy": [psnr(a, b) for a, b in zip(s["sse_copy"], s["pixels"])],
                "psnr_changed": [psnr(a, b) for a, b in zip(s["sse_changed"], s["changed"])],
                "psnr_changed_copy": [psnr(a, b) for a, b in zip(s["sse_copy_changed"], s["changed"])],
                "changed_fraction": ratio(s["changed"], s["pixels"]),
                "paddle_error_px": ratio(s["paddle_err"], s["paddle_pairs"]),
                "paddle_error_px_copy": ratio(s["paddle_err_copy"], s["paddle_pairs"]),
                "paddle_lost": ratio(s["paddle_lost"], s["paddle_real"]),
                "ball_found": ratio(s["ball_found"], s["ball_real"]),
                "ball_error_px": ratio(s["ball_err"], s["ball_pairs"]),
                "ball_phantom": ratio(s["ball_phantom"], s["ball_absent"]),
                "bricks_broken_real": ratio(s["bricks_broken_real"], s["starts"]),
                "bricks_broken_model": ratio(s["bricks_broken_model"], s["starts"])}


@dataclass
class RolloutResult:
    curves: dict
    starts: list[Start]
    gif_frames: dict[int, tuple[torch.Tensor, torch.Tensor]]   # start index -> (real, model) (H+1, C, H, W)


def run_rollouts(sim: Simulator, episodes: list[Episode], horizon: int, count: int, batch_size: int,
                 gif_starts: int = 3) -> RolloutResult:
    """Roll out from `count` recorded start frames with the recorded actions, scoring every step."""
    starts = rollout_starts(episodes, horizon, count)
    if not starts:
        longest = max(e.steps for e in episodes)
        raise ValueError(f"no test episode has {horizon} steps (the longest has {longest}); lower --horizon")
    keep = gif_start_indices(starts, gif_starts)
    meter, gifs = HorizonMeter(horizon), {}
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        cur, prev, actions, real = start_batch(episodes, chunk, horizon)
        start_elements = [detect_elements(frame) for frame in cur]
        kept = {i: [] for i in range(len(chunk)) if first + i in keep}
        for h, model in enumerate(sim.rollout(cur, prev, actions)):
            model = model.cpu()
            meter.update(h, cur, real[:, h], model, start_elements,
                         [detect_elements(frame) for frame in real[:, h]], [detect_elements(frame) for frame in model])
            for i in kept:
                kept[i].append(model[i])
        for i, frames in kept.items():
            gifs[first + i] = (torch.cat([cur[i:i + 1], real[i]]), torch.stack([cur[i]] + frames))
    return RolloutResult(meter.curves(), starts, gifs)


def gif_start_indices(starts: list[Start], count: int) -> set[int]:
    """The first start of each of the first `count` episodes: a GIF per episode."""
    chosen, seen = set(), set()
    for index, start in enumerate(starts):
        if start.episode not in seen and len(chosen) < count:
            chosen.add(index)
            seen.add(start.episode)
    return chosen


# ------------------------------------------------------------------------------------ controllability
def controllability_starts(episodes: list[Episode], count: int) -> list[Start]:
    every = [Start(e, t) for e, episode in enumerate(episodes) for t in range(episode.steps + 1)]
    if len(every) <= count:
        return every
    return [every[i] for i in np.linspace(0, len(every) - 1, count).round().astype(int)]


def run_controllability(sim: Simulator, episodes: list[Episode], count: int, steps: int, batch_size: int,
                        seed: int = 0) -> dict:
    """From `count` test frames: `steps` of always-LEFT, of always-RIGHT, and of random codes (the
    floor). Success: the paddle's left edge ends left of (right of) where it started.

    A start whose paddle already touches the wall it is pushed towards (x = 8 for LEFT, x = 144 for
    RIGHT) cannot move that way and is left out of that direction's score; so is a start where the
    detector finds no paddle. A generated frame without a detectable paddle counts as a failure."""
    starts = controllability_starts(episodes, count)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        n = len(chunk)
        cur, prev, _, _ = start_batch(episodes, chunk, steps, torch.zeros(n, steps, dtype=torch.int64))
        begin = [detect_elements(frame).paddle_x for frame in cur]
        ends = {}
        for name, action in (("left", LEFT), ("right", RIGHT)):
            ends[name] = final_paddles(sim.rollout(cur, prev, torch.full((n, steps), action)))
        ends["random"] = final_paddles(sim.rollout(cur, prev, torch.zeros(n, steps, dtype=torch.int64), generator))
        for i, start in enumerate(chunk):
            rows.append({"episode": episodes[start.episode].name, "t": start.t, "start_x": begin[i],
                         **{f"end_x_{name}": ends[name][i] for name in ends}})
    return {"starts": len(rows), "steps": steps,
            "controller": {"left": direction_score(rows, "left", "end_x_left"),
                           "right": direction_score(rows, "right", "end_x_right")},
            "random_codes": {"left": direction_score(rows, "left", "end_x_random"),
                             "right": direction_score(rows, "right", "end_x_random")},
            "rows": rows}


def final_paddles(frames: Iterator[torch.Tensor]) -> list[int | None]:
    last = None
    for last in frames:
        pass
    return [detect_elements(frame).paddle_x for frame in last.cpu()]


def direction_score(rows: list[dict], direction: str, end_key: str) -> dict:
    at_wall = (lambda x: x <= PADDLE_MIN_X) if direction == "left" else (lambda x: x >= PADDLE_MAX_X)
    scored = [r for r in rows if r["start_x"] is not None and not at_wall(r["start_x"])]
    moved = [r for r in scored if r[end_key] is not None
             and (r[end_key] < r["start_x"] if direction == "left" else r[end_key] > r["start_x"])]
    lost = sum(r[end_key] is None for r in scored)
    return {"success": len(moved) / len(scored) if scored else None, "scored": len(scored),
            "excluded_at_wall": sum(r["start_x"] is not None and at_wall(r["start_x"]) for r in rows),
            "excluded_no_paddle": sum(r["start_x"] is None for r in rows), "paddle_lost": lost}
