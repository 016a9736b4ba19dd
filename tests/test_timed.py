"""bench/timed.py, the clock of `make demo`: every stage's time and exit status go into the log, a
failed stage's too, and the summary is the table BENCHMARKS.md shows."""
from __future__ import annotations

import json
import sys

from bench import timed


def test_each_stage_is_logged_with_its_time_and_exit_status(tmp_path, capsys):
    log = tmp_path / "reports" / "demo-timings.json"
    assert timed.main(["--log", str(log), "--fresh"]) == 0
    assert timed.main(["--log", str(log), "--stage", "data", "--", sys.executable, "-c", "pass"]) == 0
    assert timed.main(["--log", str(log), "--stage", "train", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    stages = json.loads(log.read_text())["stages"]
    assert [(s["stage"], s["exit"]) for s in stages] == [("data", 0), ("train", 3)]
    assert all(s["seconds"] >= 0 for s in stages)
    capsys.readouterr()
    assert timed.main(["--log", str(log), "--summary"]) == 0
    table = capsys.readouterr().out
    assert "| data |" in table and "failed (exit 3)" in table and "| all stages |" in table
    assert timed.main(["--log", str(log), "--fresh"]) == 0              # a new run starts an empty log
    assert json.loads(log.read_text())["stages"] == []


def test_benchmarks_keep_one_demo_table_per_kind_of_machine(monkeypatch):
    """BENCHMARKS.md's demo section: a demo timed on one kind of machine replaces that kind's table
    and keeps the other kinds' (the demo's cost depends on native bf16 most)."""
    from bench import bench_demo

    def log(stage_seconds: float, machine: str) -> dict:
        return {"machine": machine, "started": "2026-12-05 10:00:00",
                "stages": [{"stage": "train (demo)", "seconds": stage_seconds, "exit": 0}]}

    kind = {"key": ("avx2-only-no-avx512-bf16-or-amx", "AVX2 only, no avx512_bf16 or AMX")}
    monkeypatch.setattr(bench_demo, "machine_kind", lambda: kind["key"])
    first = bench_demo.section(log(454, "the AVX2 box"), "")
    kind["key"] = ("native-bf16-avx512-bf16", "native bf16: avx512_bf16")
    both = bench_demo.section(log(338, "the bf16 box"), first)
    assert "### AVX2 only" in both and "| 7.6 min (454 s) |" in both and "the AVX2 box" in both
    assert "### native bf16: avx512_bf16" in both and "| 5.6 min (338 s) |" in both
    again = bench_demo.section(log(300, "the bf16 box, again"), both)
    assert "| 5.6 min (338 s) |" not in again and "| 5.0 min (300 s) |" in again and "the AVX2 box" in again
    assert again.count("### ") == 2
    assert bench_demo.section(None, again) == again                 # no demo ran here: every table kept
    assert "No demo has run here yet" in bench_demo.section(None, "")
