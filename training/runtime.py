"""Where and how the trainer runs: rank and device, DDP process group, CPU threads, seeding, the
autocast dtype and GradScaler, and the few collectives the loop needs."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.device import resolve_device
from common.distributed import end_with_launcher
from model.inference import autocast_dtype


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None = None     # autocast dtype; None = fp32

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def uses_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return self.amp_dtype == torch.float16

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                else contextlib.nullcontext())


def setup_runtime(device: str, amp: str, seed: int, deterministic: bool, threads: int) -> Runtime:
    """Rank and device from torchrun's environment (one process = rank 0 of 1), the process group,
    threads, seeds and numerics. `device` is auto | cpu | cuda."""
    end_with_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)          # so the device rule picks this rank's GPU
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        # Ranks sharing a CPU box split its cores rather than each taking all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif resolved.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, world_size, local_rank, resolved, autocast_dtype(amp, resolved))


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    if not rt.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value, rt: Runtime) -> list:
    """Every rank's `value` (a picklable object), in rank order."""
    if not rt.distributed:
        return [value]
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def average_batchnorm_stats(model: torch.nn.Module, rt: Runtime) -> None:
    """Under DDP without SyncBatchNorm each rank's running statistics drift apart; average them before
    validation and checkpoints so every rank, and the checkpoint, holds the same model."""
    if not rt.distributed:
        return
    for module in model.modules():
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                and not isinstance(module, torch.nn.SyncBatchNorm)):
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer.div_(rt.world_size)


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def graph_breaks(reset: bool = False) -> int:
    """Graph breaks torch.compile has met in this process (dynamo's own counters); `reset` zeroes them."""
    from torch._dynamo.utils import counters

    found = sum(counters["graph_break"].values())
    if reset:
        counters["graph_break"].clear()
    return found


# name prefixes: "quantizer.recent" also covers recent_next and recent_count
PER_RANK_BUFFERS = tuple(f"quantizer.{name}" for name in ("usage", "recent"))


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of the parameters and BatchNorm statistics: what must agree across DDP ranks (the
    quantiser's usage counts and recent-output buffer are per rank by design)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(PER_RANK_BUFFERS):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def report_digests(model: torch.nn.Module, rt: Runtime, step: int) -> None:
    """Print the final weights' digest; under DDP every rank's must agree."""
    digests = all_gather(weights_digest(model), rt)
    if not rt.main:
        return
    same = len(set(digests)) == 1
    print(f"done at step {step}; weights digest {digests[0]}"
          + (f"; identical on all {rt.world_size} ranks" if rt.distributed and same else "")
          + (f"; RANKS DIFFER: {digests}" if not same else ""), flush=True)
    if not same:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
