"""Record real Atari Breakout play (ALE) as `bulk_videos/`: one folder per episode holding `<N>.png`
frames and `meta.jsonl` labels, one line per transition t (frame t -> frame t+1).

    python -m pipeline.record --out bulk_videos --episodes 24 --max-steps 400 --workers 2

Every episode is a pure function of (seed, episode index, options): the same command writes
byte-identical files, whatever the worker count.

Labels in meta.jsonl (all positions in pixels of the 210 x 160 RGB frame, read from the console RAM
and checked against the pixels of the recorded frames):
- `paddle_x`: left edge column of the paddle (RAM[72] - 47), from 8 to 144. The paddle occupies
  rows 189-192 and is 16 px wide (8 px once the ball has reached the top wall); at the right end
  its last columns are hidden under the wall (x >= 152).
- `ball_x`, `ball_y`: top-left pixel of the 2 x 4 ball (RAM[99] - 49, RAM[101] + 9; note the plus:
  RAM[101] - 9 would be 18 rows off). They are null while the ball is not in play (RAM[101] == 0:
  before FIRE launches it, and after a life is lost). In play the ball can still be hidden in part
  or whole: under a side wall (x < 8 or x > 150), and after a miss while it falls below the paddle
  (y > 188, up to about 217, below the screen's last row 209; its x can then leave the play area).
  Over the brick rows (y 57-92) it is drawn in the colour of the brick row it crosses.
- The un-prefixed fields describe frame t, the `next_` fields frame t+1. `action` is the action
  taken at t (with sticky actions the emulator may repeat the previous one instead; the label is what
  the policy chose), `reward`, `lives` and `terminal` (game over) are the outcome of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from common.cli import MAX_SEED, MAX_THREADS, add_config_flags, config_values, flag
from common.errors import UserError, check_output_dir, run_cli
from pipeline.actions import ACTION_NAMES, FIRE, LEFT, NOOP, RIGHT

PADDLE_WIDTH = 16
PARTIAL_MARK = ".partial-"          # temp folders of unfinished episodes: `.<name>.partial-<pid>`


@dataclass(frozen=True)
class RecordOptions:
    max_steps: int
    seed: int = 0
    frameskip: int = 4
    sticky: float = 0.25

    def __post_init__(self):
        if self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.seed < 0:                   # numpy's SeedSequence takes no negative entropy
            raise UserError(f"--seed must be >= 0 (got {self.seed})")
        if self.frameskip < 1:
            raise UserError(f"--frameskip must be at least 1 (got {self.frameskip})")
        if not 0.0 <= self.sticky <= 1.0:
            raise UserError(f"--sticky must be a probability in [0, 1] (got {self.sticky})")


@dataclass(frozen=True)
class EpisodePlan:
    index: int
    name: str
    policy: str
    seed: int


def plan_episode(seed: int, index: int) -> EpisodePlan:
    """Every third episode plays at random; the others track the ball. The episode's own seed comes
    from (seed, index) alone, so episodes do not depend on which worker records them or in what order."""
    policy = "random" if index % 3 == 2 else "tracker"
    episode_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return EpisodePlan(index, f"ep{index:04d}-{policy}", policy, episode_seed)


# ------------------------------------------------------------------------------- game state
def positions(ram: np.ndarray) -> dict[str, int | None]:
    """Paddle and ball positions in pixels (see the module docstring for what they mean)."""
    in_play = int(ram[101]) != 0
    return {"paddle_x": int(ram[72]) - 47,
            "ball_x": int(ram[99]) - 49 if in_play else None,
            "ball_y": int(ram[101]) + 9 if in_play else None}


class TrackerPolicy:
    """Moves the paddle under the ball, launches it with FIRE, and with probability `noise` presses a
    random button, so that the paddle also overshoots, waits and misses (lives get lost)."""

    name = "tracker"

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.noise = float(rng.uniform(0.1, 0.35))
        self.aim = 0                # where under the paddle to meet the ball: varies the bounce angle

    def act(self, ram: np.ndarray) -> int:
        if self.rng.random() < self.noise:
            return int(self.rng.integers(len(ACTION_NAMES)))
        where = positions(ram)
        if where["ball_x"] is None:
            self.aim = int(self.rng.integers(-6, 7))
            return FIRE
        offset = where["ball_x"] + 1 - (where["paddle_x"] + PADDLE_WIDTH // 2 + self.aim)
        if offset > 3:
            return RIGHT
        if offset < -3:
            return LEFT
        return NOOP


class RandomPolicy:
    name = "random"

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def act(self, ram: np.ndarray) -> int:
        return int(self.rng.integers(len(ACTION_NAMES)))


POLICIES = {policy.name: policy for policy in (TrackerPolicy, RandomPolicy)}


def make_env(options: RecordOptions):
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    return gym.make("ALE/Breakout-v5", frameskip=options.frameskip,
                    repeat_action_probability=options.sticky)


# ------------------------------------------------------------------------------- writing
def save_frame(frame: np.ndarray, path: Path) -> None:
    # PIL writes no timestamp or other varying chunk, so equal pixels give equal bytes.
    Image.fromarray(frame).save(path, format="PNG")


def play_episode(plan: EpisodePlan, options: RecordOptions, folder: Path) -> None:
    """Play one episode into `folder`: frames 0..T as PNG and one meta.jsonl line per transition."""
    env = make_env(options)
    action_names = env.unwrapped.get_action_meanings()
    ale = env.unwrapped.ale
    policy = POLICIES[plan.policy](np.random.default_rng(plan.seed))
    frame, info = env.reset(seed=plan.seed)
    save_frame(frame, folder / "0.png")
    ram = ale.getRAM()
    lives = int(info["lives"])
    lines = []
    for t in range(options.max_steps):
        before = positions(ram)
        action = policy.act(ram)
        frame, reward, terminated, truncated, info = env.step(action)
        ram = ale.getRAM()
        after = positions(ram)
        save_frame(frame, folder / f"{t + 1}.png")
        lines.append({"t": t, "action": action, "action_name": action_names[action],
                      "reward": float(reward), "lives": int(info["lives"]),
                      "life_lost": int(info["lives"]) < lives, "terminal": bool(terminated),
                      "policy": plan.policy, **before, **{f"next_{k}": v for k, v in after.items()}})
        lives = int(info["lives"])
        if terminated or truncated:
            break
    env.close()
    (folder / "meta.jsonl").write_text(
        "".join(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n" for line in lines))


def record_episode(out_dir: Path, plan: EpisodePlan, options: RecordOptions) -> Path:
    """Record into a hidden temp folder and rename it when complete, so an interrupted recording
    never leaves a half episode under a name that looks finished."""
    final = out_dir / plan.name
    partial = out_dir / f".{plan.name}{PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        play_episode(plan, options, partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def remove_stale_partials(out_dir: Path) -> None:
    """Temp folders left by a recording that was killed before it could clean up."""
    for entry in out_dir.iterdir():
        if entry.name.startswith(".") and PARTIAL_MARK in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def record(out_dir: Path, *, episodes: int, max_steps: int, seed: int = 0, workers: int = 1,
           frameskip: int = 4, sticky: float = 0.25, progress: bool = True) -> list[Path]:
    """Record `episodes` Breakout episodes of at most `max_steps` transitions each into `out_dir`;
    returns the episode folders in episode order."""
    from tqdm import tqdm

    if episodes < 1:
        raise UserError(f"--episodes must be at least 1 (got {episodes})")
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    options = RecordOptions(max_steps=max_steps, seed=seed, frameskip=frameskip, sticky=sticky)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    plans = [plan_episode(seed, index) for index in range(episodes)]
    bar = tqdm(total=episodes, unit="episode", desc="record", disable=not progress)
    try:
        if workers == 1:
            folders = []
            for plan in plans:
                folders.append(record_episode(out_dir, plan, options))
                bar.update()
            return folders
        with ProcessPoolExecutor(min(workers, episodes), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(record_episode, out_dir, plan, options) for plan in plans]
            for future in futures:
                future.result()
                bar.update()
            return [future.result() for future in futures]
    finally:
        bar.close()


def holds_episodes(out_dir: Path) -> bool:
    return out_dir.is_dir() and any(entry.is_dir() and not entry.name.startswith(".")
                                    for entry in out_dir.iterdir())


@dataclass
class RecordCommand:
    """The command line (`python -m pipeline.record --help`)."""

    out: Path = flag(help="output folder (bulk_videos/)")
    episodes: int = flag(help="episodes to record", min=1)
    max_steps: int = flag(help="transitions per episode at most", min=1)
    seed: int = flag(0, min=0, max=MAX_SEED)
    workers: int = flag(1, "processes", min=1, max=MAX_THREADS)
    frameskip: int = flag(4, "emulator frames per step", min=1)
    sticky: float = flag(0.25, "sticky-action probability", min=0, max=1)
    skip_existing: bool = flag(False, "do nothing (exit 0) when --out already holds episodes")
    progress: bool = True


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.record", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, RecordCommand)
    args = RecordCommand(**config_values(parser.parse_args(argv), RecordCommand))
    if args.skip_existing and holds_episodes(args.out):
        print(f"{args.out} already holds episodes; not recording (remove it to record again)")
        return 0
    folders = record(args.out, episodes=args.episodes, max_steps=args.max_steps, seed=args.seed,
                     workers=args.workers, frameskip=args.frameskip, sticky=args.sticky,
                     progress=args.progress)
    print(f"recorded {len(folders)} episodes into {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
