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


def test_benchmarks_keep_one_block_per_kind_of_machine(tmp_path, monkeypatch):
    """BENCHMARKS.md's per-machine sections (the demo's stages, the stages in fp32 and bf16): a run
    on one kind of machine replaces that kind's block and keeps the other kinds' (a CPU with native
    bf16 and one without differ most)."""
    from bench import bench_demo
    from bench.common import per_machine_section

    def demo_table(stage_seconds: float, machine: str) -> str:
        log = tmp_path / "demo-timings.json"
        log.write_text(json.dumps({"machine": machine, "started": "2026-12-05 10:00:00",
                                   "stages": [{"stage": "train (demo)", "seconds": stage_seconds, "exit": 0}]}))
        monkeypatch.setattr(bench_demo, "LOG", log)
        return bench_demo.run()

    avx2, bf16 = ("avx2-only", "AVX2 only, no avx512_bf16 or AMX"), ("native-bf16", "native bf16: avx512_bf16")
    section = lambda previous, block, kind: per_machine_section(previous, bench_demo.TITLE, bench_demo.INTRO,  # noqa: E731
                                                                 block, kind)
    first = section("", demo_table(454, "the AVX2 box"), avx2)
    both = section(first, demo_table(338, "the bf16 box"), bf16)
    assert both.startswith(bench_demo.TITLE) and both.count("### On ") == 2
    assert "### On AVX2 only" in both and "| 7.6 min (454 s) |" in both and "the AVX2 box" in both
    assert "### On native bf16: avx512_bf16" in both and "| 5.6 min (338 s) |" in both
    again = section(both, demo_table(300, "the bf16 box, again"), bf16)
    assert "| 5.6 min (338 s) |" not in again and "| 5.0 min (300 s) |" in again and "the AVX2 box" in again
    assert section(again, None, bf16) == again                      # nothing measured: every block kept
    monkeypatch.setattr(bench_demo, "LOG", tmp_path / "absent.json")
    assert bench_demo.run() == ""                                    # no demo here: nothing to add
