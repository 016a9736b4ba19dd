"""What only a GPU can check (skipped without one; `make gpu-check` runs them): the loader's frames
on the device, bf16 and fp16 training steps, eager and compiled, and encoding on the GPU against
the CPU."""
from __future__ import annotations

import pytest
import torch

from model import LatentActionModel, ModelConfig, load_checkpoint
from pipeline.loader import build_loader
from training.runtime import Runtime
from training.step import TrainStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_frames_on_the_gpu_equal_the_cpu_ones(pair_shards, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    make = lambda device: build_loader(pair_shards, "val", 4, shuffle=False, drop_last=False,  # noqa: E731
                                       backend=backend, device=device, cache=False)
    for on_gpu, on_cpu in zip(make("cuda"), make("cpu")):
        assert on_gpu["cur"].device.type == "cuda"
        assert torch.equal(on_gpu["cur"].cpu(), on_cpu["cur"]) and torch.equal(on_gpu["next"].cpu(), on_cpu["next"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mixed_precision_step_on_the_gpu(dtype):
    device = torch.device("cuda")
    model = LatentActionModel(ModelConfig(width=0.0625, code_dim=32)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = TrainStep(model, optimizer, Runtime(0, 1, 0, device, dtype), grad_clip=1.0)
    cur = torch.rand(4, 1, 210, 160, device=device)
    batch = {"cur": cur, "next": (cur + 0.05 * torch.rand_like(cur)).clamp(0, 1)}
    outcomes = [step(iter([batch]), 1e-3, i) for i in range(3)]
    assert all(o.skipped is None for o in outcomes) and all(torch.isfinite(torch.tensor(o.terms["loss"])) for o in outcomes)
    assert step.scaler.is_enabled() == (dtype == torch.float16)


def test_gpu_codes_equal_cpu_codes_in_fp32(tiny_checkpoint):
    frames = torch.rand(8, 1, 210, 160, generator=torch.Generator().manual_seed(0))
    nxt = (frames + 0.1 * torch.rand(frames.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    on_cpu = load_checkpoint(tiny_checkpoint, "cpu").encode(frames, nxt)
    torch.backends.cudnn.allow_tf32 = False
    on_gpu = load_checkpoint(tiny_checkpoint, "cuda").encode(frames.cuda(), nxt.cuda()).cpu()
    assert (on_gpu == on_cpu).float().mean() > 0.99          # a nearest-code tie may fall either way


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_the_compiled_step_runs_and_follows_eager_on_the_gpu(dtype, channels_last):
    """The step that crashed in its first backward (inductor's stride assertion on
    aten.convolution_backward): compiled, it runs and its losses follow eager's within rounding."""
    device = torch.device("cuda")
    cur = torch.rand(8, 1, 210, 160, device=device, generator=torch.Generator(device).manual_seed(0))
    batch = {"cur": cur, "next": (cur + 0.05 * torch.rand_like(cur)).clamp(0, 1)}
    layout = torch.channels_last if channels_last else torch.contiguous_format
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = LatentActionModel(ModelConfig(width=0.25)).to(device, memory_format=layout).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        step = TrainStep(model, optimizer, Runtime(0, 1, 0, device, dtype), grad_clip=1.0, compile=compiled)
        losses[compiled] = [step(iter([batch]), 1e-3, i).terms["loss"] for i in range(5)]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


def test_the_loaders_model_input_is_the_correctly_rounded_value_on_the_gpu():
    """Every byte value divides to the same float on the GPU as on the CPU (CUDA multiplies by the
    reciprocal of a host scalar, which rounds 126 of them differently)."""
    from pipeline.frames import to_model_input

    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1)
    assert torch.equal(to_model_input(values.cuda()).cpu(), to_model_input(values))
