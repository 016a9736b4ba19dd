"""Latent extraction throughput: extract.py (the project loader decoding in order, batched encoding,
reproducible tars) against a naive per-pair loop (PIL decode of each pair, encode one pair at a
time, same tar writer), with the same checkpoint on the same pairs in the same run; and the size of
the `.tar.zst` copies.

Checkpoint: the `demo` architecture (train.py --preset demo: width 0.25, the model `make demo`
trains), trained 20 steps on the benchmark pairs. Throughput depends on the architecture, not on
how far it was trained.

    python -m bench extract
"""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import BENCH_OUT, markdown_table, pair_shards, recorded_videos

NAIVE_PAIRS = 300              # the naive loop is timed on the first pairs of the train split
BATCH_SIZE = 64
EPISODES, MAX_STEPS = 8, 300   # about 2,400 pairs: minutes on a 2-core CPU, all three stages


def demo_checkpoint(shards: Path) -> Path:
    """A demo-architecture checkpoint, trained once and reused."""
    import train

    out = BENCH_OUT / "extract-demo-ckpt"
    path = out / "step-000020.pt"
    if not path.exists():
        shutil.rmtree(out, ignore_errors=True)     # a half-made one: train.py refuses a folder holding a run
        code = train.main(["--shards", str(shards), "--preset", "demo", "--iters", "20", "--batch-size", "8",
                           "--out", str(out), "--run-dir", str(BENCH_OUT / "extract-demo-run"), "--no-compile",
                           "--wandb", "disabled", "--set", "ckpt_every=20"])
        if code != 0:
            raise RuntimeError("training the benchmark checkpoint failed")
    return path


def naive_pairs_per_s(shards: Path, checkpoint: Path, limit: int) -> float:
    """Decode each pair with PIL, encode it alone, write it: the loop one writes first."""
    import json

    from PIL import Image

    from model import load_checkpoint
    from pipeline.frames import to_model_input
    from pipeline.shards import TarShardWriter, iter_samples, split_shards

    lam = load_checkpoint(checkpoint, "cpu")
    manifest = json.loads((shards / "manifest.json").read_text())
    entries = split_shards(shards, manifest, "train")
    out = BENCH_OUT / "extract-naive" / "latent-000000.tar"
    done = 0
    started = time.perf_counter()
    with TarShardWriter(out) as writer:
        for entry in entries:
            for key, members in iter_samples(entry["tar"], entry["idx"]):
                frames = [to_model_input(torch.from_numpy(np.array(Image.open(io.BytesIO(members[m])).convert("RGB"))))
                          for m in ("cur.png", "next.png")]
                with torch.inference_mode():
                    codes = lam.encode(frames[0][None], frames[1][None])[0].to(torch.uint8).numpy()
                buffer = io.BytesIO()
                np.save(buffer, codes)
                writer.add(key, {**members, "codes.npy": buffer.getvalue()})
                done += 1
                if done == limit:
                    break
            if done == limit:
                break
    elapsed = time.perf_counter() - started
    shutil.rmtree(out.parent)
    return done / elapsed


def pipeline_run(shards: Path, checkpoint: Path, backend: str) -> tuple[float, int]:
    """(seconds, pairs) of a fresh `extract.py` run over every split."""
    from model.extraction import ExtractConfig, extract

    out = BENCH_OUT / f"extract-latent-{backend}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = extract(ExtractConfig(shards, checkpoint, out, batch_size=BATCH_SIZE, backend=backend, progress=False))
    elapsed = time.perf_counter() - started
    return elapsed, sum(split["pairs"] for split in result.manifest["splits"].values())


def zstd_run(shards: Path, checkpoint: Path, backend: str) -> tuple[float, float]:
    """(seconds, compressed/plain size) of adding `.tar.zst` copies to a finished output (no re-encoding)."""
    from model.extraction import ExtractConfig, extract
    from pipeline.latent import zstd_ratio

    out = BENCH_OUT / f"extract-latent-{backend}"
    started = time.perf_counter()
    result = extract(ExtractConfig(shards, checkpoint, out, batch_size=BATCH_SIZE, backend=backend, zstd=True,
                                   progress=False))
    return time.perf_counter() - started, zstd_ratio(result.manifest, out)


def available_backends() -> list[str]:
    from pipeline.loader import default_backend

    return ["dali", "torch"] if default_backend() == "dali" else ["torch"]


def run() -> str:
    from pipeline.latent import ZSTD_LEVEL

    shards = pair_shards(recorded_videos(episodes=EPISODES, max_steps=MAX_STEPS))
    checkpoint = demo_checkpoint(shards)
    naive = naive_pairs_per_s(shards, checkpoint, NAIVE_PAIRS)
    rows = [[f"naive loop: PIL decode, encode 1 pair at a time (first {NAIVE_PAIRS} train pairs)",
             f"{naive:.1f}", "1.00x"]]
    for backend in available_backends():
        seconds, pairs = pipeline_run(shards, checkpoint, backend)
        rows.append([f"extract.py, loader backend {backend}, batch {BATCH_SIZE} ({pairs} pairs, all splits, "
                     f"{seconds:.1f} s incl. model load)", f"{pairs / seconds:.1f}", f"{pairs / seconds / naive:.2f}x"])
    zstd_seconds, ratio = zstd_run(shards, checkpoint, available_backends()[-1])
    device = "GPU" if torch.cuda.is_available() else "CPU"
    return "\n".join([
        "## Latent extraction (`extract.py`)", "",
        f"Demo-architecture checkpoint (`--preset demo`, 20 steps), {device}; pairs/s end to end "
        "(decode, encode, write tars and indexes).", "",
        markdown_table(["method", "pairs/s", "vs naive"], rows), "",
        f"`--zstd` on the finished output (compression only, level {ZSTD_LEVEL}): "
        f"the `.tar.zst` copies are {ratio:.3f} of the tar size ({1 / ratio:.1f}x smaller; consecutive "
        f"pairs share a frame, so most PNG bytes repeat within zstd's window), {zstd_seconds:.1f} s for all shards."])
