"""The compiled trainer's layout contract (model/conv.py): the convolution operators' fake
implementations promise exactly the strides the real ones return (the mismatch that crashed the
first compiled backward on CUDA), and a training step compiled by inductor, on the CPU, follows the
eager one. CUDA runs the same step in tests/test_cuda.py."""
from __future__ import annotations

import pytest
import torch

from model import LatentActionModel, ModelConfig
from model.config import ShiftConfig
from model.conv import conv, layout_of, strides_for
from training.runtime import Runtime
from training.step import TrainStep

CHANNELS_LAST = torch.channels_last


def case(batch, channels, size, out_channels, *, transposed, layout=torch.contiguous_format, bias=True,
         stride=2, output_padding=(0, 0), weight_layout=torch.contiguous_format):
    x = torch.randn(batch, channels, *size).to(memory_format=layout).requires_grad_()
    shape = (channels, out_channels, 3, 3) if transposed else (out_channels, channels, 3, 3)
    w = torch.randn(shape).to(memory_format=weight_layout).requires_grad_()
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    return (x, w, b, [stride, stride], [1, 1], [1, 1], transposed, list(output_padding), 1)


CASES = {
    # the decoder's first stage: 512 -> 512 transposed with output_padding (pytorch#184026's shape)
    "transposed C_in == C_out, output_padding": case(2, 8, (7, 5), 8, transposed=True, output_padding=(1, 1)),
    # the decoder's last stage: to one channel, whose channels-last and contiguous strides coincide
    "transposed to 1 channel, channels-last input": case(2, 4, (9, 8), 1, transposed=True, layout=CHANNELS_LAST,
                                                         output_padding=(1, 1), bias=True),
    # the encoder's first stage: a 1-channel frame in, channels-last weights
    "1-channel input": case(2, 1, (21, 16), 4, transposed=False, weight_layout=CHANNELS_LAST, bias=False),
    "channels-last, stride 1, 1x1 grid": case(2, 6, (1, 1), 3, transposed=False, layout=CHANNELS_LAST, stride=1),
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_the_operators_fake_strides_are_the_real_ones(args):
    """torch.library.opcheck runs the operator for real and under FakeTensor (what inductor plans
    with) and requires the same sizes and strides, forward and backward, and correct gradients."""
    torch.library.opcheck(conv, args)


def test_the_operator_computes_what_aten_convolution_does():
    x, w, b, *params = case(3, 4, (9, 8), 5, transposed=True, layout=CHANNELS_LAST, output_padding=(1, 0))
    ours = conv(x, w, b, *params)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    stride, padding, dilation, transposed, output_padding, groups = params
    theirs = torch.ops.aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
    theirs.square().sum().backward()
    assert torch.equal(ours, theirs)
    assert all(torch.allclose(mine, t.grad, rtol=1e-5, atol=1e-6) for mine, t in zip(grads, (x, w, b)))
    assert ours.stride() == strides_for(ours.shape, layout_of(x))


def test_a_one_channel_tensor_counts_as_contiguous():
    frame = torch.rand(2, 1, 6, 4)
    assert layout_of(frame) == layout_of(frame.to(memory_format=CHANNELS_LAST)) == torch.contiguous_format
    assert layout_of(torch.rand(2, 3, 6, 4).to(memory_format=CHANNELS_LAST)) == CHANNELS_LAST


# The tiny model with a shift head of 3 x 3 shifts: each shift is a few kernels in the compiled graph
# (the whole model is one graph), and with the preset's shifts a cold compile (empty inductor cache,
# as in CI) took 50 s of the test on a 2-core CPU, 43 s with these. The convolutions' layouts are the same.
COMPILED_CONFIG = ModelConfig(width=0.0625, code_dim=32, shift=ShiftConfig(max_x=1, max_y=1))


def test_an_inductor_compiled_train_step_follows_the_eager_one(monkeypatch):
    """The trainer's own compiled step (TrainStep, inductor: the code path `make train` takes on a
    GPU), on the tiny model in the default layout (channels-last), three updates against eager.
    Inductor's vectorised C++ is switched off to halve the compile time on a 2-core CPU: the layout
    planning under test comes before code generation and is the same."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "vec_isa_ok", False)
    torch._dynamo.reset()
    cur = torch.rand(4, 1, 210, 160, generator=torch.Generator().manual_seed(0))
    batch = {"cur": cur, "next": (cur + 0.05 * torch.rand(cur.shape, generator=torch.Generator().manual_seed(1)))
             .clamp(0, 1)}
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = LatentActionModel(COMPILED_CONFIG).to(memory_format=CHANNELS_LAST).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = TrainStep(model, optimizer, Runtime(0, 1, 0, torch.device("cpu")), grad_clip=1.0, compile=compiled)
        losses[compiled] = [step(iter([batch]), 1e-3, i).terms["loss"] for i in range(3)]
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]
