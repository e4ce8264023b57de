"""Transposed convolution without zero insertion: stride^D phase convolutions over the input as it is.

The zero-insertion method spreads the input ``stride`` apart with zeros
between, pads it and convolves with the flipped kernel: along each
dimension ``stride - 1`` of every ``stride`` inputs it multiplies are the
inserted zeros.  Here each output position is computed from the weights
that actually reach it.  Along one dimension, output ``o`` of a transposed
convolution is ``Σ_k x[i] · w[k]`` over ``i · stride + k · dilation = o + padding``,
so the outputs fall into ``stride`` phases ``r = (o + padding) mod stride``;
phase ``r`` uses only the taps ``k`` with ``k · dilation ≡ r (mod stride)``,
and is an ordinary stride-1 convolution of the input with those taps,
flipped, at dilation ``dilation / gcd(dilation, stride)``.  In D dimensions
the phases are the ``stride^D`` combinations; a phase that no tap reaches
holds only the bias.  Backward is the adjoint: strided convolutions, which
skip rather than multiply the positions between inputs.

Only the convolutions' own border padding multiplies zeros (as the
zero-insertion method's does too).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


@dataclass(frozen=True)
class Phase:
    """One phase along one dimension: the taps that reach it and where its outputs and inputs lie."""

    taps: tuple[int, ...]  # kernel indices, descending (the flipped sub-kernel, in convolution order)
    first_output: int  # the phase's outputs are first_output, first_output + stride, ...
    outputs: int
    pad_before: int  # input padding before (negative: that many inputs cropped)
    pad_after: int
    dilation: int  # of the sub-kernel


def phases_of(length: int, kernel: int, stride: int, padding: int, dilation: int, out_length: int) -> list[Phase]:
    """Return the ``stride`` phases of one dimension of a transposed convolution (see the module docstring)."""
    step = dilation // math.gcd(dilation, stride)
    phases = []
    for residue in range(stride):
        taps = [k for k in range(kernel) if (k * dilation) % stride == residue]
        first_output = (residue - padding) % stride
        outputs = max(0, -(-(out_length - first_output) // stride))
        if not taps or not outputs:
            phases.append(Phase((), first_output, 0, 0, 0, step))
            continue
        largest_shift = (taps[-1] * dilation - residue) // stride
        first_index = (first_output + padding - residue) // stride
        pad_before = largest_shift - first_index
        needed = (outputs - 1) + (len(taps) - 1) * step + 1
        phases.append(
            Phase(tuple(reversed(taps)), first_output, outputs, pad_before, needed - length - pad_before, step)
        )
    return phases


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def multiply_counts(input_shape, weight_shape, stride, padding, output_padding=0, groups=1, dilation=1) -> dict:
    """Return the multiplies of a batched transposed convolution: by phases, by zero insertion, and the useful ones.

    ``useful`` counts the (input, weight) pairs that land on an output;
    ``zero_insertion`` is the stride-1 convolution of the zero-spread, padded
    input (every output times every weight); ``phases`` is this module's.
    """
    dims = len(input_shape) - 2
    stride, padding, output_padding, dilation = (
        _as_tuple(value, dims) for value in (stride, padding, output_padding, dilation)
    )
    per_pair = input_shape[0] * input_shape[1] * weight_shape[1]  # samples × inputs × outputs per group
    counts = {"phases": per_pair, "zero_insertion": per_pair, "useful": per_pair}
    for length, kernel, step, pad, extra, spread in zip(
        input_shape[2:], weight_shape[2:], stride, padding, output_padding, dilation
    ):
        out = (length - 1) * step - 2 * pad + spread * (kernel - 1) + extra + 1
        counts["phases"] *= sum(
            phase.outputs * len(phase.taps) for phase in phases_of(length, kernel, step, pad, spread, out)
        )
        counts["zero_insertion"] *= out * kernel
        counts["useful"] *= sum(
            1 for i in range(length) for k in range(kernel) if 0 <= i * step + k * spread - pad < out
        )
    return counts


def _check(input, weight, bias, stride, padding, output_padding, groups, dilation, dims: int):
    """Refuse what PyTorch refuses, with its error classes; return the output's spatial size."""
    if input.dim() not in (dims + 1, dims + 2) or weight.dim() != dims + 2:
        _TRANSPOSED[dims](input, weight, bias, stride, padding, output_padding, groups, dilation)  # raises
    batched = input if input.dim() == dims + 2 else input.unsqueeze(0)
    if isinstance(groups, int) and groups > 0 and weight.shape[0] != batched.shape[1]:
        raise RuntimeError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected input"
            f"{list(batched.shape)} to have {weight.shape[0]} channels, but got {batched.shape[1]} "
            f"channels instead"
        )
    sizes = _output_sizes(batched.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation, dims)
    if sizes is not None and min(sizes) <= 0:  # before the check below, which would meet the size as a shape
        raise RuntimeError(
            f"Given input size per channel: ({' x '.join(map(str, batched.shape[2:]))}). Calculated "
            f"output size per channel: ({' x '.join(map(str, sizes))}). Output size is too small"
        )
    with torch.no_grad():  # PyTorch's own checks of the arguments, on an empty batch: no arithmetic
        _TRANSPOSED[dims](
            batched.new_empty((0, *batched.shape[1:])), weight, bias, stride, padding, output_padding, groups, dilation
        )
    stride, padding, output_padding, dilation = (
        _as_tuple(value, dims) for value in (stride, padding, output_padding, dilation)
    )
    if min(dilation) <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got dilation={list(dilation)}")
    if any(extra >= step and extra >= spread for extra, step, spread in zip(output_padding, stride, dilation)):
        raise RuntimeError(
            f"output padding must be smaller than either stride or dilation, but got "
            f"output_padding={list(output_padding)}, stride={list(stride)}, dilation={list(dilation)}"
        )
    return stride, padding, dilation, sizes


def _output_sizes(lengths, kernels, stride, padding, output_padding, dilation, dims: int) -> list[int] | None:
    """Return the output's spatial size, or ``None`` when the arguments are not yet known to be valid numbers."""
    values = [_as_tuple(value, dims) for value in (stride, padding, output_padding, dilation)]
    if not all(len(value) == dims and all(type(number) is int for number in value) for value in values):
        return None
    if min(values[0]) < 1 or min(values[1]) < 0 or min(values[3]) < 1:
        return None  # PyTorch's check names these
    return [
        (length - 1) * step - 2 * pad + spread * (kernel - 1) + extra + 1
        for length, kernel, step, pad, extra, spread in zip(lengths, kernels, *values)
    ]


def as_convolution_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Return a transposed convolution's weight ``(in, out/groups, ...)`` as a convolution's ``(out, in/groups, ...)``."""
    channels_in, per_group_out = weight.shape[:2]
    grouped = weight.reshape(groups, channels_in // groups, per_group_out, *weight.shape[2:])
    return grouped.transpose(1, 2).reshape(groups * per_group_out, channels_in // groups, *weight.shape[2:])


def _phase_convolution(batched, kernel, groups, combination: tuple[Phase, ...]):
    """Return one combination of phases: the stride-1 convolution of the (padded or cropped) input with its taps."""
    sub_kernel = kernel
    for axis, phase in enumerate(combination):
        sub_kernel = sub_kernel.index_select(2 + axis, torch.tensor(phase.taps, device=kernel.device))
    padding = [amount for phase in reversed(combination) for amount in (phase.pad_before, phase.pad_after)]
    padded = F.pad(batched, padding)
    return _CONVOLUTIONS[len(combination)](
        padded, sub_kernel, None, 1, 0, tuple(p.dilation for p in combination), groups
    )


def phase_forward(batched, weight, stride, padding, dilation, groups, sizes):
    """Return the transposed convolution of a batched input (no bias), one phase convolution at a time."""
    kernel = as_convolution_weight(weight, groups)
    per_axis = [
        phases_of(length, size_k, step, pad, spread, out)
        for length, size_k, step, pad, spread, out in zip(
            batched.shape[2:], weight.shape[2:], stride, padding, dilation, sizes
        )
    ]
    out = batched.new_zeros(batched.shape[0], kernel.shape[0], *sizes)
    for combination in itertools.product(*per_axis):
        if any(not phase.outputs for phase in combination):
            continue  # no weight reaches these outputs: only the bias
        where = (
            slice(None),
            slice(None),
            *(
                slice(phase.first_output, phase.first_output + step * (phase.outputs - 1) + 1, step)
                for phase, step in zip(combination, stride)
            ),
        )
        out[where] = _phase_convolution(batched, kernel, groups, combination)
    return out


class _PhaseConvTranspose(torch.autograd.Function):
    """Forward by phases; backward by the adjoint, a strided convolution, which multiplies no inserted zero either.

    The input's gradient is the convolution of the output's gradient with the
    same weight, stride, padding and dilation; the weight's gradient is that
    convolution's weight gradient with the input in the place of its output
    gradient.  Measured against autograd through the phase convolutions in
    ``benchmarks/operators.py``: 1.3 to 2.9 times as fast at strides 2-4,
    within 6 % at stride 1.
    """

    @staticmethod
    def forward(ctx, batched, weight, stride, padding, dilation, groups, sizes):
        ctx.save_for_backward(batched, weight)
        ctx.arguments = (stride, padding, dilation, groups)
        return phase_forward(batched, weight, stride, padding, dilation, groups, sizes)

    @staticmethod
    def backward(ctx, grad):
        batched, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.arguments
        dims = batched.dim() - 2
        convolution = _CONVOLUTIONS[dims]
        grad_input = grad_weight = None
        # With output_padding >= stride (allowed where dilation is larger) the adjoint is longer than the input.
        longer = [slice(None), slice(None), *(slice(0, length) for length in batched.shape[2:])]
        if ctx.needs_input_grad[0]:
            grad_input = convolution(grad, weight, None, stride, padding, dilation, groups)[tuple(longer)]
        if ctx.needs_input_grad[1]:
            lengths = [
                (length + 2 * pad - spread * (kernel - 1) - 1) // step + 1
                for length, pad, spread, kernel, step in zip(
                    grad.shape[2:], padding, dilation, weight.shape[2:], stride
                )
            ]
            extended = F.pad(
                batched,
                [
                    amount
                    for length, have in zip(reversed(lengths), reversed(batched.shape[2:]))
                    for amount in (0, length - have)
                ],
            )
            weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}[dims]
            grad_weight = weight_grad(grad, weight.shape, extended, stride, padding, dilation, groups)
        return grad_input, grad_weight, None, None, None, None, None


def _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, dims: int):
    if input.numel() == 0:  # nothing to multiply: PyTorch's own answer, and its own refusals of empty inputs
        return _TRANSPOSED[dims](input, weight, bias, stride, padding, output_padding, groups, dilation)
    stride, padding, dilation, sizes = _check(
        input, weight, bias, stride, padding, output_padding, groups, dilation, dims
    )
    batched = input if input.dim() == dims + 2 else input.unsqueeze(0)
    out = _PhaseConvTranspose.apply(batched, weight, stride, padding, dilation, groups, sizes)
    if bias is not None:
        out = out + bias.view(1, -1, *([1] * dims))
    return out if input.dim() == dims + 2 else out.squeeze(0)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``torch.nn.functional.conv_transpose1d``, computed as ``stride`` phase convolutions (no zero insertion).

    Returns the same tensor (to rounding); refuses what PyTorch refuses, with its error classes.
    """
    return _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, 1)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``torch.nn.functional.conv_transpose2d``, computed as ``stride²`` phase convolutions (no zero insertion).

    Returns the same tensor (to rounding); refuses what PyTorch refuses, with its error classes.
    """
    return _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, 2)


class ConvTranspose1d(nn.ConvTranspose1d):
    """A drop-in ``nn.ConvTranspose1d`` (same parameters, initialisation and ``output_size``) using ``conv_transpose1d``."""

    def forward(self, input, output_size=None):
        return _module_forward(self, input, output_size, 1)


class ConvTranspose2d(nn.ConvTranspose2d):
    """A drop-in ``nn.ConvTranspose2d`` (same parameters, initialisation and ``output_size``) using ``conv_transpose2d``."""

    def forward(self, input, output_size=None):
        return _module_forward(self, input, output_size, 2)


def _module_forward(module, input, output_size, dims: int):
    """Return a transposed-convolution module's output by phases (its ``output_size`` turned into output padding)."""
    _refuse_padding_mode(module)
    extra = module._output_padding(
        input, output_size, module.stride, module.padding, module.kernel_size, dims, module.dilation
    )
    return _conv_transpose(
        input, module.weight, module.bias, module.stride, module.padding, extra, module.groups, module.dilation, dims
    )


def _refuse_padding_mode(module) -> None:
    if module.padding_mode != "zeros":  # as nn.ConvTranspose*d refuses it
        raise ValueError(f'Only "zeros" padding mode is supported for {type(module).__name__}')
