"""What the world model trains on: windows of consecutive recorded frames from the latent shards.

A window is the `past` frames up to frame t (t-P+1 .. t), the `steps` frames after it (t+1 ..
t+K), the K recorded key presses between them and the K recorded code grids. With K > 1 the world
model plays its own short rollout over the window (control/world_train.py): each step's input is
its own snapped drawing of the step before, the target the recorded frame.

Windows come from runs of consecutive samples (control/data.follows) read in shard order, shard
order shuffled per epoch, mixed in a shuffle buffer. At an episode's first frames (meta "t" 0) the
missing past is frame 0 repeated, as the controller's data and the rollouts do; a run that starts
elsewhere (a shard boundary inside an episode, a gap) yields no window until it has its whole past,
so no window pretends that the ball stood still.
"""
from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Iterator

import torch

from common.errors import UserError
from pipeline.frames import to_model_input
from pipeline.stream import latent_dataset, latent_urls

from control.data import FrameCache, action_of, follows


def windows(source: Path, split: str, past: int, steps: int, *, grayscale: bool, urls_seed: int | None,
            cache: FrameCache | None = None) -> Iterator[dict]:
    """Every window of one split, in shard order (shards shuffled by `urls_seed` unless None); frames
    uint8 from the cache (or float without one), `collate_windows` makes batches of them."""
    urls = latent_urls(source, split)
    if urls_seed is not None:
        random.Random(urls_seed).shuffle(urls)
    cached = {} if cache is None else {"decode_frame": cache, "model_input": False}
    run: deque[dict] = deque(maxlen=past - 1 + steps)       # the last samples of the current run
    run_length, from_start = 0, False
    for sample in latent_dataset(urls, grayscale, with_meta=True, split_nodes=False, split_workers=False, **cached):
        if not (run and follows(run[-1]["meta"], sample["meta"])):
            run.clear()
            run_length, from_start = 0, sample["meta"].get("t") == 0
        run.append(sample)
        run_length += 1
        if run_length < steps or (run_length < past - 1 + steps and not from_start):
            continue
        samples = list(run)
        chosen = samples[-steps:]                            # transitions t .. t+K-1
        history = [s["cur"] for s in samples[:-steps]]       # frames t-P+1 .. t-1, as far as the run has them
        past_frames = history + [chosen[0]["cur"]]
        past_frames = [past_frames[0]] * (past - len(past_frames)) + past_frames
        yield {"frames": past_frames + [s["next"] for s in chosen],
               "actions": [action_of(s["meta"], s["key"]) for s in chosen],
               "codes": torch.stack([s["codes"] for s in chosen])}


def collate_windows(samples: list[dict], grayscale: bool) -> dict[str, torch.Tensor]:
    """frames float (B, P+K, C, H, W), actions int64 (B, K), codes int64 (B, K, 7, 5)."""
    frames = torch.stack([torch.stack(s["frames"]) for s in samples])
    if frames.dtype == torch.uint8:
        frames = to_model_input(frames, grayscale)
    return {"frames": frames, "actions": torch.tensor([s["actions"] for s in samples], dtype=torch.int64),
            "codes": torch.stack([s["codes"] for s in samples])}


def window_batches(source: Path, batch_size: int, past: int, steps: int, *, grayscale: bool, shuffle_buffer: int,
                   seed: int, split: str = "train", cache: FrameCache | None = None) -> Iterator[dict]:
    """Shuffled batches of windows forever, epoch after epoch (each epoch a new shard order)."""
    rng = random.Random(seed)
    buffer: list[dict] = []
    epoch = 0
    while True:
        seen = 0
        for window in windows(source, split, past, steps, grayscale=grayscale,
                              urls_seed=seed * 1_000_003 + epoch, cache=cache):
            seen += 1
            buffer.append(window)
            if len(buffer) >= shuffle_buffer:
                yield collate_windows([buffer.pop(rng.randrange(len(buffer))) for _ in range(batch_size)], grayscale)
        if seen == 0:
            raise UserError(f"{source}: split {split!r} has no run of {steps} consecutive samples")
        epoch += 1


def fixed_batches(source: Path, split: str, batch_size: int, count: int, past: int, steps: int, *,
                  grayscale: bool, cache: FrameCache | None = None) -> list[dict]:
    """`count` batches of windows spread over a split, the same every call: the validation sample."""
    every = list(windows(source, split, past, steps, grayscale=grayscale, urls_seed=None, cache=cache))
    if not every:
        return []
    picks = [every[i] for i in torch.linspace(0, len(every) - 1, min(len(every), batch_size * count)).round().long()]
    return [collate_windows(picks[i:i + batch_size], grayscale) for i in range(0, len(picks), batch_size)]
