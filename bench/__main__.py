"""`make bench`: run every side-by-side benchmark and write BENCHMARKS.md.

Each benchmark module exposes `run() -> str`, a markdown section that compares the project's way with
a baseline measured in the same run, as ratios. `python -m bench pack loader` runs a subset; the
sections not run keep their previous text in BENCHMARKS.md. A module with PER_MACHINE = True (and its
TITLE and INTRO) returns one machine's block, kept beside the other kinds of machine's blocks
(bench/common.per_machine_section); its run() returning "" measured nothing, and the section is kept.
"""
from __future__ import annotations

import importlib
import re
import sys
import time

from bench.common import ROOT, machine, per_machine_section

BENCHMARKS = ["demo", "pack", "loader", "train", "step", "extract", "scale", "stages", "play"]
OUTPUT = ROOT / "BENCHMARKS.md"


def previous_sections() -> dict[str, str]:
    if not OUTPUT.exists():
        return {}
    text = OUTPUT.read_text()
    found = re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", text, flags=re.S)
    return dict(found)


def main(argv: list[str]) -> int:
    chosen = argv or BENCHMARKS
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    sections = previous_sections()
    for name in chosen:
        print(f"== bench {name}", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"bench.bench_{name}")
        body = module.run().strip()
        stamp = time.strftime("%Y-%m-%d")
        measured = f"{body}\n\n_Measured {stamp} on: {machine()}; took {time.perf_counter() - started:.0f} s._\n"
        if getattr(module, "PER_MACHINE", False):
            if not body and name in sections:
                continue                                    # nothing measured here: the section stays
            measured = per_machine_section(sections.get(name, ""), module.TITLE, module.INTRO,
                                           measured if body else None)
        sections[name] = measured
        write(sections)    # after each benchmark, so a later failure keeps what was measured
    print(f"wrote {OUTPUT}")
    return 0


def write(sections: dict[str, str]) -> None:
    parts = ["# Benchmarks\n",
             "Written by `make bench` (`python -m bench [name ...]`). Every figure is measured side by side "
             "with its baseline in the same run, on the machine named under each section.\n"]
    for name in BENCHMARKS:
        if name in sections:
            parts.append(f"<!-- bench:{name} -->\n{sections[name].strip()}\n<!-- /bench:{name} -->\n")
    from pipeline.shards import atomic_write_bytes

    atomic_write_bytes(OUTPUT, "\n".join(parts).encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
