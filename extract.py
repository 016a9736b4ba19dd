"""Latent-action extraction: every pair of every split through encoder + quantiser, into latent shards.

    python extract.py --shards shards/pairs --checkpoint checkpoints/latent_action/best.pt \
        [--out shards/latent] [--batch-size 64] [--overwrite] [--zstd]

Output (DESIGN.md, "Extraction"): `out/{split}/latent-NNNNNN.tar` + `.idx`, one latent shard per pair
shard in the same order, each sample `<key>.cur.png` and `<key>.next.png` (the pair shard's bytes),
`<key>.codes.npy` (uint8 (7, 5)) and `<key>.json` (the pair's json plus {"checkpoint": {sha256, step}});
`out/manifest.json` ("lam-latent/1") is written last, so its presence means the run finished.
A model with context (ModelConfig.context 1) was given frame t-1: its samples also hold
`<key>.prev.png` (the source bytes of frame t-1 of the same episode, frame t's where there is none)
and `"prev_valid"` in the json, and the manifest's checkpoint says `"context": 1`.

Resuming: beside each finished tar a small `latent-NNNNNN.done.json` records which pair shard
(sha256) it came from, with which checkpoint (sha256), and the tar's own sha256; it is written just
before the tar gets its name, so a visible tar never lacks its record. A re-run with the
same checkpoint skips every shard whose record still matches; an output made by another checkpoint
is refused unless --overwrite, so latents of two models never mix.

Frames are decoded by the project loader (`pipeline.loader`, DALI where installed) in manifest order;
the PNG bytes written are read from the pair tar through its index, never re-encoded.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from common.device import resolve_device
from common.errors import UserError, check_output_dir, run_cli
from pipeline.frames import GRID
from model.inference import CODE_DTYPE, CheckpointIdentity, autocast, codes_to_array, load_model
from pipeline.loader import in_order_loader
from pipeline.pair_index import PreviousFrames
from pipeline.shards import (LATENT_FORMAT, PAIRS_FORMAT, SPLITS, TarShardWriter, atomic_write_bytes,
                             atomic_write_json, iter_samples, load_manifest, remove_orphaned_temps, sha256_file,
                             split_shards)

ZSTD_LEVEL = 10
DONE_SUFFIX = ".done.json"


# ------------------------------------------------------------------------------------ model
def make_encoder(lam, device: torch.device, compile_model: bool) -> Callable[..., np.ndarray]:
    """(cur, next, prev or None) float batches on `device` -> uint8 codes (B, 7, 5) on the CPU."""
    encode = torch.compile(lam.encode, dynamic=True) if compile_model else lam.encode

    @torch.inference_mode()
    def run(cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None) -> np.ndarray:
        with autocast(device):
            return codes_to_array(encode(cur, nxt, prev))

    return run


# ------------------------------------------------------------------------------------ plan
@dataclass
class ShardJob:
    """One pair shard and the latent shard made from it."""

    split: str
    source: dict               # the pair manifest's entry, plus resolved "tar"/"idx" paths
    tar: Path                  # the latent shard
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


def plan_jobs(shards: Path, manifest: dict, out: Path) -> list[ShardJob]:
    jobs = []
    for split in SPLITS:
        if split not in manifest.get("splits", {}):
            continue
        for number, entry in enumerate(split_shards(shards, manifest, split)):
            jobs.append(ShardJob(split, entry, out / split / f"latent-{number:06d}.tar"))
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


def checkpoints_in(out: Path) -> set[str]:
    """sha256 of every checkpoint whose latents are in `out` (manifest and per-shard records)."""
    found = set()
    manifest = out / "manifest.json"
    if manifest.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            found.add(json.loads(manifest.read_text())["checkpoint"]["sha256"])
    for record in out.glob(f"*/latent-*{DONE_SUFFIX}"):
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
            found.add(json.loads(record.read_text())["checkpoint"]["sha256"])
    return found


def clear_output(out: Path) -> None:
    """Remove what extract.py writes in `out` (and nothing else)."""
    (out / "manifest.json").unlink(missing_ok=True)
    for pattern in ("latent-*.tar", "latent-*.tar.zst", "latent-*.idx", f"latent-*{DONE_SUFFIX}"):
        for path in out.glob(f"*/{pattern}"):
            path.unlink()


def check_output(out: Path, shards: Path, identity: CheckpointIdentity, overwrite: bool) -> None:
    if out.resolve() == shards.resolve():
        raise UserError(f"{out}: the output directory must not be the pair shard directory")
    others = checkpoints_in(out) - {identity.sha256}
    if others and not overwrite:
        raise UserError(f"{out}: holds latents of another checkpoint ({', '.join(s[:12] for s in sorted(others))}), "
                        f"not {identity.path} ({identity.sha256[:12]}); pass --overwrite to replace them")
    if others:
        clear_output(out)


def remove_stale(out: Path, jobs: Sequence[ShardJob]) -> None:
    """Latent shards beyond the current plan (the pair shards were re-packed into fewer) go, and so do
    the temp files of a run that was killed mid-shard."""
    for split_dir in {job.tar.parent for job in jobs}:
        remove_orphaned_temps(split_dir)
    planned = {job.tar for job in jobs}
    for tar in out.glob("*/latent-*.tar"):
        if tar not in planned:
            for path in (tar, tar.with_suffix(".idx"), tar.with_name(tar.name + ".zst"),
                         tar.with_name(tar.name.removesuffix(".tar") + DONE_SUFFIX)):
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ samples
def codes_npy(codes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(codes, dtype=CODE_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def latent_json(pair_json: bytes, identity: CheckpointIdentity, prev_valid: bool | None = None) -> bytes:
    meta = json.loads(pair_json)
    meta["checkpoint"] = {"sha256": identity.sha256, "step": identity.step}
    if prev_valid is not None:
        meta["prev_valid"] = prev_valid
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def latent_members(members: dict[str, bytes], codes: np.ndarray, identity: CheckpointIdentity,
                   prev: tuple[bytes, bool] | None = None) -> dict[str, bytes]:
    """The latent sample; `prev` (PNG bytes of frame t-1, prev_valid) for a model with context."""
    out = {"cur.png": members["cur.png"], "next.png": members["next.png"]}
    if prev is not None:
        out["prev.png"] = prev[0]
    out.update({"codes.npy": codes_npy(codes),
                "json": latent_json(members["json"], identity, None if prev is None else prev[1])})
    return out


# ------------------------------------------------------------------------------------ running
def coded_pairs(loader, encode, needed: Callable[[int, int], bool]) -> Iterator[tuple[str, np.ndarray | None]]:
    """(key, codes) of every pair of a split in manifest order; codes are None (not computed) for
    batches where `needed(first_pair, stop_pair)` is False (their shards are already done)."""
    position = 0
    for batch in loader:
        keys = batch["key"]
        stop = position + len(keys)
        codes = (encode(batch["cur"], batch["next"], batch.get("prev")) if needed(position, stop)
                 else [None] * len(keys))
        yield from zip(keys, codes)
        position = stop


def write_shard(job: ShardJob, coded: Iterator[tuple[str, np.ndarray]], identity: CheckpointIdentity,
                previous: PreviousFrames | None = None) -> None:
    """Write one latent shard from the next `job.pairs` coded pairs and its pair shard's bytes (and,
    for a model with context, each pair's frame t-1 from `previous`). Its completion record is
    written before the tar gets its name: a visible tar always has one."""

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


def extract_split(jobs: Sequence[ShardJob], shards: Path, lam, identity: CheckpointIdentity, *,
                  batch_size: int, device: torch.device, backend: str | None, compile_model: bool,
                  progress: tqdm) -> None:
    split = jobs[0].split
    loader = in_order_loader(shards, split, batch_size, grayscale=identity.color == "gray", backend=backend,
                             device=device, context=identity.context)
    # frame t-1's bytes, read by frame id: the pair (t-1, t) may sit in the shard before
    previous = PreviousFrames(loader.index) if identity.context else None
    ends = np.cumsum([job.pairs for job in jobs])
    done = np.array([job.done for job in jobs])

    def needed(first: int, stop: int) -> bool:
        shard_range = np.searchsorted(ends, [first, stop - 1], side="right")
        return not done[shard_range[0]:shard_range[1] + 1].all()

    coded = coded_pairs(loader, make_encoder(lam, device, compile_model), needed)
    try:
        for job in jobs:
            if job.done:
                for _ in itertools.islice(coded, job.pairs):       # decoded but not encoded: keep in step
                    pass
                continue
            write_shard(job, coded, identity, previous)
            job.done = True
            progress.update(job.pairs)
    finally:
        if previous is not None:
            previous.close()


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


# ------------------------------------------------------------------------------------ manifest
def build_manifest(shards: Path, pair_manifest: dict, jobs: Sequence[ShardJob], identity: CheckpointIdentity,
                   with_zstd: bool) -> dict:
    splits = {}
    for split in SPLITS:
        split_jobs = [job for job in jobs if job.split == split]
        if split not in pair_manifest.get("splits", {}):
            continue
        entries = []
        for job in split_jobs:
            record = read_record(job)
            entry = {"file": f"{split}/{job.tar.name}", "index": f"{split}/{job.tar.with_suffix('.idx').name}",
                     "pairs": job.pairs, "sha256": record["sha256"],
                     "source": job.source["file"], "source_sha256": job.source.get("sha256")}
            if with_zstd:
                entry["zstd"] = {key: record["zstd"][key] for key in ("file", "sha256", "bytes")}
            entries.append(entry)
        source_split = pair_manifest["splits"][split]
        splits[split] = {"episodes": source_split.get("episodes", []), "pairs": sum(job.pairs for job in split_jobs),
                         "shards": entries}
    return {"format": LATENT_FORMAT,
            "checkpoint": {"path": identity.path, "sha256": identity.sha256, "step": identity.step,
                           "color": identity.color, "context": identity.context},
            "source": {"shards": str(shards), "manifest_sha256": sha256_file(shards / "manifest.json")},
            "frame": pair_manifest.get("frame", {}), "grid": list(GRID), "code_dtype": "uint8",
            "splits": splits}


def zstd_ratio(manifest: dict, out: Path) -> float:
    """Compressed over uncompressed bytes, all shards."""
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    plain = sum((out / shard["file"]).stat().st_size for shard in shards)
    return sum(shard["zstd"]["bytes"] for shard in shards) / plain if plain else 1.0


# ------------------------------------------------------------------------------------ cli
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract latent action codes for every pair into latent shards.")
    parser.add_argument("--shards", type=Path, required=True, help="pair shard directory (lam-pairs/1 manifest)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained model checkpoint (.pt)")
    parser.add_argument("--out", type=Path, default=Path("shards/latent"), help="latent shard directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="replace latents made by another checkpoint")
    parser.add_argument("--zstd", action="store_true", help="also write .tar.zst copies of every shard")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backend", choices=("dali", "torch"), default=None,
                        help="frame decoding backend of the loader (default: dali when installed)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (used on GPUs only)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


@dataclass
class ExtractResult:
    manifest: dict
    written: int               # shards extracted by this run
    skipped: int               # shards already done by an earlier run with this checkpoint


def extract(shards: Path, checkpoint: Path, out: Path, *, batch_size: int = 64, overwrite: bool = False,
            with_zstd: bool = False, device: str | None = None, backend: str | None = None,
            compile_model: bool = True, progress: bool = True) -> ExtractResult:
    """Run the extraction (see the module docstring)."""
    check_output_dir(out, "--out")
    pair_manifest = load_manifest(shards, PAIRS_FORMAT)
    jobs = plan_jobs(shards, pair_manifest, out)
    device = resolve_device(device)
    lam, identity = load_model(checkpoint, device)
    check_output(out, shards, identity, overwrite)
    for job in jobs:
        job.done = is_finished(job, identity)
    todo = [job for job in jobs if not job.done]
    if todo:
        (out / "manifest.json").unlink(missing_ok=True)     # the manifest vouches for a finished run only
    remove_stale(out, jobs)
    bar = tqdm(total=sum(job.pairs for job in todo), unit="pair", desc="extract", disable=not progress or not todo)
    with bar:
        for split in SPLITS:
            split_jobs = [job for job in jobs if job.split == split]
            if any(not job.done for job in split_jobs):
                extract_split(split_jobs, shards, lam, identity, batch_size=batch_size, device=device,
                              backend=backend,
                              compile_model=compile_model and device.type == "cuda", progress=bar)
    if with_zstd:
        for job in jobs:
            ensure_zstd(job)
    manifest = build_manifest(shards, pair_manifest, jobs, identity, with_zstd)
    atomic_write_json(out / "manifest.json", manifest)
    return ExtractResult(manifest, written=len(todo), skipped=len(jobs) - len(todo))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


def cli(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = extract(args.shards, args.checkpoint, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                     with_zstd=args.zstd, device=args.device, backend=args.backend,
                     compile_model=not args.no_compile, progress=not args.no_progress)
    manifest = result.manifest
    counts = ", ".join(f"{split} {info['pairs']}" for split, info in manifest["splits"].items())
    print(f"latents of checkpoint {manifest['checkpoint']['sha256'][:12]} (step {manifest['checkpoint']['step']}): "
          f"{counts} pairs; {result.written} shards written, {result.skipped} already done -> {args.out}")
    if args.zstd:
        print(f"zstd copies: {zstd_ratio(manifest, args.out):.3f} of the tar size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
