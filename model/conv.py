"""Convolutions whose memory layout the compiled graph can trust.

Why: torch.compile (inductor) plans every buffer's strides ahead from each op's *fake* (meta)
implementation and asserts them when the real kernel returns (`assert_size_stride`). For
`aten.convolution` and `aten.convolution_backward` the meta kernels and cuDNN do not always agree
on the layout: a transposed convolution with output_padding (pytorch/pytorch#184026), a chain of
transposed convolutions in backward (#171622), a 1-channel tensor whose channels-last and
contiguous strides coincide (#197517), and inductor's own layout optimisation, which turns
convolutions channels-last before it records strides (#197514). Each of these is a different
version's bug; this model has all the ingredients (ConvTranspose2d with output_padding, 512 -> 512,
a 1-channel frame in and out), and on CUDA the first backward of the compiled `full` model failed
with `expected ... stride 8400==1 at dim=1 ... Error in op: aten.convolution_backward`.

So under torch.compile the model's convolutions are custom operators that own their layout: the
forward and both halves of the backward return a tensor in a layout chosen here (channels-last when
the input is unambiguously channels-last, contiguous otherwise), the real implementation copies
into that layout when the backend returned another, and the fake implementation promises exactly
those strides. Inductor then has nothing to predict: whatever torch version or backend, the
strides it asserts are the ones it gets. Eager mode (and a CPU run without compile) keeps the
plain modules: the same kernels, so the same bits; compiled, the values are the same ops' results.
The cost is a copy where a backend picks another layout than the one chosen here (none on the
paths measured) and no convolution fusion by inductor (it fuses none on a GPU anyway).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def layout_of(tensor: Tensor) -> torch.memory_format:
    """channels_last where `tensor` (4-d) is channels-last and not also contiguous (a tensor with one
    channel, or 1 x 1 pixels, is both: contiguous then), torch.contiguous_format otherwise."""
    if (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
            and not tensor.is_contiguous()):
        return torch.channels_last
    return torch.contiguous_format


def strides_for(shape: Sequence[int], layout: torch.memory_format) -> tuple[int, ...]:
    """The dense strides of `shape` in `layout` (channels-last: N, H, W, C from outer to inner)."""
    if layout == torch.channels_last and len(shape) == 4:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(1, size)
    return tuple(reversed(strides))


def pinned(tensor: Tensor, layout: torch.memory_format) -> Tensor:
    """`tensor` with exactly strides_for(its shape, layout), copied only where it has others."""
    wanted = strides_for(tensor.shape, layout)
    if tensor.stride() == wanted:
        return tensor
    return torch.empty_strided(tensor.shape, wanted, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def empty_pinned(like: Tensor, shape: Sequence[int], layout: torch.memory_format) -> Tensor:
    return like.new_empty_strided(tuple(shape), strides_for(shape, layout))


def conv_output_shape(input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                      groups: int) -> list[int]:
    spatial = []
    for i, size in enumerate(input.shape[2:]):
        kernel = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if transposed:
            spatial.append((size - 1) * stride[i] - 2 * padding[i] + kernel + output_padding[i])
        else:
            spatial.append((size + 2 * padding[i] - kernel) // stride[i] + 1)
    channels = weight.shape[1] * groups if transposed else weight.shape[0]
    return [input.shape[0], channels, *spatial]


# ------------------------------------------------------------------------------------ the operators
@torch.library.custom_op("lam::conv", mutates_args=())
def conv(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
         dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int) -> Tensor:
    out = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return pinned(out, layout_of(input))


@conv.register_fake
def _(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    shape = conv_output_shape(input, weight, stride, padding, dilation, transposed, output_padding, groups)
    return empty_pinned(input, shape, layout_of(input))


@torch.library.custom_op("lam::conv_grad_input", mutates_args=())
def conv_grad_input(grad: Tensor, input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int) -> Tensor:
    found = torch.ops.aten.convolution_backward(grad, input, weight, None, stride, padding, dilation, transposed,
                                                output_padding, groups, [True, False, False])[0]
    return pinned(found, layout_of(input))


@conv_grad_input.register_fake
def _(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups):
    return empty_pinned(grad, input.shape, layout_of(input))


@torch.library.custom_op("lam::conv_grad_weight", mutates_args=())
def conv_grad_weight(grad: Tensor, input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int) -> Tensor:
    found = torch.ops.aten.convolution_backward(grad, input, weight, None, stride, padding, dilation, transposed,
                                                output_padding, groups, [False, True, False])[1]
    return pinned(found, layout_of(weight))


@conv_grad_weight.register_fake
def _(grad, input, weight, stride, padding, dilation, transposed, output_padding, groups):
    return empty_pinned(grad, weight.shape, layout_of(weight))


def _setup_context(ctx, inputs, output):
    input, weight, bias, *params = inputs
    ctx.save_for_backward(input, weight)
    ctx.params = params
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_input = conv_grad_input(grad, input, weight, *ctx.params) if needs_input else None
    grad_weight = conv_grad_weight(grad, input, weight, *ctx.params) if needs_weight else None
    grad_bias = grad.sum((0, *range(2, grad.dim()))) if ctx.has_bias and needs_bias else None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


conv.register_autograd(_backward, setup_context=_setup_context)


def autocast_args(input: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """What autocast hands aten.convolution: every tensor cast to the autocast dtype where autocast is
    on (it does not cast a custom operator's inputs itself)."""
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# ------------------------------------------------------------------------------------ the modules
class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict); under torch.compile the layout-owning `conv`."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(input)
        return conv(*autocast_args(input, self.weight, self.bias), list(self.stride), list(self.padding),
                    list(self.dilation), False, [0, 0], self.groups)


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same parameters, same state_dict); under torch.compile the layout-owning `conv`."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not torch.compiler.is_compiling() or output_size is not None:
            return super().forward(input, output_size)
        return conv(*autocast_args(input, self.weight, self.bias), list(self.stride), list(self.padding),
                    list(self.dilation), True, list(self.output_padding), self.groups)
