"""A pair shard set as one run reads it: the folder pinned and its manifest read and checked once
(pipeline/shards.load_manifest), then handed to everything in the run that needs the data (the
loaders, the action labels, the validator's probe, the palette, the checkpoints' record of the data)
instead of each of them reading the manifest again, and possibly another set if a re-pack swapped
one in meanwhile.

    data = PairSet.open("shards/pairs")
    data.pairs("val"), data.sha256, data.palette(), data.shards("train")
    loader = open_loader(data, "train", LoaderConfig(batch_size=32))      # pipeline/loader.py
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from pipeline.palette import Palette, read_palette
from pipeline.shards import PAIRS_FORMAT, Manifest, load_manifest, split_shards


@dataclass(frozen=True)
class PairSet:
    path: Path                  # as the user named it (a link a re-pack swaps)
    manifest: Manifest          # checked; .root is the folder pinned when it was read, .sha256 its bytes' hash

    @classmethod
    def open(cls, path: str | Path) -> "PairSet":
        return cls(Path(path), load_manifest(Path(path), PAIRS_FORMAT))

    @property
    def root(self) -> Path:
        return self.manifest.root

    @property
    def sha256(self) -> str:
        """The manifest's hash: how a checkpoint remembers the data it was trained on."""
        return self.manifest.sha256

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def pairs(self, split: str) -> int:
        return sum(int(shard["pairs"]) for shard in self.manifest["splits"].get(split, {}).get("shards", []))

    def shards(self, split: str, *, verify: bool = False) -> list[dict]:
        """The split's shard entries with their paths and indexes checked (pipeline/shards.split_shards)."""
        return split_shards(self.path, self.manifest, split, verify=verify)

    def palette(self) -> Palette | None:
        return read_palette(self.manifest)

    def require_val_pairs(self) -> None:
        """Training chooses best.pt on the val split; with none it would end without a best.pt and
        without a word, and extraction after it would fail. So it refuses to start, in one line."""
        if not self.pairs("val"):
            fractions = ",".join(f"{f:g}" for f in self.manifest.get("fractions", []) if isinstance(f, (int, float)))
            raise UserError(f"{self.path}: the val split has no pairs (packed with --fractions {fractions or '?'}); "
                            f"training chooses best.pt on it: re-pack with a val share, e.g. --fractions 0.8,0.1,0.1")
