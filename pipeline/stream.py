"""Webdataset readers of latent shards (`shards/latent/`) for downstream training (Parts 3 and 4).

    from pipeline.stream import latent_dataset
    for sample in latent_dataset("shards/latent", split="train"):
        sample["cur"], sample["codes"], sample["next"]    # float (C,210,160), int64 (7,5), float
                                                          # (codes stored uint8, or uint16 past 256 codes)
        sample["prev"], sample["prev_valid"]              # shards of a model with context: frame t-1, bool

    loader = torch.utils.data.DataLoader(latent_dataset(urls, shuffle=1000, batch_size=32),
                                         batch_size=None, num_workers=4)

Reads `.tar` and zstd-compressed `.tar.zst` shards alike (decompressed as a stream with the
`zstandard` package; no external binary). Shards are split across DDP ranks (wds.split_by_node:
torch.distributed or RANK/WORLD_SIZE) and DataLoader workers (wds.split_by_worker), so each sample
is read once per epoch over the whole job, as long as there are at least ranks x workers shards.
Frames go through `pipeline.frames.to_model_input`, the preprocessing the model was trained with.
"""
from __future__ import annotations

import functools
import io
import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import webdataset as wds
import zstandard

from webdataset.tariterators import group_by_keys, tar_file_expander

from common.errors import UserError
from pipeline.frames import GRID, to_model_input
from pipeline.latent import CODE_DTYPES
from pipeline.png import decode_png
from pipeline.shards import LATENT_FORMAT, SPLITS, check_shard_hash, load_manifest, read_index

ZSTD_SUFFIX = ".zst"


# ------------------------------------------------------------------------------------ sources
def latent_urls(source: str | Path | Sequence[str | Path], split: str | None = None,
                compressed: bool = False) -> list[str]:
    """Shard urls from a latent directory (its manifest: every split in train/val/test order, or one
    `split`; `compressed` picks the `.tar.zst` copies), a brace pattern ("dir/latent-{000000..000003}.tar"),
    one shard path, or a list of urls. A local path that is not there is one clear error here,
    not an unreadable stream later."""
    if isinstance(source, (list, tuple)):
        urls = [str(url) for url in source]
    elif Path(source).is_dir():
        urls = _manifest_urls(Path(source), split, compressed)
    else:
        urls = list(wds.shardlists.expand_urls(str(source)))
        if [str(source)] == urls and is_local(urls[0]) and not Path(urls[0]).exists():
            raise UserError(f"{source}: not found (expected a latent shard directory, a .tar or .tar.zst shard, "
                            f"or a brace pattern of them)")
    if not urls:
        raise UserError(f"{source}: no latent shards to read")
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise UserError(f"{missing[0]}: latent shard not found{more}")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _manifest_urls(directory: Path, split: str | None, compressed: bool) -> list[str]:
    manifest = load_manifest(directory, LATENT_FORMAT)
    splits = manifest["splits"]
    names = [split] if split else [name for name in SPLITS if name in splits]
    urls = []
    for name in names:
        if name not in splits:
            raise UserError(f"{directory / 'manifest.json'}: no split {name!r} (has {', '.join(splits) or 'none'})")
        for shard in splits[name]["shards"]:
            if compressed and "zstd" not in shard:
                raise UserError(f"{directory}: shard {shard['file']} has no .tar.zst copy (re-run extract.py --zstd)")
            path = manifest.root / (shard["zstd"]["file"] if compressed else shard["file"])
            if not path.is_file():
                raise UserError(f"{path}: shard listed in the manifest is missing")
            urls.append(str(path))
    return urls


# ------------------------------------------------------------------------------------ promises
def manifest_entry(url: str) -> dict | None:
    """What the manifest of the latent directory holding a local shard says of it ({"pairs",
    "sha256"}; of the `.tar.zst` copy for a `.zst` url), or None where no manifest lists it. Found
    by place (<dir>/<split>/<shard>), so a list of urls from `latent_urls` is checked as the
    directory itself would be."""
    found = _manifest_of(url)
    if found is None:
        return None
    path = Path(url)
    return found.entries.get(f"{path.parent.name}/{path.name}")


def code_limits(url: str) -> CodeLimits:
    """What the codes in a shard may be: from the manifest of the latent directory holding it, or,
    where none is found (a remote url, a loose shard), only the stored types."""
    found = _manifest_of(url)
    return CodeLimits() if found is None else found.limits


class CodeLimits(NamedTuple):
    """The codes a latent manifest promises: grid codes in [0, codebook_size) of type code_dtype,
    and, for a LAM with a per-frame action code, action codes in [0, action_codes) of action_dtype
    (0: the samples hold none). None: not known (the stored types still bound them)."""

    codebook_size: int | None = None
    code_dtype: str | None = None
    action_codes: int | None = None
    action_dtype: str | None = None
    manifest: str = ""


class ManifestFacts(NamedTuple):
    entries: dict[str, dict]
    limits: CodeLimits


def _manifest_of(url: str) -> ManifestFacts | None:
    if not is_local(url):
        return None
    directory = Path(url).parent.parent
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        return None
    stat = manifest_file.stat()
    return _manifest_facts(str(directory), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _manifest_facts(directory: str, mtime_ns: int, size: int) -> ManifestFacts:
    """file -> {"pairs", "sha256"} for every shard (and .tar.zst copy) a latent manifest lists, and
    the codes it promises; cached per manifest version (its mtime and size), as every shard asks."""
    manifest = load_manifest(Path(directory), LATENT_FORMAT)
    entries = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            entries[shard["file"]] = {"pairs": shard["pairs"], "sha256": shard["sha256"]}
            if "zstd" in shard:
                entries[shard["zstd"]["file"]] = {"pairs": shard["pairs"], "sha256": shard["zstd"]["sha256"]}
    checkpoint = manifest.get("checkpoint", {})
    limits = CodeLimits(checkpoint.get("codebook_size"), manifest.get("code_dtype"),
                        checkpoint.get("action_codes", 0) if "codebook_size" in checkpoint else None,
                        manifest.get("action_dtype"), str(Path(directory) / "manifest.json"))
    return ManifestFacts(entries, limits)


class ShardMismatch(ValueError):
    """A shard is not what its index or manifest says it holds: cut short, or changed."""


def promised_counts(url: str) -> list[tuple[int, str]]:
    """(samples, who says so) for a shard: the `.idx` beside it, its latent manifest."""
    promises = []
    index = Path(url.removesuffix(ZSTD_SUFFIX)).with_suffix(".idx")
    if is_local(url) and index.is_file():
        promises.append((len(read_index(index)), "its index lists"))
    entry = manifest_entry(url)
    if entry is not None:
        promises.append((entry["pairs"], "its manifest lists"))
    return promises


def verify_shard(url: str) -> None:
    """The shard's bytes hash to its manifest's sha256 (one read of the file)."""
    entry = manifest_entry(url)
    if entry is None:
        raise UserError(f"{url}: no latent manifest beside it lists this shard, so there is no sha256 to verify "
                        f"(read its directory instead, or verify=False)")
    check_shard_hash(Path(url), entry["sha256"])


# ------------------------------------------------------------------------------------ opening
def open_shard(url: str):
    """A readable byte stream of one shard's tar, decompressing `.zst` on the fly."""
    stream = wds.gopen(url, "rb")
    if url.endswith(ZSTD_SUFFIX):
        return zstandard.ZstdDecompressor().stream_reader(stream, closefd=True)
    return stream


def zstd_url_opener(data: Iterable[dict], handler: Callable = wds.reraise_exception) -> Iterable[dict]:
    """webdataset's `url_opener`, with `.tar.zst` support: {"url"} -> {"url", "stream"}."""
    for source in data:
        try:
            yield {**source, "stream": open_shard(source["url"])}
        except Exception as error:     # the handler decides, as in webdataset's own opener
            error.args = error.args + (source["url"],)
            if handler(error):
                continue
            raise


def tar_samples(data: Iterable[dict], handler: Callable = wds.reraise_exception,
                verify: bool = False) -> Iterable[dict]:
    """Stream of {"url"} -> webdataset samples {"__key__", "cur.png", ...}, `.tar` or `.tar.zst`.
    A tar cut short, even at a sample boundary, reads as a shorter tar (tarfile's stream mode
    stops quietly), so a shard must yield as many samples as its `.idx` and its manifest list;
    with `verify`, its bytes must hash to the manifest's sha256 before it is read."""
    for source in data:
        if verify:
            verify_shard(source["url"])
        files = tar_file_expander(zstd_url_opener([source], handler=handler), handler=handler)
        count = 0
        for sample in group_by_keys(files, handler=handler):
            count += 1
            yield sample
        for expected, who in promised_counts(source["url"]):
            if count != expected:
                handler(ShardMismatch(f"holds {count} samples, {who} {expected}", source["url"]))
                break


# ----------------------------------------------------------------------------------- decoding
class BadSample(ValueError):
    """A latent sample that is not what its shard's manifest promises; the message names the shard
    and the sample."""


def stored_codes(data: bytes, member: str, size: int | None, dtype: str | None) -> np.ndarray:
    """A `.npy` of codes as extraction stores them: an unsigned type (`dtype` where the manifest says
    which; otherwise one of CODE_DTYPES) and every code in [0, size) where the size is known. A code
    past the codebook must not reach the decoder, whose lookup would wrap it (259 drawn as 3)."""
    codes = np.load(io.BytesIO(data), allow_pickle=False)
    allowed = (dtype,) if dtype else tuple(np.dtype(t).name for t in CODE_DTYPES)
    if codes.dtype.name not in allowed:        # a signed or float array was not written by extraction
        raise ValueError(f"{member} holds {codes.dtype}, expected {' or '.join(allowed)}")
    if size is not None and codes.size and int(codes.max()) >= size:
        raise ValueError(f"{member} holds code {int(codes.max())}, but there are {size} codes (0..{size - 1})")
    return codes


def decode_codes(data: bytes, size: int | None = None, dtype: str | None = None) -> torch.Tensor:
    """codes.npy (uint8 up to 256 codes, uint16 above: pipeline.latent.code_dtype) -> int64 (7, 5),
    each code checked against the codebook's `size` when it is known."""
    codes = stored_codes(data, "codes.npy", size, dtype)
    if codes.shape != GRID:
        raise ValueError(f"codes.npy has shape {codes.shape}, expected {GRID}")
    return torch.from_numpy(codes.astype(np.int64))


def decode_action_code(data: bytes, size: int | None = None, dtype: str | None = None) -> int:
    """action.npy: the per-frame action code of a LAM that has one (a scalar, or shape (1,)), checked
    against the number of action codes when it is known."""
    code = stored_codes(data, "action.npy", size, dtype)
    if code.size != 1:
        raise ValueError(f"action.npy has {code.size} values, expected one")
    return int(code.reshape(-1)[0])


def sample_codes(sample: dict) -> dict:
    """The sample's codes, decoded and checked against the manifest of its shard (`code_limits`):
    {"codes"} (+ {"action_code"}). A problem is a BadSample naming the shard and the sample."""
    url, key = sample.get("__url__", "a latent shard"), sample["__key__"]
    limits = code_limits(url) if isinstance(url, str) else CodeLimits()
    try:
        out = {"codes": decode_codes(sample["codes.npy"], limits.codebook_size, limits.code_dtype)}
        if "action.npy" in sample:
            if limits.action_codes == 0:
                raise ValueError(f"action.npy, but {limits.manifest} names a LAM without action codes")
            out["action_code"] = decode_action_code(sample["action.npy"], limits.action_codes, limits.action_dtype)
        elif limits.action_codes:
            raise ValueError(f"no action.npy, but {limits.manifest} names a LAM with a per-frame action code "
                             f"({limits.action_codes} codes)")
    except KeyError as missing:
        raise BadSample(f"{url}: sample {key} has no {missing.args[0]} member") from None
    except ValueError as error:
        raise BadSample(f"{url}: sample {key}: {error}") from None
    return out


FRAMES = ("cur", "next", "prev")       # "prev" only in shards of a model with context


def decode_latent_sample(sample: dict, grayscale: bool = True, with_meta: bool = False,
                         decode_frame: Callable[[bytes], torch.Tensor] = decode_png) -> dict:
    """A raw webdataset sample of a latent shard -> {"key", "cur", "codes", "next"} (+ "prev",
    "prev_valid" where the shard has frame t-1; + "action_code" where the LAM has a per-frame
    action code; + "meta"), frames still uint8 (H, W, C): the float conversion runs once per batch
    where there are batches. `decode_frame` turns PNG bytes into such a frame (a caching decoder may
    give gray frames as (H, W, 1), which `to_model_input` takes as they are)."""
    out = {"key": sample["__key__"],
           "cur": decode_frame(sample["cur.png"]),
           **sample_codes(sample),
           "next": decode_frame(sample["next.png"])}
    meta = json.loads(sample["json"]) if with_meta or "prev.png" in sample else None
    if "prev.png" in sample:
        out["prev"] = decode_frame(sample["prev.png"])
        out["prev_valid"] = bool(meta.get("prev_valid", True))
    if with_meta:
        out["meta"] = meta
    return out


def to_model_sample(sample: dict, grayscale: bool) -> dict:
    """uint8 frames -> float (C, H, W) in [0, 1] by the shared preprocessing."""
    return {**sample, **{name: to_model_input(sample[name], grayscale) for name in FRAMES if name in sample}}


def collate_latent(samples: list[dict], grayscale: bool) -> dict:
    """Stack a batch: frames float (B, C, H, W), codes int64 (B, 7, 5), prev_valid bool (B,), keys
    (and metas) as lists."""
    batch = {"key": [s["key"] for s in samples], "codes": torch.stack([s["codes"] for s in samples])}
    if "action_code" in samples[0]:
        batch["action_code"] = torch.tensor([s["action_code"] for s in samples], dtype=torch.int64)
    for name in FRAMES:
        if name in samples[0]:
            batch[name] = to_model_input(torch.stack([s[name] for s in samples]), grayscale)
    if "prev_valid" in samples[0]:
        batch["prev_valid"] = torch.tensor([s["prev_valid"] for s in samples], dtype=torch.bool)
    if "meta" in samples[0]:
        batch["meta"] = [s["meta"] for s in samples]
    return batch


# ----------------------------------------------------------------------------------- pipeline
def raise_user_error(error: Exception) -> bool:
    """The default handler: a shard that cannot be read becomes one UserError naming it and saying
    what is wrong (not there, not readable, short, corrupt); webdataset adds the url to the
    error's args."""
    urls = [arg for arg in error.args if isinstance(arg, str) and (arg.endswith(".tar") or arg.endswith(ZSTD_SUFFIX))]
    reason = next((str(arg) for arg in error.args if isinstance(arg, str) and arg not in urls), type(error).__name__)
    where = urls[-1] if urls else "a latent shard"
    if isinstance(error, BadSample):
        raise UserError(str(error)) from None
    if isinstance(error, ShardMismatch):
        raise UserError(f"{where}: latent shard {reason}: cut short or changed since it was written "
                        f"(re-run extract.py)") from None
    if isinstance(error, FileNotFoundError):
        raise UserError(f"{where}: latent shard not found") from None
    if isinstance(error, OSError):
        raise UserError(f"{where}: cannot read latent shard ({error.strerror or reason[:160]})") from None
    raise UserError(f"{where}: unreadable latent shard, half-written or corrupt ({reason[:160]})") from None


def latent_dataset(source, grayscale: bool = True, *, split: str | None = None, compressed: bool = False,
                   shuffle: int = 0, seed: int = 0, batch_size: int | None = None, partial_batches: bool = True,
                   with_meta: bool = False, split_nodes: bool = True, split_workers: bool = True,
                   handler: Callable = raise_user_error, verify: bool = False,
                   decode_frame: Callable[[bytes], torch.Tensor] = decode_png,
                   model_input: bool = True) -> wds.DataPipeline:
    """A webdataset pipeline over latent shards yielding {"key", "cur", "codes", "next"}, plus
    "prev" (frame t-1, shaped like "cur") and "prev_valid" where the shards hold frame t-1 (the
    model used context; see extract.py).

    source: a latent directory, a list of urls, a brace pattern or one shard (see `latent_urls`).
    shuffle: 0 keeps manifest order; n > 0 shuffles shard order (by `seed`) and samples in a buffer of n.
    batch_size: collate into batches (frames (B, C, 210, 160), codes (B, 7, 5), a list of keys);
    `partial_batches=False` drops a short last batch.
    Every shard must hold the samples its `.idx` and its manifest list; `verify` also checks its
    bytes against the manifest's sha256 (one more read of each shard).
    decode_frame: PNG bytes -> uint8 (H, W, C) frame (`decode_png`; control/data.py passes a cache).
    model_input: False leaves unbatched samples' frames uint8 as decoded, for a caller that converts
    whole batches with `to_model_input` (the same values, converted once per batch).
    """
    urls = latent_urls(source, split, compressed)
    stages = [wds.SimpleShardList(urls, seed=seed if shuffle else None)]
    if split_nodes:
        stages.append(wds.split_by_node)
    if split_workers:
        stages.append(wds.split_by_worker)
    stages.append(wds.filters.pipelinefilter(tar_samples)(handler=handler, verify=verify))
    if shuffle:
        stages.append(wds.filters.pipelinefilter(shuffle_samples)(shuffle, seed))
    # partials of module functions, not lambdas: the pipeline must pickle for spawned DataLoader workers
    stages.append(wds.map(partial(decode_latent_sample, grayscale=grayscale, with_meta=with_meta,
                                  decode_frame=decode_frame), handler=handler))
    if batch_size:
        stages.append(wds.batched(batch_size, collation_fn=partial(collate_latent, grayscale=grayscale),
                                  partial=partial_batches))
    elif model_input:
        stages.append(wds.map(partial(to_model_sample, grayscale=grayscale)))
    return wds.DataPipeline(*stages)


def shuffle_samples(data: Iterable[dict], bufsize: int, seed: int) -> Iterable[dict]:
    """Shuffle in a buffer of `bufsize`, with an RNG made here, inside the worker, so that it is
    distinct per rank and worker and repeatable for a given seed."""
    rng = random.Random(seed * 100_003 + wds.utils.pytorch_worker_seed())
    yield from wds.filters._shuffle(data, bufsize, initial=min(bufsize, 100), rng=rng)
