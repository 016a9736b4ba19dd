"""How many loader CPU cores one GPU needs: the pairs per second a GPU's training step (full preset)
and extraction could consume, estimated from the model's FLOPs and the GPU's bf16 peak, against the
pairs per second one CPU core of the loader delivers, measured here.

FLOPs per pair: FlopCounterMode on the CPU (convolutions and matmuls, as for MFU): a training step
(forward + backward, training/throughput.py), and extraction's encoder + quantiser forward.
Loader: each configuration in a child process pinned to one core (sched_setaffinity), one decoding
thread, one intra-op thread: what one core delivers, whatever else the box runs.

    python -m bench scale
"""
from __future__ import annotations

import os

from bench.common import markdown_table, pair_shards, recorded_videos, run_child

EPISODES, MAX_STEPS = 16, 400
BATCH = 32
# An assumed MFU for the estimate: small-image convolution stacks at batch 32-256 rarely reach the
# large-matmul utilisation of transformers (MFU is logged by train.py on CUDA: replace this with it).
ASSUMED_MFU = 0.3
GPUS = [("H100 / H200 SXM", 989e12), ("A100", 312e12), ("L4", 121e12)]     # dense bf16 peaks, FLOP/s

# One core: the loader's assembling thread, its decoder (one DALI thread, or one DataLoader worker
# process for the torch backend, which inherits the affinity) and the consumer share core 0.
# Rates per CPU-second (this process's and its finished workers' user + system time), beside the wall
# clock: on a shared box a pinned process gets a fraction of its core, and CPU time does not count
# the waiting.
CPU_SECONDS = """
import os, resource, time
os.sched_setaffinity(0, {{0}})
def cpu_seconds():
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
"""

# One core: the loader's assembling thread, its decoder (one DALI thread, or one DataLoader worker
# process for the torch backend, which inherits the affinity) and the consumer share core 0.
LOADER_CHILD = CPU_SECONDS + """
import torch
torch.set_num_threads(1)
from pipeline.loader import build_loader
kind = {kind!r}
loader = build_loader({shards!r}, "train", {batch}, backend={backend!r}, device="cpu", threads=1,
                      shuffle=kind != "in order", drop_last=kind != "in order", cache=kind == "cache fill")
pairs, started, cpu = 0, time.perf_counter(), cpu_seconds()
for batch in loader:                          # one epoch: with the cache, the epoch that fills it
    pairs += batch["cur"].shape[0]
wall = time.perf_counter() - started
print(json.dumps({{"per_cpu_s": pairs / (cpu_seconds() - cpu), "per_s": pairs / wall}}))
"""

# Decoding alone: PIL on one core (the torch backend's decoder; DALI's CPU decoder is in the loader rows).
DECODE_CHILD = CPU_SECONDS + """
from pipeline.png import decode_png_rgb
from pipeline.pair_index import FrameReader, build_pair_index
index = build_pair_index({shards!r}, "train")
reader = FrameReader(index)
frames = [reader.read_png(i) for i in range(min(2000, index.num_frames))]
cpu = cpu_seconds()
for data in frames:
    decode_png_rgb(data)
print(json.dumps({{"per_cpu_s": len(frames) / (cpu_seconds() - cpu)}}))
"""

FLOPS_CHILD = """
import torch
from torch.utils.flop_counter import FlopCounterMode
from model import LatentActionModel, ModelConfig
from training.throughput import training_flops_per_sample
config = ModelConfig()
model = LatentActionModel(config).eval()
frames = torch.rand(1, *config.frame_shape)
counter = FlopCounterMode(display=False)
with counter, torch.inference_mode():
    model.encode(frames, frames)
print(json.dumps({{"train": training_flops_per_sample(config), "encode": float(counter.get_total_flops())}}))
"""


def loader_rate(shards, backend: str, kind: str) -> dict:
    return run_child(LOADER_CHILD.format(shards=str(shards), batch=BATCH, backend=backend, kind=kind))


LOADER_KINDS = [
    ("in order", "extraction, evaluation (about 1 frame decoded per pair)"),
    ("shuffled", "training, split larger than the cache (about 2 frames decoded per pair)"),
    ("cache fill", "training, first epoch with the cache (each frame once; later epochs decode nothing)"),
]


def run() -> str:
    shards = pair_shards(recorded_videos(EPISODES, MAX_STEPS))
    flops = run_child(FLOPS_CHILD.format())
    load_before = os.getloadavg()[0]
    decode = run_child(DECODE_CHILD.format(shards=str(shards)))["per_cpu_s"]
    rates = {(backend, kind): loader_rate(shards, backend, kind) for kind, _ in LOADER_KINDS
             for backend in ("dali", "torch")}
    load_after = os.getloadavg()[0]

    demand = [[name, f"{peak / 1e12:.0f}"]
              + [f"{peak * ASSUMED_MFU / flops[what]:,.0f}" for what in ("train", "encode")] for name, peak in GPUS]
    h100 = GPUS[0][1] * ASSUMED_MFU
    supply = [[f"`{backend}`, {kind}", use, f"{rates[backend, kind]['per_cpu_s']:.0f}",
               f"{rates[backend, kind]['per_s']:.0f}",
               f"{h100 / flops['train' if kind != 'in order' else 'encode'] / rates[backend, kind]['per_cpu_s']:,.0f}"]
              for kind, use in LOADER_KINDS for backend in ("dali", "torch")]
    return f"""## Scaling out: loader cores per GPU

How many pairs per second one GPU could consume, **estimated** (not measured: this machine has no
GPU) from the model's FLOPs and the GPU's dense bf16 peak at an assumed {ASSUMED_MFU:.0%} MFU, against
the pairs per second one CPU core of the loader delivers, **measured** here (a child process pinned
to one core, one decoding thread). The full preset model (ModelConfig defaults) takes
{flops['train'] / 1e9:.1f} GFLOP per pair for a training step (forward + backward) and
{flops['encode'] / 1e9:.2f} GFLOP per pair for extraction (encoder + quantiser forward).

GPU demand, pairs/s at {ASSUMED_MFU:.0%} MFU (the ceiling, at 100 %, is {1 / ASSUMED_MFU:.1f}× these):

{markdown_table(["GPU", "bf16 peak TFLOP/s", "training step, pairs/s", "extraction, pairs/s"], demand)}

Loader supply, one CPU core: pairs per CPU-second (the process's and its workers' user + system
time; the wall-clock rate beside it is what the shared box gave). PIL alone decodes
{decode:.0f} frames per CPU-second here.

{markdown_table(["loader, one core", "used by", "pairs / CPU-s", "pairs/s (wall)",
                 "cores to feed one H100 at that MFU"], supply)}

- Training: with the decoded-frame cache (on by default while a split's unique frames fit 4 GiB:
  about 128,000 gray frames) only the first epoch decodes; afterwards batches are gathered from the
  cache on the GPU and the loader needs next to no CPU. The first epoch, or every epoch of a split
  too large for the cache, needs the cores in the table, per GPU: past a machine's cores the GPU
  waits on decoding (`make gpu-check` measures the data-wait fraction of the full preset).
- Extraction walks every pair once, in order, and its encoder is light: decoding is the bottleneck
  on any GPU, by the factor in the table: expect extraction to run at the rate of the cores it is
  given (`--loader-threads`, default the machine's cores shared among its ranks), not at the GPU's,
  and add machines (`--nnodes`) for cores rather than GPUs.
- The box is shared: load average {load_before:.1f} before and {load_after:.1f} after the loader
  rows, on {os.cpu_count()} cores, so the wall-clock rates are well below the per-CPU-second ones.
"""
