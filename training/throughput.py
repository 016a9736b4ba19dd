"""Speed and memory figures logged every step: samples/s, GPU memory, and MFU (model FLOPs
utilisation) against the peak of the GPU at hand, looked up by its name."""
from __future__ import annotations

import torch

from model import LatentActionModel, ModelConfig

# Dense tensor-core peaks in FLOP/s (vendor data sheets): (bf16/fp16, tf32). Matched by substring of
# torch.cuda.get_device_name, most specific first.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 494e12),            # SXM
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10G", 125e12, 62.5e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
]


def peak_flops(device: torch.device, amp_dtype: torch.dtype | None) -> float | None:
    """The GPU's dense peak for the precision the convolutions run in; None off CUDA or for an
    unknown GPU (then no MFU is logged rather than a made-up one)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, half, tf32 in PEAK_FLOPS:
        if pattern in name:
            return half if amp_dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def training_flops_per_sample(config: ModelConfig) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted by FlopCounterMode on the
    CPU (convolutions and matmuls; elementwise ops are left out, as usual for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = LatentActionModel(config).train()
    frames = torch.rand(1, *config.frame_shape)
    counter = FlopCounterMode(display=False)
    with counter:
        model(frames, frames)["loss"].backward()
    return float(counter.get_total_flops())


class Throughput:
    """Per-step speed row: samples/s always; GPU memory and MFU on CUDA."""

    def __init__(self, config: ModelConfig, device: torch.device, amp_dtype: torch.dtype | None, batch_size: int):
        self.device, self.batch_size = device, batch_size
        self.peak = peak_flops(device, amp_dtype)
        self.flops_per_sample = training_flops_per_sample(config) if self.peak else None

    def row(self, seconds: float) -> dict:
        samples_per_s = self.batch_size / seconds
        row = {"steps_per_s": 1 / seconds, "samples_per_s": samples_per_s}
        if self.device.type == "cuda":
            row["gpu/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["gpu/memory_reserved_gb"] = torch.cuda.memory_reserved(self.device) / 2**30
        if self.peak and self.flops_per_sample:
            row["mfu"] = samples_per_s * self.flops_per_sample / self.peak
        return row
