"""Transposed convolution without zero insertion equals PyTorch's, values and gradients, and refuses what it refuses."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpipe.ops import ConvTranspose1d, ConvTranspose2d, conv_transpose1d, conv_transpose2d
from layerpipe.ops.conv_transpose import multiply_counts


def _case(stride, kernel, seed):
    """A random float64 case at this stride and kernel: dilation, padding, output padding, groups, shapes."""
    chooser = random.Random(seed)
    dilation = (chooser.randint(1, 2), chooser.randint(1, 2))
    groups = chooser.choice([1, 2, 3])
    strides = (stride, chooser.randint(1, 4))
    kernels = (kernel, chooser.randint(1, 7))
    padding = tuple(chooser.randint(0, (k - 1) * d) for k, d in zip(kernels, dilation))
    output_padding = tuple(chooser.randint(0, max(s, d) - 1) for s, d in zip(strides, dilation))
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(
        chooser.choice([1, 2]),
        2 * groups,
        chooser.randint(1, 6),
        chooser.randint(1, 6),
        dtype=torch.float64,
        generator=generator,
    )
    weight = torch.randn(2 * groups, chooser.randint(1, 2), *kernels, dtype=torch.float64, generator=generator)
    bias = torch.randn(weight.shape[1] * groups, dtype=torch.float64, generator=generator)
    return (
        inputs,
        weight,
        bias,
        dict(stride=strides, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
    )


def _values_and_gradients(function, inputs, weight, bias, arguments, grad_seed=0):
    leaves = [tensor.detach().clone().requires_grad_() for tensor in (inputs, weight, bias)]
    out = function(*leaves, **arguments)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(grad_seed))
    return out.detach(), torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("kernel", range(1, 8))
@pytest.mark.parametrize("stride", range(1, 5))
def test_conv_transpose2d_equals_pytorchs_values_and_gradients(stride, kernel):
    checked = 0
    for seed in range(12):
        inputs, weight, bias, arguments = _case(stride, kernel, seed * 100 + stride * 10 + kernel)
        try:
            expected, expected_grads = _values_and_gradients(F.conv_transpose2d, inputs, weight, bias, arguments)
        except RuntimeError:  # an output that would be empty: refused by both
            with pytest.raises(RuntimeError, match="Output size is too small"):
                conv_transpose2d(inputs, weight, bias, **arguments)
            continue
        found, found_grads = _values_and_gradients(conv_transpose2d, inputs, weight, bias, arguments)
        assert found.shape == expected.shape, arguments
        assert (found - expected).abs().max() <= 1e-12, arguments
        for name, mine, theirs in zip(("input", "weight", "bias"), found_grads, expected_grads):
            assert (mine - theirs).abs().max() <= 1e-12, (name, arguments)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize(
    "arguments",
    [
        dict(stride=2, padding=1),
        dict(stride=(3, 2), padding=(0, 1), output_padding=(2, 1)),
        dict(stride=1, dilation=2, output_padding=1),
        dict(stride=2, dilation=(1, 2), groups=2),
        dict(stride=4, padding=2, output_padding=3),
    ],
)
def test_conv_transpose2d_passes_gradcheck(arguments):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 4, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 1, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(arguments.get("groups", 1), dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: conv_transpose2d(x, w, b, **arguments), (inputs, weight, bias))


@pytest.mark.parametrize(
    "stride, kernel, dilation, padding, output_padding",
    [(1, 1, 1, 0, 0), (2, 3, 1, 1, 1), (3, 7, 2, 4, 2), (4, 2, 1, 0, 3), (2, 5, 2, 3, 1), (1, 4, 2, 2, 1)],
)
def test_conv_transpose1d_equals_pytorchs_values_and_gradients(stride, kernel, dilation, padding, output_padding):
    generator = torch.Generator().manual_seed(stride * kernel)
    inputs = torch.randn(2, 4, 9, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 3, kernel, dtype=torch.float64, generator=generator)
    bias = torch.randn(6, dtype=torch.float64, generator=generator)
    arguments = dict(stride=stride, padding=padding, output_padding=output_padding, groups=2, dilation=dilation)
    expected, expected_grads = _values_and_gradients(F.conv_transpose1d, inputs, weight, bias, arguments)
    found, found_grads = _values_and_gradients(conv_transpose1d, inputs, weight, bias, arguments)
    assert (found - expected).abs().max() <= 1e-12
    assert all((mine - theirs).abs().max() <= 1e-12 for mine, theirs in zip(found_grads, expected_grads))


def test_an_unbatched_input_gives_an_unbatched_output():
    inputs, weight = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    found = conv_transpose2d(inputs, weight, None, 2, 1, 1)
    assert found.shape == (3, 10, 12)
    assert (found - F.conv_transpose2d(inputs, weight, None, 2, 1, 1)).abs().max() <= 1e-12


REFUSED = [
    dict(output_padding=2, stride=2),
    dict(stride=0),
    dict(padding=-1),
    dict(dilation=0),
    dict(groups=3),
    dict(groups=0),
    dict(padding=9),
    dict(stride=(1, 2, 3)),
    dict(stride=1.5),
    dict(bias=torch.zeros(5)),
    dict(inputs=torch.randn(4, 5)),
    dict(inputs=torch.randn(1, 3, 5, 5)),
    dict(weight=torch.randn(4, 2, 3)),
]


@pytest.mark.parametrize(
    "arguments", REFUSED, ids=[", ".join(sorted(case)) + f"-{index}" for index, case in enumerate(REFUSED)]
)
def test_every_refused_combination_gives_pytorchs_own_error_class_in_one_line(arguments):
    arguments = dict(arguments)
    inputs = arguments.pop("inputs", torch.randn(1, 4, 5, 5))
    weight = arguments.pop("weight", torch.randn(4, 2, 3, 3))
    with pytest.raises(Exception) as theirs:
        F.conv_transpose2d(inputs, weight, **arguments)
    with pytest.raises(type(theirs.value)) as ours:
        conv_transpose2d(inputs, weight, **arguments)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) and "\n" not in str(ours.value).strip()


def test_the_modules_are_drop_in_replacements_with_output_size():
    torch.manual_seed(0)
    theirs = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    ours = ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    ours.load_state_dict(theirs.state_dict())
    inputs = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    for size in (None, (10, 14)):
        assert (ours(inputs, output_size=size) - theirs(inputs, output_size=size)).abs().max() <= 1e-12
    one_d, reference = ConvTranspose1d(4, 2, 4, stride=3).double(), nn.ConvTranspose1d(4, 2, 4, stride=3).double()
    one_d.load_state_dict(reference.state_dict())
    assert (one_d(inputs[:, :, 0]) - reference(inputs[:, :, 0])).abs().max() <= 1e-12


@pytest.mark.parametrize("stride, kernel", [(2, 4), (3, 6), (4, 8), (2, 2)])
def test_the_phases_multiply_a_stride_squared_fraction_of_what_zero_insertion_does(stride, kernel):
    """With the kernel a multiple of the stride, each phase has kernel/stride taps: exactly 1/stride² of the work."""
    counts = multiply_counts((1, 8, 16, 16), (8, 8, kernel, kernel), stride, padding=kernel // 2)
    assert counts["phases"] * stride**2 == counts["zero_insertion"]
    assert counts["useful"] <= counts["phases"]


@pytest.mark.parametrize(
    "shape, arguments",
    [
        ((1, 4, 0, 5), {}),
        ((0, 4, 5, 5), dict(stride=2, output_padding=3)),
        ((0, 4, 2, 2), dict(padding=9)),
        ((2, 0, 3, 3), {}),
    ],
)
def test_empty_inputs_get_pytorchs_own_answer(shape, arguments):
    inputs, weight = torch.randn(shape), torch.randn(shape[1], 2, 3, 3)
    try:
        expected = F.conv_transpose2d(inputs, weight, **arguments)
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=re.escape(str(error)[:40])):
            conv_transpose2d(inputs, weight, **arguments)
        return
    assert conv_transpose2d(inputs, weight, **arguments).shape == expected.shape
