"""A checkpoint folder (--out) belongs to one run. Without --resume, a folder that holds checkpoints
is another run's: training into it would overwrite its best.pt and step files, and a later
--resume would continue whichever run wrote the newest step file. So it is refused, naming the run
that is there; --resume continues that run only when every checkpoint there is of one run and the
command line asks for that run (its preset and name), not another.

A checkpoint is peeked at here only for its config and step: loaded weights-only and memory-mapped,
so its tensors are not read.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from model.checkpoint import first_line

STEP_FILE = re.compile(r"step-(\d+)\.pt")
BEST_FILE = "best.pt"


@dataclass(frozen=True)
class RunCheckpoint:
    path: Path
    run_name: str | None          # None: the file cannot be read
    preset: str | None
    step: int | None
    problem: str | None = None

    def describe(self) -> str:
        if self.problem:
            return f"{self.path.name} (unreadable: {self.problem})"
        return f"{self.path.name} (run {self.run_name or '(unnamed)'}, preset {self.preset}, step {self.step})"


def run_checkpoints(out: Path) -> list[Path]:
    """The checkpoints a run leaves in its folder (temp files of a killed write are hidden, not these)."""
    if not out.is_dir():
        return []
    return sorted(path for path in out.iterdir() if path.name == BEST_FILE or STEP_FILE.fullmatch(path.name))


def peek(path: Path) -> RunCheckpoint:
    """The run a checkpoint belongs to, from its config; weights_only like every checkpoint read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        train = saved_train(state)
        return RunCheckpoint(path, str(train.get("run_name") or ""), train.get("preset"), int(state["step"]))
    except Exception as error:              # noqa: BLE001 - the file's content, whatever its shape
        return RunCheckpoint(path, None, None, None, first_line(error))


def saved_train(state: dict) -> dict:
    """A checkpoint's training settings (config["train"]); {} where a file has none."""
    train = state["config"].get("train") if isinstance(state.get("config"), dict) else None
    return train if isinstance(train, dict) else {}


def refuse_another_run(out: Path) -> None:
    """Without --resume: a folder holding checkpoints is refused, saying whose they are."""
    found = run_checkpoints(out)
    if not found:
        return
    latest = max(found, key=lambda path: (path.name != BEST_FILE, step_number(path)))
    run = peek(latest)
    whose = (f"{run.run_name or '(unnamed)'} (preset {run.preset}, at step {run.step})" if run.problem is None
             else f"checkpoints ({', '.join(path.name for path in found[:4])}{', ...' if found[4:] else ''})")
    raise UserError(f"--out {out}: holds a run of {whose}; --resume to continue it, or another --out")


def step_number(path: Path) -> int:
    match = STEP_FILE.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def check_one_run(out: Path, latest: Path, state: dict) -> None:
    """--resume: every checkpoint in `out` is of the run whose latest step file it continues."""
    name = str(saved_train(state).get("run_name") or "")
    others = [run for run in map(peek, run_checkpoints(out)) if run.path != latest and run.run_name != name]
    if others:
        raise UserError(f"--resume: {out} holds checkpoints of more than one run ({latest.name} is run "
                        f"{name or '(unnamed)'}; {'; '.join(run.describe() for run in others[:3])}"
                        f"{'; ...' if others[3:] else ''}): move one run's files to a folder of its own")


def check_same_run_asked(latest: Path, state: dict, preset: str | None, settings: dict) -> None:
    """--resume continues the run in the folder: a --preset or run_name that names another run is
    refused (to start that run, give another --out)."""
    saved = saved_train(state)
    asked = {"preset": preset, "run_name": settings.get("run_name")}
    different = [f"{name} {value!r} (the run's is {saved.get(name)!r})" for name, value in asked.items()
                 if value is not None and saved.get(name) is not None and value != saved[name]]
    if different:
        raise UserError(f"--resume: {latest.parent} holds run {saved.get('run_name') or '(unnamed)'}, but the command "
                        f"asks for {', '.join(different)}: drop it to continue that run, or train into another --out")


# Settings that say where and how a run runs, not what it computes: a run that differs only in
# these is the same run (`--reuse`). `iters` too: a longer --iters continues the same run.
RUN_LOCAL_SETTINGS = frozenset({"run_name", "run_dir", "out", "shards", "wandb", "threads", "device", "backend",
                                "compile", "compile_backend", "compile_mode", "iters"})


def same_run_settings(state: dict, wanted: dict) -> bool:
    """Whether a checkpoint's run trains what `wanted` ({"train": ..., "model": ...}, as a checkpoint's
    config holds them) asks for: every setting equal but the RUN_LOCAL_SETTINGS."""
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    train = {k: v for k, v in saved_train(state).items() if k not in RUN_LOCAL_SETTINGS}
    asked = {k: v for k, v in wanted["train"].items() if k not in RUN_LOCAL_SETTINGS}
    return train == asked and saved.get("model") == wanted["model"]


def reuse_or_set_aside(out: Path, wanted: dict, manifest_sha: str) -> bool:
    """`--reuse`: True when `out` holds one run of these settings on this data (it is to be continued:
    nothing to train if it has finished); otherwise any checkpoints there are moved, folder and all,
    to `<out>.previous-<time>` (printed; nothing is deleted) and False: train afresh."""
    found = run_checkpoints(out)
    if not found:
        return False
    latest = max((path for path in found if STEP_FILE.fullmatch(path.name)), key=step_number, default=None)
    if latest is not None:
        try:
            state = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
        except Exception:                   # noqa: BLE001 - an unreadable file is another run's business
            state = {}
        runs = {run.run_name for run in map(peek, found)}
        if (len(runs) == 1 and state.get("shards_manifest_sha256") == manifest_sha
                and same_run_settings(state, wanted)):
            return True
    aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    print(f"train: {out} held a run of other settings or data; moved it to {aside} and training afresh",
          flush=True)
    return False
