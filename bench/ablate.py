"""Ablation of the model options that decide whether the prediction draws what moved and whether the
codes carry the action (`make ablate`).

Each variant trains the `demo` preset on the same pair shards (`--set` for its options) once per
seed, then, all on the val split (never test: the default is chosen here):
- evaluate.py: drawing (paddle and ball within 2 px of the true frame's, missing), PSNR, the probes;
- extract.py, a short controller run (control.train) and play.py rollout: controllability, whether
  always-LEFT / always-RIGHT move the paddle that way inside the model.
Writes reports/ablation/ablation.json (after every run, so a long ablation can be read while it
goes) and ablation.md: each variant's mean over its seeds, and the seeds' spread.

    python -m bench.ablate [--shards shards/pairs] [--iters N] [--seeds 0 1] [--only NAME ...]
        [--set field=value ...] [--controller-steps 300] [--jobs 2]

`--set` adds train.py settings to every variant (e.g. `--set context=1`: each with frame t-1).
Every stage runs as its own process, through the same command lines a user types. `--jobs 2` runs
two (variant, seed) runs side by side, one CPU thread each: on a 2-core box the small convolutions
gain less from a second thread than from a second run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import ROOT, machine, markdown_table
from common.cli import checked_type
from common.errors import UserError, check_output_dir, run_cli

SEED_LITERAL = ["encoder_input=pair", "decoder_skips=false", "latent_every_stage=false", "residual_output=false",
                "changed_pixel_weight=1", "motion=none", "motion_codes=false", "quantizer=vq"]
VARIANTS: dict[str, list[str]] = {
    "seed-literal": SEED_LITERAL,
    # last round's default: t+1 = t + change, codes on every stage, nearest-code quantiser
    "residual output, VQ codes (last round's default)": ["motion=none", "motion_codes=false", "quantizer=vq"],
    "shift decoder, VQ codes": ["quantizer=vq"],
    "shift decoder, FSQ codes (the default)": [],
    "default with 7 x 8 px shift blocks": ["motion_stage=1"],
    "default + encoder matching features": ["encoder_match=true"],
    "default + frame t-1 as context": ["context=1"],
    "default + 2.5 % action labels": ["action_fraction=0.025"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)[:60].strip("-")


def run_stage(args: list[str], log: Path, threads: int | None) -> None:
    """One stage as its own process (the command a user types); its output goes to `log`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "a") as out:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        raise UserError(f"{' '.join(args[:2])} failed (exit {code}); see {log}")


def run_variant(settings: list[str], seed: int, root: Path, shards: Path, iters: int | None,
                controller_steps: int, threads: int | None = None) -> dict:
    """Train, evaluate, extract, fit a controller and roll it out; returns the numbers."""
    log = root / "log.txt"
    root.mkdir(parents=True, exist_ok=True)
    # the variant's folder is this ablation's own: a rerun trains afresh (train.py refuses to train
    # into a folder that holds another run's checkpoints)
    shutil.rmtree(root / "ckpt", ignore_errors=True)
    run = lambda args: run_stage(args, log, threads)  # noqa: E731
    train = ["train.py", "--shards", str(shards), "--preset", "demo", "--out", str(root / "ckpt"),
             "--run-dir", str(root / "run"), "--wandb", "disabled", "--set", f"seed={seed}",
             *(["--set", f"threads={threads}"] if threads else [])]
    train += (["--iters", str(iters), "--set", f"lr_decay_iters={iters}"] if iters else [])
    for setting in settings:
        train += ["--set", setting]
    started = time.perf_counter()
    run(train)
    seconds = time.perf_counter() - started
    checkpoint = root / "ckpt" / "best.pt"
    run(["extract.py", "--shards", str(shards), "--checkpoint", str(checkpoint), "--out", str(root / "latent"),
         "--no-progress"])
    run(["evaluate.py", "--shards", str(shards), "--checkpoint", str(checkpoint), "--split", "val",
         "--out", str(root / "val"), "--latent", str(root / "latent"), "--no-progress"])
    run(["-m", "control.train", "--latent", str(root / "latent"), "--out", str(root / "controller"),
         "--steps", str(controller_steps), "--eval-split", "val"])
    run(["play.py", "rollout", "--checkpoint", str(checkpoint), "--controller", str(root / "controller" / "controller.pt"),
         "--latent", str(root / "latent"), "--split", "val", "--out", str(root / "play")])
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = max(row["step"] for row in rows)
    return {"seed": seed, "train_seconds": seconds, "steps": steps,
            "seconds_per_step": statistics.median(1 / r["steps_per_s"] for r in rows if r.get("steps_per_s")),
            "val": json.loads((root / "val" / "metrics.json").read_text()),
            "play": json.loads((root / "play" / "metrics.json").read_text())}


def summary(result: dict) -> dict:
    """The figures a row shows, from one run."""
    val, control = result["val"], result["play"]["controllability"]
    actions = val.get("actions") or {}
    paddle, ball = val["elements"]["paddle"], val["elements"]["ball"]
    lost = result["play"]["rollouts"]["curves"]["paddle_lost"][-1]          # at the last step (50)
    return {"paddle_within_2px": paddle["model"]["within_2px"], "paddle_missing": paddle["model"]["missing"],
            "ball_within_2px": ball["model"]["within_2px"], "ball_missing": ball["model"]["missing"],
            "move": (actions.get("move") or {}).get("codes_linear"),
            "move_bins": (actions.get("move_bins") or {}).get("codes_linear"),
            "left": control["controller"]["left"]["success"], "right": control["controller"]["right"]["success"],
            "rollout_paddle_lost": lost, "codes_used": val["codebook"]["used_fraction"],
            "psnr": val["model"]["psnr"], "psnr_copy": val["copy_baseline"]["psnr"],
            "seconds_per_step": result["seconds_per_step"]}


def cell(values: list, percent: bool = True) -> str:
    """Mean over seeds, with the spread (max − min) when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, spread = statistics.fmean(values), max(values) - min(values)
    if percent:
        return f"{mean:.0%}" + (f" ±{spread / 2:.0%}" if len(values) > 1 else "")
    return f"{mean:.2f}" + (f" ±{spread / 2:.2f}" if len(values) > 1 else "")


HEADER = ["variant", "seeds", "paddle within 2 px", "paddle missing", "ball within 2 px", "ball missing",
          "move probe", "5-bin move probe", "LEFT moves left", "RIGHT moves right", "rollout: paddle lost by step 50",
          "codes used", "PSNR (copy)", "s / step"]


def table_row(name: str, results: list[dict]) -> list:
    rows = [summary(r) for r in results]
    column = lambda key: [row[key] for row in rows]  # noqa: E731
    return [name, len(rows), cell(column("paddle_within_2px")), cell(column("paddle_missing")),
            cell(column("ball_within_2px")), cell(column("ball_missing")), cell(column("move")),
            cell(column("move_bins")), cell(column("left")), cell(column("right")),
            cell(column("rollout_paddle_lost")), cell(column("codes_used")),
            f"{cell(column('psnr'), False)} ({cell(column('psnr_copy'), False)})",
            cell(column("seconds_per_step"), False)]


def write_tables(out: Path, results: dict[str, list[dict]], note: str) -> str:
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=str))
    text = (f"# Ablation: drawing what moved, and codes that carry the action\n\n{note}\n\n"
            + markdown_table(HEADER, [table_row(name, runs) for name, runs in results.items() if runs])
            + "\n\nMean over seeds ± half the spread between them. Drawing and probes: evaluate.py on the val "
              "split; LEFT / RIGHT: play.py rollout's controllability on val (always-LEFT or always-RIGHT for "
              "its steps, success when the paddle ends that way and visible); s / step: training's median.\n")
    (out / "ablation.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=ROOT / "shards" / "pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ablation")
    parser.add_argument("--iters", type=checked_type(int, "--iters", {"min": 1}), default=None,
                        help="training steps (default: the demo preset's)")
    parser.add_argument("--seeds", type=checked_type(int, "--seeds", {"min": 0}), nargs="+", default=[0, 1])
    parser.add_argument("--controller-steps", type=checked_type(int, "--controller-steps", {"min": 1}), default=300)
    parser.add_argument("--jobs", type=checked_type(int, "--jobs", {"min": 1}), default=1,
                        help="runs side by side (one CPU thread each when > 1)")
    parser.add_argument("--only", nargs="*", help="variant names (substrings) to run, in this order")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a train.py setting for every variant (repeatable)")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    if not (args.shards / "manifest.json").is_file():
        raise UserError(f"--shards {args.shards}: no manifest.json (run make shards first)")
    # in the order --only names them, so that the runs that matter most finish first
    names = [n for o in args.only for n in VARIANTS if o in n] if args.only else list(VARIANTS)
    chosen = {n: [*VARIANTS[n], *args.set] for n in dict.fromkeys(names)}
    if not chosen:
        raise UserError(f"--only {' '.join(args.only)}: no such variant (there are: {'; '.join(VARIANTS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    note = (f"`demo` preset{f', {args.iters} steps' if args.iters else ''}, seeds {args.seeds}, val split of "
            f"`{args.shards}`; controller {args.controller_steps} steps"
            f"{'; every variant with --set ' + ' '.join(args.set) if args.set else ''}. {machine()}.")
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    threads = 1 if args.jobs > 1 else None

    def one(name: str, seed: int) -> None:
        result = run_variant(chosen[name], seed, args.out / slug(name) / f"seed-{seed}", args.shards, args.iters,
                             args.controller_steps, threads)
        results[name].append({"settings": chosen[name], **result})
        results[name].sort(key=lambda r: r["seed"])
        write_tables(args.out, results, note)           # after every run: a long ablation can be read as it goes

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in [pool.submit(one, name, seed) for name in chosen for seed in args.seeds]:
            done.result()
    print(write_tables(args.out, results, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
