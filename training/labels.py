"""Light supervision, off by default (TrainConfig.action_fraction): the recorded action of a small,
fixed fraction of the train transitions trains an action head on the code grid, so the codes lean
towards the real controls. LAOM (Nikulin et al., ICML 2025) reports that labels on 2.5 % of the
data, used while the latent actions are learned, raise downstream performance 4.2x on average."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch

from pipeline.pair_set import PairSet
from pipeline.shards import read_members

NO_LABEL = -1


def chosen(key: str, fraction: float, seed: int) -> bool:
    """Whether pair `key` is among the labelled fraction: a hash of (seed, key), so the choice
    depends on neither the order the pairs are read in nor the number of ranks."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ActionLabels:
    """Recorded actions of the labelled train pairs, looked up by key."""

    def __init__(self, labels: dict[str, int], fraction: float):
        self.labels, self.fraction = labels, fraction

    @classmethod
    def build(cls, data: PairSet, fraction: float, seed: int) -> "ActionLabels | None":
        """The labelled pairs of `data`'s train split (None when `fraction` is 0: no supervision)."""
        if not fraction:
            return None
        entries = data.shards("train")
        labels = {}
        for key, members in read_members(entries, ("json",)).items():
            meta = json.loads(members["json"])
            if "action" in meta and chosen(key, fraction, seed):
                labels[key] = int(meta["action"])
        return cls(labels, fraction)

    def describe(self) -> str:
        return f"action labels on {len(self.labels)} train pairs ({self.fraction:.1%} asked) train the action head"

    def __len__(self) -> int:
        return len(self.labels)

    def __call__(self, keys: Sequence[str], device: torch.device) -> torch.Tensor:
        """int64 (B,): each pair's action, NO_LABEL where it is not among the labelled."""
        return torch.tensor([self.labels.get(key, NO_LABEL) for key in keys], dtype=torch.int64, device=device)
