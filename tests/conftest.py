"""Shared test data, made by the tests themselves: a few short real ALE Breakout episodes, packed
into pair shards, and a `tiny` model trained on them. Session-scoped, so each is built once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TEST_EPISODES = 6
TEST_MAX_STEPS = 48
TEST_PAIRS_PER_SHARD = 16


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Path:
    """`bulk_videos/` with TEST_EPISODES real Breakout episodes (PNG frames + meta.jsonl)."""
    from pipeline.record import record

    out = tmp_path_factory.mktemp("recorded") / "bulk_videos"
    record(out, episodes=TEST_EPISODES, max_steps=TEST_MAX_STEPS, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def pair_shards(videos, tmp_path_factory) -> Path:
    """`shards/pairs/` packed from `videos` (several shards per split, with .idx and manifest.json)."""
    from pipeline.pack import pack

    out = tmp_path_factory.mktemp("shards") / "pairs"
    pack(videos, out, seed=0, pairs_per_shard=TEST_PAIRS_PER_SHARD, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def broken_shards(videos, tmp_path_factory) -> Path:
    """Pair shards packed (lenient) from `bad_frames.make_broken_videos`: episodes with rejected,
    missing and converted frames, so some pairs have no frame t-1 in the middle of an episode."""
    from bad_frames import make_broken_videos
    from pipeline.pack import pack

    root = tmp_path_factory.mktemp("broken")
    out = root / "pairs"
    pack(make_broken_videos(videos, root / "bulk_videos"), out, seed=0, pairs_per_shard=TEST_PAIRS_PER_SHARD,
         workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(pair_shards, tmp_path_factory) -> Path:
    """A `tiny` model trained 20 steps on `pair_shards`; returns the path of step-000020.pt."""
    import train

    root = tmp_path_factory.mktemp("tiny_run")
    code = train.main(["--shards", str(pair_shards), "--preset", "tiny", "--out", str(root / "ckpt"),
                       "--run-dir", str(root / "run"), "--iters", "20", "--no-compile",
                       "--wandb", "disabled", "--set", "ckpt_every=10"])
    assert code == 0
    return root / "ckpt" / "step-000020.pt"


@pytest.fixture(scope="session")
def latent_dir(pair_shards, tiny_checkpoint, tmp_path_factory) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `tiny_checkpoint`. Shared by the
    extraction, stream and evaluation tests; a test that changes it copies it first."""
    import extract

    out = tmp_path_factory.mktemp("latent") / "latent"
    # fp32 whatever the CPU: tests compare the codes with the fp32 model's (bf16 has its own tests)
    code = extract.main(["--shards", str(pair_shards), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--batch-size", "24", "--backend", "torch", "--no-progress", "--zstd", "--amp", "off"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def context_checkpoint(pair_shards, tmp_path_factory) -> Path:
    """A `tiny` model with frame t-1 as context (`--set context=1`) trained 10 steps on `pair_shards`;
    returns the path of step-000010.pt."""
    import train

    root = tmp_path_factory.mktemp("context_run")
    code = train.main(["--shards", str(pair_shards), "--preset", "tiny", "--out", str(root / "ckpt"),
                       "--run-dir", str(root / "run"), "--iters", "10", "--no-compile", "--wandb", "disabled",
                       "--set", "ckpt_every=10", "--set", "context=1"])
    assert code == 0
    return root / "ckpt" / "step-000010.pt"


@pytest.fixture(scope="session")
def context_latent_dir(pair_shards, context_checkpoint, tmp_path_factory) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `context_checkpoint`: samples
    with `<key>.prev.png`."""
    import extract

    out = tmp_path_factory.mktemp("context_latent") / "latent"
    code = extract.main(["--shards", str(pair_shards), "--checkpoint", str(context_checkpoint), "--out", str(out),
                         "--batch-size", "24", "--backend", "torch", "--no-progress", "--zstd", "--amp", "off"])
    assert code == 0
    return out
