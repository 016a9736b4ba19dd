"""Loading training batches: `pipeline.loader` (dali and torch backends, decoded-frame cache on and
off) against the loader a user would write first (PNG folders of bulk_videos, PIL
`Image.open(...).convert("L")`, torch DataLoader with 2 workers, batch 32, shuffle), on the same real
Breakout recording, grayscale, batch 32, train split, each configuration in a fresh child process."""
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
"""
