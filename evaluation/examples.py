"""Pairs to show in a reconstruction grid (evaluate.py's report, the trainer's logged images): the
frames as images, and the pairs worth showing. No matplotlib here, so the trainer's validation and
the evaluation pass import it without loading a plotting library; evaluation/figures.py draws them."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Example:
    """One pair to show: frames float (H, W) gray or (H, W, 3) RGB in [0, 1]."""

    key: str
    cur: np.ndarray
    next: np.ndarray
    pred: np.ndarray
    changed_pixels: int

    @classmethod
    def of(cls, key: str, cur: np.ndarray, nxt: np.ndarray, pred: np.ndarray) -> "Example":
        """From model-layout frames (C, H, W) in [0, 1]."""
        return cls(key, as_image(cur), as_image(nxt), as_image(pred), int((cur != nxt).sum()))


def as_image(frame: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) gray or (H, W, 3) RGB."""
    return frame[0] if frame.shape[0] == 1 else frame.transpose(1, 2, 0)


class MostChanged:
    """The `limit` pairs where most pixels change between t and t+1: where copying frame t fails and
    the codes must carry the change. Ties go to the later pair of the split, by its position there,
    so shares of a split kept apart (one per rank) and merged pick what one pass over it picks."""

    def __init__(self, limit: int):
        self.limit = limit
        self._heap: list[tuple[int, int, Example]] = []     # (changed pixels, position, example)

    def offer(self, position: int, example: Example) -> None:
        item = (example.changed_pixels, position, example)
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, item)
        elif item[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, item)

    @classmethod
    def merged(cls, parts: Sequence["MostChanged"]) -> "MostChanged":
        joined = cls(parts[0].limit if parts else 0)
        for part in parts:
            for _, position, example in part._heap:
                joined.offer(position, example)
        return joined

    def examples(self) -> list[Example]:
        """Most changed first."""
        return [example for _, _, example in sorted(self._heap, key=lambda item: item[:2], reverse=True)]
