"""One batched pass over the pairs of a split, or over one rank's share of them under torchrun: the
model's prediction of frame t+1 scored beside copying frame t and beside decoding random codes,
code use, and ball, paddle and bricks detected in the true and predicted frames.

A rank's share is whole batches of the single-process walk (`batch_share`), so every batch, and
every code, is the one a single process computes. The reconstruction meters reduce their sums
across ranks (evaluation/metrics.py); everything kept pair by pair (`Share`) is gathered to rank 0
in rank order, which is split order. The random codes for ΔPSNR are drawn per pair from the seed
and the pair's position in the split, not per batch, so no rank draws another's.

Two stages run side by side: the model (encode, decode, decode random codes) in a thread of its own,
a batch or two ahead, and the scoring (meters, element detection) in the caller's thread, each
with its own CPU threads; batches are scored in order, so every number is the one a single thread
computes (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.distributed import Ranks
from evaluation.events import detect_elements
from evaluation.examples import Example, MostChanged
from evaluation.metrics import ElementMeter, ReconstructionMeter
from evaluation.probes import pooled
from model.inference import autocast, codes_to_array
from pipeline.frames import GRID
from pipeline.loader import BackgroundIterator

EXAMPLES = 6                   # pairs in the reconstruction grid


@dataclass
class Share:
    """What a pass keeps pair by pair, in split order."""

    keys: list = field(default_factory=list)
    codes: list = field(default_factory=list)                # stored code type (B, 7, 5) per batch
    frame_features: list = field(default_factory=list)       # float (B, f) per batch: frame t, pooled
    diff_features: list = field(default_factory=list)        # float (B, f) per batch: t+1 - t, pooled
    cur_elements: list = field(default_factory=list)
    next_elements: list = field(default_factory=list)
    model_elements: ElementMeter = field(default_factory=ElementMeter)
    copy_elements: ElementMeter = field(default_factory=ElementMeter)
    examples: MostChanged = field(default_factory=lambda: MostChanged(EXAMPLES))

    @classmethod
    def joined(cls, shares: Sequence["Share"]) -> "Share":
        """Shares of consecutive runs of the split (the ranks', in rank order) as one."""
        lists = ("keys", "codes", "frame_features", "diff_features", "cur_elements", "next_elements")
        return cls(**{name: [item for share in shares for item in getattr(share, name)] for name in lists},
                   model_elements=ElementMeter.merged([share.model_elements for share in shares]),
                   copy_elements=ElementMeter.merged([share.copy_elements for share in shares]),
                   examples=MostChanged.merged([share.examples for share in shares]))

    def all_codes(self) -> np.ndarray:
        return np.concatenate(self.codes)


@dataclass
class SplitPass:
    model: ReconstructionMeter
    copy: ReconstructionMeter
    random: ReconstructionMeter
    share: Share


def batch_share(pairs: int, batch_size: int, ranks: Ranks) -> tuple[int, int]:
    """[start, stop) positions of this rank's pairs: a contiguous run of whole batches of the
    single-process walk (ranks past the last batch get an empty run)."""
    batches = -(-pairs // batch_size)
    first, last = (batches * rank // ranks.world_size for rank in (ranks.rank, ranks.rank + 1))
    return min(first * batch_size, pairs), min(last * batch_size, pairs)


def random_codes(pairs: int, codebook_size: int, seed: int) -> np.ndarray:
    """Codes drawn at random for every pair of the split, (pairs, 7, 5): the same for every rank."""
    return np.random.default_rng(seed).integers(0, codebook_size, (pairs, *GRID))


def predictions(loader, lam, device: torch.device, *, first: int, random: np.ndarray, dtype: torch.dtype | None):
    """The model's part of the pass: (batch, codes, prediction, prediction from random codes) for each
    of the loader's batches, predictions float and clamped to [0, 1]."""
    position = first
    for batch in loader:
        cur, nxt, prev = batch["cur"], batch["next"], batch.get("prev")
        stop = position + len(batch["key"])
        with torch.inference_mode(), autocast(device, dtype):
            # a model with a per-frame action code (Genie's split) decodes with it; the random grid
            # keeps the pair's own action code, so ΔPSNR still measures what the grid adds
            codes, action = lam.encode_both(cur, nxt, prev)
            pred = lam.decode(cur, codes, prev, action).float().clamp(0, 1)
            pred_random = lam.decode(cur, torch.from_numpy(random[position:stop]).to(device), prev,
                                     action).float().clamp(0, 1)
        yield batch, codes, pred, pred_random
        position = stop


def evaluate_pass(loader, lam, device: torch.device, *, first: int, random: np.ndarray, progress: bool,
                  dtype: torch.dtype | None = None, model_threads: int = 1) -> SplitPass:
    """Score the loader's batches: the pairs from position `first` of the split on, in order;
    `random` holds the random codes of every pair of the split (`random_codes`). The model runs in
    its own thread with `model_threads` CPU threads, autocast to `dtype` (None: fp32)."""
    # random codes serve ΔPSNR only: no SSIM for them
    state = SplitPass(ReconstructionMeter(device), ReconstructionMeter(device), ReconstructionMeter(device, ssim=False),
                      Share())
    position = first
    size = lam.config.codebook_size
    predicted = BackgroundIterator(lambda: predictions(loader, lam, device, first=first, random=random, dtype=dtype),
                                   depth=2, device=device, threads=model_threads, name="evaluate-model")
    try:
        for batch, codes, pred, pred_random in tqdm(predicted, desc="evaluate", unit="batch", total=len(loader),
                                                     disable=not progress):
            cur, nxt = batch["cur"], batch["next"]
            state.model.update(pred, nxt, cur)
            state.copy.update(cur, nxt, cur)
            state.random.update(pred_random, nxt, cur)
            share = state.share
            share.keys += batch["key"]
            share.codes.append(codes_to_array(codes, size))
            share.frame_features.append(pooled(cur))
            share.diff_features.append(pooled(nxt.float() - cur.float()))
            collect_elements(share, position, cur.cpu().numpy(), nxt.cpu().numpy(), pred.cpu().numpy(), batch["key"])
            position += len(batch["key"])
    finally:
        predicted.close()
    return state


def collect_elements(share: Share, first: int, cur: np.ndarray, nxt: np.ndarray, pred: np.ndarray,
                     keys: list[str]) -> None:
    for position, (key, frame_t, frame_next, frame_pred) in enumerate(zip(keys, cur, nxt, pred), first):
        elements_t, elements_next = detect_elements(frame_t), detect_elements(frame_next)
        share.model_elements.update(detect_elements(frame_pred), elements_next, elements_t)
        share.copy_elements.update(elements_t, elements_next, elements_t)
        share.cur_elements.append(elements_t)
        share.next_elements.append(elements_next)
        share.examples.offer(position, Example.of(key, frame_t, frame_next, frame_pred))
