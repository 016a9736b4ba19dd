"""Ablation of the model's named variants (`make ablate`): which draws what moved, whose codes carry
the action, and which holds together when played forward.

Each entry trains the `demo` preset with a named model variant (`train.py --model NAME`, plus
training settings for entries such as `labels`) on the same pair shards once per seed, then, all on
the val split (never test: the default is chosen here):
- evaluate.py: drawing (paddle and ball within 2 px of the true frame's), PSNR, the probes, codes used;
- extract.py, a controller (control.train) and play.py rollout: long rollouts of both kinds (the
  recorded codes, the controller's) against the recording, and whether held LEFT / RIGHT steer.
Writes reports/ablation/ablation.json (after every run, so a long ablation can be read while it
goes) and ablation.md: each entry's mean over its seeds, and the seeds' spread.

    python -m bench.ablate [--shards shards/pairs] [--iters N] [--seeds 0 1] [--only NAME ...]
        [--set field=value ...] [--controller-steps 300] [--jobs 2]

`--worlds NAME ...` measures the world model's levers instead (control/world.py, docs/world-model.md):
on one LAM, its latents and its controller (`--checkpoint`, `--latent`, `--controller`), each entry
trains a world model (python -m control.world_train, or none: the LAM's decoder), plays it with
play.py rollout (both kinds, held LEFT / RIGHT) and plays `--sessions` sessions of the ball-following
policy (play.py session --no-browser), and writes world-ablation.md and .json after every entry.

    python -m bench.ablate --worlds decoder controller-codes own-rollouts [--world-steps 240]

Every stage runs as its own process, through the same command lines a user types. `--jobs 2` runs
two (entry, seed) runs side by side, one CPU thread each: on a 2-core box the small convolutions
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
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, machine, markdown_table
from common.cli import MAX_SEED, MAX_THREADS, add_config_flags, config_values, flag
from common.errors import UserError, check_output_dir, run_cli


@dataclass(frozen=True)
class Entry:
    model: str                          # a named model variant (model/config.py VARIANTS)
    about: str                          # what the row is, for the table
    settings: tuple[str, ...] = ()      # training settings on top (train.py --set)


ENTRIES: dict[str, Entry] = {
    "default": Entry("default", "the default (codes FiLM the bottleneck, the move prior 3e-5)"),
    "seed": Entry("seed", "the seed's model"),
    "vq-residual": Entry("vq-residual", "residual output, VQ codes (three rounds ago)"),
    "vq-shift": Entry("vq-shift", "shift decoder, VQ codes"),
    "fsq-shift": Entry("fsq-shift", "shift decoder, FSQ codes on every stage (the default until the move prior)"),
    "blocks-7x8": Entry("blocks-7x8", "shift decoder with 7 x 8 px blocks"),
    "match": Entry("match", "encoder matching features"),
    "context": Entry("context", "frame t-1 as context"),
    "split": Entry("split", "frame t-1, a per-frame action code, grid dropout 0.5 (Genie's split)"),
    "labels": Entry("default", "the default + 2.5 % action labels", ("action_fraction=0.025",)),
    "own-frames": Entry("default", "the default, half of each batch from its own snapped frame t (from step 300)",
                        ("own_frames=0.5", "own_frames_start=300")),
    "no-prior": Entry("default", "the default without the move prior", ("motion_weight=0.0",)),
    # The rows below are changes to fsq-shift, the default they were measured against (docs/model.md).
    # one step it learnt the ball on 3 of 3 seeds; played forward seed 0 was worse, seed 1 far better
    # ("FiLM at the bottleneck only")
    "film-bottleneck": Entry("fsq-shift", "fsq-shift, codes FiLM the decoder's bottleneck only",
                             ("latent_every_stage=false",)),
    # codes that name the move: the probe past the bar on three seeds (94-95 % on test), the paddle
    # drawn less precisely (74-89 % within 2 px), worse played forward ("Codes that name the move")
    "move-codes": Entry("fsq-shift", "fsq-shift, shifts chosen by source block, the encoder's view moved up to 8 px",
                        ("shift.indexed_by=source", "encoder_jitter=8")),
    # the same with the view moved for the first half of the run only: the paddle back (96 % on test,
    # seeds 0 and 2), the probe on one of the two (89 / 93 %) ("The view moved for part of the run only")
    "move-codes-settled": Entry("fsq-shift", "move-codes, the encoder's view moved for the first half of the run only",
                                ("shift.indexed_by=source", "encoder_jitter=8", "jitter_until=0.5")),
    # the move prior on every stage's FiLM: the probe 93-97 % on three seeds, seed 0's ball 76 % ("A move prior")
    "move-prior": Entry("fsq-shift", "fsq-shift + the move prior (weight 1e-4)", ("motion_weight=0.0001",)),
}
STEPS = (10, 50, 200)                   # rollout steps the table shows


@dataclass(frozen=True)
class WorldEntry:
    about: str                          # what the row is, for the table
    train: tuple[str, ...] | None       # control.world_train flags; None: no world model, the LAM's decoder
    # a LAM variant trained, extracted and given a controller of its own for this row (instead of
    # --checkpoint's), as long as the LAM and the world model together: `split` at the same budget
    variant: str | None = None


# The list, each lever on top of the row before it (docs/world-model.md says what each did).
ONE_STEP = ("--rollout-steps", "1")
OWN = ("--rollout-steps", "3", "--rollout-from", "0.3")
WORLD_ENTRIES: dict[str, WorldEntry] = {
    "decoder": WorldEntry("today's: the LAM's decoder, frame t and the controller's codes", None),
    "controller-codes": WorldEntry("world model (t-1, t) trained one step on the controller's codes",
                                   (*ONE_STEP, "--codes", "controller")),
    "own-rollouts": WorldEntry("+ its own snapped rollouts, 3 steps", (*OWN, "--codes", "controller")),
    "paddle-row": WorldEntry("+ the paddle's row of codes from the recording (the default)", OWN),
    "context-noise": WorldEntry("+ noise on the past frames (std up to 0.1)", (*OWN, "--context-noise", "0.1")),
    "past-3": WorldEntry("+ frame t-2 (no noise)", (*OWN, "--past-frames", "3")),
    "key": WorldEntry("+ the key beside the codes (no noise, t-1 and t)", (*OWN, "--key")),
    "rollouts-6": WorldEntry("paddle-row with 6-step rollouts of its own frames (the next experiment)",
                             ("--rollout-steps", "6", "--rollout-from", "0.3")),
    "recorded-codes": WorldEntry("world model (t-1, t) trained one step on the recorded codes (the encoder's)",
                                 (*ONE_STEP, "--codes", "recorded")),
    "split": WorldEntry("Genie's split LAM (t-1, 8 action codes, grid dropout), trained the LAM's and the world "
                        "model's steps together, played from its own decoder", None, "split"),
}
WORLD_STEPS = (1, 10, 50, 200)          # rollout steps the world table shows


@dataclass
class AblateConfig:
    shards: Path = flag(ROOT / "shards" / "pairs", "pair shard directory")
    out: Path = flag(ROOT / "reports" / "ablation", "ablation.md, ablation.json and each run's folder")
    iters: int = flag(0, "training steps (0: the demo preset's)", min=0)
    seeds: tuple[int, ...] = flag((0, 1), "training seeds of each entry", nargs="+", min=0, max=MAX_SEED)
    controller_steps: int = flag(300, "controller training steps", min=1)
    jobs: int = flag(1, "runs side by side (one CPU thread each when > 1)", min=1, max=MAX_THREADS)
    only: tuple[str, ...] = flag((), f"entries to run, in this order (of: {', '.join(ENTRIES)})", nargs="*")
    set: tuple[str, ...] = flag((), "a train.py setting for every entry (FIELD=VALUE)", nargs="*")
    # the world model's levers (--worlds): on one LAM, its latents and its controller
    worlds: tuple[str, ...] = flag((), f"world model entries to run instead of model variants (of: "
                                       f"{', '.join(WORLD_ENTRIES)})", nargs="*")
    checkpoint: Path = flag(ROOT / "checkpoints" / "latent_action" / "best.pt", "--worlds: the LAM")
    latent: Path = flag(ROOT / "shards" / "latent", "--worlds: its latent shards")
    controller: Path = flag(ROOT / "checkpoints" / "controller" / "controller.pt", "--worlds: its controller")
    world_steps: int = flag(160, "--worlds: world model training steps (the demo's)", min=1)
    lam_steps: int = flag(1300, "--worlds: the steps --checkpoint was trained (the split row trains this many "
                                "plus --world-steps)", min=1)
    split: str = flag("val", "--worlds: the split rollouts and sessions start from", choices=("val", "test"))
    starts: int = flag(12, "--worlds: rollout starts (200 steps each)", min=1)
    control_starts: int = flag(24, "--worlds: starts of held LEFT / RIGHT", min=1)
    sessions: int = flag(4, "--worlds: sessions of the ball-following policy (300 steps each, no browser)", min=0)

    def __post_init__(self):
        self.shards, self.out = Path(self.shards), Path(self.out)
        self.checkpoint, self.latent, self.controller = Path(self.checkpoint), Path(self.latent), Path(self.controller)
        unknown = [name for name in self.only if name not in ENTRIES]
        if unknown:
            raise UserError(f"--only {' '.join(unknown)}: no such entry (there are: {', '.join(ENTRIES)})")
        unknown = [name for name in self.worlds if name not in WORLD_ENTRIES]
        if unknown:
            raise UserError(f"--worlds {' '.join(unknown)}: no such entry (there are: {', '.join(WORLD_ENTRIES)})")
        check_output_dir(self.out, "--out")
        if self.worlds:
            for label, path in (("--checkpoint", self.checkpoint), ("--controller", self.controller),
                                ("--latent", self.latent / "manifest.json")):
                if not path.is_file():
                    raise UserError(f"{label} {path}: not found (make train extract controller first)")
        elif not (self.shards / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json (run make shards first)")

    @property
    def entries(self) -> dict[str, Entry]:
        return {name: ENTRIES[name] for name in (self.only or ENTRIES)}


def run_stage(args: list[str], log: Path, threads: int | None) -> None:
    """One stage as its own process (the command a user types); its output goes to `log`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "a") as out:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        raise UserError(f"{' '.join(args[:2])} failed (exit {code}); see {log}")


def run_entry(entry: Entry, seed: int, root: Path, cfg: AblateConfig, threads: int | None) -> dict:
    """Train, evaluate, extract, fit a controller and roll it out; returns the numbers."""
    log = root / "log.txt"
    root.mkdir(parents=True, exist_ok=True)
    # the variant's folder is this ablation's own: a rerun trains afresh (train.py refuses to train
    # into a folder that holds another run's checkpoints)
    shutil.rmtree(root / "ckpt", ignore_errors=True)
    run = lambda args: run_stage(args, log, threads)  # noqa: E731
    train = ["train.py", "--shards", str(cfg.shards), "--preset", "demo", "--model", entry.model,
             "--out", str(root / "ckpt"), "--run-dir", str(root / "run"), "--wandb", "disabled",
             "--set", f"seed={seed}", *(["--set", f"threads={threads}"] if threads else [])]
    train += (["--iters", str(cfg.iters), "--set", f"lr_decay_iters={cfg.iters}"] if cfg.iters else [])
    for setting in (*entry.settings, *cfg.set):
        train += ["--set", setting]
    started = time.perf_counter()
    run(train)
    seconds = time.perf_counter() - started
    checkpoint = root / "ckpt" / "best.pt"
    run(["extract.py", "--shards", str(cfg.shards), "--checkpoint", str(checkpoint), "--out", str(root / "latent"),
         "--no-progress"])
    run(["evaluate.py", "--shards", str(cfg.shards), "--checkpoint", str(checkpoint), "--split", "val",
         "--out", str(root / "val"), "--latent", str(root / "latent"), "--no-progress"])
    run(["-m", "control.train", "--latent", str(root / "latent"), "--out", str(root / "controller"),
         "--steps", str(cfg.controller_steps), "--eval-split", "val"])
    run(["play.py", "rollout", "--checkpoint", str(checkpoint), "--controller", str(root / "controller" / "controller.pt"),
         "--latent", str(root / "latent"), "--split", "val", "--out", str(root / "play")])
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "train_seconds": seconds, "steps": max(row["step"] for row in rows),
            "seconds_per_step": statistics.median(1 / r["steps_per_s"] for r in rows if r.get("steps_per_s")),
            "val": json.loads((root / "val" / "metrics.json").read_text()),
            "play": json.loads((root / "play" / "metrics.json").read_text())}


def ball_moving(curves: dict, step: int) -> float | None:
    """Of the balls found at `step` and a step earlier, the share that moved (a frozen ball is found,
    not played); None in results written before the rollouts measured it."""
    values = curves.get("ball_moving")
    return values[step - 1] if values else None


def summary(result: dict) -> dict:
    """The figures a row shows, from one run."""
    val, control, curves = result["val"], result["play"]["controllability"], result["play"]["rollouts"]["curves"]
    actions = val.get("actions") or {}
    figures = {"paddle_within_2px": val["elements"]["paddle"]["model"]["within_2px"],
               "ball_within_2px": val["elements"]["ball"]["model"]["within_2px"],
               "move": (actions.get("move") or {}).get("codes_linear"), "codes_used": val["codebook"]["used_fraction"],
               "psnr": val["model"]["psnr"], "psnr_copy": val["copy_baseline"]["psnr"],
               "left": control["controller"]["left"]["success"], "right": control["controller"]["right"]["success"],
               "seconds_per_step": result["seconds_per_step"]}
    horizon = len(curves["horizon"])
    for kind in ("codes", "controller"):
        for step in (s for s in STEPS if s <= horizon):
            figures[f"{kind}_paddle_{step}"] = curves[kind]["paddle_found"][step - 1]
            figures[f"{kind}_ball_{step}"] = curves[kind]["ball_found"][step - 1]
            figures[f"{kind}_ball_moving_{step}"] = ball_moving(curves[kind], step)
        gaps = [m - c for m, c in zip(curves[kind]["psnr"], curves["copy"]["psnr"]) if None not in (m, c)]
        figures[f"{kind}_above_copy"] = next((h for h, gap in enumerate(gaps, 1) if gap < 0), horizon + 1) - 1
        figures[f"{kind}_two_balls"] = max(v or 0 for v in curves[kind]["two_balls"])
    return figures


def cell(values: list, percent: bool = True) -> str:
    """Mean over seeds, with the spread (max − min) when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, spread = statistics.fmean(values), max(values) - min(values)
    if percent:
        return f"{mean:.0%}" + (f" ±{spread / 2:.0%}" if len(values) > 1 else "")
    return f"{mean:.2f}" + (f" ±{spread / 2:.2f}" if len(values) > 1 else "")


def trio(column, kind: str, what: str) -> str:
    return " / ".join(cell(column(f"{kind}_{what}_{step}")) for step in STEPS)


HEADER = ["entry", "seeds", "paddle / ball within 2 px", "move probe", "codes used", "PSNR (copy)",
          "recorded codes: paddle found, steps 10 / 50 / 200", "ball found", "ball moving", "steps above copy",
          "controller: paddle found", "ball found", "ball moving", "steps above copy",
          "two balls (codes / controller)", "LEFT / RIGHT (20 steps)", "s / step"]


def table_row(name: str, results: list[dict]) -> list:
    rows = [summary(r) for r in results]
    column = lambda key: [row.get(key) for row in rows]  # noqa: E731
    return [f"`{name}`: {ENTRIES[name].about}", len(rows),
            f"{cell(column('paddle_within_2px'))} / {cell(column('ball_within_2px'))}", cell(column("move")),
            cell(column("codes_used")), f"{cell(column('psnr'), False)} ({cell(column('psnr_copy'), False)})",
            trio(column, "codes", "paddle"), trio(column, "codes", "ball"), trio(column, "codes", "ball_moving"),
            cell(column("codes_above_copy"), False),
            trio(column, "controller", "paddle"), trio(column, "controller", "ball"),
            trio(column, "controller", "ball_moving"),
            cell(column("controller_above_copy"), False),
            f"{cell(column('codes_two_balls'))} / {cell(column('controller_two_balls'))}",
            f"{cell(column('left'))} / {cell(column('right'))}", cell(column("seconds_per_step"), False)]


def write_tables(out: Path, results: dict[str, list[dict]], note: str) -> str:
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=str))
    text = (f"# Ablation: drawing what moved, codes that carry the action, and playing forward\n\n{note}\n\n"
            + markdown_table(HEADER, [table_row(name, runs) for name, runs in results.items() if runs])
            + "\n\nMean over seeds ± half the spread between them. Drawing, probe, codes used, PSNR: evaluate.py on the "
              "val split. Rollouts: play.py rollout on val (200 steps from 48 starts, every frame fed back in after "
              "snapping to the palette): the paddle found in the share of starts, the ball found where the recording "
              "shows one, and of those found a step earlier too the share that moved as the game's ball does (a "
              "frozen ball is found, not played), how many steps PSNR stays above copying the start frame, the "
              "worst step's share of two balls. LEFT / RIGHT: held for 20 steps, success when the paddle ends that way. s / step: training's "
              "median.\n")
    (out / "ablation.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------ world models
def run_world_entry(entry: WorldEntry, root: Path, cfg: AblateConfig, threads: int | None) -> dict:
    """Train the entry's world model (if any), roll it out and play the sessions; returns the numbers."""
    log = root / "log.txt"
    root.mkdir(parents=True, exist_ok=True)
    run = lambda args: run_stage(args, log, threads)  # noqa: E731
    models = ["--checkpoint", str(cfg.checkpoint), "--controller", str(cfg.controller), "--latent", str(cfg.latent)]
    world, training = [], None
    if entry.variant is not None:
        models, training = lam_of_its_own(entry.variant, root, cfg, run, threads)
    if entry.train is not None:
        shutil.rmtree(root / "world", ignore_errors=True)
        run(["-m", "control.world_train", *models, "--out", str(root / "world"), "--steps", str(cfg.world_steps),
             *entry.train, *(["--threads", str(threads)] if threads else [])])
        world = ["--world", str(root / "world" / "world.pt")]
        training = json.loads((root / "world" / "metrics.json").read_text())
    play_flags = [*models, *world, "--split", cfg.split, *(["--threads", str(threads)] if threads else [])]
    shutil.rmtree(root / "play", ignore_errors=True)
    run(["play.py", "rollout", *play_flags, "--out", str(root / "play"), "--starts", str(cfg.starts),
         "--control-starts", str(cfg.control_starts), "--gifs", "2"])
    sessions = []
    for seed in range(cfg.sessions):
        shutil.rmtree(root / f"session-{seed}", ignore_errors=True)
        run(["play.py", "session", *play_flags, "--out", str(root / f"session-{seed}"), "--seed", str(seed),
             "--no-browser"])
        sessions.append(json.loads((root / f"session-{seed}" / "session.json").read_text()))
    return {"training": training and {k: training[k] for k in ("training", "val")},
            "play": json.loads((root / "play" / "metrics.json").read_text()),
            "sessions": [{k: s[k] for k in ("seed", "steps", "steps_per_s", "score")} for s in sessions]}


def lam_of_its_own(variant: str, root: Path, cfg: AblateConfig, run, threads: int | None) -> tuple[list[str], dict]:
    """Train the LAM variant for the LAM's and the world model's steps together, extract its codes and
    train its controller as the demo does; returns the play flags and its training time."""
    for made in ("ckpt", "run", "latent", "controller"):
        shutil.rmtree(root / made, ignore_errors=True)
    steps = cfg.lam_steps + cfg.world_steps
    started = time.perf_counter()
    run(["train.py", "--shards", str(cfg.shards), "--preset", "demo", "--model", variant, "--out", str(root / "ckpt"),
         "--run-dir", str(root / "run"), "--wandb", "disabled", "--iters", str(steps),
         "--set", f"lr_decay_iters={steps}", *(["--set", f"threads={threads}"] if threads else [])])
    seconds = time.perf_counter() - started
    checkpoint = root / "ckpt" / "best.pt"
    run(["extract.py", "--shards", str(cfg.shards), "--checkpoint", str(checkpoint), "--out", str(root / "latent"),
         "--no-progress"])
    run(["-m", "control.train", "--latent", str(root / "latent"), "--out", str(root / "controller"),
         "--steps", str(cfg.controller_steps)])
    models = ["--checkpoint", str(checkpoint), "--controller", str(root / "controller" / "controller.pt"),
              "--latent", str(root / "latent")]
    return models, {"training": {"steps": steps, "seconds": round(seconds, 1)}, "val": None}


def world_figures(result: dict) -> dict:
    """The figures a world row shows."""
    curves, control = result["play"]["rollouts"]["curves"], result["play"]["controllability"]
    horizon = len(curves["horizon"])
    figures = {"left": control["controller"]["left"]["success"], "right": control["controller"]["right"]["success"]}
    for kind in ("codes", "controller"):
        for step in (s for s in WORLD_STEPS if s <= horizon):
            for name in ("psnr", "paddle_found", "ball_found", "ball_phantom", "two_balls", "bricks_lost_model",
                         "bricks_lost_real"):
                figures[f"{kind}_{name}_{step}"] = curves[kind][name][step - 1]
            figures[f"{kind}_ball_moving_{step}"] = ball_moving(curves[kind], step)
        figures[f"{kind}_above_copy"] = next((h for h, (m, c) in enumerate(zip(curves[kind]["psnr"],
                                                                              curves["copy"]["psnr"]), 1)
                                              if m is not None and c is not None and m < c), horizon + 1) - 1
    for step in (s for s in WORLD_STEPS if s <= horizon):
        figures[f"copy_psnr_{step}"] = curves["copy"]["psnr"][step - 1]
    scores = [s["score"] for s in result["sessions"]]
    if scores:
        seen = [s["ball"]["seen"] for s in scores if s["ball"]["seen"] is not None]
        figures.update(session_ball=statistics.fmean(seen) if seen else None,
                       session_paddle=statistics.fmean(s["paddle"]["seen"] for s in scores),
                       session_bricks=statistics.fmean(s["bricks"]["broken"] for s in scores),
                       session_back=sum(s["bricks"]["came_back"] for s in scores),
                       session_launches=sum(s["ball"]["launches"] for s in scores),
                       session_steps_per_s=statistics.fmean(s2["steps_per_s"] for s2 in result["sessions"]))
    training = result.get("training")
    figures["train_seconds"] = training["training"]["seconds"] if training else None
    return figures


def per_step(figures: dict, kind: str, name: str, percent: bool = True) -> str:
    values = [figures.get(f"{kind}_{name}_{step}") for step in WORLD_STEPS]
    return " / ".join("n/a" if v is None else f"{v:.0%}" if percent else f"{v:.2f}" for v in values)


WORLD_HEADER = ["entry", "kind", "PSNR, steps 1 / 10 / 50 / 200 (copy-start)", "steps above copy", "paddle found",
                "ball found", "ball moving", "a ball where none", "two balls", "bricks lost at 200 (recording)",
                "LEFT / RIGHT",
                "session: ball in play / paddle / bricks broken (back) / launches", "train s"]


def world_rows(name: str, result: dict) -> list[list]:
    f = world_figures(result)
    pct_or = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    session = ("n/a" if "session_ball" not in f else
               f"{pct_or(f['session_ball'])} / {pct_or(f['session_paddle'])} / {f['session_bricks']:.1f} "
               f"({f['session_back']}) / {f['session_launches']}")
    rows = []
    for kind in ("codes", "controller"):
        bricks = f.get(f"{kind}_bricks_lost_model_200")
        rows.append([f"`{name}`: {WORLD_ENTRIES[name].about}" if kind == "codes" else "", "recorded codes"
                     if kind == "codes" else "controller",
                     f"{per_step(f, kind, 'psnr', False)} ({per_step(f, 'copy', 'psnr', False)})",
                     f[f"{kind}_above_copy"], per_step(f, kind, "paddle_found"), per_step(f, kind, "ball_found"),
                     per_step(f, kind, "ball_moving"),
                     per_step(f, kind, "ball_phantom"), per_step(f, kind, "two_balls"),
                     "n/a" if bricks is None else f"{bricks:.2f} ({f[f'{kind}_bricks_lost_real_200']:.2f})",
                     f"{pct_or(f['left'])} / {pct_or(f['right'])}" if kind == "controller" else "",
                     session if kind == "controller" else "",
                     "" if f["train_seconds"] is None or kind == "codes" else f"{f['train_seconds']:.0f}"])
    return rows


def write_world_tables(out: Path, results: dict[str, dict], note: str) -> str:
    (out / "world-ablation.json").write_text(json.dumps(results, indent=2, default=str))
    rows = [row for name, result in results.items() for row in world_rows(name, result)]
    text = (f"# Ablation: the world model that is played\n\n{note}\n\n" + markdown_table(WORLD_HEADER, rows)
            + "\n\nRollouts: play.py rollout, 200 steps from each start, every frame snapped and fed back; the "
              "paddle found in the share of starts, the ball found where the recording shows one, of those found a "
              "step earlier too the share that moved (a frozen ball is found, not played), a ball where it shows "
              "none. LEFT / RIGHT: held 20 steps. Sessions: the ball-following policy, 300 steps each, on the "
              "game's step API (no browser), mean over sessions. train s: the world model's training.\n")
    (out / "world-ablation.md").write_text(text)
    return text


def run_worlds(cfg: AblateConfig) -> int:
    note = (f"LAM `{cfg.checkpoint}`, controller `{cfg.controller}`, latents `{cfg.latent}`; world models "
            f"{cfg.world_steps} steps; {cfg.split} split, "
            f"{cfg.starts} rollout starts, {cfg.sessions} sessions. {machine()}.")
    results: dict[str, dict] = {}
    threads = 1 if cfg.jobs > 1 else None

    def one(name: str) -> None:
        results[name] = run_world_entry(WORLD_ENTRIES[name], cfg.out / "worlds" / name, cfg, threads)
        write_world_tables(cfg.out, {n: results[n] for n in cfg.worlds if n in results}, note)

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        for done in [pool.submit(one, name) for name in cfg.worlds]:
            done.result()
    print(write_world_tables(cfg.out, {n: results[n] for n in cfg.worlds}, note))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser, AblateConfig)
    cfg = AblateConfig(**config_values(parser.parse_args(argv), AblateConfig))
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.worlds:
        return run_worlds(cfg)
    note = (f"`demo` preset{f', {cfg.iters} steps' if cfg.iters else ''}, seeds {list(cfg.seeds)}, val split of "
            f"`{cfg.shards}`; controller {cfg.controller_steps} steps"
            f"{'; every entry with --set ' + ' '.join(cfg.set) if cfg.set else ''}. {machine()}.")
    results: dict[str, list[dict]] = {name: [] for name in cfg.entries}
    threads = 1 if cfg.jobs > 1 else None

    def one(name: str, seed: int) -> None:
        result = run_entry(cfg.entries[name], seed, cfg.out / name / f"seed-{seed}", cfg, threads)
        results[name].append({"model": cfg.entries[name].model, "settings": list(cfg.entries[name].settings), **result})
        results[name].sort(key=lambda r: r["seed"])
        write_tables(cfg.out, results, note)           # after every run: a long ablation can be read as it goes

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        for done in [pool.submit(one, name, seed) for name in cfg.entries for seed in cfg.seeds]:
            done.result()
    print(write_tables(cfg.out, results, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
