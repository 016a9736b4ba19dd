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
