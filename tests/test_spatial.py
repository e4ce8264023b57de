"""Spatially partitioned layers equal the unpartitioned ones on the whole image, in float64, on 2 and 4 gloo ranks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerpipe
from layerpipe.ops.spatial import SpatialBlock, SpatialConv2d, SpatialConvTranspose2d, SpatialGroupNorm
from layerpipe.ops.spatial_rows import ExchangePlan, Piece, RowMap, plan_exchange, split_rows

# ---------------------------------------------------------------- the row arithmetic (no processes)


def test_split_rows_is_even_and_aligned():
    assert split_rows(10, 3) == ((0, 3), (3, 6), (6, 10))
    assert split_rows(13, 2, align=2) == ((0, 6), (6, 13))
    with pytest.raises(ValueError, match="cannot split 5 rows into 4 chunks starting on multiples of 2"):
        split_rows(5, 4, align=2)


def test_each_rank_receives_exactly_what_its_neighbours_send():
    bounds = ((0, 5), (5, 9), (9, 14))
    layer = RowMap("conv", kernel=5, padding=2)
    wants = tuple(layer.needed_rows(first, end, 14) for first, end in layer.output_bounds(bounds, 14))
    plans = [plan_exchange(bounds, wants, 14, index) for index in range(3)]
    assert plans[1] == ExchangePlan(
        8,
        copies=(Piece(1, 0, 4, 2),),
        receives=(Piece(0, 3, 5, 0), Piece(2, 0, 2, 6)),
        sends=(Piece(0, 0, 2, 7), Piece(2, 2, 4, 0)),
    )
    sent = sorted(((index, piece) for index, plan in enumerate(plans) for piece in plan.sends), key=repr)
    received = sorted(
        (
            (piece.peer, Piece(index, piece.first, piece.end, piece.at))
            for index, plan in enumerate(plans)
            for piece in plan.receives
        ),
        key=repr,
    )
    assert sent == received


def test_a_chunk_smaller_than_the_overlap_it_must_provide_is_refused_in_one_line():
    bounds = ((0, 6), (6, 7), (7, 14))
    layer = RowMap("conv", kernel=5, padding=2)
    wants = tuple(layer.needed_rows(first, end, 14) for first, end in layer.output_bounds(bounds, 14))
    with pytest.raises(
        ValueError,
        match=r"^spatial rank 0 needs rows -2 to 7 \(its overlap\), which reach past its "
        r"neighbour's chunk of 1 rows into spatial rank 2's",
    ):
        plan_exchange(bounds, wants, 14, 0)


# ---------------------------------------------------------------- against the whole image, on gloo ranks

CONVOLUTIONS = [
    dict(kernel_size=kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
    for kernel, stride, dilation, mode in itertools.product((1, 3, 5, 7), (1, 2), (1, 2), ("zeros", "circular"))
    for padding in {dilation * (kernel - 1) // 2, 0}
    if not (mode == "circular" and padding == 0)
]


def _random(shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _compare(spatial: nn.Module, whole: nn.Module, height: int, bounds, seed: int) -> float:
    """Return the largest relative difference of output, input gradient and parameter gradients on this rank."""
    index = torch.distributed.get_rank()
    whole.load_state_dict(spatial.state_dict())
    image = _random((2, 4, height, 16), seed).requires_grad_()
    expected = whole(image)
    grad = _random(expected.shape, seed + 1)
    expected.backward(grad)
    first, end = bounds[index]
    chunk = image.detach()[:, :, first:end].clone().requires_grad_()
    found = spatial(chunk)
    low, high = spatial.row_map().output_bounds(bounds, height)[index] if hasattr(spatial, "row_map") else bounds[index]
    found.backward(grad[:, :, low:high])
    scale = lambda tensor: max(float(tensor.abs().max()), 1e-30)  # noqa: E731
    errors = [
        float((found - expected[:, :, low:high]).abs().max()) / scale(expected),
        float((chunk.grad - image.grad[:, :, first:end]).abs().max()) / scale(image.grad),
    ]
    for (_, mine), theirs in zip(spatial.named_parameters(), whole.parameters()):
        errors.append(float((mine.grad - theirs.grad).abs().max()) / scale(theirs.grad))
    return max(errors)


def _spatial_layers_equal_the_whole_image(height: int, uneven: bool):
    ranks = torch.distributed.get_world_size()
    failures = []
    for number, options in enumerate(CONVOLUTIONS):
        bounds = split_rows(height, ranks, align=options["stride"])
        if uneven:  # move the first boundary by one stride
            (a, b), (c, d) = bounds[0], bounds[1]
            bounds = ((a, b + options["stride"]), (c + options["stride"], d)) + bounds[2:]
        torch.manual_seed(number)
        spatial = SpatialConv2d(4, 6, groups=2, **options).double()
        whole = nn.Conv2d(4, 6, groups=2, **options).double()
        error = _compare(spatial, whole, height, bounds, seed=number)
        if error > 1e-12:
            failures.append((options, bounds, error))
    for number, (kernel, stride, padding, output_padding, dilation) in enumerate(
        [(2, 2, 0, 0, 1), (3, 2, 1, 1, 1), (4, 2, 1, 0, 1), (5, 3, 2, 2, 1), (3, 1, 1, 0, 2), (7, 2, 3, 1, 2)]
    ):
        bounds = split_rows(height, ranks)
        torch.manual_seed(100 + number)
        options = dict(
            kernel_size=kernel, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation
        )
        spatial = SpatialConvTranspose2d(4, 6, **options).double()
        error = _compare(spatial, nn.ConvTranspose2d(4, 6, **options).double(), height, bounds, seed=200 + number)
        if error > 1e-12:
            failures.append((options, bounds, error))
    bounds = split_rows(height, ranks)
    torch.manual_seed(7)
    error = _compare(SpatialGroupNorm(2, 4).double(), nn.GroupNorm(2, 4).double(), height, bounds, seed=300)
    if error > 1e-12:
        failures.append(("group norm", bounds, error))
    return failures


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks, height, uneven", [(2, 17, False), (2, 20, True), (4, 31, False)])
def test_spatial_layers_equal_the_unpartitioned_layers_on_the_whole_image(ranks, height, uneven):
    for rank, failures in enumerate(layerpipe.launch(_spatial_layers_equal_the_whole_image, ranks, (height, uneven))):
        assert failures == [], f"rank {rank}: {failures}"


def _a_stack(height: int):
    """Convolutions, activations, a spatial group norm, a strided convolution down and a transposed one up."""
    ranks, index = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    spatial = nn.Sequential(
        SpatialConv2d(3, 8, 3, padding=1),
        nn.GELU(),
        SpatialGroupNorm(2, 8),
        SpatialConv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        SpatialConv2d(8, 8, 5, padding=4, dilation=2),
        nn.Tanh(),
        SpatialConvTranspose2d(8, 3, 4, stride=2, padding=1),
    ).double()
    whole = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GELU(),
        nn.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=4, dilation=2),
        nn.Tanh(),
        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
    ).double()
    whole.load_state_dict(spatial.state_dict())
    bounds = split_rows(height, ranks, align=2)
    # down by 2, then up by 2: the chunk of the output is the input chunk's rows
    return _against_whole(spatial, whole, _random((2, 3, height, 10), 1), bounds[index], bounds[index], grad_seed=2)


def _against_whole(spatial, whole, image, rows, output_rows, grad_seed: int) -> float:
    """Return the largest relative difference between ``spatial`` on this process's ``rows`` of ``image`` and
    ``whole`` on all of it: output (its ``output_rows``), input gradient and parameter gradients."""
    image = image.requires_grad_()
    expected = whole(image)
    grad = _random(expected.shape, grad_seed)
    expected.backward(grad)
    (first, end), (low, high) = rows, output_rows
    chunk = image.detach()[:, :, first:end].clone().requires_grad_()
    found = spatial(chunk)
    found.backward(grad[:, :, low:high])
    relative = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return max(
        [relative(found.detach(), expected.detach()[:, :, low:high]), relative(chunk.grad, image.grad[:, :, first:end])]
        + [relative(mine.grad, theirs.grad) for mine, theirs in zip(spatial.parameters(), whole.parameters())]
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks, height", [(2, 24), (4, 48)])
def test_a_stack_of_spatial_layers_equals_the_unpartitioned_stack(ranks, height):
    for rank, error in enumerate(layerpipe.launch(_a_stack, ranks, (height,))):
        assert error <= 1e-12, f"rank {rank}: {error:.2e}"


def _too_small():
    layer = SpatialConv2d(1, 1, 5, padding=2).double()
    first, end = ((0, 6), (6, 7), (7, 14))[torch.distributed.get_rank()]
    try:
        layer(_random((1, 1, 14, 5), 0)[:, :, first:end])
    except ValueError as error:
        return str(error)
    return "accepted"


@pytest.mark.multiprocess
def test_a_chunk_smaller_than_its_overlap_is_refused_on_every_rank():
    messages = layerpipe.launch(_too_small, 3)
    assert set(messages) == {
        "spatial rank 0 needs rows -2 to 7 (its overlap), which reach past its neighbour's "
        "chunk of 1 rows into spatial rank 2's: use fewer spatial ranks or a larger image"
    }


def _a_block(height: int):
    """A block that exchanges its overlap once equals the whole image, as the layer-by-layer exchange does."""
    ranks, index = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2),
        nn.Sigmoid(),
        nn.Conv2d(8, 4, 3, padding=2, dilation=2),
        nn.GELU(),
        nn.Conv2d(4, 4, 3),
    ]
    whole = nn.Sequential(*layers).double()
    block = SpatialBlock(*[copy.deepcopy(layer) for layer in layers]).double()
    bounds = split_rows(height, ranks, align=2)
    _, wanted = block.plan(bounds)
    return _against_whole(block, whole, _random((2, 3, height, 12), 3), bounds[index], wanted[-1][index], grad_seed=4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks, height", [(2, 30), (4, 64)])
def test_a_block_exchanging_its_overlap_once_equals_the_unpartitioned_layers(ranks, height):
    for rank, error in enumerate(layerpipe.launch(_a_block, ranks, (height,))):
        assert error <= 1e-12, f"rank {rank}: {error:.2e}"


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), "SpatialBlock takes convolutions with numeric zeros"),
        (nn.GroupNorm(1, 2), "SpatialBlock takes nn.Conv2d and element-wise layers .*, not GroupNorm"),
    ],
)
def test_a_block_refuses_layers_it_cannot_run_in_one_line(layer, message):
    with pytest.raises(ValueError, match=message):
        SpatialBlock(nn.Conv2d(2, 2, 3, padding=1), layer)


def _functional():
    from layerpipe.ops import spatial_conv2d

    index = torch.distributed.get_rank()
    image, weight = _random((2, 4, 15, 9), 5), _random((6, 2, 3, 5), 6).requires_grad_()
    bounds = split_rows(15, torch.distributed.get_world_size(), align=2)
    expected = F.conv2d(image, weight, None, (2, 1), (1, 2), 1, 2)
    found = spatial_conv2d(image[:, :, slice(*bounds[index])], weight, None, (2, 1), (1, 2), 1, 2)
    low, high = RowMap("conv", 3, 2, 1).output_bounds(bounds, 15)[index]
    found.sum().backward()
    (grad,) = torch.autograd.grad(expected.sum(), weight)
    return float((found - expected[:, :, low:high]).abs().max()), float((weight.grad - grad).abs().max())


@pytest.mark.multiprocess
def test_the_functional_form_equals_conv2d_on_the_whole_image():
    for rank, (output, weight) in enumerate(layerpipe.launch(_functional, 2)):
        assert output <= 1e-12 and weight <= 1e-12, (rank, output, weight)


def _transposed_band_without_inputs():
    """A band whose transposed-convolution outputs no input row reaches still runs the backward of what came before."""
    torch.manual_seed(0)
    spatial = nn.Sequential(SpatialConv2d(1, 1, 3, padding=1), SpatialConvTranspose2d(1, 1, 1, stride=2, padding=1))
    whole = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ConvTranspose2d(1, 1, 1, stride=2, padding=1))
    spatial, whole = spatial.double(), whole.double()
    whole.load_state_dict(spatial.state_dict())
    return _compare_sequential(spatial, whole, height=3)


def _compare_sequential(spatial, whole, height):
    index, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    bounds = split_rows(height, ranks)
    image = _random((1, 1, height, 4), 0).requires_grad_()
    expected = whole(image)
    expected.sum().backward()
    first, end = bounds[index]
    chunk = image.detach()[:, :, first:end].clone().requires_grad_()
    spatial(chunk).sum().backward()
    errors = [float((chunk.grad - image.grad[:, :, first:end]).abs().max())]
    errors += [
        float((mine.grad - theirs.grad).abs().max()) for mine, theirs in zip(spatial.parameters(), whole.parameters())
    ]
    return max(errors)


@pytest.mark.multiprocess
def test_a_band_no_input_row_reaches_still_takes_part_in_the_backward():
    for rank, error in enumerate(layerpipe.launch(_transposed_band_without_inputs, 2)):
        assert error <= 1e-12, (rank, error)


def _group_norm_far_from_zero():
    torch.manual_seed(0)
    index = torch.distributed.get_rank()
    image = 100 + 1e-3 * torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    first, end = split_rows(8, torch.distributed.get_world_size())[index]
    expected = F.group_norm(image, 2)[:, :, first:end]
    found = SpatialGroupNorm(2, 4)(image[:, :, first:end])
    return float((found - expected).abs().max())


@pytest.mark.multiprocess
def test_the_spatial_group_norm_of_values_far_from_zero_matches_in_float32():
    for rank, error in enumerate(layerpipe.launch(_group_norm_far_from_zero, 2)):
        assert error <= 1e-2, (rank, error)  # E[x²] − E[x]² gave differences up to 1.17, or NaN


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(padding_mode="reflect"), "padding_mode='reflect': a spatial convolution pads with zeros or circular"),
        (dict(padding="same"), "padding='same': give the padding as numbers to a spatial convolution"),
    ],
)
def test_the_functional_form_refuses_padding_it_cannot_do_in_one_line(keywords, message):
    from layerpipe.ops import spatial_conv2d

    with pytest.raises(ValueError, match=f"^{message}$"):
        spatial_conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3), **keywords)
