"""Latent-action extraction: every pair of every split through encoder + quantiser (eval mode,
batched, autocast) into latent shards (the format: pipeline/latent.py), by one process or by every
rank torchrun starts.

    result = extract(ExtractConfig(shards=Path("shards/pairs"), checkpoint=Path("best.pt")))

Precision and the promise about bytes: fp32 by default (`--amp off`), so that the same checkpoint
on the same machine writes the same bytes whatever the loader, the number of ranks, a kill and a
rerun, or `--batch-size`: every encoder call has exactly `--batch-size` rows (a shard's last batch is
padded with copies of its last pair), so a kernel chosen for a short batch never computes a shard's
tail, and each pair's codes do not depend on its neighbours in the batch (measured: oneDNN's fp32
kernels give every row the same bits at any batch size above 1). On a GPU, cuDNN picks its
algorithms by fixed heuristics here (no benchmark mode), for the same reason. `--amp bf16` (or
`auto`, model/precision.py's rule) is faster on hardware with native bf16 and makes no such
promise: a bf16 kernel's rounding may depend on the batch and its layout, and an FSQ code near a
rounding boundary then flips. The first line printed says which precision runs and why. On a CPU
the encoder runs channels_last with `--threads` intra-op threads beside the loader's decoding
thread (common/device.model_threads says why not every core).

Frames are decoded by the project loader (`pipeline.loader`, DALI where installed) in manifest
order, one run of batches per pair shard: a batch never spans two shards, so a shard's codes depend
on that shard, the checkpoint and the batch size only, not on which rank made it or on which shards
a re-run still had to make. The PNG bytes written are read from the pair tar through its index,
never re-encoded.

Under torchrun every rank checks a share of the existing shards (is it finished, by this
checkpoint?), then takes every world_size-th unfinished shard across all splits; rank 0 alone
removes stale output before any rank writes, and writes the manifest after a barrier, once every
rank's shards are on disk. The result is byte for byte what one process writes, and a run killed
on any rank leaves finished shards that the next run keeps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.cli import MAX_BATCH, MAX_THREADS, check_fields, flag
from common.device import fixed_conv_algorithms, model_threads, torch_threads
from common.distributed import Ranks, hold_on_main, process_group
from common.errors import UserError, check_output_dir
from common.lock import FolderLock
from model.inference import AMP_MODES, CheckpointIdentity, autocast, codes_to_array, inference_layout, load_model
from model.precision import Precision, decide_precision
from pipeline.latent import (Coded, ShardJob, build_manifest, clear_output, ensure_zstd, is_finished, other_checkpoints,
                             plan_jobs, remove_stale, write_shard)
from pipeline.loader import announce_backend, in_order_loader
from pipeline.pair_index import PreviousFrames
from pipeline.shards import PAIRS_FORMAT, SPLITS, atomic_write_json, load_manifest, pin_shard_dir


@dataclass
class ExtractConfig:
    shards: Path = flag(help="pair shard directory (lam-pairs/1 manifest)")
    checkpoint: Path = flag(help="trained model checkpoint (.pt)")
    out: Path = flag(Path("shards/latent"), "latent shard directory")
    batch_size: int | None = flag(None, "pairs per encoder batch, per rank (default 64 on a CPU, 512 on a GPU; "
                                        "the bytes written do not depend on it)", min=1, max=MAX_BATCH)
    overwrite: bool = flag(False, "replace latents made by another checkpoint")
    zstd: bool = flag(False, "also write .tar.zst copies of every shard")
    device: str | None = flag(None, "cuda or cpu (default: cuda when available; under torchrun each rank its own GPU)",
                              choices=("auto", "cpu", "cuda"))
    backend: str | None = flag(None, "frame decoding backend of the loader: auto (the default: dali where installed, "
                                     "else torch), dali or torch", choices=("auto", "dali", "torch"))
    loader_threads: int | None = flag(None, "frame decoding threads (torch backend: worker processes) per rank "
                                            "(default: the machine's cores shared among its ranks)", min=1,
                                      max=MAX_THREADS)
    threads: int | None = flag(None, "CPU threads of the encoder, per rank (default: the rank's cores less one, "
                                     "which decodes frames beside it; at least one)", min=1, max=MAX_THREADS)
    amp: str = flag("off", "precision: off (fp32, the default: the same bytes whatever the loader, ranks, reruns "
                           "or --batch-size on this machine), bf16 or fp16 (faster where native, no such promise), "
                           "auto (bf16 where native and faithful to fp32 for this checkpoint)", choices=AMP_MODES)
    compile: bool = flag(True, "torch.compile the encoder (on GPUs only)")
    progress: bool = True

    def __post_init__(self):
        check_fields(self)                  # the flags' rules, for a config built in Python too


@dataclass
class ExtractResult:
    manifest: dict | None      # the latent manifest (on rank 0; None on the other ranks)
    written: int               # shards extracted by this run, all ranks together
    skipped: int               # shards already done by an earlier run with this checkpoint


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run the extraction (see the module docstring); under torchrun, on every rank."""
    check_output_dir(cfg.out, "--out")
    named = cfg.shards                  # what the manifest names as the source: the folder a re-pack keeps
    # the shard set as it is now: a re-pack swapping in another meanwhile cannot mix the two
    cfg = dataclasses.replace(cfg, shards=pin_shard_dir(cfg.shards))
    pair_manifest = load_manifest(cfg.shards, PAIRS_FORMAT)
    jobs = plan_jobs(cfg.shards, pair_manifest, cfg.out)
    lock = FolderLock(cfg.out)
    try:
        return extract_locked(cfg, named, pair_manifest, jobs, lock)
    finally:
        lock.release()


def extract_locked(cfg: ExtractConfig, named: Path, pair_manifest: dict, jobs: list[ShardJob],
                   lock: FolderLock) -> ExtractResult:
    """The run, on every rank; rank 0 takes --out's lock before any rank looks at what --out holds
    and holds it until the manifest is written."""
    with process_group(cfg.device) as (ranks, device), fixed_conv_algorithms(), \
            torch_threads((cfg.threads or model_threads(ranks.cores)) if device.type == "cpu" else None):
        hold_on_main(ranks, lock)
        lam, identity = load_model(cfg.checkpoint, device)
        inference_layout(lam, device)
        # every rank asks (so every rank stops alike); only rank 0 removes, and only with --overwrite
        replace = other_checkpoints(cfg.out, cfg.shards, identity, cfg.overwrite)
        if replace and ranks.main:
            clear_output(cfg.out)
        ranks.barrier()
        mark_finished(jobs, identity, ranks)
        todo = [job for job in jobs if not job.done]
        if ranks.main:
            if todo:
                (cfg.out / "manifest.json").unlink(missing_ok=True)   # the manifest vouches for a finished run only
            remove_stale(cfg.out, jobs)
        ranks.barrier()                          # nothing is removed once any rank writes
        mine = ranks.share(todo)
        precision = (decide_precision(cfg.amp, lam, identity, cfg.shards, pair_manifest, device, ranks,
                                      cfg.loader_threads or ranks.cores, "extract") if todo else None)
        if todo:
            cfg = dataclasses.replace(cfg, backend=announce_backend(cfg.backend, ranks.main, "extract"))
        bar = tqdm(total=sum(job.pairs for job in mine), unit="pair", disable=not (cfg.progress and mine),
                   desc="extract" + (f" (rank {ranks.rank} of {ranks.world_size})" if ranks.distributed else ""))
        with bar:
            for split in SPLITS:
                split_jobs = [job for job in mine if job.split == split]
                if split_jobs:
                    extract_split(split_jobs, cfg, pair_manifest, lam, identity, ranks, device, precision, bar)
        ranks.barrier()                          # every rank's shards are whole
        if cfg.zstd:                             # (copies of any shard, so after the barrier)
            for job in ranks.share(jobs):
                ensure_zstd(job)
            ranks.barrier()
        manifest = None
        if ranks.main:                           # the manifest vouches for every rank's shards
            manifest = build_manifest(cfg.shards, pair_manifest, jobs, identity, cfg.zstd, named)
            atomic_write_json(cfg.out / "manifest.json", manifest)
    return ExtractResult(manifest, written=len(todo), skipped=len(jobs) - len(todo))


def mark_finished(jobs: Sequence[ShardJob], identity: CheckpointIdentity, ranks: Ranks) -> None:
    """Set `done` on every job whose latent shard is finished: each rank hashes a share of the
    shards and all ranks learn every answer, so all of them plan the same work."""
    found = [is_finished(job, identity) for job in ranks.share(jobs)]
    for rank, answers in enumerate(ranks.all_gather(found)):
        for job, done in zip(jobs[rank::ranks.world_size], answers):
            job.done = done


def make_encoder(lam, device: torch.device, compile_model: bool, dtype: torch.dtype | None = None,
                 rows: int | None = None) -> Callable[..., list[Coded]]:
    """(cur, next, prev or None) float batches on `device` -> each pair's codes, the grid (7, 5) in
    its stored type on the CPU (and the per-frame action code of a model that has one); autocast to
    `dtype` (None: fp32). With `rows`, a shorter batch is padded to `rows` rows (copies of its last
    pair) before it is encoded, so every call has one shape (module docstring)."""
    # one shape per run (rows), so no dynamic shapes; without rows, any batch size
    encode = (torch.compile(lam.encode_both, dynamic=rows is None) if compile_model else lam.encode_both)
    size = lam.config.codebook_size

    @torch.inference_mode()
    def run(cur: torch.Tensor, nxt: torch.Tensor, prev: torch.Tensor | None = None) -> list[Coded]:
        given = len(cur)
        if rows is not None and given < rows:
            cur, nxt, prev = (None if frames is None else pad_rows(frames, rows) for frames in (cur, nxt, prev))
        with autocast(device, dtype):
            grids, actions = encode(cur, nxt, prev)
        grids = grids[:given]
        actions = [None] * given if actions is None else actions[:given].tolist()
        return [Coded(grid, action) for grid, action in zip(codes_to_array(grids, size), actions)]

    return run


def pad_rows(frames: torch.Tensor, rows: int) -> torch.Tensor:
    """`frames` (B, ...) with copies of its last row appended up to `rows` rows."""
    filler = frames[-1:].expand(rows - len(frames), *frames.shape[1:])
    return torch.cat([frames, filler]).contiguous(memory_format=torch.channels_last
                                                  if frames.is_contiguous(memory_format=torch.channels_last)
                                                  else torch.contiguous_format)


def coded_pairs(loader, encode) -> Iterator[tuple[str, Coded]]:
    """(key, codes) of every pair the loader walks, in its order."""
    for batch in loader:
        yield from zip(batch["key"], encode(batch["cur"], batch["next"], batch.get("prev")))


def extract_split(jobs: Sequence[ShardJob], cfg: ExtractConfig, pair_manifest: dict, lam,
                  identity: CheckpointIdentity, ranks: Ranks, device: torch.device, precision: Precision,
                  progress: tqdm) -> None:
    """Write the latent shards of `jobs` (all of one split), walking only their pairs."""
    batch_size = cfg.batch_size or (512 if device.type == "cuda" else 64)
    loader = in_order_loader(cfg.shards, jobs[0].split, batch_size, grayscale=identity.color == "gray",
                             backend=cfg.backend, device=device, context=identity.context,
                             runs=[job.run for job in jobs], manifest=pair_manifest,
                             threads=cfg.loader_threads or ranks.cores)
    # frame t-1's bytes, read by frame id: the pair (t-1, t) may sit in the shard before, or on another rank
    previous = PreviousFrames(loader.index) if identity.context else None
    coded = coded_pairs(loader, make_encoder(lam, device, cfg.compile and device.type == "cuda", precision.dtype,
                                             rows=batch_size))
    try:
        for job in jobs:
            write_shard(job, coded, identity, previous)
            job.done = True
            progress.update(job.pairs)
    finally:
        coded.close()
        if previous is not None:
            previous.close()
