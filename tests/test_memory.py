"""Every command keeps its freed memory (common/memory.py): a block the size of a training step's
activations comes from the heap, where freeing keeps it for the next step, not from an mmap that
freeing hands back to the kernel. Checked with glibc's own account (mallinfo2), in fresh processes."""
from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept":
    from common.memory import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()        # once per process; again is a no-op
elif sys.argv[1] == "command":
    from common.errors import run_cli
    assert run_cli(lambda argv: 0, []) == 0
block = np.ones(20 * 2**20 // 8)                              # 20 MiB, like the demo's largest activations
print(libc.mallinfo2().hblkhd)                                # bytes in mmapped blocks
"""


def glibc_with_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


def mmapped_bytes(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2) to see where a block came from")
def test_a_command_serves_a_large_block_from_the_heap_where_freeing_keeps_it():
    assert mmapped_bytes("default") >= 20 * 2**20            # glibc's default: its own mmap, unmapped on free
    assert mmapped_bytes("kept") < 20 * 2**20
    assert mmapped_bytes("command") < 20 * 2**20             # every CLI goes through run_cli
