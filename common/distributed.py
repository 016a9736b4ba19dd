"""Ranks for the commands that share work under torchrun (extraction, evaluation): who this process
is, its device, and the few collectives they need: a barrier, gathering Python objects, and a share
of a list. One process outside torchrun is rank 0 of 1, and every collective is then a no-op.

    with process_group("auto") as (ranks, device):
        mine = ranks.share(jobs)               # jobs[rank::world_size]
        ...
        ranks.barrier()                        # every rank's work is on disk
        if ranks.main: ...                     # only rank 0 writes what vouches for the whole

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; the process group is gloo on CPUs
and gloo for CPU tensors beside NCCL for CUDA tensors on GPUs (so the meters' CUDA sums go through
NCCL while barriers and Python objects go through gloo).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from common.device import resolve_device
from common.errors import UserError
from common.lock import FolderLock

T = TypeVar("T")
# A barrier waits for the slowest rank's share of the work: far longer than a training step, so
# longer than torch's default (10 to 30 minutes, by backend).
COLLECTIVE_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cores(self) -> int:
        """This rank's share of the machine's CPU cores."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world_size-th, from its rank on (round robin: equal counts, and
        neighbours, often alike in cost, on different ranks)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, value: Any) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather(self, value: Any) -> list | None:
        """Every rank's `value` (picklable), in rank order, on rank 0; None on the other ranks."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size if self.main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def hold_on_main(ranks: Ranks, lock: FolderLock) -> None:
    """The output folder's lock, taken by rank 0 (the one writer of what vouches for the run; the
    other ranks write their shards only between barriers it has passed). Every rank learns whether
    it got it, so a refused run stops on every rank alike. The caller releases it (a no-op off rank 0)."""
    refusal = None
    if ranks.main:
        try:
            lock.acquire()
        except UserError as error:
            refusal = str(error)
    refusal = ranks.all_gather(refusal)[0]
    if refusal:
        raise UserError(refusal)


# prctl(2): ask the kernel for a signal when the parent process dies
PR_SET_PDEATHSIG = 1


def end_with_launcher() -> None:
    """Under torchrun, die with it. torchrun starts each rank in a session of its own
    (start_new_session=True in torch's SubprocessHandler), so killing torchrun's process group (a
    job's Ctrl-C, a scheduler's kill -9) leaves every rank running, writing, and holding its output.
    Asked here, the kernel kills this rank the moment torchrun dies, however it dies; and if it died
    before the ask, the rank stops now."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if launcher_gone():
        os.kill(os.getpid(), signal.SIGKILL)


def launcher_gone() -> bool:
    """Whether this rank's parent is no longer a torchrun (it was reparented to init or a reaper)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as file:
            command = file.read()
    except OSError:
        return True
    return b"torch.distributed" not in command and b"torchrun" not in command


def torchrun_ranks() -> Ranks:
    """This process's place, from torchrun's environment (rank 0 of 1 without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))


@contextlib.contextmanager
def process_group(device: str | torch.device | None) -> Iterator[tuple[Ranks, torch.device]]:
    """This rank and its device (the rank's own GPU: cuda:LOCAL_RANK), inside the process group when
    torchrun started several; the group is left on exit. CPU ranks sharing a machine split its cores."""
    end_with_launcher()
    ranks = torchrun_ranks()
    if str(device or "auto") in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)           # so the device rule picks this rank's GPU
    resolved = resolve_device(device)
    if resolved.type == "cpu" and ranks.local_world_size > 1:
        torch.set_num_threads(ranks.cores)
    joined = ranks.distributed and not dist.is_initialized()
    if joined:
        backend = "cpu:gloo,cuda:nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield ranks, resolved
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
