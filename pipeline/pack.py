"""Pack `bulk_videos/<episode>/<N>.png` into pair shards: validate every frame once, pair (t, t+1)
inside each episode, split by episode 80/10/10, and write reproducible webdataset tars with a DALI
index beside each, plus `manifest.json` (see DESIGN.md, "Pair shards").

    python -m pipeline.pack --src bulk_videos --out shards/pairs --workers 2 [--strict]

How it is built:
- Workers (processes) only check frames, a chunk of one episode at a time, and send back the bytes to
  store. The parent pairs frames and writes every tar in one fixed order, so the tars are the same
  bytes whatever the worker count. At most 2 x workers chunks are in flight: memory stays flat.
- A frame is checked without a full decode when it is 8-bit RGB (the usual case): every chunk CRC,
  the IHDR, and an inflate of the image data (zlib-ng) to its exact length, whose Adler-32 catches
  corruption. Its bytes then go into the tar untouched. Other PNG kinds (gray, RGBA, palette,
  16-bit, interlaced) are decoded by PIL, and all but interlaced 8-bit RGB are re-encoded as RGB.
- Re-packing over an existing output is crash-safe and safe for readers: the new set (manifest
  last) is built in a hidden staging folder beside `--out`, which is a symbolic link to the current
  version; one rename of that link publishes the new set (pipeline/shard_set.py). A crash leaves the
  old set and its manifest untouched; a reader that started on the old set finishes on it (it stays
  on disk until the re-pack after next). Leftovers from a crashed run are removed by the next one.
  Hidden folders in `--src` are not episodes.
- `--strict`: rejected frames, gaps, duplicate frame numbers and malformed meta.jsonl are fatal;
  conversions of valid grayscale/RGBA/palette/16-bit frames are not problems.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator, Sequence

from zlib_ng import zlib_ng

from common.cli import MAX_SEED, MAX_THREADS, add_config_flags, config_values, flag
from common.errors import UserError, check_output_dir, run_cli
from common.lock import FolderLock
from pipeline.frames import FRAME_HEIGHT, FRAME_WIDTH
from pipeline.palette import MAX_COLOURS, MIN_COLOURS, Palette, colour_ids
from pipeline.png import BadFrame, Ihdr, png_chunks
from pipeline.shard_set import ShardSetFolder
from pipeline.shards import PAIRS_FORMAT, SPLITS, TarShardWriter, WrittenShard, atomic_write_json

DEFAULT_PAIRS_PER_SHARD = 1000      # ~3.5 MB of Breakout pairs: enough shards per split to spread over ranks
CHUNK_FRAMES = 256                  # frames per worker task
# The palette is read off one frame in this many (a full decode each: about 1 ms): a game's colours
# are on screen all the time, so a sample finds them at a fraction of the cost of decoding every frame.
PALETTE_EVERY = 8
FRAME_FILE = re.compile(r"(\d+)\.png", re.IGNORECASE)


@dataclass(frozen=True)
class PackOptions:
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD
    workers: int = 1
    strict: bool = False

    def __post_init__(self):
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != len(SPLITS):
            raise UserError(f"--fractions needs {len(SPLITS)} numbers (train,val,test), got {len(fractions)}")
        if any(not math.isfinite(f) or f < 0 for f in fractions):
            raise UserError(f"--fractions must be non-negative numbers, got {','.join(map(str, fractions))}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise UserError(f"--fractions must sum to 1, got {','.join(map(str, fractions))} (sum {sum(fractions):g})")
        if self.pairs_per_shard < 1:
            raise UserError(f"--pairs-per-shard must be at least 1 (got {self.pairs_per_shard})")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        object.__setattr__(self, "fractions", fractions)


# ------------------------------------------------------------------------------- frame checks
COLOR_RGB = 2


@dataclass
class Frame:
    number: int
    file: str                       # relative to --src, '/'-separated
    data: bytes | None = None       # the PNG bytes to store; None when rejected
    converted: bool = False
    problem: str | None = None
    colours: tuple[int, ...] = ()   # its distinct colours (24-bit), for the palette; sampled frames only


def check_rgb8_pixels(ihdr: Ihdr, image_data: bytes) -> None:
    """What a full decode of a non-interlaced 8-bit RGB PNG could find wrong, without unfiltering:
    the stream must inflate (its Adler-32 verified) to exactly one filter byte plus 3 bytes per
    pixel per row, and every filter byte must be a defined filter."""
    row = 1 + 3 * ihdr.width
    inflater = zlib_ng.decompressobj()      # zlib-ng: the same checks, several times faster than zlib here
    try:
        raw = inflater.decompress(image_data, row * ihdr.height + 1)
    except zlib_ng.error as error:
        raise BadFrame(f"corrupt PNG (image data: {error})") from None
    if not inflater.eof:
        if len(raw) > row * ihdr.height:
            raise BadFrame("corrupt PNG (more image data than the size says)")
        raise BadFrame("truncated PNG (image data ends early)")
    if len(raw) != row * ihdr.height:
        raise BadFrame(f"corrupt PNG (image data has {len(raw)} bytes, expected {row * ihdr.height})")
    if max(raw[::row]) > 4:
        raise BadFrame("corrupt PNG (unknown row filter)")


def decode_to_rgb_png(data: bytes) -> bytes:
    """Fully decode a PNG of another kind (gray, gray+alpha, palette, RGBA, 16-bit, interlaced) and
    re-encode it as 8-bit RGB. Alpha is dropped; 16-bit samples keep their high byte."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode.startswith("I"):          # 16-bit gray: PIL has no direct I;16 -> RGB
                import numpy as np

                image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as error:
        raise BadFrame(f"corrupt PNG ({error})") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")                  # no timestamp chunk: the same pixels give the same bytes
    return buffer.getvalue()


def frame_colours(data: bytes) -> tuple[int, ...]:
    """The distinct colours of a valid PNG frame, as 24-bit RGB integers."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return tuple(colour_ids(np.asarray(image.convert("RGB"))).tolist())


def check_frame(path: Path, frame: Frame, height: int, width: int) -> Frame:
    """The frame with the bytes to store (and, one frame in PALETTE_EVERY, its colours), or with
    the reason it is rejected."""
    checked = check_frame_bytes(path, frame, height, width)
    if checked.data is None or frame.number % PALETTE_EVERY:
        return checked
    return replace(checked, colours=frame_colours(checked.data))


def check_frame_bytes(path: Path, frame: Frame, height: int, width: int) -> Frame:
    try:
        data = path.read_bytes()
    except OSError as error:
        return replace(frame, problem=f"unreadable ({error.strerror or error})")
    try:
        ihdr, image_data = png_chunks(data)
        if (ihdr.height, ihdr.width) != (height, width):
            raise BadFrame(f"wrong size {ihdr.height}x{ihdr.width} (height x width), expected {height}x{width}")
        if ihdr.color_type == COLOR_RGB and ihdr.bit_depth == 8 and not ihdr.interlaced:
            check_rgb8_pixels(ihdr, image_data)
            return replace(frame, data=data)
        if ihdr.color_type == COLOR_RGB and ihdr.bit_depth == 8:
            decode_to_rgb_png(data)                 # interlaced RGB: decode to check, keep the bytes
            return replace(frame, data=data)
        return replace(frame, data=decode_to_rgb_png(data), converted=True)
    except BadFrame as error:
        return replace(frame, problem=str(error))


def check_frames(src: str, frames: list[Frame], height: int, width: int) -> list[Frame]:
    """One worker task: check a chunk of frames of one episode."""
    return [check_frame(Path(src) / frame.file, frame, height, width) for frame in frames]


# ------------------------------------------------------------------------------- episodes
@dataclass
class Episode:
    index: int
    name: str
    split: str
    frames: list[Frame] = field(default_factory=list)     # in frame order, not yet checked
    missing: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)    # found by listing: duplicate numbers, unreadable folder
    meta: dict[int, dict] = field(default_factory=dict)
    meta_problem: str | None = None


def list_episodes(src: Path) -> list[str]:
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    names = sorted(entry.name for entry in os.scandir(src) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        loose = [entry.name for entry in os.scandir(src) if FRAME_FILE.fullmatch(entry.name)]
        hint = " (its PNG files must be inside one sub-folder per episode)" if loose else ""
        raise UserError(f"--src {src}: no episode folders found{hint}")
    return names


def scan_episode(src: Path, episode: Episode) -> None:
    """List the episode's frames in numeric order, its gaps and its duplicate numbers, and read meta.jsonl."""
    folder = src / episode.name
    by_number: dict[int, list[str]] = {}
    try:
        for entry in os.scandir(folder):
            match = FRAME_FILE.fullmatch(entry.name)
            if match and entry.is_file():
                by_number.setdefault(int(match.group(1)), []).append(entry.name)
    except OSError as error:
        episode.rejected.append({"file": episode.name, "reason": f"unreadable folder ({error.strerror or error})"})
    for number in sorted(by_number):
        names = sorted(by_number[number])
        if len(names) == 1:
            episode.frames.append(Frame(number, f"{episode.name}/{names[0]}"))
        else:                           # which one is frame N? neither is used
            episode.rejected += [{"file": f"{episode.name}/{name}",
                                  "reason": f"duplicate frame number {number} ({', '.join(names)})"} for name in names]
    if by_number:
        episode.missing = [f"{episode.name}/{n}.png" for n in range(min(by_number), max(by_number))
                           if n not in by_number]
    episode.meta, episode.meta_problem = read_meta(folder / "meta.jsonl", f"{episode.name}/meta.jsonl")


def read_meta(path: Path, name: str) -> tuple[dict[int, dict], str | None]:
    """The recorder's labels by t. A malformed file is not used at all (labels that are partly wrong
    are worse than none): returns no labels and the problem."""
    if not path.is_file():
        return {}, None
    meta = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return {}, f"{name}: unreadable ({error})"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return {}, f"{name}: line {number} is not valid JSON"
        if not isinstance(record, dict) or not isinstance(record.get("t"), int) or record["t"] in meta:
            return {}, f"{name}: line {number} is not an object with a new integer \"t\""
        meta[record["t"]] = record
    return meta, None


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Episodes per split: largest remainder, then every split with a positive fraction gets at
    least one episode while another split has more than one."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i, fraction in enumerate(fractions):
        donor = max(range(len(counts)), key=lambda j: counts[j])
        if fraction > 0 and counts[i] == 0 and counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts


def assign_splits(names: list[str], seed: int, fractions: Sequence[float]) -> list[str]:
    """The split of each episode. The order comes from a hash of (seed, name): the same on every
    platform and library version, and adding episodes does not reorder the existing ones."""
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"{seed}\0{names[i]}".encode()).digest())
    splits = [""] * len(names)
    position = 0
    for split, count in zip(SPLITS, split_counts(len(names), fractions)):
        for i in order[position:position + count]:
            splits[i] = split
        position += count
    return splits


# ------------------------------------------------------------------------------- checking in parallel
@dataclass
class Chunk:
    episode: Episode
    frames: list[Frame]
    first: bool                     # first / last chunk of its episode
    last: bool


def chunks(src: Path, episodes: list[Episode]) -> Iterator[Chunk]:
    """Each episode scanned when reached, cut into chunks; an episode with no frames gives one empty chunk."""
    for episode in episodes:
        scan_episode(src, episode)
        starts = range(0, max(len(episode.frames), 1), CHUNK_FRAMES)
        for start in starts:
            yield Chunk(episode, episode.frames[start:start + CHUNK_FRAMES], start == 0, start == starts[-1])


def checked_chunks(src: Path, episodes: list[Episode], workers: int) -> Iterator[Chunk]:
    """The chunks with their frames checked, in episode and frame order. At most 2 x workers chunks
    are in flight, so memory does not grow with the dataset."""
    if workers == 1:
        for chunk in chunks(src, episodes):
            yield replace(chunk, frames=check_frames(str(src), chunk.frames, FRAME_HEIGHT, FRAME_WIDTH))
        return
    # fork: workers start at once and inherit the imports; spawn where fork does not exist.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=get_context(method))
    try:
        pending = deque()
        for chunk in chunks(src, episodes):
            pending.append((chunk, pool.submit(check_frames, str(src), chunk.frames, FRAME_HEIGHT, FRAME_WIDTH)))
            if len(pending) >= 2 * workers:
                chunk, future = pending.popleft()
                yield replace(chunk, frames=future.result())
        for chunk, future in pending:
            yield replace(chunk, frames=future.result())
    finally:
        pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------- writing
class SplitWriter:
    """The shards of one split: pairs in arrival order, a new tar every `pairs_per_shard` pairs."""

    def __init__(self, folder: Path, pairs_per_shard: int):
        self.folder, self.pairs_per_shard = folder, pairs_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[WrittenShard] = []
        self.writer: TarShardWriter | None = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.writer is None:
            self.writer = TarShardWriter(self.folder / f"pairs-{len(self.shards):06d}.tar")
        self.writer.add(key, members)
        if self.writer.samples == self.pairs_per_shard:
            self.shards.append(self.writer.close())
            self.writer = None

    def finish(self) -> list[WrittenShard]:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None
        return self.shards

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


@dataclass
class Findings:
    rejected: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    episodes_without_pairs: list[str] = field(default_factory=list)
    colours: set[int] = field(default_factory=set)     # of the sampled frames (PALETTE_EVERY)

    def any_problem(self) -> bool:
        return bool(self.rejected or self.missing or self.warnings)

    def problems(self) -> list[str]:
        """What --strict refuses: every bad file, one line each."""
        return ([f"{r['file']}: {r['reason']}" for r in self.rejected]
                + [f"{m}: missing (gap in frame numbers)" for m in self.missing] + self.warnings)


def pair_json(episode: Episode, t: int) -> bytes:
    fields = {**episode.meta.get(t, {}), "episode": episode.name, "t": t}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def note_scan(episode: Episode, findings: Findings, strict: bool) -> None:
    findings.missing += episode.missing
    findings.rejected += episode.rejected
    if episode.meta_problem:
        findings.warnings.append(episode.meta_problem)
        if not strict:                  # strict reports it with every other problem at the end
            print(f"warning: {episode.meta_problem}; packed without its labels", file=sys.stderr)


def write_pairs(src: Path, episodes: list[Episode], writers: dict[str, SplitWriter], options: PackOptions,
                findings: Findings, progress: bool) -> None:
    """Check every frame once and write each episode's pairs (t, t+1) into its split's shards."""
    from tqdm import tqdm

    previous: Frame | None = None
    pairs_in_episode = 0
    with tqdm(total=len(episodes), unit="episode", desc="pack", disable=not progress) as bar:
        for chunk in checked_chunks(src, episodes, options.workers):
            episode = chunk.episode
            if chunk.first:
                note_scan(episode, findings, options.strict)
            for frame in chunk.frames:
                if len(findings.colours) <= MAX_COLOURS:
                    findings.colours.update(frame.colours)
                if frame.problem:
                    findings.rejected.append({"file": frame.file, "reason": frame.problem})
                elif frame.converted:
                    findings.converted.append(frame.file)
                if (previous is not None and previous.data is not None and frame.data is not None
                        and frame.number == previous.number + 1):
                    pairs_in_episode += 1
                    if not (options.strict and findings.any_problem()):   # strict and failing: check only
                        key = f"{episode.index:05d}_{previous.number:06d}"
                        writers[episode.split].add(key, {"cur.png": previous.data, "next.png": frame.data,
                                                         "json": pair_json(episode, previous.number)})
                previous = frame
            if chunk.last:
                if pairs_in_episode == 0:
                    findings.episodes_without_pairs.append(episode.name)
                episode.frames, episode.meta = [], {}       # only its name and split are needed from here
                previous, pairs_in_episode = None, 0
                bar.update()


def build_manifest(options: PackOptions, episodes: list[Episode], shards: dict[str, list[WrittenShard]],
                   findings: Findings) -> dict:
    splits = {}
    for split in SPLITS:
        entries = [{"file": f"{split}/{s.tar.name}", "index": f"{split}/{s.index.name}",
                    "pairs": s.samples, "sha256": s.sha256} for s in shards[split]]
        splits[split] = {"episodes": [e.name for e in episodes if e.split == split],
                         "pairs": sum(s.samples for s in shards[split]), "shards": entries}
    return {"format": PAIRS_FORMAT, "frame": {"height": FRAME_HEIGHT, "width": FRAME_WIDTH},
            "seed": options.seed, "fractions": list(options.fractions),
            "pairs_per_shard": options.pairs_per_shard, "splits": splits,
            "rejected": findings.rejected, "missing": findings.missing, "converted": findings.converted,
            "episodes_without_pairs": findings.episodes_without_pairs, "warnings": findings.warnings,
            **palette_entry(findings.colours)}


def palette_entry(colours: set[int]) -> dict:
    """The manifest's "palette" (the game's colours, pipeline/palette.py), when the frames have one."""
    if not MIN_COLOURS <= len(colours) <= MAX_COLOURS:        # the manifest schema's rule
        return {}
    return {"palette": Palette.from_ids(colours).to_json()}


def pack(src: Path, out: Path, *, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
         pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD, workers: int = 1, strict: bool = False,
         progress: bool = True) -> dict:
    """Pack `src` (one sub-folder per episode) into pair shards under `out`; returns the manifest.
    With `strict`, any rejected frame, gap or malformed meta.jsonl raises UserError naming every
    bad file, and `out` is left as it was."""
    options = PackOptions(seed=seed, fractions=tuple(fractions), pairs_per_shard=pairs_per_shard,
                          workers=workers, strict=strict)
    src, out = Path(src), Path(out)
    check_output_dir(out, "--out")
    names = list_episodes(src)
    if out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"--out {out} is inside --src {src}: it would be read as an episode")
    with FolderLock(out):               # one packer per --out, from its first check to the swap
        return pack_locked(src, out, names, options, progress)


def pack_locked(src: Path, out: Path, names: list[str], options: PackOptions, progress: bool) -> dict:
    """pack()'s work on the episodes `names`, with the --out lock held."""
    folder = ShardSetFolder(out)
    folder.check()
    episodes = [Episode(i, name, split) for i, (name, split) in
                enumerate(zip(names, assign_splits(names, options.seed, options.fractions)))]
    folder.remove_leftovers()
    staging = folder.staging()
    writers = {split: SplitWriter(staging / split, options.pairs_per_shard) for split in SPLITS}
    findings = Findings()
    try:
        write_pairs(src, episodes, writers, options, findings, progress)
        if options.strict and findings.problems():
            problems = findings.problems()
            raise UserError(f"--strict: {len(problems)} problem(s) in {src}; nothing written:\n  "
                            + "\n  ".join(problems))
        shards = {split: writer.finish() for split, writer in writers.items()}
        manifest = build_manifest(options, episodes, shards, findings)
        atomic_write_json(staging / "manifest.json", manifest)          # last: the set is whole
        folder.publish(staging)
        return manifest
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- command line
def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None


def summary(manifest: dict, out: Path) -> str:
    splits = manifest["splits"]
    lines = [f"packed {sum(s['pairs'] for s in splits.values())} pairs into {out}: "
             + ", ".join(f"{name} {s['pairs']} pairs / {len(s['episodes'])} episodes / {len(s['shards'])} shards"
                         for name, s in splits.items()),
             f"rejected {len(manifest['rejected'])} frames, missing {len(manifest['missing'])}, "
             f"converted {len(manifest['converted'])}, episodes without pairs {len(manifest['episodes_without_pairs'])}"
             + (f", warnings {len(manifest['warnings'])}" if manifest["warnings"] else "")]
    shown = 10
    lines += [f"  rejected {r['file']}: {r['reason']}" for r in manifest["rejected"][:shown]]
    lines += [f"  missing {m}" for m in manifest["missing"][:shown]]
    if len(manifest["rejected"]) > shown or len(manifest["missing"]) > shown:
        lines.append(f"  (full lists in {out / 'manifest.json'})")
    return "\n".join(lines)


@dataclass
class PackCommand:
    """The command line (`python -m pipeline.pack --help`)."""

    src: Path = flag(help="bulk_videos/: one sub-folder per episode")
    out: Path = flag(help="output folder (shards/pairs)")
    seed: int = flag(0, "seed of the episode split", min=0, max=MAX_SEED)
    fractions: str = flag("0.8,0.1,0.1", "train,val,test shares of the episodes")
    pairs_per_shard: int = flag(DEFAULT_PAIRS_PER_SHARD, min=1)
    workers: int = flag(1, "processes checking frames", min=1, max=MAX_THREADS)
    strict: bool = flag(False, "any bad or missing frame is fatal; nothing written")
    progress: bool = True


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pack", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, PackCommand)
    args = PackCommand(**config_values(parser.parse_args(argv), PackCommand))
    manifest = pack(args.src, args.out, seed=args.seed, fractions=parse_fractions(args.fractions),
                    pairs_per_shard=args.pairs_per_shard, workers=args.workers, strict=args.strict,
                    progress=args.progress)
    print(summary(manifest, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
