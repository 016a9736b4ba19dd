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

import io
import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
import zstandard

from webdataset.tariterators import group_by_keys, tar_file_expander

from common.errors import UserError
from pipeline.frames import GRID, to_model_input
from pipeline.latent import CODE_DTYPES
from pipeline.png import decode_png
from pipeline.shards import LATENT_FORMAT, SPLITS, load_manifest, read_index

ZSTD_SUFFIX = ".zst"


# ------------------------------------------------------------------------------------ sources
def latent_urls(source: str | Path | Sequence[str | Path], split: str | None = None,
                compressed: bool = False) -> list[str]:
    """Shard urls from a latent directory (its manifest: every split in train/val/test order, or one
    `split`; `compressed` picks the `.tar.zst` copies), a brace pattern ("dir/latent-{000000..000003}.tar"),
    one shard path, or a list of urls."""
    if isinstance(source, (list, tuple)):
        urls = [str(url) for url in source]
    elif Path(source).is_dir():
        urls = _manifest_urls(Path(source), split, compressed)
    else:
        urls = list(wds.shardlists.expand_urls(str(source)))
    if not urls:
        raise UserError(f"{source}: no latent shards to read")
    return urls


def _manifest_urls(directory: Path, split: str | None, compressed: bool) -> list[str]:
    manifest = load_manifest(directory, LATENT_FORMAT)
    splits = manifest.get("splits", {})
    names = [split] if split else [name for name in SPLITS if name in splits]
    urls = []
    for name in names:
        if name not in splits:
            raise UserError(f"{directory / 'manifest.json'}: no split {name!r} (has {', '.join(splits) or 'none'})")
        for shard in splits[name]["shards"]:
            if compressed and "zstd" not in shard:
                raise UserError(f"{directory}: shard {shard['file']} has no .tar.zst copy (re-run extract.py --zstd)")
            path = directory / (shard["zstd"]["file"] if compressed else shard["file"])
            if not path.is_file():
                raise UserError(f"{path}: shard listed in the manifest is missing")
            urls.append(str(path))
    return urls


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


def tar_samples(data: Iterable[dict], handler: Callable = wds.reraise_exception) -> Iterable[dict]:
    """Stream of {"url"} -> webdataset samples {"__key__", "cur.png", ...}, `.tar` or `.tar.zst`.
    A tar cut short reads as a shorter tar (tarfile's stream mode stops quietly), so a shard with a
    `.idx` beside it must yield as many samples as the index lists."""
    for source in data:
        files = tar_file_expander(zstd_url_opener([source], handler=handler), handler=handler)
        count = 0
        for sample in group_by_keys(files, handler=handler):
            count += 1
            yield sample
        expected = indexed_samples(source["url"])
        if expected is not None and count != expected:
            handler(ValueError(f"holds {count} samples, its index lists {expected}", source["url"]))


def indexed_samples(url: str) -> int | None:
    """How many samples the `.idx` beside a local shard lists (None: no index there)."""
    index = Path(url.removesuffix(ZSTD_SUFFIX)).with_suffix(".idx")
    return len(read_index(index)) if index.is_file() else None


# ----------------------------------------------------------------------------------- decoding
def decode_codes(data: bytes) -> torch.Tensor:
    """codes.npy (uint8 up to 256 codes, uint16 above: pipeline.latent.code_dtype) -> int64 (7, 5)."""
    codes = np.load(io.BytesIO(data), allow_pickle=False)
    if codes.shape != GRID:
        raise ValueError(f"codes.npy has shape {codes.shape}, expected {GRID}")
    if codes.dtype not in CODE_DTYPES:         # a signed or float grid was not written by extraction
        raise ValueError(f"codes.npy holds {codes.dtype}, expected one of "
                         f"{', '.join(np.dtype(t).name for t in CODE_DTYPES)}")
    return torch.from_numpy(codes.astype(np.int64))


def decode_action_code(data: bytes) -> int:
    """action.npy: the per-frame action code of a LAM that has one (a scalar, or shape (1,))."""
    code = np.load(io.BytesIO(data), allow_pickle=False)
    if code.size != 1:
        raise ValueError(f"action.npy has {code.size} values, expected one")
    return int(code.reshape(-1)[0])


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
           "codes": decode_codes(sample["codes.npy"]),
           "next": decode_frame(sample["next.png"])}
    meta = json.loads(sample["json"]) if with_meta or "prev.png" in sample else None
    if "action.npy" in sample:
        out["action_code"] = decode_action_code(sample["action.npy"])
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
    """The default handler: a shard that cannot be read (half-written, corrupt) becomes one clear
    UserError naming it; webdataset adds the url to the error's args."""
    urls = [arg for arg in error.args if isinstance(arg, str) and (arg.endswith(".tar") or arg.endswith(ZSTD_SUFFIX))]
    reason = next((str(arg) for arg in error.args if isinstance(arg, str) and arg not in urls), type(error).__name__)
    where = urls[-1] if urls else "a latent shard"
    raise UserError(f"{where}: unreadable latent shard, half-written or corrupt ({reason[:160]})") from None


def latent_dataset(source, grayscale: bool = True, *, split: str | None = None, compressed: bool = False,
                   shuffle: int = 0, seed: int = 0, batch_size: int | None = None, partial_batches: bool = True,
                   with_meta: bool = False, split_nodes: bool = True, split_workers: bool = True,
                   handler: Callable = raise_user_error, decode_frame: Callable[[bytes], torch.Tensor] = decode_png,
                   model_input: bool = True) -> wds.DataPipeline:
    """A webdataset pipeline over latent shards yielding {"key", "cur", "codes", "next"}, plus
    "prev" (frame t-1, shaped like "cur") and "prev_valid" where the shards hold frame t-1 (the
    model used context; see extract.py).

    source: a latent directory, a list of urls, a brace pattern or one shard (see `latent_urls`).
    shuffle: 0 keeps manifest order; n > 0 shuffles shard order (by `seed`) and samples in a buffer of n.
    batch_size: collate into batches (frames (B, C, 210, 160), codes (B, 7, 5), a list of keys);
    `partial_batches=False` drops a short last batch.
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
    stages.append(wds.filters.pipelinefilter(tar_samples)(handler=handler))
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
