"""Evaluate a trained latent action model on one split: metrics.json, report.md and figures.

    python evaluate.py --shards shards/pairs --checkpoint checkpoints/latent_action/best.pt \
        [--split test] [--out reports/test]
    torchrun --nproc_per_node=N evaluate.py ...     # the split shared among N ranks, the same report

The work is evaluation/run.py's (DESIGN.md, "Evaluation"); `reports/summary.md` puts every split
evaluated so far side by side.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.cli import add_config_flags, config_values
from common.errors import run_cli
from evaluation.report import headline
from evaluation.run import EvaluateConfig, evaluate

__all__ = ["EvaluateConfig", "evaluate", "main"]


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a latent action model on one split.")
    add_config_flags(parser, EvaluateConfig)
    metrics, report = evaluate(EvaluateConfig(**config_values(parser.parse_args(argv), EvaluateConfig)))
    if metrics is not None:                      # rank 0 (or the only process) speaks for the run
        print(f"{metrics['split']}: {metrics['pairs']} pairs in {metrics['seconds']} s; {headline(metrics)}")
        print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
