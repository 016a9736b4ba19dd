"""`make demo`, stage by stage, as the last demo on this machine timed it (bench/timed.py writes
reports/demo-timings.json while it runs; this turns it into BENCHMARKS.md's table).

One table per kind of machine (a GPU by its name, a CPU by its SIMD flags: native bf16 or not), so
that a run on one kind keeps the other kinds' tables: the demo's cost depends on it most (bf16
autocast trains only where bf16 is native; README, "The two commands").

    python -m bench demo
"""
from __future__ import annotations

import json
import re

from bench.common import ROOT
from bench.timed import summary

LOG = ROOT / "reports" / "demo-timings.json"
TITLE = "## `make demo`, stage by stage"
INTRO = ("Each stage of the last `make demo` on each kind of machine, timed while it ran (bench/timed.py), one table "
         "per kind: a run on this machine replaces its own kind's table and keeps the others. The virtual "
         "environment is made before the first stage and is not in the table. The line under each table names "
         "the demo's commit and machine; the stamp at the end of the section, when the last table was copied here. "
         "A second `make demo` reuses what is finished, so its table is short: the first run's is the cost.")
BLOCK = re.compile(r"<!-- demo-machine:([\w-]+) -->\n(.*?)<!-- /demo-machine:\1 -->", flags=re.S)


def machine_kind() -> tuple[str, str]:
    """(key, heading) of this machine's kind: its GPU, else its CPU's SIMD flags in words."""
    from common.provenance import cpu_state, gpu_name

    gpu = gpu_name()
    heading = gpu if gpu else cpu_state()["simd"]
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "unknown", heading


def previous_tables(section: str) -> dict[str, str]:
    """{kind key: its block's text} of an earlier version of this section."""
    return dict(BLOCK.findall(section))


def section(log: dict | None, previous: str) -> str:
    """The section with this machine's table (from `log`, the demo's timings; None: no demo ran here)
    in place of its kind's earlier one, and every other kind's kept, in key order."""
    tables = previous_tables(previous)
    if log is not None:
        key, heading = machine_kind()
        tables[key] = f"### {heading}\n\n{summary(log)}\n"
    if not tables:
        return f"{TITLE}\n\nNo demo has run here yet (`make demo` writes reports/demo-timings.json)."
    blocks = [f"<!-- demo-machine:{key} -->\n{text.strip()}\n<!-- /demo-machine:{key} -->" for key, text in
              sorted(tables.items())]
    return "\n\n".join([TITLE, INTRO, *blocks])


def run() -> str:
    from bench.__main__ import previous_sections

    log = json.loads(LOG.read_text()) if LOG.is_file() else None
    return section(log, previous_sections().get("demo", ""))
