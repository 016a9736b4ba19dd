"""What the controller reads from latent shards, all through `pipeline.stream.latent_dataset`
(with_meta=True gives each sample's json, which carries the recorder's `action`):

- training batches: frame t, frame t-1, the recorded action and the LAM's codes, shuffled;
- whole episodes in order (test split), for rollouts and the play page's start frames.

Frame t-1 is the sample's own `prev` where the shards hold it (a LAM with context); otherwise the
previous sample's frame t when that sample is the same episode's step t-1. That needs the samples in
shard order, so the stream is read unshuffled (shard order is shuffled per epoch instead) and mixed
afterwards in a shuffle buffer here.

Decoding: with a `FrameCache` each distinct frame is decoded once per run and kept as uint8 (a
frame is one sample's t+1 and the next one's t, and training reads the split every epoch), and
frames stay uint8 until a batch is made, which converts them all at once: the same batches, bit for
bit, as decoding and converting every frame of every sample (tested).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from common.errors import UserError
from pipeline.actions import ACTION_NAMES
from pipeline.frames import rgb_to_gray_uint8, to_model_input
from pipeline.latent import latent_lam
from pipeline.png import decode_png
from pipeline.shards import LATENT_FORMAT, load_manifest
from pipeline.stream import latent_dataset, latent_urls

NONE = -1                       # "no codes": the transition before an episode's first one
FRAME_CACHE_GB = 4.0            # the decoded-frame cache's default budget (the demo's train split takes 0.2 GB)


@dataclass
class Episode:
    """One recorded episode (or a run of it without gaps): frames 0..T and the T actions between them."""

    name: str
    frames: torch.Tensor                 # float (T+1, C, 210, 160) in [0, 1]
    actions: torch.Tensor                # int64 (T,)
    codes: torch.Tensor                  # int64 (T, 7, 5): the LAM's codes of each recorded transition
    metas: list[dict] = field(repr=False)
    action_codes: torch.Tensor | None = None   # int64 (T,): its per-frame action codes, for a LAM with them

    @property
    def steps(self) -> int:
        return len(self.actions)


def action_of(meta: dict, key: str) -> int:
    """The recorder's action id of a sample, checked: the controller knows only Breakout's four."""
    if "action" not in meta:
        raise UserError(f"sample {key}: its json has no recorded 'action' (record episodes with pipeline.record "
                        f"to get action labels)")
    action = int(meta["action"])
    if not 0 <= action < len(ACTION_NAMES):
        raise UserError(f"sample {key}: action {action} is not one of Breakout's {len(ACTION_NAMES)} "
                        f"({', '.join(ACTION_NAMES)})")
    return action


def follows(previous: dict | None, meta: dict) -> bool:
    """`meta` is the transition right after `previous` in the same episode."""
    return (previous is not None and previous.get("episode") == meta.get("episode")
            and previous.get("t") is not None and meta.get("t") == previous["t"] + 1)


class FrameCache:
    """PNG bytes -> the decoded frame, uint8 (H, W, C) in the colour mode it is used in (gray frames
    reduced once, by the function `to_model_input` applies, to (H, W, 1)), each distinct frame decoded
    once: keyed by its bytes, which the packer copies unchanged from the one source file. Frames past
    `budget_gb` are decoded every time they come."""

    def __init__(self, grayscale: bool, budget_gb: float = FRAME_CACHE_GB):
        self.grayscale, self.budget = grayscale, int(budget_gb * 2**30)
        self.frames: dict[bytes, torch.Tensor] = {}
        self.held = self.decoded = 0

    def __call__(self, png: bytes) -> torch.Tensor:
        frame = self.frames.get(png)
        if frame is None:
            frame = decode_png(png)
            frame = rgb_to_gray_uint8(frame) if self.grayscale else frame
            self.decoded += 1
            if self.held + frame.numel() <= self.budget:
                self.frames[png] = frame
                self.held += frame.numel()
        return frame


def samples_with_prev(source, split: str, grayscale: bool, urls_seed: int | None,
                      cache: FrameCache | None = None) -> Iterator[dict]:
    """Samples of one split in shard order (shards shuffled by `urls_seed` unless None), each with
    "prev" (frame t-1, or frame t itself at an episode's or a gap's start) and "action". Frames are
    float (C, H, W) in [0, 1]; with a `cache`, uint8 from it (`collate` converts them)."""
    urls = latent_urls(source, split)
    if urls_seed is not None:
        random.Random(urls_seed).shuffle(urls)
    previous = first = None
    cached = {} if cache is None else {"decode_frame": cache, "model_input": False}
    for sample in latent_dataset(urls, grayscale, with_meta=True, split_nodes=False, split_workers=False, **cached):
        first = first or sample
        same_kind_of_codes(sample, first, source)
        meta = sample["meta"]
        after = follows(previous and previous["meta"], meta)
        if "prev" in sample:          # stored: right also at the first sample of a shard
            prev = sample["prev"]
        else:
            prev = previous["cur"] if after else sample["cur"]
        # the codes of transition t-1 (negative: none, at an episode's or a shard's first sample)
        prev_codes = previous["codes"] if after else torch.full_like(sample["codes"], NONE)
        prev_action_code = previous["action_code"] if after and "action_code" in previous else NONE
        yield {**sample, "prev": prev, "action": action_of(meta, sample["key"]), "prev_codes": prev_codes,
               "prev_action_code": prev_action_code}
        previous = sample


def collate(samples: list[dict], grayscale: bool = True) -> dict[str, torch.Tensor]:
    """Frames float (B, C, H, W) (uint8 ones converted here, a batch at a time), actions, codes."""
    def frames(name: str) -> torch.Tensor:
        stacked = torch.stack([s[name] for s in samples])
        return to_model_input(stacked, grayscale) if stacked.dtype == torch.uint8 else stacked

    batch = {"cur": frames("cur"), "prev": frames("prev"),
             "action": torch.tensor([s["action"] for s in samples], dtype=torch.int64),
             "codes": torch.stack([s["codes"] for s in samples]),
             "prev_codes": torch.stack([s["prev_codes"] for s in samples])}
    if "action_code" in samples[0]:
        batch["action_code"] = torch.tensor([s["action_code"] for s in samples], dtype=torch.int64)
        batch["prev_action_code"] = torch.tensor([s["prev_action_code"] for s in samples], dtype=torch.int64)
    return batch


def targets(batch: dict[str, torch.Tensor], target: str, before: bool = False) -> torch.Tensor:
    """What the controller learns to predict, as a grid (B, h, w): the code grid (B, 7, 5), or the
    per-frame action code as one cell (B, 1, 1); `before`: those of the transition before (its
    input; negative where there is none)."""
    if target == "action":
        return batch["prev_action_code" if before else "action_code"][:, None, None]
    return batch["prev_codes" if before else "codes"]


def training_batches(source, batch_size: int, *, grayscale: bool, shuffle_buffer: int, seed: int,
                     split: str = "train", cache: FrameCache | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches forever, epoch after epoch (each epoch a new shard order); the same batches
    with a `cache` or without."""
    rng = random.Random(seed)
    buffer: list[dict] = []
    epoch = 0
    while True:
        seen = 0
        for sample in samples_with_prev(source, split, grayscale, urls_seed=seed * 1_000_003 + epoch, cache=cache):
            seen += 1
            buffer.append(sample)
            if len(buffer) < shuffle_buffer:
                continue
            batch = [buffer.pop(rng.randrange(len(buffer))) for _ in range(batch_size)]
            yield collate(batch, grayscale)
        if seen == 0:
            raise UserError(f"{source}: split {split!r} has no samples")
        epoch += 1


def ordered_batches(source, split: str, batch_size: int, *, grayscale: bool,
                    cache: FrameCache | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every sample of a split once, in shard order, for evaluation."""
    batch: list[dict] = []
    for sample in samples_with_prev(source, split, grayscale, urls_seed=None, cache=cache):
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch, grayscale)
            batch = []
    if batch:
        yield collate(batch, grayscale)


def read_episodes(source, split: str = "test", *, grayscale: bool, max_episodes: int | None = None) -> list[Episode]:
    """The split's episodes in order; an episode with a gap (a rejected frame) becomes two runs."""
    episodes: list[Episode] = []
    run: list[dict] = []

    def close_run():
        if run:
            frames = torch.stack([s["cur"] for s in run] + [run[-1]["next"]])
            action_codes = torch.tensor([s["action_code"] for s in run]) if "action_code" in run[0] else None
            episodes.append(Episode(name=str(run[0]["meta"].get("episode", run[0]["key"])), frames=frames,
                                    actions=torch.tensor([action_of(s["meta"], s["key"]) for s in run]),
                                    codes=torch.stack([s["codes"] for s in run]), metas=[s["meta"] for s in run],
                                    action_codes=action_codes))

    first = None
    for sample in latent_dataset(latent_urls(source, split), grayscale, with_meta=True,
                                 split_nodes=False, split_workers=False):
        first = first or sample
        same_kind_of_codes(sample, first, source)
        if run and not follows(run[-1]["meta"], sample["meta"]):
            close_run()
            run = []
            if max_episodes is not None and len(episodes) >= max_episodes:
                break
        run.append(sample)
    close_run()           # empty after a `break`: that run was already closed
    if not episodes:
        raise UserError(f"{source}: split {split!r} has no samples")
    return episodes


def same_kind_of_codes(sample: dict, first: dict, source) -> None:
    """Every sample of a latent set holds a per-frame action code (`action.npy`) or none does: one
    LAM made them all. (Where the manifest is read, the stream checks each sample against it.)"""
    if ("action_code" in sample) != ("action_code" in first):
        has, lacks = (first, sample) if "action_code" in first else (sample, first)
        raise UserError(f"{source}: sample {lacks['key']} has no action.npy, but sample {has['key']} has one: "
                        f"latents of a LAM with a per-frame action code hold one in every sample (re-run extract.py)")


def latent_identity(source) -> dict:
    """The LAM whose codes a latent directory holds, as its manifest records it (pipeline.latent.
    latent_lam: sha256, step, codebook size, action codes, colour mode), when there is one (read and
    checked like every manifest: a damaged one is one clear error)."""
    if not (Path(source) / "manifest.json").is_file():
        return {}
    return latent_lam(load_manifest(Path(source), LATENT_FORMAT))
