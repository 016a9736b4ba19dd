"""train.py's command line: a few flags of their own (TrainConfig's fields), `--set` for any field,
and `--resume`; from them the run's config and, when resuming, the checkpoint it continues."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from common.cli import add_config_flags, check_fields, config_values
from common.errors import UserError, check_output_dir
from model.config import VARIANTS
from pipeline.pair_set import PairSet
from training.config import TrainConfig, build_config, fields_help
from training.resume import Resumed, resume
from training.run_folder import refuse_another_run, reuse_or_set_aside

FLAGS = ("shards", "preset", "out", "run_dir", "iters", "batch_size", "rgb", "compile", "amp", "wandb")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the latent action VQ-VAE on pair shards.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=fields_help())
    # default None for every flag: on --resume only what the command line gives overrides the checkpoint
    add_config_flags(parser, TrainConfig, only=FLAGS, unset=True)
    parser.add_argument("--model", choices=list(VARIANTS), default=None,
                        help="the model variant (default: default; on --resume, the checkpoint's); --help lists them")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest step-*.pt (without it, an --out "
                             "that holds checkpoints is refused)")
    parser.add_argument("--reuse", action="store_true",
                        help="if --out holds a run of these settings on these shards: continue it (nothing to "
                             "train once it has finished); if it holds another run: move that to "
                             "<out>.previous-<time> and train afresh (what `make demo` run again does)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any config field (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Resumed | None]:
    """The run's config: the preset, then --set, then the flags; on --resume the checkpoint's, with
    what the command line gives on top. Output folders are checked first, before --resume looks
    inside --out; a folder holding another run is refused without --resume (training/run_folder.py);
    every value is checked by its field's rules (the data itself is checked once, by train())."""
    out = args.out or TrainConfig.out
    check_output_dir(out, "--out")
    if args.run_dir:
        check_output_dir(args.run_dir, "--run-dir")
    flags = {name: value for name, value in config_values(args, TrainConfig).items() if name not in ("preset", "model")}
    if args.reuse and not args.resume:
        wanted = build_config(args.preset or "full", args.set, flags, args.model or "default")
        args.resume = reuse_or_set_aside(Path(out), {"train": wanted.to_dict(), "model": wanted.model.to_dict()},
                                         PairSet.open(wanted.shards).sha256)
    if not args.resume:
        refuse_another_run(Path(out))
    cfg, resumed = (resume(Path(out), args.preset, args.set, flags, args.model) if args.resume
                    else (build_config(args.preset or "full", args.set, flags, args.model or "default"), None))
    # --set and presets reach fields no flag parsed: the same rules (a float is finite, ...)
    check_fields(cfg, label=lambda name: name, prefix="bad configuration: ")
    return named(cfg), resumed


def named(cfg: TrainConfig) -> TrainConfig:
    """The run's name and its folder: as given (or saved), else <preset>-<date>-<time> and runs/<name>."""
    run_name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(cfg, run_name=run_name, run_dir=cfg.run_dir or str(Path("runs") / run_name))
