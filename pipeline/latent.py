"""Latent shards (`shards/latent/`, DESIGN.md "Extraction"): what a latent sample, shard and manifest
hold, and how a finished shard is told from an unfinished one. The model that makes the codes is
run by model/extraction.py; this module knows bytes only.

Output: `out/{split}/latent-NNNNNN.tar` + `.idx`, one latent shard per pair shard in the same order,
each sample `<key>.cur.png` and `<key>.next.png` (the pair shard's bytes), `<key>.codes.npy` ((7, 5),
uint8 up to 256 codes, uint16 above: `code_dtype`) and `<key>.json` (the pair's json plus
{"checkpoint": {sha256, step}}); `out/manifest.json` ("lam-latent/1") is written last, so its
presence means the run finished. A model with context was given frame t-1: its samples also hold
`<key>.prev.png` (the source bytes of frame t-1 of the same episode, frame t's where there is none)
and `"prev_valid"` in the json, and the manifest's checkpoint says `"context": 1`. A model with a
per-frame action code (Genie's split) adds `<key>.action.npy` (shape (1,)), and the manifest says
how many such codes there are (`checkpoint.action_codes`) and their type (`action_dtype`). The
manifest carries the pair manifest's palette (pipeline/palette.py) for whoever plays the model.

Resuming: beside each finished tar a small `latent-NNNNNN.done.json` records which pair shard
(sha256) it came from, with which checkpoint (sha256), and the tar's own sha256; it is written just
before the tar gets its name, so a visible tar never lacks its record. A shard whose record still
matches is finished; latents of another checkpoint are refused unless the caller overwrites them,
so latents of two models never mix.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import zstandard

from common.errors import UserError
from pipeline.frames import GRID
from pipeline.pair_index import PreviousFrames
from pipeline.shards import (LATENT_FORMAT, SPLITS, TarShardWriter, atomic_write_bytes, atomic_write_json,
                             iter_samples, remove_orphaned_temps, sha256_file, split_shards)

ZSTD_LEVEL = 10
DONE_SUFFIX = ".done.json"
CODE_DTYPES = (np.uint8, np.uint16)     # the stored forms, smallest first


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned type that holds every code of the codebook: uint8 up to 256 codes,
    uint16 above (DESIGN.md, "Model"): no code ever wraps."""
    for dtype in CODE_DTYPES:
        if codebook_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"a codebook of {codebook_size} codes does not fit {np.dtype(CODE_DTYPES[-1]).name} codes")


@dataclass(frozen=True)
class CheckpointIdentity:
    """The checkpoint latents were made by, as every latent sample and manifest records it."""

    path: str
    sha256: str
    step: int
    color: str                 # "gray" | "rgb": the colour mode the model was trained in
    context: int = 0           # 1: the model takes frame t-1 too (ModelConfig.context)
    codebook_size: int = 256
    action_codes: int = 0      # a per-frame action code of this many values (Genie's split), or 0: none

    @property
    def code_dtype(self) -> np.dtype:
        return code_dtype(self.codebook_size)


def latent_lam(manifest: dict) -> dict:
    """What a latent manifest records of the LAM that made its codes, in the terms of
    model/checkpoint.lam_identity (a field an older manifest lacks is left out)."""
    checkpoint = manifest.get("checkpoint", {})
    facts = {key: checkpoint[key] for key in ("sha256", "step", "codebook_size") if key in checkpoint}
    if "codebook_size" in checkpoint:               # written since the action codes were: 0 when absent
        facts["action_codes"] = checkpoint.get("action_codes", 0)
    if "color" in checkpoint:
        facts["in_channels"] = 1 if checkpoint["color"] == "gray" else 3
    return facts


# ------------------------------------------------------------------------------------ plan
@dataclass
class ShardJob:
    """One pair shard and the latent shard made from it."""

    split: str
    source: dict               # the pair manifest's entry, plus resolved "tar"/"idx" paths
    tar: Path                  # the latent shard
    first: int                 # position of the shard's first pair in its split
    done: bool = False

    @property
    def record_path(self) -> Path:
        return self.tar.with_name(self.tar.name.removesuffix(".tar") + DONE_SUFFIX)

    @property
    def zstd_path(self) -> Path:
        return self.tar.with_name(self.tar.name + ".zst")

    @property
    def pairs(self) -> int:
        return int(self.source["pairs"])

    @property
    def run(self) -> tuple[int, int]:
        """[start, stop) positions of its pairs in the split: what the loader walks for it."""
        return self.first, self.first + self.pairs


def plan_jobs(shards: Path, manifest: dict, out: Path) -> list[ShardJob]:
    """One job per pair shard of every split, in manifest order."""
    jobs = []
    for split in SPLITS:
        if split not in manifest.get("splits", {}):
            continue
        first = 0
        for number, entry in enumerate(split_shards(shards, manifest, split)):
            jobs.append(ShardJob(split, entry, out / split / f"latent-{number:06d}.tar", first))
            first += int(entry["pairs"])
    return jobs


def read_record(job: ShardJob) -> dict | None:
    try:
        return json.loads(job.record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(job: ShardJob, identity: CheckpointIdentity) -> bool:
    """The latent shard exists, is whole, and was made from this very pair shard by this checkpoint."""
    record = read_record(job)
    return (record is not None
            and record.get("checkpoint", {}).get("sha256") == identity.sha256
            and record.get("source_sha256") == job.source.get("sha256")
            and record.get("pairs") == job.pairs
            and job.tar.is_file() and job.tar.with_suffix(".idx").is_file()
            and sha256_file(job.tar) == record.get("sha256"))


# ------------------------------------------------------------------------------------ the output folder
def checkpoints_in(out: Path) -> set[str]:
    """sha256 of every checkpoint whose latents are in `out` (manifest and per-shard records)."""
    found = set()
    manifest = out / "manifest.json"
    if manifest.is_file():
        # ValueError: bad JSON, and bytes that are not UTF-8 at all
        with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
            found.add(json.loads(manifest.read_text())["checkpoint"]["sha256"])
    for record in out.glob(f"*/latent-*{DONE_SUFFIX}"):
        with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
            found.add(json.loads(record.read_text())["checkpoint"]["sha256"])
    return found


def other_checkpoints(out: Path, shards: Path, identity: CheckpointIdentity, overwrite: bool) -> bool:
    """Whether `out` holds latents of another checkpoint (which `clear_output` then removes);
    refused, without changing anything, unless `overwrite`."""
    if out.resolve() == shards.resolve():
        raise UserError(f"{out}: the output directory must not be the pair shard directory")
    others = checkpoints_in(out) - {identity.sha256}
    if others and not overwrite:
        raise UserError(f"{out}: holds latents of another checkpoint ({', '.join(s[:12] for s in sorted(others))}), "
                        f"not {identity.path} ({identity.sha256[:12]}); pass --overwrite to replace them")
    return bool(others)


def clear_output(out: Path) -> None:
    """Remove what extraction writes in `out` (and nothing else)."""
    (out / "manifest.json").unlink(missing_ok=True)
    for pattern in ("latent-*.tar", "latent-*.tar.zst", "latent-*.idx", f"latent-*{DONE_SUFFIX}"):
        for path in out.glob(f"*/{pattern}"):
            path.unlink()


def remove_stale(out: Path, jobs: Sequence[ShardJob]) -> None:
    """Latent shards beyond the current plan (the pair shards were re-packed into fewer) go, and so do
    the temp files of a run that was killed mid-shard. Only while no writer of this run has started."""
    for split_dir in {job.tar.parent for job in jobs}:
        remove_orphaned_temps(split_dir)
    planned = {job.tar for job in jobs}
    for tar in out.glob("*/latent-*.tar"):
        if tar not in planned:
            for path in (tar, tar.with_suffix(".idx"), tar.with_name(tar.name + ".zst"),
                         tar.with_name(tar.name.removesuffix(".tar") + DONE_SUFFIX)):
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ samples
def codes_npy(codes: np.ndarray, dtype: np.dtype) -> bytes:
    if codes.size and int(codes.max()) > np.iinfo(dtype).max:
        raise ValueError(f"code {int(codes.max())} does not fit {np.dtype(dtype).name}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(codes, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def latent_json(pair_json: bytes, identity: CheckpointIdentity, prev_valid: bool | None = None) -> bytes:
    meta = json.loads(pair_json)
    meta["checkpoint"] = {"sha256": identity.sha256, "step": identity.step}
    if prev_valid is not None:
        meta["prev_valid"] = prev_valid
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def latent_members(members: dict[str, bytes], codes: Coded, identity: CheckpointIdentity,
                   prev: tuple[bytes, bool] | None = None) -> dict[str, bytes]:
    """The latent sample; `prev` (PNG bytes of frame t-1, prev_valid) for a model with context, and
    `action.npy` (shape (1,)) for a model with a per-frame action code."""
    out = {"cur.png": members["cur.png"], "next.png": members["next.png"]}
    if prev is not None:
        out["prev.png"] = prev[0]
    out["codes.npy"] = codes_npy(codes.grid, identity.code_dtype)
    if codes.action is not None:
        out["action.npy"] = codes_npy(np.array([codes.action]), code_dtype(identity.action_codes))
    out["json"] = latent_json(members["json"], identity, None if prev is None else prev[1])
    return out


class Coded(NamedTuple):
    """One pair's codes as extraction stores them: the grid (7, 5) and the per-frame action code."""

    grid: np.ndarray
    action: int | None = None


def write_shard(job: ShardJob, coded: Iterator[tuple[str, Coded]], identity: CheckpointIdentity,
                previous: PreviousFrames | None = None) -> None:
    """Write one latent shard from the next `job.pairs` (key, codes) of `coded` and its pair shard's
    bytes (and, for a model with context, each pair's frame t-1 from `previous`). Its completion
    record is written before the tar gets its name: a visible tar always has one."""

    def write_record(written) -> None:
        atomic_write_json(job.record_path, {"source": job.source["file"], "source_sha256": job.source.get("sha256"),
                                            "pairs": job.pairs, "sha256": written.sha256,
                                            "checkpoint": {"sha256": identity.sha256, "step": identity.step}})

    with TarShardWriter(job.tar, before_publish=write_record) as writer:
        raw = iter_samples(job.source["tar"], job.source["idx"])
        for (key, members), (coded_key, codes) in zip(raw, itertools.islice(coded, job.pairs)):
            if key != coded_key:
                raise UserError(f"{job.source['tar']}: sample {key} arrived as {coded_key} from the loader")
            writer.add(key, latent_members(members, codes, identity, previous.png(key) if previous else None))
        if writer.samples != job.pairs:        # raised inside: the writer aborts, nothing lands
            raise UserError(f"{job.source['tar']}: holds {writer.samples} pairs, the manifest says {job.pairs}")


# ------------------------------------------------------------------------------------ zstd
def compress_zstd(tar: Path, level: int = ZSTD_LEVEL) -> Path:
    """Write `<tar>.zst` beside the tar (atomically); returns its path."""
    target = tar.with_name(tar.name + ".zst")
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    atomic_write_bytes(target, compressor.compress(tar.read_bytes()))
    return target


def ensure_zstd(job: ShardJob) -> dict:
    """The `.tar.zst` copy of a finished shard, made now unless its record shows it is current."""
    record = read_record(job) or {}
    tar_sha = record.get("sha256")
    zstd = record.get("zstd")
    if not (zstd and zstd.get("tar_sha256") == tar_sha and job.zstd_path.is_file()
            and sha256_file(job.zstd_path) == zstd.get("sha256")):
        path = compress_zstd(job.tar)
        zstd = {"file": str(path.relative_to(job.tar.parent.parent)), "sha256": sha256_file(path),
                "bytes": path.stat().st_size, "tar_sha256": tar_sha}
        atomic_write_json(job.record_path, {**record, "zstd": zstd})
    return zstd


def zstd_ratio(manifest: dict, out: Path) -> float:
    """Compressed over uncompressed bytes, all shards."""
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    plain = sum((out / shard["file"]).stat().st_size for shard in shards)
    return sum(shard["zstd"]["bytes"] for shard in shards) / plain if plain else 1.0


# ------------------------------------------------------------------------------------ manifest
def build_manifest(shards: Path, pair_manifest: dict, jobs: Sequence[ShardJob], identity: CheckpointIdentity,
                   with_zstd: bool, named: Path | None = None) -> dict:
    """The latent manifest, from the pair manifest and every finished shard's record. Its source is
    the pair folder as the user `named` it (`shards/pairs`, which a re-pack keeps, not the hidden
    version folder it pointed to, which the re-pack after next removes) and the sha256 of the pair
    manifest read, which tells which set that was."""
    splits = {}
    for split in SPLITS:
        if split not in pair_manifest.get("splits", {}):
            continue
        split_jobs = [job for job in jobs if job.split == split]
        entries = []
        for job in split_jobs:
            record = read_record(job)
            entry = {"file": f"{split}/{job.tar.name}", "index": f"{split}/{job.tar.with_suffix('.idx').name}",
                     "pairs": job.pairs, "sha256": record["sha256"],
                     "source": job.source["file"], "source_sha256": job.source.get("sha256")}
            if with_zstd:
                entry["zstd"] = {key: record["zstd"][key] for key in ("file", "sha256", "bytes")}
            entries.append(entry)
        splits[split] = {"episodes": pair_manifest["splits"][split].get("episodes", []),
                         "pairs": sum(job.pairs for job in split_jobs), "shards": entries}
    split_code = ({"action_codes": identity.action_codes} if identity.action_codes else {})
    return {"format": LATENT_FORMAT,
            "checkpoint": {"path": identity.path, "sha256": identity.sha256, "step": identity.step,
                           "color": identity.color, "context": identity.context,
                           "codebook_size": identity.codebook_size, **split_code},
            "source": {"shards": str(named or shards), "manifest_sha256": sha256_file(shards / "manifest.json")},
            "frame": pair_manifest.get("frame", {}), "grid": list(GRID), "code_dtype": identity.code_dtype.name,
            **({"action_dtype": code_dtype(identity.action_codes).name} if identity.action_codes else {}),
            # the game's colours, for whoever plays the model forward (pipeline/palette.py)
            **({"palette": pair_manifest["palette"]} if "palette" in pair_manifest else {}),
            "splits": splits}
