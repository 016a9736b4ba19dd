"""The clock of `make demo`: each stage runs under it, and how long it took goes into a log that
`make demo` prints at its end and `python -m bench demo` turns into BENCHMARKS.md's table.

    python -m bench.timed --log reports/demo-timings.json --stage train -- make train ...
    python -m bench.timed --log reports/demo-timings.json --fresh      # a new run of the demo
    python -m bench.timed --log reports/demo-timings.json --summary    # the table, in markdown

A stage's exit status is passed through, and recorded: a failed stage is in the log too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine
from common.errors import run_cli
from pipeline.shards import atomic_write_json


def read_log(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": []}


def timed_stage(path: Path, stage: str, command: list[str]) -> int:
    started = time.perf_counter()
    code = subprocess.call(command)
    log = read_log(path)
    log["stages"].append({"stage": stage, "seconds": round(time.perf_counter() - started, 1), "exit": code})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, log)
    return code


def summary(log: dict) -> str:
    total = sum(stage["seconds"] for stage in log["stages"]) or 1.0
    rows = [f"| {s['stage']} | {s['seconds'] / 60:.1f} min ({s['seconds']:.0f} s) | {s['seconds'] / total:.0%} |"
            + ("" if s["exit"] == 0 else f" failed (exit {s['exit']}) |") for s in log["stages"]]
    return "\n".join(["| stage | time | share |", "|---|---|---|", *rows,
                      f"| all stages | {total / 60:.1f} min | |", "",
                      f"Started {log['started']} on {log['machine']}."])


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv)


def cli(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--stage")
    parser.add_argument("--fresh", action="store_true", help="start a new log (the first stage of a run)")
    parser.add_argument("--summary", action="store_true", help="print the log as a markdown table")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.fresh:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.log, {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "stages": []})
    if args.stage and command:
        return timed_stage(args.log, args.stage, command)
    if args.summary:
        print(summary(read_log(args.log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
