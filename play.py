"""Play Breakout inside the model: rollouts against recorded test episodes, controllability, the
play page, and its speed.

    python play.py rollout --checkpoint checkpoints/latent_action/best.pt \
        --controller checkpoints/controller/controller.pt --latent shards/latent [--out reports/play]
    python play.py serve   [same three flags]          # http://127.0.0.1:8000 (HOST=, PORT= override)
    python play.py bench   [same three flags] [--steps 100]
    python play.py session [same three flags] [--steps 300] [--seed 0]

`rollout` writes metrics.json, report.md, curves.png, controllability.png and rollout-<episode>.gif
(recorded | model | |difference|) into --out. `bench` times play steps through the real HTTP
server (controller, decoder, PNG encoding, and the rest of the round trip) and writes bench.json.
`session` plays the page in headless Chromium with a policy that follows the ball (control/session.py)
and writes session.json, session-contact-sheet.png and a section of report.md (or session.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from common.cli import MAX_BATCH, MAX_SEED, MAX_THREADS, add_config_flags, check_fields, config_values, flag
from common.device import resolve_device
from common.errors import UserError, check_output_dir, run_cli
from common.identity import check_made_from
from common.lock import FolderLock
from common.provenance import provenance
from evaluation.formatting import num, pct
from model import load_checkpoint
from model.checkpoint import LAM_KIND, lam_identity
from pipeline.actions import ACTION_NAMES
from pipeline.latent import latent_lam
from pipeline.palette import frame_levels, read_palette
from pipeline.shards import LATENT_FORMAT, SPLITS, atomic_write_json, load_manifest

from control.checkpoint import controller_lam, load_controller
from control.controllability import run_controllability
from control.data import read_episodes
from control.figures import controllability_bars, rollout_curves, write_gif
from control.report import CONTROL_GOAL, REPORT_HORIZONS, write_play_report
from control.rollout import KINDS, codes_before, run_rollouts
from control.server import Game, StartFrame, make_server
from control.session import check_browser, record_session, summary
from control.simulator import Simulator
from control.world import check_belongs, load_world

DEFAULT_CHECKPOINT = Path("checkpoints/latent_action/best.pt")
DEFAULT_CONTROLLER = Path("checkpoints/controller/controller.pt")
DEFAULT_LATENT = Path("shards/latent")
# a rollout keeps its GIF starts' frames in memory, every step of them: 10,000 steps of 3 panels are 1 GB
MAX_PLAY_STEPS = 10_000


@dataclass
class ModelPaths:
    checkpoint: Path = flag(DEFAULT_CHECKPOINT, "LAM checkpoint")
    controller: Path = flag(DEFAULT_CONTROLLER, "controller checkpoint")
    latent: Path = flag(DEFAULT_LATENT, "latent shards (episodes to start from)")
    split: str = flag("test", choices=SPLITS)
    device: str = flag("auto", "where the models run: auto (a GPU when there is one), cpu or cuda",
                       choices=("auto", "cpu", "cuda"))
    threads: int = flag(0, "torch CPU threads (0: torch's default)", min=0, max=MAX_THREADS)
    per_cell: bool = flag(False, "the controller picks each cell's code on its own, "
                                 "not one of the grids seen in training")
    snap: bool = flag(True, "snap each generated frame to the game's palette before it is fed back "
                            "(--no-snap: feed back what the decoder drew)")
    allow_other_checkpoint: bool = flag(False, "play a controller, or latents, made from another LAM checkpoint "
                                               "of the same kind (the report says so); by default refused")
    world: Path | None = flag(None, "world model checkpoint (make world) that draws instead of the LAM's decoder")

    def __post_init__(self):
        check_fields(self)                  # the flags' rules, for a config built in Python too


@dataclass
class RolloutConfig(ModelPaths):
    out: Path = Path("reports/play")
    horizon: int = flag(200, "steps each rollout plays", min=1, max=MAX_PLAY_STEPS)
    starts: int = flag(48, "rollout start frames, spread over the split's episodes", min=1, max=MAX_PLAY_STEPS)
    gifs: int = flag(3, "GIFs of starts spread over the episodes", min=0)
    control_starts: int = flag(100, min=1, max=MAX_PLAY_STEPS)
    control_steps: int = flag(20, "steps of always-LEFT / always-RIGHT", min=1, max=MAX_PLAY_STEPS)
    batch_size: int = flag(0, "starts played side by side (0: all of them at once)", min=0, max=MAX_BATCH)
    seed: int = flag(0, min=0, max=MAX_SEED)

    def __post_init__(self):
        super().__post_init__()
        check_output_dir(self.out, "--out")


@dataclass
class ServeConfig(ModelPaths):
    host: str = "127.0.0.1"
    port: int = flag(8000, min=0, max=65535)
    max_episodes: int = flag(4, "test episodes whose frames are the restart points", min=1)
    seed: int | None = None


@dataclass
class BenchConfig(ModelPaths):
    steps: int = flag(100, "play steps timed", min=1, max=MAX_PLAY_STEPS)
    out: Path = Path("reports/play")

    def __post_init__(self):
        super().__post_init__()
        check_output_dir(self.out, "--out")


@dataclass
class SessionConfig(ModelPaths):
    steps: int = flag(300, "steps the ball-following policy plays on the page", min=1, max=MAX_PLAY_STEPS)
    out: Path = Path("reports/play")
    seed: int = flag(0, "picks the test frame the game restarts from", min=0, max=MAX_SEED)
    browser: bool = flag(True, "drive the page in headless Chromium (--no-browser: the same policy on the game's "
                               "own step API, where Chromium is not installed)")

    def __post_init__(self):
        super().__post_init__()
        check_output_dir(self.out, "--out")


# ------------------------------------------------------------------------------------ loading
def load_simulator(paths: ModelPaths) -> tuple[Simulator, bool]:
    """LAM + controller, checked to belong together, with the palette of the latent shards when
    `paths.snap`; returns (simulator, grayscale)."""
    if paths.threads:
        torch.set_num_threads(paths.threads)
    device = resolve_device(paths.device)
    lam = load_checkpoint(paths.checkpoint, device)
    controller = load_controller(paths.controller, device)
    world = load_world_for(paths, lam, controller, device)
    return Simulator(lam, controller, device=device, per_cell=paths.per_cell, world=world), \
        lam.config.in_channels == 1


def controller_made_for_lam(paths: ModelPaths, sim: Simulator) -> str | None:
    """The controller must predict this LAM's codes: of its kind always (grid or action code, the
    codebook, the colour mode), of these very weights unless --allow-other-checkpoint (then the
    note for the report). The LAM's identity is the hash of the bytes it was loaded from."""
    return check_made_from(str(paths.controller), controller_lam(sim.controller), f"LAM {paths.checkpoint}",
                           lam_identity(sim.lam), kind=LAM_KIND, allow_other=paths.allow_other_checkpoint,
                           remedy="train a controller on this LAM's latents (make extract controller)")


def latents_made_by_lam(paths: ModelPaths, sim: Simulator, episodes: list) -> str | None:
    """The latents' recorded codes (and the start frames' codes before) must be this LAM's: of its
    kind always, of these very weights unless --allow-other-checkpoint. Their record: the manifest,
    or, for shards without one beside them, each sample's json."""
    if (Path(paths.latent) / "manifest.json").is_file():
        recorded = latent_lam(load_manifest(paths.latent, LATENT_FORMAT))
    else:
        made_by = {meta.get("checkpoint", {}).get("sha256") for e in episodes for meta in e.metas} - {None}
        recorded = {"sha256": made_by.pop()} if len(made_by) == 1 else {}
    return check_made_from(str(paths.latent), recorded, f"LAM {paths.checkpoint}", lam_identity(sim.lam),
                           kind=LAM_KIND, allow_other=paths.allow_other_checkpoint,
                           remedy="extract latents with this LAM (make extract)")


def made_from_notes(*notes: str | None) -> list[str]:
    """The notes of what was played with --allow-other-checkpoint, said on stderr as well."""
    kept = [note for note in notes if note]
    for note in kept:
        print(f"warning: {note}", file=sys.stderr)
    return kept


def load_world_for(paths: ModelPaths, lam, controller, device: torch.device):
    """The world model of --world, refused unless it was trained with this LAM and controller; None without --world."""
    if paths.world is None:
        return None
    world = load_world(paths.world, device)
    check_belongs(world, lam, controller, paths.world)
    return world


def with_palette(sim: Simulator, paths: ModelPaths, episodes: list) -> Simulator:
    """The simulator snapping to the palette the latent manifest records (or, for shards from before
    it did, the colours of the episodes' own frames); unchanged with --no-snap."""
    if not paths.snap:
        return sim
    palette = read_palette(load_manifest(paths.latent, LATENT_FORMAT))
    channels = sim.lam.config.in_channels
    levels = palette.levels(channels) if palette else frame_levels(torch.cat([e.frames for e in episodes]))
    return replace(sim, palette=levels)


# ------------------------------------------------------------------------------------ rollout
def rollout(config: RolloutConfig) -> dict:
    with FolderLock(config.out):                # one writer of --out (rollout, session, bench share reports/play)
        return rollout_locked(config)


def rollout_locked(config: RolloutConfig) -> dict:
    sim, grayscale = load_simulator(config)
    controller_note = controller_made_for_lam(config, sim)
    episodes = read_episodes(config.latent, config.split, grayscale=grayscale)
    notes = made_from_notes(controller_note, latents_made_by_lam(config, sim, episodes))
    sim = with_palette(sim, config, episodes)
    started = time.perf_counter()
    try:
        result = run_rollouts(sim, episodes, config.horizon, config.starts, config.batch_size or config.starts,
                              config.gifs)
    except ValueError as error:
        raise UserError(f"{config.latent} ({config.split}): {error}") from None
    control = run_controllability(sim, episodes, config.control_starts, config.control_steps,
                                  config.batch_size or config.control_starts, config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    gifs = []
    for index, panels in sorted(result.gif_frames.items()):
        start = result.starts[index]
        name = f"rollout-{safe_name(episodes[start.episode].name)}-t{start.t}.gif"
        write_gif(config.out / name, [panels["real"], *(panels[kind] for kind in KINDS if kind in panels)])
        gifs.append(name)
    figures = {"curves": rollout_curves(result.curves, config.out / "curves.png").name,
               "controllability": controllability_bars(control, config.out / "controllability.png", CONTROL_GOAL).name}
    metrics = {"split": config.split, "device": str(sim.device), "checkpoint": str(config.checkpoint),
               "lam_step": int(sim.lam.step),
               "world": None if config.world is None else str(config.world),
               "controller": str(config.controller), "controller_step": sim.controller.step,
               "controller_grids": 0 if config.per_cell else len(sim.controller.seen_grids),
               "latent": str(config.latent), "config": jsonable(asdict(config)), "made_from_other": notes,
               "palette": None if sim.palette is None else sim.palette.tolist(),
               "rollouts": {"starts": len(result.starts), "episodes": len({s.episode for s in result.starts}),
                            "curves": result.curves},
               "controllability": control, "figures": figures, "gifs": gifs,
               "seconds": round(time.perf_counter() - started, 1),
               "provenance": provenance(**lam_origin(sim.lam), precision="fp32")}      # rollouts run in fp32, on --device
    atomic_write_json(config.out / "metrics.json", metrics)
    metrics["report"] = str(write_play_report(config.out, metrics, figures, gifs))
    return metrics


def lam_origin(lam) -> dict:
    """What a report records of the LAM it played: its identity, its variant, and the preset and commit
    it was trained with."""
    trained_with = getattr(lam, "trained_with", {})
    return {"checkpoint_sha256": getattr(lam, "sha256", None), "variant": lam.config.variant,
            "preset": trained_with.get("preset"), "trained_at": trained_with.get("commit")}


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


def jsonable(values: dict) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


# ------------------------------------------------------------------------------------ serving
def build_game(config: ServeConfig) -> tuple[Game | None, str | None]:
    """The game, or the reason there is none (a missing checkpoint, controller or test frames, or
    ones made from another LAM)."""
    try:
        sim, grayscale = load_simulator(config)
        controller_note = controller_made_for_lam(config, sim)
        episodes = read_episodes(config.latent, config.split, grayscale=grayscale, max_episodes=config.max_episodes)
        notes = made_from_notes(controller_note, latents_made_by_lam(config, sim, episodes))
        sim = with_palette(sim, config, episodes)
    except UserError as error:
        return None, str(error)
    starts = [StartFrame(e.frames[t], e.frames[max(t - 1, 0)], codes_before(e, t))
              for e in episodes for t in range(len(e.frames))]
    game = Game(sim, starts, config.seed)
    game.made_from_other = notes                 # for the report of what was played (play.py session)
    return game, None


def serve(config: ServeConfig) -> int:
    game, problem = build_game(config)
    try:
        server = make_server(config.host, config.port, game, problem)
    except OSError as error:
        raise UserError(f"cannot listen on {config.host}:{config.port} ({error.strerror or error}); set PORT=") from None
    if problem:
        print(f"play: not ready: {problem}", file=sys.stderr)
    print(f"play page on http://{config.host}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# ------------------------------------------------------------------------------------ bench
def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def bench(config: BenchConfig) -> dict:
    """Play steps through the real server on a free port: where a frame's time goes."""
    with FolderLock(config.out):
        return bench_locked(config)


def bench_locked(config: BenchConfig) -> dict:
    game, problem = build_game(ServeConfig(**{**asdict(config_paths(config)), "seed": 0}))
    if problem:
        raise UserError(problem)
    server = make_server("127.0.0.1", 0, game)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/step"
    rng = random.Random(0)
    try:
        for _ in range(5):                                   # warm-up: first calls allocate
            post_json(url, {"action": "NOOP"})
        rows = []
        for _ in range(config.steps):
            began = time.perf_counter()
            answer = post_json(url, {"action": rng.choice(ACTION_NAMES)})
            total = 1000 * (time.perf_counter() - began)
            timing = answer["timing_ms"]
            rows.append({**timing, "total": total, "http_and_json": total - sum(timing.values())})
    finally:
        server.shutdown()
        server.server_close()
    median = {name: round(statistics.median(r[name] for r in rows), 2) for name in rows[0]}
    result = {"steps": config.steps, "threads": torch.get_num_threads(), "median_ms": median,
              "mean_ms": {name: round(statistics.fmean(r[name] for r in rows), 2) for name in rows[0]},
              "frames_per_s": round(1000 / median["total"], 1), "checkpoint": str(config.checkpoint),
              "controller": str(config.controller)}
    atomic_write_json(config.out / "bench.json", result)
    return result


def session(config: SessionConfig) -> dict:
    game, problem = build_game(ServeConfig(**{**asdict(config_paths(config)), "seed": config.seed}))
    if problem:
        raise UserError(problem)
    about = {"checkpoint": str(config.checkpoint), "controller": str(config.controller),
             "world": None if config.world is None else str(config.world),
             "latent": str(config.latent), "seed": config.seed, "made_from_other": game.made_from_other}
    return record_session(game, config.out, config.steps, about, config.browser)


def config_paths(config: ModelPaths) -> ModelPaths:
    return ModelPaths(**{f: getattr(config, f) for f in ModelPaths.__dataclass_fields__})


# ------------------------------------------------------------------------------------ cli
# command -> (its config, help, fields that are not flags: the server's address comes from HOST=, PORT=)
COMMANDS = {"rollout": (RolloutConfig, "rollouts, controllability, GIFs and report", ()),
            "serve": (ServeConfig, "the play page (HOST=, PORT= override 127.0.0.1:8000)", ("host", "port", "seed")),
            "bench": (BenchConfig, "time play steps through the HTTP server", ()),
            "session": (SessionConfig, "a ball-following policy plays the page in headless Chromium", ())}


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(description="Play Breakout inside the latent action model.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (config, help_text, not_flags) in COMMANDS.items():
        add_config_flags(commands.add_parser(name, help=help_text), config, skip=not_flags)
    args = parser.parse_args(argv)
    config = COMMANDS[args.command][0]
    values = config_values(args, config)
    if args.command == "serve":
        port = os.environ.get("PORT", "8000")
        if not port.isdigit() or not 0 <= int(port) < 65536:
            raise UserError(f"PORT={port!r} is not a port number")
        values.update(host=os.environ.get("HOST", "127.0.0.1"), port=int(port))
    return args.command, config(**values)


def run(argv: Sequence[str] | None = None) -> int:
    command, config = parse_args(argv)
    if command == "serve":
        return serve(config)
    if command == "bench":
        result = bench(config)
        m = result["median_ms"]
        print(f"play step, median over {result['steps']}: {m['total']:.1f} ms = {result['frames_per_s']} frames/s "
              f"(controller {m['controller']:.1f}, decoder {m['decoder']:.1f}, png {m['png']:.1f}, "
              f"http+json {m['http_and_json']:.1f} ms; {result['threads']} threads)")
        return 0
    if command == "session":
        if config.browser:
            check_browser()                                  # before loading any model
        with FolderLock(config.out):
            print(summary(session(config)))
        return 0
    metrics = rollout(config)
    curves, control = metrics["rollouts"]["curves"], metrics["controllability"]
    for h in REPORT_HORIZONS:
        if h <= len(curves["horizon"]):
            line = f"step {h}: PSNR copy start {num(curves['copy']['psnr'][h - 1])}"
            for kind in KINDS:
                c = {name: values[h - 1] for name, values in curves[kind].items()}
                line += (f"; {kind}: PSNR {num(c['psnr'])}, paddle {pct(c['paddle_found'], 0)}, "
                         f"ball {pct(c['ball_found'], 0)} (moving {pct(c['ball_moving'], 0)}), "
                         f"bricks lost {num(c['bricks_lost_model'])} ({num(c['bricks_lost_real'])})")
            print(line)
    moved = {(codes, side): pct(control[codes][side]["success"], 0)
             for codes in ("controller", "random_codes") for side in ("left", "right")}
    print(f"controllability: LEFT {moved['controller', 'left']}, RIGHT {moved['controller', 'right']} "
          f"(random codes {moved['random_codes', 'left']}, {moved['random_codes', 'right']})")
    print(f"report: {metrics['report']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (a user's mistake: one `error:` line on stderr, 2)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
