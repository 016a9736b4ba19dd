"""What every benchmark shares: the machine description (and its kind, for sections kept per kind of
machine), a recorded Breakout set and its pair shards (made once under bench/out/ and reused), and
peak-memory measurement in a child process."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_OUT = ROOT / "bench" / "out"


def machine() -> str:
    """The machine and the code a benchmark ran on, for its section's last line (common/provenance.py)."""
    from common.provenance import provenance

    where = provenance()
    cpu = where["cpu"]
    code = f"commit {where['commit'][:7]}" if where["commit"] else "commit unknown"
    if where["dirty"]:
        code += " with uncommitted changes"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{code}; {cpu['cores']} CPU cores ({cpu['model']}, {cpu['simd']}), {mem_gb:.0f} GiB RAM, "
            f"{where['gpu'] or 'no GPU'}; Python {where['python']}, torch {where['torch']}")


# A section measured per kind of machine holds one block per kind: a run replaces its own kind's block
# and keeps the others (the figures of a CPU with native bf16 and one without are both worth keeping).
MACHINE_BLOCK = re.compile(r"<!-- machine:([\w-]+) -->\n(.*?)<!-- /machine:\1 -->", flags=re.S)


def machine_kind() -> tuple[str, str]:
    """(key, words) of this machine's kind: its GPU by name, else its CPU's SIMD flags in words."""
    from common.provenance import cpu_state, gpu_name

    words = gpu_name() or cpu_state()["simd"]
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "unknown", words


def per_machine_section(previous: str, title: str, intro: str, block: str | None,
                        kind: tuple[str, str] | None = None) -> str:
    """`title`, `intro`, then one block per kind of machine: `block` (measured here; None: nothing
    was) under this machine's kind (`kind`, default machine_kind()) in place of its earlier one, and
    every other kind's block of `previous` (the section's earlier text) kept, in key order."""
    blocks = dict(MACHINE_BLOCK.findall(previous))
    if block is not None:
        key, words = kind or machine_kind()
        blocks[key] = f"### On {words}\n\n{block.strip()}\n"
    parts = [f"<!-- machine:{key} -->\n{text.strip()}\n<!-- /machine:{key} -->" for key, text in sorted(blocks.items())]
    return "\n\n".join([title, intro, *parts])


def recorded_videos(episodes: int = 16, max_steps: int = 400, seed: int = 0) -> Path:
    """A real Breakout recording for benchmarks, made once and reused (keyed by its size and seed)."""
    from pipeline.record import record

    out = BENCH_OUT / f"videos-e{episodes}-s{max_steps}-seed{seed}"
    done = out / ".complete"
    if not done.exists():
        record(out, episodes=episodes, max_steps=max_steps, seed=seed, workers=os.cpu_count() or 1)
        done.touch()
    return out


def pair_shards(videos: Path, pairs_per_shard: int = 1000) -> Path:
    """Pair shards packed from `videos`, made once and reused."""
    from pipeline.pack import pack

    out = videos.with_name(videos.name + f"-pairs{pairs_per_shard}")
    if not (out / "manifest.json").exists():
        pack(videos, out, pairs_per_shard=pairs_per_shard, workers=os.cpu_count() or 1)
    return out


def run_child(code: str, timeout: float = 1800) -> dict:
    """Run `code` in a fresh Python so that its memory peak is its own. `code` may call
    `child_peak_rss_mb()` (defined for it) and must print one JSON dict as its last line."""
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_peak_rss_mb() -> float:
    """Peak RSS of this process plus the peak of its largest finished child (DataLoader workers), MB."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


CHILD_PRELUDE = "import json\nfrom bench.common import child_peak_rss_mb\n"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median_ms(run, reps: int = 7) -> float:
    """The median of `reps` timed calls of `run`, in ms, after one untimed call (first calls allocate)."""
    run()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)
