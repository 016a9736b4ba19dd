"""Latent shards extracted once per test session, shared by the extraction, stream and evaluation
tests (pytest puts tests/ on sys.path; conftest.py belongs to the shared fixtures)."""
from __future__ import annotations

from pathlib import Path

_MADE: dict[tuple[Path, Path], Path] = {}


def extracted_latents(pair_shards: Path, checkpoint: Path, tmp_path_factory) -> Path:
    """`shards/latent` (with .tar.zst copies) of `pair_shards` through `checkpoint`, made on first use."""
    import extract

    key = (Path(pair_shards), Path(checkpoint))
    if key not in _MADE:
        out = tmp_path_factory.mktemp("latent") / "latent"
        code = extract.main(["--shards", str(pair_shards), "--checkpoint", str(checkpoint), "--out", str(out),
                             "--batch-size", "24", "--backend", "torch", "--no-progress", "--zstd"])
        assert code == 0
        _MADE[key] = out
    return _MADE[key]
