"""`make demo`, stage by stage, as the last demo on this machine timed it (bench/timed.py writes
reports/demo-timings.json while it runs; this turns it into BENCHMARKS.md's table).

    python -m bench demo
"""
from __future__ import annotations

import json

from bench.common import ROOT
from bench.timed import summary

LOG = ROOT / "reports" / "demo-timings.json"


def run() -> str:
    if not LOG.is_file():
        return "## `make demo`, stage by stage\n\nNo demo has run here yet (`make demo` writes reports/demo-timings.json)."
    return "\n".join(["## `make demo`, stage by stage", "",
                      "Each stage of the last `make demo` on this machine, timed while it ran (bench/timed.py). "
                      "The virtual environment is made before the first stage and is not in the table. The line under "
                      "the table names the demo's commit and machine; the stamp below it, when it was copied here.", "",
                      summary(json.loads(LOG.read_text()))])
