"""Loading training batches: `pipeline.loader` (dali and torch backends, decoded-frame cache on and
off) against the loader a user would write first (PNG folders of bulk_videos, PIL
`Image.open(...).convert("L")`, torch DataLoader with 2 workers, batch 32, shuffle), on the same real
Breakout recording, grayscale, batch 32, train split, each configuration in a fresh child process.
Then frame t-1 (context=1) beside context=0: both loaders in one child, their epochs interleaved, so
both see the same load on a shared box."""
from __future__ import annotations

import os

from bench.common import markdown_table, pair_shards, recorded_videos, run_child

EPISODES, MAX_STEPS = 16, 400
BATCH = 32
EPOCHS = 3           # epoch 0 is the first (cold: cache fill, first decode); 1 and 2 are warm

# The child walks EPOCHS epochs and reports pairs/s per epoch, the mean number of distinct episodes
# per batch, and its peak RSS (its own plus its largest DataLoader worker's).
MEASURE = """
import json, time
def measure(loader, episode_of_batch):
    rates, distinct = [], []
    for epoch in range({epochs}):
        pairs, started = 0, time.perf_counter()
        for batch in loader:
            pairs += batch["cur"].shape[0]
            if epoch == 0:
                distinct.append(len(set(episode_of_batch(batch))))
        rates.append(pairs / (time.perf_counter() - started))
    return {{"pairs": pairs, "rates": rates, "distinct": sum(distinct) / len(distinct)}}
"""

NAIVE_CHILD = MEASURE + """
import re
from pathlib import Path
import numpy as np, torch
from PIL import Image

class PngPairs(torch.utils.data.Dataset):
    def __init__(self, root, episodes):
        self.pairs = []
        for number, name in enumerate(episodes):
            frames = {{int(p.stem): p for p in (Path(root) / name).iterdir() if re.fullmatch(r"\\d+\\.png", p.name)}}
            self.pairs += [(number, frames[t], frames[t + 1]) for t in sorted(frames) if t + 1 in frames]
    def __len__(self):
        return len(self.pairs)
    def __getitem__(self, i):
        episode, cur, nxt = self.pairs[i]
        gray = lambda path: torch.from_numpy(np.asarray(Image.open(path).convert("L"))).float().div(255)[None]
        return {{"cur": gray(cur), "next": gray(nxt), "episode": episode}}

episodes = json.loads((Path({shards!r}) / "manifest.json").read_text())["splits"]["train"]["episodes"]
loader = torch.utils.data.DataLoader(PngPairs({videos!r}, episodes), batch_size={batch}, shuffle=True,
                                     num_workers=2, drop_last=True)
result = measure(loader, lambda batch: batch["episode"].tolist())
print(json.dumps({{**result, "peak_rss_mb": child_peak_rss_mb(), "cache_mb": 0}}))
"""

LOADER_CHILD = MEASURE + """
from pipeline.loader import build_loader
loader = build_loader({shards!r}, "train", {batch}, backend={backend!r}, device="cpu", cache={cache},
                      with_keys=True)
result = measure(loader, lambda batch: [key.rsplit("_", 1)[0] for key in batch["key"]])
# what reading the shards in order would give, from the index alone (nothing decoded)
in_order = build_loader({shards!r}, "train", {batch}, backend={backend!r}, device="cpu", shuffle=False)
in_order_distinct = [len(set(in_order.index.episodes[pairs].tolist())) for pairs in in_order.schedule.batches(0)]
print(json.dumps({{**result, "peak_rss_mb": child_peak_rss_mb(),
                  "in_order_distinct": sum(in_order_distinct) / len(in_order_distinct),
                  "cache_mb": loader.cache_bytes / 2**20 if loader.cached else 0,
                  "frames": loader.index.num_frames, "split_pairs": loader.index.num_pairs}}))
"""


# Both loaders of one configuration, epochs interleaved (0 1, 1 0, 0 1, ...), and the frames each
# decodes per pair in an epoch (from the index: the cache decodes every frame once; a streamed batch
# its unique frames).
CONTEXT_CHILD = """
import json, time
import numpy as np
from pipeline.loader import build_loader
loaders = {{context: build_loader({shards!r}, "train", {batch}, backend={backend!r}, device="cpu", cache={cache},
                                  shuffle={shuffle}, drop_last={shuffle}, context=context) for context in (0, 1)}}
rates = {{0: [], 1: []}}
for epoch in range({epochs}):
    for context in ((0, 1) if epoch % 2 == 0 else (1, 0)):
        pairs, started = 0, time.perf_counter()
        for batch in loaders[context]:
            pairs += batch["cur"].shape[0]
        rates[context].append(pairs / (time.perf_counter() - started))
def decoded_per_pair(loader):
    if loader.cached:
        return loader.index.num_frames / loader.index.num_pairs
    batches = loader.schedule.batches(1)
    frames = sum(len(np.unique(loader._pair_frames[:, pairs])) for pairs in batches)
    return frames / sum(len(pairs) for pairs in batches)
print(json.dumps({{"rates": {{str(c): r for c, r in rates.items()}},
                  "decoded": {{str(c): decoded_per_pair(loader) for c, loader in loaders.items()}}}}))
"""
CONTEXT_CONFIGS = [("dali", True, True), ("dali", False, True), ("dali", False, False), ("torch", True, True)]


def context_section(common: dict) -> str:
    rows = []
    for backend, cache, shuffle in CONTEXT_CONFIGS:
        r = run_child(CONTEXT_CHILD.format(**common, backend=backend, cache=cache, shuffle=shuffle))
        first = {c: r["rates"][c][0] for c in ("0", "1")}
        warm = {c: sum(r["rates"][c][1:]) / len(r["rates"][c][1:]) for c in ("0", "1")}
        rows.append([f"`{backend}`, cache {'on' if cache else 'off'}, {'shuffled' if shuffle else 'in order'}",
                     f"{first['0']:.0f} / {first['1']:.0f}", f"{first['1'] / first['0']:.2f}",
                     f"{warm['0']:.0f} / {warm['1']:.0f}", f"{warm['1'] / warm['0']:.2f}",
                     f"{r['decoded']['0']:.2f} / {r['decoded']['1']:.2f}"])
    table = markdown_table(["loader", "epoch 0 pairs/s, context 0 / 1", "context 1 / 0",
                            "warm pairs/s (epochs 1-2), context 0 / 1", "context 1 / 0",
                            "frames decoded per pair, context 0 / 1"], rows)
    return f"""### Frame t-1 (`context=1`) beside `context=0`

Both loaders of a row in one child process, their epochs interleaved (so both see the same load on
the shared box); `context=1` yields `prev` (and `prev_valid`) beside `cur` and `next`.

{table}

- Decoding: the cache serves `prev` from frames it already holds (no frame decoded twice); a streamed
  batch decodes its unique frames, prev frames included, so a shuffled batch decodes up to half as
  many frames again while an in-order pass (extraction, evaluation) adds about one frame a batch.
- Warm cache: the work per batch is gathering and converting its frames to float32, and
  `context=1` makes three frames a pair where `context=0` makes two.
"""


def run() -> str:
    videos = recorded_videos(EPISODES, MAX_STEPS)
    shards = pair_shards(videos)
    load_before = os.getloadavg()[0]
    common = dict(shards=str(shards), videos=str(videos), batch=BATCH, epochs=EPOCHS)
    naive = run_child(NAIVE_CHILD.format(**common))
    rows = [("naive: PNG folders, PIL `convert(\"L\")`, DataLoader 2 workers", naive)]
    for backend in ("torch", "dali"):
        for cache in (True, False):
            result = run_child(LOADER_CHILD.format(**common, backend=backend, cache=cache))
            rows.append((f"`{backend}` backend, cache {'on' if cache else 'off'}", result))
    context = context_section(common)
    load_after = os.getloadavg()[0]

    def warm(result: dict) -> float:
        return sum(result["rates"][1:]) / len(result["rates"][1:])

    table = markdown_table(
        ["loader", "epoch 0 pairs/s", "warm pairs/s (epochs 1-2)", "warm vs naive", "epoch 0 vs naive",
         "cache MiB", "peak RSS MiB", "distinct episodes / batch"],
        [[name, f"{r['rates'][0]:.0f}", f"{warm(r):.0f}", f"{warm(r) / warm(naive):.2f}x",
          f"{r['rates'][0] / naive['rates'][0]:.2f}x", f"{r['cache_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
          f"{r['distinct']:.1f}"] for name, r in rows])
    info = rows[1][1]
    return f"""## Loader

Batches of {BATCH} grayscale pairs from the train split ({info['split_pairs']} pairs, {info['frames']} unique
frames, of {EPISODES} recorded Breakout episodes), on the CPU, {EPOCHS} epochs per configuration, each in a
fresh process; nothing is done with a batch. Epoch 0 includes filling the decoded-frame cache; the warm
rate is the mean of epochs 1-2. Peak RSS is the process's plus its largest DataLoader worker's.
"distinct episodes / batch" is the mean number of episodes in a batch of {BATCH}; reading the shards in
order (`shuffle=False`) gives {info['in_order_distinct']:.2f}.

{table}

- Cache on: each unique frame of the split is decoded once (a frame sits in two pairs; the index gives
  it one id), then every batch is a gather from uint8 frames in memory and `frames.to_model_input`.
- Cache off: each batch decodes its unique frames; same batches, bit for bit (tested).
- The box is shared: load average {load_before:.1f} before and {load_after:.1f} after this benchmark, on
  {os.cpu_count()} cores; the rates move with it, the ratios less.

{context}"""
