"""The loader's view of one split of pair shards: every pair, every unique frame, and where its PNG
bytes sit in which tar, built from the `.idx` files alone (no tar is read to build it).

Shards hold consecutive pairs of each episode, so pair (episode, t)'s `next.png` is pair
(episode, t+1)'s `cur.png`: the index gives both the same frame id, and a loader that decodes by
frame id decodes every frame once instead of twice.

The same ids give each pair its frame t-1 (`prev`): pair (t, t+1) has one exactly when the split
holds pair (t-1, t) of its episode, the pair whose `next` frame is this pair's `cur` frame. A pair
without one (an episode's first pair, or frame t-1 rejected or missing, so the packer made no pair
(t-1, t)) gets its own frame t as `prev` and `prev_valid` False.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.errors import UserError
from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH
from pipeline.png import BadFrame, decode_png_rgb, png_chunks
from pipeline.shards import PAIRS_FORMAT, load_manifest, split_shards

FRAME_MEMBERS = ("cur.png", "next.png")


@dataclass(frozen=True)
class PairIndex:
    """Pairs of one split in manifest order (shard order, then sample order inside each shard)."""

    split: str
    tars: list[Path]                 # shard tars, in manifest order
    keys: list[str]                  # pair key, per pair
    episodes: np.ndarray             # int64 (pairs,): episode id, for mixing statistics
    cur: np.ndarray                  # int64 (pairs,): frame id of frame t
    next: np.ndarray                 # int64 (pairs,): frame id of frame t+1
    prev: np.ndarray                 # int64 (pairs,): frame id of frame t-1 (of frame t where prev_valid is False)
    prev_valid: np.ndarray           # bool (pairs,): the split holds frame t-1 of the same episode
    frame_tar: np.ndarray            # int64 (frames,): which tar holds the frame's bytes
    frame_offset: np.ndarray         # int64 (frames,): byte offset of the PNG data in that tar
    frame_size: np.ndarray           # int64 (frames,): PNG size in bytes
    frame_member: list[str]          # tar member name, for error messages
    height: int = FRAME_HEIGHT
    width: int = FRAME_WIDTH

    @property
    def num_pairs(self) -> int:
        return len(self.keys)

    @property
    def num_frames(self) -> int:
        return len(self.frame_member)

    def describe_frame(self, frame: int) -> str:
        return f"{self.tars[self.frame_tar[frame]]}: member {self.frame_member[frame]}"


def episode_and_step(key: str) -> tuple[str, int] | None:
    """'00003_000012' -> ('00003', 12); None for a key the packer did not write (no frame sharing then)."""
    episode, _, step = key.rpartition("_")
    return (episode, int(step)) if episode and step.isdigit() else None


def build_pair_index(shard_dir: Path, split: str, manifest: dict | None = None, *, verify: bool = False) -> PairIndex:
    """Read the manifest (unless the caller passes it, already read) and the `.idx` of every shard of
    `split`; clear errors for anything missing or short (`verify`: every tar's sha256 checked against
    the manifest's too)."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir, PAIRS_FORMAT)
    entries = split_shards(shard_dir, manifest, split, verify=verify)
    frame = manifest.get("frame") or {}
    height, width = int(frame.get("height", FRAME_HEIGHT)), int(frame.get("width", FRAME_WIDTH))

    frames = _FrameTable()
    keys, episodes, cur, nxt = [], [], [], []
    episode_ids: dict[str, int] = {}
    for shard_number, entry in enumerate(entries):
        for sample in entry["samples"]:
            missing = [ext for ext in FRAME_MEMBERS if ext not in sample.members]
            if missing:
                raise UserError(f"{entry['idx']}: sample {sample.key} has no {', '.join(missing)} member")
            position = episode_and_step(sample.key)
            episode = position[0] if position else sample.key
            keys.append(sample.key)
            episodes.append(episode_ids.setdefault(episode, len(episode_ids)))
            for ext, step, out in (("cur.png", 0, cur), ("next.png", 1, nxt)):
                identity = (position[0], position[1] + step) if position else (sample.key, ext)
                offset, size = sample.members[ext]
                out.append(frames.add(identity, shard_number, offset, size, f"{sample.key}.{ext}"))

    as_array = lambda values: np.asarray(values, dtype=np.int64)
    prev, prev_valid = previous_frames(as_array(cur), as_array(nxt), len(frames.member))
    return PairIndex(split=split, tars=[entry["tar"] for entry in entries], keys=keys,
                     episodes=as_array(episodes), cur=as_array(cur), next=as_array(nxt),
                     prev=prev, prev_valid=prev_valid,
                     frame_tar=as_array(frames.tar), frame_offset=as_array(frames.offset),
                     frame_size=as_array(frames.size), frame_member=frames.member,
                     height=height, width=width)


def previous_frames(cur: np.ndarray, nxt: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the frame id of frame t-1 and whether there is one: the `cur` frame of the pair
    whose `next` frame is this pair's `cur` frame. Frame ids are per (episode, t), so that pair is
    (t-1, t) of the same episode; a rejected or missing frame t-1 has no such pair. Where there is
    none, frame t itself stands in."""
    cur_of_pair_ending_at = np.full(num_frames, -1, dtype=np.int64)
    cur_of_pair_ending_at[nxt] = cur
    prev = cur_of_pair_ending_at[cur]
    valid = prev >= 0
    return np.where(valid, prev, cur), valid


class _FrameTable:
    """Unique frames by (episode, t). A second member for the same frame must have the same byte
    size (the packer copies the same bytes into both pairs); if it does not, it is kept as its own
    frame, so a surprise costs one extra decode, never a wrong frame."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.tar, self.offset, self.size, self.member = [], [], [], []

    def add(self, identity: tuple, tar: int, offset: int, size: int, member: str) -> int:
        known = self.ids.get(identity)
        if known is not None and self.size[known] == size:
            return known
        frame = len(self.member)
        self.ids.setdefault(identity, frame)
        self.tar.append(tar)
        self.offset.append(offset)
        self.size.append(size)
        self.member.append(member)
        return frame


class FrameReader:
    """Encoded PNG bytes of frames, read by offset with `os.pread` (no shared file position, so the
    same reader is safe in forked DataLoader workers and in DALI's callback)."""

    def __init__(self, index: PairIndex):
        self.index = index
        self._fds: dict[int, int] = {}

    def read_png(self, frame: int) -> bytes:
        """The frame's PNG bytes, structurally checked (see png_problem) before any decoder sees them."""
        tar = int(self.index.frame_tar[frame])
        fd = self._fds.get(tar)
        if fd is None:
            path = self.index.tars[tar]
            try:
                fd = self._fds[tar] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise UserError(f"{path}: shard gone while this run read its set (removed, or re-packed twice "
                                f"since the run started); run again") from None
            except OSError as error:
                raise UserError(f"{path}: cannot open shard ({error.strerror})") from None
        size, offset = int(self.index.frame_size[frame]), int(self.index.frame_offset[frame])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise UserError(f"{self.index.describe_frame(frame)} runs past the end of the tar (truncated shard)")
        problem = png_problem(data, self.index.height, self.index.width)
        if problem:
            raise UserError(f"{self.index.describe_frame(frame)} is not a readable PNG ({problem})")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        return {"index": self.index, "_fds": {}}     # file descriptors do not travel to spawned workers


class PreviousFrames:
    """Frame t-1 of pairs by key, as the PNG bytes stored in the shards (frame t's where the pair has
    none): what extraction writes as `<key>.prev.png`, and what evaluation decodes for a model with
    context outside the loader."""

    def __init__(self, index: PairIndex):
        self.index = index
        self._pair = {key: pair for pair, key in enumerate(index.keys)}
        self._reader = FrameReader(index)

    def png(self, key: str) -> tuple[bytes, bool]:
        """(PNG bytes of frame t-1, prev_valid) of pair `key`."""
        pair = self._pair[key]
        return self._reader.read_png(int(self.index.prev[pair])), bool(self.index.prev_valid[pair])

    def close(self) -> None:
        self._reader.close()


def png_problem(data: bytes, height: int, width: int) -> str | None:
    """What is wrong with a PNG's structure, or None: signature, IHDR, every chunk's CRC, IEND, size.

    About 10 us a frame, checked before any decoder sees it: DALI 2.4's CPU image decoder raises on a
    bad frame, but the pipeline then crashes the process when it is shut down. (A CRC-valid PNG whose
    compressed stream is still invalid is left to the decoders, whose errors are reported the same way.)
    """
    try:
        ihdr, _ = png_chunks(data)
    except BadFrame as error:
        return str(error)
    if (ihdr.height, ihdr.width) != (height, width):
        return f"{ihdr.width}x{ihdr.height} pixels, expected {width}x{height}"
    return None


def raise_for_bad_frames(index: PairIndex, frames: Sequence[int]) -> None:
    """Decode `frames` one by one with PIL and raise a UserError naming the first bad one (not a
    PNG, corrupt, or not H x W). Called after a batched decoder failed, to say which member it was."""
    reader = FrameReader(index)
    try:
        for frame in frames:
            data = reader.read_png(int(frame))
            try:
                pixels = decode_png_rgb(data)
            except Exception as error:
                raise UserError(f"{index.describe_frame(frame)} is not a readable PNG ({error})") from None
            if pixels.shape[:2] != (index.height, index.width):
                raise UserError(f"{index.describe_frame(frame)} is {pixels.shape[1]}x{pixels.shape[0]}, "
                                f"expected {index.width}x{index.height}")
    finally:
        reader.close()
