"""Latent-action extraction: every pair of every split through encoder + quantiser, into latent shards.

    python extract.py --shards shards/pairs --checkpoint checkpoints/latent_action/best.pt \
        [--out shards/latent] [--batch-size 64] [--overwrite] [--zstd]
    torchrun --nproc_per_node=N extract.py ...      # the shards shared among N ranks, the same output

The work is model/extraction.py's, the latent shard format pipeline/latent.py's (DESIGN.md,
"Extraction"). A re-run with the same checkpoint skips finished shards; latents of another
checkpoint in --out are refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.cli import add_config_flags, config_values
from common.errors import run_cli
from model.extraction import ExtractConfig, ExtractResult, extract
from pipeline.latent import zstd_ratio


def summary(result: ExtractResult, cfg: ExtractConfig) -> str:
    manifest = result.manifest
    counts = ", ".join(f"{split} {info['pairs']}" for split, info in manifest["splits"].items())
    line = (f"latents of checkpoint {manifest['checkpoint']['sha256'][:12]} (step {manifest['checkpoint']['step']}): "
            f"{counts} pairs; {result.written} shards written, {result.skipped} already done -> {cfg.out}")
    if cfg.zstd:
        line += f"\nzstd copies: {zstd_ratio(manifest, cfg.out):.3f} of the tar size"
    return line


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Extract latent action codes for every pair into latent shards.")
    add_config_flags(parser, ExtractConfig)
    cfg = ExtractConfig(**config_values(parser.parse_args(argv), ExtractConfig))
    result = extract(cfg)
    if result.manifest is not None:              # rank 0 (or the only process) speaks for the run
        print(summary(result, cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
