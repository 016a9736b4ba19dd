"""Controllability: does the controller steer? From test frames, `steps` of always-LEFT and of
always-RIGHT, beside uniformly random codes (the floor); success is the paddle (detected from
pixels, evaluation/events.py) ending on the side it was pushed towards."""
from __future__ import annotations

from typing import Iterator

import torch

from evaluation.events import detect_elements
from pipeline.actions import LEFT, RIGHT

from control.data import Episode
from control.rollout import older_frames, recorded_steps, rollout_starts, start_frames
from control.simulator import Simulator

PADDLE_MIN_X, PADDLE_MAX_X = 8, 144      # the paddle's left edge range (pipeline/record.py)


def run_controllability(sim: Simulator, episodes: list[Episode], count: int, steps: int, batch_size: int,
                        seed: int = 0) -> dict:
    """From `count` test frames: `steps` of always-LEFT, of always-RIGHT, and of random codes (the
    floor). Success: the paddle's left edge ends left of (right of) where it started.

    A start whose paddle already touches the wall it is pushed towards (x = 8 for LEFT, x = 144 for
    RIGHT) cannot move that way and is left out of that direction's score; so is a start where the
    detector finds no paddle. A generated frame without a detectable paddle counts as a failure."""
    starts = rollout_starts(episodes, 0, count)        # every frame may start: no recorded steps needed
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        n = len(chunk)
        cur, prev = start_frames(episodes, chunk)
        before = recorded_steps(episodes, chunk, 0).before
        older = older_frames(sim, episodes, chunk)
        begin = [detect_elements(frame).paddle_x for frame in cur]
        ends = {}
        for name, action in (("left", LEFT), ("right", RIGHT)):
            ends[name] = final_paddles(sim.rollout(cur, prev, torch.full((n, steps), action), before=before,
                                                   older=older))
        ends["random"] = final_paddles(sim.rollout(cur, prev, torch.zeros(n, steps, dtype=torch.int64), generator,
                                                   older=older))
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
