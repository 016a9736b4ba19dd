"""Training/extraction loader over pair shards: `build_loader(...)` (DESIGN.md, "Loader").

    loader = build_loader("shards/pairs", "train", 32, backend="dali", device="cuda")
    for batch in loader:                       # one pass is one epoch
        batch["cur"], batch["next"]            # float32 (B, C, 210, 160) in [0, 1] on the device
        batch["prev"], batch["prev_valid"]     # with context=1: frame t-1, and bool (B,) (see below)
    batches = loader.forever()                 # epoch after epoch, as training draws them

How it works, shared by both backends (they differ only in the decoder, pipeline/frame_decoders.py):

- Index (pipeline/pair_index.py): every pair of the split and every unique frame, from the `.idx`
  files. A frame appears in two pairs (t-1, t) and (t, t+1) but has one frame id.
- Context (context=1): each pair also gets frame t-1 of its episode, by frame id from the index
  (`prev`; frame t itself, with `prev_valid` False, at an episode's first pair or after a frame the
  packer rejected). It is one more frame id per pair for the same cache or per-batch decode, so no
  frame is decoded twice and sampling, DDP shares and resume are those of context=0.
- Sampling (EpochSchedule): epoch e visits the split in a fresh permutation drawn from (seed, e) over
  the whole split, so a batch mixes episodes; shuffle=False keeps manifest order. Each DDP rank takes
  a contiguous slice of that order; with drop_last every rank gets the same number of batches.
  Extraction and evaluation walk given runs of pairs in order instead (RunSchedule: a batch never
  spans two runs), so that their batches do not depend on how the work is shared among ranks.
- Frames: if the split's unique frames fit `cache_budget_gb` (uint8, gray frames take a third of RGB),
  the first pass decodes each unique frame exactly once into a cache on the device and every batch
  afterwards is a gather from it; otherwise each batch decodes its unique frames (in-order batches
  share frames, so an in-order pass decodes about one frame per pair). Either way the batch is the
  same (frames are decoded losslessly), and `frames.to_model_input` makes the model input, a role
  (cur, next, prev) at a time.
- DDP: each rank caches the whole split, not its share, because the permutation, and so the share,
  changes every epoch; the budget is per rank.
- Batches are made in a background thread (BackgroundIterator), `prefetch` ahead of the consumer.
- State: (epoch, batches already yielded in it). A loader that loads a state yields on its next pass
  exactly what the saved loader would have yielded next; any other pass starts at an epoch boundary
  (a pass left half-way counts as a finished epoch).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from common.device import resolve_device
from common.errors import UserError
from pipeline.frame_decoders import DaliFrameDecoder, FrameDecoder, PilFrameDecoder, default_threads
from pipeline.frames import rgb_to_gray_uint8, to_model_input
from pipeline.pair_index import PairIndex, build_pair_index

BACKENDS = ("dali", "torch")
CONTEXTS = (0, 1)               # frames before t a pair carries: none, or frame t-1
STATE_FORMAT = "lam-loader/1"
DEFAULT_CACHE_BUDGET_GB = 4.0
CACHE_FILL_FRAMES = 128          # frames per decoder job while filling the cache
GRAY_FRAMES_PER_STEP = 2         # see PairLoader._kept


@dataclass(frozen=True)
class EpochSchedule:
    """Which pairs this rank gets, in which batches, in every epoch: pure function of its fields."""

    num_pairs: int
    batch_size: int
    shuffle: bool
    seed: int
    rank: int
    world_size: int
    drop_last: bool
    subset: tuple[int, ...] | None = None    # the pair ids to walk (None: every pair of the split)

    def pair_order(self, epoch: int) -> np.ndarray:
        ids = np.arange(self.num_pairs) if self.subset is None else np.asarray(self.subset, dtype=np.int64)
        if not self.shuffle:
            return ids
        return ids[np.random.default_rng([self.seed, epoch]).permutation(len(ids))]

    def _share_bounds(self) -> tuple[int, int]:
        if self.drop_last:       # equal shares, so every DDP rank steps the same number of times
            share = self.num_pairs // self.world_size
            return self.rank * share, self.rank * share + self.batches_per_epoch * self.batch_size
        base, extra = divmod(self.num_pairs, self.world_size)     # np.array_split's sizes
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return (self.num_pairs // self.world_size) // self.batch_size
        start, end = self._share_bounds()
        return math.ceil((end - start) / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """Pair ids of this rank's batches `start`, `start`+1, ... of `epoch`."""
        first, last = self._share_bounds()
        share = self.pair_order(epoch)[first:last]
        size = self.batch_size
        return [share[i * size:(i + 1) * size] for i in range(start, self.batches_per_epoch)]


@dataclass(frozen=True)
class RunSchedule:
    """Runs of consecutive pairs, [start, stop) positions in the split, walked in order, each cut into
    batches of its own: a batch never spans two runs. Extraction gives one run per shard, so a
    shard's batches, and so its codes, do not depend on which shards a rank or a re-run walks;
    evaluation gives each rank whole batches of the single-process walk. Every epoch is the same."""

    runs: tuple[tuple[int, int], ...]
    batch_size: int

    def pair_order(self, epoch: int) -> np.ndarray:
        return np.concatenate([np.arange(start, stop) for start, stop in self.runs] or [np.zeros(0, np.int64)])

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.runs)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        size = self.batch_size
        every = [np.arange(first, min(first + size, stop)) for begin, stop in self.runs
                 for first in range(begin, stop, size)]
        return every[start:]


class PairLoader:
    """Iterable over batches of pairs; see the module docstring. Built by `build_loader`."""

    def __init__(self, index: PairIndex, schedule: EpochSchedule | RunSchedule, decoder: FrameDecoder, *,
                 grayscale: bool, device: torch.device, with_keys: bool, cache: bool, prefetch: int = 2,
                 context: int = 0):
        self.index, self.schedule, self.decoder, self.prefetch = index, schedule, decoder, prefetch
        self.grayscale, self.device, self.with_keys, self.context = grayscale, device, with_keys, context
        self.cached = cache
        self._cache: torch.Tensor | None = None
        self._epoch, self._batch = 0, 0          # the next batch to yield
        self._resume_pending = False
        self._assembling: BackgroundIterator | None = None
        # the frames each pair yields, one row per role: frame ids (roles, pairs)
        self.roles = ("cur", "next", "prev")[:2 + context]
        self._pair_frames = np.stack([getattr(index, role) for role in self.roles])
        self._pair_frames_on_device = torch.from_numpy(self._pair_frames).to(device)
        self._prev_valid = torch.from_numpy(index.prev_valid).to(device)

    # ------------------------------------------------------------------------------- public
    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def cache_bytes(self) -> int:
        """Memory the decoded-frame cache takes (or would take) on the device."""
        return self.index.num_frames * self.index.height * self.index.width * self.channels

    @property
    def coverage(self) -> tuple[int, int]:
        """(pairs, episodes) this loader walks in an epoch, all ranks together."""
        ids = self.schedule.pair_order(0)
        return len(ids), len(np.unique(self.index.episodes[ids]))

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def __iter__(self) -> Iterator[dict]:
        if self._assembling is not None:         # a pass still open elsewhere shares the decoder: end it
            self._assembling.close()
        epoch, start = self._begin_pass()
        batches = self.schedule.batches(epoch, start)
        assembled = self._assembling = BackgroundIterator(lambda: self._model_inputs(batches),
                                                          depth=self.prefetch, device=self.device)
        try:
            for number, batch in enumerate(assembled, start + 1):
                # the position moves before the yield: a state taken while the caller holds this
                # batch already counts it as consumed
                self._epoch, self._batch = (epoch + 1, 0) if number == len(self) else (epoch, number)
                yield batch
        finally:
            assembled.close()

    def forever(self) -> Iterator[dict]:
        """Epoch after epoch, as training draws batches; state_dict() knows the position inside the epoch."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "epoch": self._epoch, "batch": self._batch, **asdict(self.schedule)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = asdict(self.schedule)
        # rank may differ: in DDP every rank loads the state rank 0 saved, and all ranks stand at
        # the same batch number
        different = [f"{name} {state.get(name)!r} != {mine[name]!r}" for name in mine
                     if name != "rank" and state.get(name) != mine[name]]
        if different:
            raise UserError("loader state was saved by a differently built loader: " + ", ".join(different))
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._resume_pending = True

    # ------------------------------------------------------------------------------ internals
    def _begin_pass(self) -> tuple[int, int]:
        if self._resume_pending:
            self._resume_pending = False
        elif self._batch:                        # the last pass stopped half-way: next epoch
            self._epoch, self._batch = self._epoch + 1, 0
        return self._epoch, self._batch

    def _model_inputs(self, batches: Sequence[np.ndarray]) -> Iterator[dict]:
        """The batches of this pass, as the model takes them (runs in the BackgroundIterator's thread)."""
        frame_batches = self._cached_frames(batches) if self.cached else self._streamed_frames(batches)
        try:
            for pairs, (frames, rows) in zip(batches, frame_batches):
                # a role at a time: index_select (several times faster on a CPU than frames[rows] for
                # whole-frame rows), then the float conversion while the gathered frames are in cache
                batch = {role: to_model_input(frames.index_select(0, role_rows), self.grayscale)
                         for role, role_rows in zip(self.roles, rows)}
                if self.context:
                    batch["prev_valid"] = self._prev_valid[torch.from_numpy(pairs).to(self.device)]
                if self.with_keys:
                    batch["key"] = [self.index.keys[pair] for pair in pairs]
                yield batch
        finally:
            frame_batches.close()

    def _kept(self, frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded RGB -> the form the loader keeps: gray is reduced once, by the same function
        to_model_input would apply, so keeping gray frames changes nothing but memory."""
        if not self.grayscale:
            return frames if out is None else out.copy_(frames)
        if out is None:
            out = torch.empty((*frames.shape[:-1], 1), dtype=torch.uint8, device=frames.device)
        # On the CPU a few frames at a time: the reduction's int32 temporaries then stay small
        # enough for malloc to reuse, where whole-batch temporaries fragment the heap (+300 MB RSS).
        step = GRAY_FRAMES_PER_STEP if frames.device.type == "cpu" else max(1, len(frames))
        for start in range(0, len(frames), step):
            out[start:start + step] = rgb_to_gray_uint8(frames[start:start + step])
        return out

    def _cached_frames(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, (the cache's uint8 frames, the rows of each role's frames in it (roles, B))."""
        if self._cache is None and batches:
            self._cache = self._fill_cache()
        for pairs in batches:
            yield self._cache, self._pair_frames_on_device[:, torch.from_numpy(pairs).to(self.device)]

    def _fill_cache(self) -> torch.Tensor:
        """Decode every unique frame of the split once, in big multi-threaded jobs."""
        index = self.index
        cache = torch.empty((index.num_frames, index.height, index.width, self.channels),
                            dtype=torch.uint8, device=self.device)
        jobs = [np.arange(start, min(start + CACHE_FILL_FRAMES, index.num_frames))
                for start in range(0, index.num_frames, CACHE_FILL_FRAMES)]
        decoded = self.decoder.decode(jobs)
        try:
            for job, frames in zip(jobs, decoded):
                self._kept(frames, out=cache[job[0]:job[-1] + 1])
        finally:
            decoded.close()
            self.decoder.close()                 # never needed again: free its threads and buffers
        return cache

    def _streamed_frames(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, (its unique frames, decoded once each (a prev frame that is also a cur or next
        frame of the batch included), the rows of each role's frames in them (roles, B))."""
        plans = [np.unique(self._pair_frames[:, pairs], return_inverse=True) for pairs in batches]
        decoded = self.decoder.decode([unique for unique, _ in plans])
        try:
            for (_, where), frames in zip(plans, decoded):
                rows = torch.from_numpy(where.reshape(len(self.roles), -1)).to(self.device)
                yield self._kept(frames), rows
        finally:
            decoded.close()


class BackgroundIterator:
    """Runs an iterator in a thread of its own, up to `depth` items ahead of the consumer.

    Like DataLoader's pin-memory thread, the thread uses one intra-op thread (`threads`): the
    loader's tensor work is small memory-bound ops, which gain nothing from threads, and on a busy
    box torch's thread team waits on descheduled members (measured 7x slower on the shared 2-core
    box). It also overlaps loading with the consumer's own work. On a GPU each batch is complete
    before it is handed over, so the consumer may use it on any stream.
    """

    def __init__(self, make_items: Callable[[], Iterator], *, depth: int, device: torch.device, threads: int = 1,
                 name: str = "pair-loader"):
        # set_num_threads(1) in the thread also becomes the default of threads that have not used
        # torch yet: make sure the caller's thread has settled its own count first
        torch.get_num_threads()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(make_items, device, threads),
                                        name=name, daemon=True)
        self._thread.start()

    def _produce(self, make_items: Callable[[], Iterator], device: torch.device, threads: int) -> None:
        torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        items = None
        try:
            items = make_items()
            for item in items:
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as error:          # handed to the consumer, raised there
            self._put(("error", error))
        finally:
            if items is not None:
                items.close()                     # frees decoder threads/workers now, in this thread

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator:
        while True:
            try:
                kind, value = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or (not self._thread.is_alive() and self._queue.empty()):
                    return                        # closed (a newer pass took over)
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the item in hand first)."""
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class LoaderConfig:
    """How a loader walks a split: build_loader's settings as one value (DESIGN.md, "Loader").

    context: 0 yields {"cur", "next"}; 1 adds "prev" (frame t-1 of the same episode, shaped like
    "cur") and "prev_valid" (bool (B,); False where "prev" is frame t itself: an episode's first
    pair, or frame t-1 rejected by the packer).

    Extra tuning:
      cache            None (default): cache decoded frames when they fit `cache_budget_gb`;
                       True: always; False: never (decode per batch).
      cache_budget_gb  device memory the cache may take, per rank (default 4 GiB; a frame takes
                       210*160 bytes gray, three times that RGB).
      threads          DALI decoding threads, or torch DataLoader workers (default: CPU count, at most 8).
      prefetch         batches made ahead of the consumer (and decoder jobs in flight ahead of those).
      sample           walk only a fixed sample of this many pairs, drawn with `seed` across every
                       episode of the split (`spread_sample`); 0: every pair.
      runs             walk only these [start, stop) runs of pair positions, in order, each cut into
                       batches of its own (RunSchedule); not with shuffle, sample or world_size > 1.
      verify           check every tar of the split against the manifest's sha256 first (one
                       read of each); shard lengths and sample counts are checked either way.
    """

    batch_size: int
    grayscale: bool = True
    shuffle: bool = True
    seed: int = 0
    backend: str = "dali"
    device: str | torch.device | None = None
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    with_keys: bool = False
    context: int = 0
    cache: bool | None = None
    cache_budget_gb: float = DEFAULT_CACHE_BUDGET_GB
    threads: int | None = None
    prefetch: int = 2
    sample: int = 0
    runs: tuple[tuple[int, int], ...] | None = None
    verify: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown loader backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.seed < 0:
            raise UserError(f"seed must be non-negative, got {self.seed}")
        if self.context not in CONTEXTS:
            raise UserError(f"context must be 0 (frames t, t+1) or 1 (frame t-1 too), got {self.context!r}")
        if self.runs is not None:
            if self.shuffle or self.sample or self.world_size > 1:
                raise ValueError("runs walk given pairs in order: not with shuffle, sample or world_size > 1")
            object.__setattr__(self, "runs", tuple((int(start), int(stop)) for start, stop in self.runs))


def build_loader(shards, split: str, batch_size: int, *, manifest: dict | None = None, **options) -> PairLoader:
    """Loader over `<shards>/<split>` pair shards (DESIGN.md, "Loader"): `options` are LoaderConfig's
    fields (grayscale, shuffle, seed, backend, device, rank, world_size, drop_last, with_keys,
    context, and the tuning it lists); `manifest` the split's manifest, when the caller has read it."""
    return open_loader(shards, split, LoaderConfig(batch_size, **options), manifest)


def open_loader(shards, split: str, config: LoaderConfig, manifest: dict | None = None) -> PairLoader:
    """The loader `config` describes over `split` of `shards`: a PairSet (pipeline/pair_set.py, its
    manifest already read) or a shard directory (its manifest read here, unless given)."""
    from pipeline.pair_set import PairSet

    if isinstance(shards, PairSet):
        shards, manifest = shards.path, shards.manifest
    device = resolve_device(config.device)
    index = build_pair_index(Path(shards), split, manifest, verify=config.verify)
    if config.runs is not None:
        schedule = RunSchedule(config.runs, config.batch_size)
    else:
        subset = spread_sample(index.episodes, config.sample, config.seed) if 0 < config.sample < index.num_pairs else None
        schedule = EpochSchedule(num_pairs=index.num_pairs if subset is None else len(subset),
                                 batch_size=config.batch_size, shuffle=config.shuffle, seed=config.seed,
                                 rank=config.rank, world_size=config.world_size, drop_last=config.drop_last,
                                 subset=None if subset is None else tuple(subset.tolist()))
    threads = config.threads or default_threads()
    if config.backend == "dali":
        _require_dali()
        decoder = DaliFrameDecoder(index, device, max_frames=max((2 + config.context) * config.batch_size,
                                                                 CACHE_FILL_FRAMES),
                                   threads=threads, prefetch=config.prefetch)
    else:
        decoder = PilFrameDecoder(index, device, workers=threads, prefetch=config.prefetch)
    cache_bytes = index.num_frames * index.height * index.width * (1 if config.grayscale else 3)
    use_cache = config.cache if config.cache is not None else cache_bytes <= config.cache_budget_gb * 2**30
    return PairLoader(index, schedule, decoder, grayscale=config.grayscale, device=device,
                      with_keys=config.with_keys, cache=use_cache, prefetch=config.prefetch, context=config.context)


def spread_sample(episodes: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n pair ids (sorted) drawn at random, without replacement, from every episode in proportion to
    its pairs (at least one each while n allows): a fixed sample that is not a few episodes."""
    rng = np.random.default_rng([seed, n])
    names, sizes = np.unique(episodes, return_counts=True)
    quota = np.floor(n * sizes / sizes.sum()).astype(int)
    quota = np.maximum(quota, 1) if n >= len(names) else quota
    for i in rng.permutation(len(names)):            # hand out what rounding left, one per episode
        if quota.sum() >= n:
            break
        quota[i] += quota[i] < sizes[i]
    while quota.sum() > n:                           # the at-least-one rule can overshoot
        quota[np.argmax(quota)] -= 1
    chosen = [rng.choice(np.flatnonzero(episodes == name), size=min(q, size), replace=False)
              for name, q, size in zip(names, quota, sizes)]
    return np.sort(np.concatenate(chosen))


def in_order_loader(shards: str | Path, split: str, batch_size: int, *, grayscale: bool,
                    backend: str | None = None, device: str | torch.device | None = None,
                    context: int = 0, runs: Sequence[tuple[int, int]] | None = None,
                    manifest: dict | None = None, threads: int | None = None, verify: bool = True) -> PairLoader:
    """Every pair of `split` once (or those of `runs`, see build_loader), in manifest order, with keys
    and no cache: what extraction and evaluation walk (the decoded-frame cache pays only from the
    second epoch on). Their output stands for the shards the manifest names, so by default every
    tar is checked against the manifest's sha256 first (`verify`)."""
    return build_loader(shards, split, batch_size, grayscale=grayscale, shuffle=False, drop_last=False,
                        with_keys=True, backend=backend or default_backend(), device=device, cache=False,
                        context=context, runs=runs, manifest=manifest, threads=threads, verify=verify)


def default_backend() -> str:
    """DALI where it is installed, the plain PyTorch path elsewhere."""
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "torch"


def resolve_backend(backend: str | None) -> tuple[str, str]:
    """(the backend to use, why) for a command's `--backend`: a name is obeyed; None or "auto" is
    DALI where it imports and the PyTorch loader elsewhere (a machine without DALI still runs)."""
    if backend not in (None, "auto"):
        return backend, f"--backend {backend}"
    chosen = default_backend()
    return chosen, "auto: " + ("DALI is installed" if chosen == "dali" else "DALI is not installed here")


def announce_backend(backend: str | None, main: bool, command: str) -> str:
    """resolve_backend, and the choice printed by the main rank as one log line."""
    chosen, why = resolve_backend(backend)
    if main:
        print(f"{command}: loader {chosen} ({why})", flush=True)
    return chosen


def _require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError("backend 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130), "
                        "or use backend='torch'") from None
