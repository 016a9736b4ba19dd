"""`make demo`, stage by stage, as the last demo on this machine timed it (bench/timed.py writes
reports/demo-timings.json while it runs; this turns it into BENCHMARKS.md's table). One table per
kind of machine (bench/common.per_machine_section): the demo's cost depends on it most (bf16
autocast trains only where bf16 is native).

    python -m bench demo
"""
from __future__ import annotations

import json

from bench.common import ROOT
from bench.timed import summary

LOG = ROOT / "reports" / "demo-timings.json"
PER_MACHINE = True
TITLE = "## `make demo`, stage by stage"
INTRO = ("Each stage of the last `make demo` on each kind of machine, timed while it ran (bench/timed.py). The "
         "virtual environment is made before the first stage and is not in the table. Under each table: the demo's "
         "commit and machine, then when it was copied here. A second `make demo` reuses what is finished, so its "
         "table is short: the first run's is the cost. No demo has run on a kind of machine without a table.")


def run() -> str:
    """This machine's table, or "" when no demo has run here."""
    return summary(json.loads(LOG.read_text())) if LOG.is_file() else ""
