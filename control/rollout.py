"""Rollouts: from recorded test frames, the controller and the LAM decoder play the recorded actions
for `horizon` steps, each generated frame fed back in, and every step is scored against the recording.

Conventions, shared with evaluate.py (its meters score both): frames in [0, 1] in the LAM's colour
mode; PSNR is 10·log10(1/MSE) with the MSE over every pixel of every start at that horizon; "changed
pixels" at horizon h are those where the recorded frame t+h differs from the start frame t, so the
copy baseline ("the screen never changes") cannot score well by matching the static background.
Paddle, ball and bricks come from the pixel detectors (evaluation/events.py), the same on recorded
and generated frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evaluation.events import detect_elements
from evaluation.metrics import ElementMeter, ReconstructionMeter

from control.data import Episode
from control.simulator import Simulator


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


def recorded_steps(episodes: list[Episode], starts: list[Start], horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(actions (B, horizon), frames t+1..t+horizon (B, horizon, C, 210, 160)) as recorded after each start."""
    actions = torch.stack([episodes[s.episode].actions[s.t:s.t + horizon] for s in starts])
    real = torch.stack([episodes[s.episode].frames[s.t + 1:s.t + 1 + horizon] for s in starts])
    return actions, real


# ------------------------------------------------------------------------------------ rollout metrics
class HorizonMeter:
    """Per horizon step, over every start: the model's frames and the start frame copied (the
    baseline), each scored against the recorded frame by evaluate.py's meters."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.frames = [(ReconstructionMeter(ssim=False), ReconstructionMeter(ssim=False)) for _ in range(horizon)]
        self.elements = [(ElementMeter(), ElementMeter()) for _ in range(horizon)]

    def update(self, h: int, start: torch.Tensor, real: torch.Tensor, model: torch.Tensor,
               start_elements: list, real_elements: list, model_elements: list) -> None:
        """h: 0-based step; tensors (B, C, 210, 160) on CPU; elements: detect_elements of each frame."""
        (model_frames, copy_frames), (model_found, copy_found) = self.frames[h], self.elements[h]
        model_frames.update(model, real, start)
        copy_frames.update(start, real, start)
        for first, truth, drawn in zip(start_elements, real_elements, model_elements):
            model_found.update(drawn, truth, first)
            copy_found.update(first, truth, first)

    def curves(self) -> dict[str, list]:
        """One value per horizon step of each measure (None where there was nothing to measure)."""
        model, copy = zip(*[(m.compute(), c.compute()) for m, c in self.frames])
        found, copied = zip(*[(m.compute(), c.compute()) for m, c in self.elements])
        ball_found = [None if f["ball"]["missing"] is None else 1 - f["ball"]["missing"] for f in found]
        return {"horizon": list(range(1, self.horizon + 1)),
                "psnr": [m["psnr"] for m in model], "psnr_copy": [c["psnr"] for c in copy],
                "psnr_changed": [m["psnr_changed"] for m in model],
                "psnr_changed_copy": [c["psnr_changed"] for c in copy],
                "changed_fraction": [meter.changed_fraction() for meter, _ in self.frames],
                "paddle_error_px": [f["paddle"]["mean_abs_error_px"] for f in found],
                "paddle_error_px_copy": [c["paddle"]["mean_abs_error_px"] for c in copied],
                "paddle_lost": [f["paddle"]["missing"] for f in found],
                "ball_found": ball_found, "ball_error_px": [f["ball"]["mean_error_px"] for f in found],
                "ball_phantom": [f["ball"]["spurious"] for f in found],
                "bricks_broken_real": [f["bricks"]["broken_per_pair"] for f in found],
                "bricks_broken_model": [f["bricks"]["broken_per_pair_pred"] for f in found]}


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
        (cur, prev), (actions, real) = start_frames(episodes, chunk), recorded_steps(episodes, chunk, horizon)
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
