"""The one device rule, shared by the loader, the trainer's runtime, extract.py and evaluate.py."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from common.errors import UserError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The one device rule: None or "auto" is the current GPU when there is one, else the CPU; a GPU
    asked for by name must exist."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):         # 'bogus', 'cuda:x': torch's own error is a traceback
        raise UserError(f"device {device!r} is not a device; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but torch sees no GPU (use device='cpu')")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"device {device} is not supported; use 'cuda' or 'cpu'")
    if device.type == "cuda" and device.index is None:
        # pin the caller's current GPU (its DDP rank's): the loader's thread would otherwise see GPU 0
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# CPU instruction sets that run bf16 matrix products natively (oneDNN's fast bf16 kernels): without
# them bf16 is emulated, and a training step of the demo model took 6x as long as fp32 (AVX2 box).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_native_bf16(cpuinfo: str | None = None) -> str | None:
    """The flag that gives this CPU native bf16 (`NATIVE_BF16_FLAGS`), or None. Read from
    /proc/cpuinfo where there is one; elsewhere oneDNN's own check decides."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def model_threads(cores: int, beside: int = 1) -> int:
    """CPU threads for the model's own ops when `beside` other busy threads (frame decoding, scoring)
    run at the same time: the cores they leave, at least one. Not every core: an OpenMP team waits
    at each op for its slowest member, and a member that a neighbouring stage (or another process
    on a shared box) descheduled stalls the whole team; on the shared 2-core box two threads ran the
    demo model's encoder and decoder 2-3x slower than one (BENCHMARKS.md "Stages"). Work is shared
    between stages instead: each runs in its own thread, beside the others."""
    return max(1, cores - beside)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block (None: left as they are), and put back
    after it, so a command run in-process (tests, benchmarks) leaves its caller's setting alone."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


@contextlib.contextmanager
def fixed_conv_algorithms() -> Iterator[None]:
    """cuDNN chooses convolution algorithms by its fixed heuristics inside the block, not by timing
    them (benchmark mode): timings vary from run to run, and another algorithm rounds differently,
    so a run that must write the same bytes as the last one (extraction) cannot let them choose.
    Put back after the block. A no-op on a CPU."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
