"""Spatially partitioned layers: each process of a spatial group holds a chunk of rows of every image.

Before a convolution a rank receives from its neighbours exactly the rows
of their chunks that its kernel also needs — the overlap, computed once by
its owner — and sends them theirs, with non-blocking point-to-point
messages (``ops/spatial_rows.py`` plans which rows go where).  Rows outside
the image are padded as the unpartitioned layer pads them: zeros, or, with
``padding_mode="circular"``, the rows at the other edge, which the edge
ranks exchange.  The backward sends each overlap row's gradient back to its
owner, which adds it in; weight gradients are summed over the spatial
group, so every rank holds the full-image gradient.

Chunk-safe as they are: element-wise layers (ReLU, GELU, Tanh, ...).  Given
here: ``SpatialConv2d``, ``SpatialConvTranspose2d`` and ``SpatialGroupNorm``
(its statistics summed over the group).  Not chunk-safe: layers that look
at whole images (attention, flattening, pooling over the split dimension,
BatchNorm) and dropout (a chunk's mask differs from the whole image's).
Images are split along their height only.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .conv_transpose import conv_transpose2d
from .spatial_rows import Bounds, ExchangePlan, RowMap, plan_exchange

EXCHANGE_TAG = 77_000
"""The message tag of overlap rows (a range of its own, apart from the pipeline's)."""


def spatial_rank(group) -> tuple[int, int]:
    """Return this process's index in the spatial ``group`` (``None``: the world) and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)


def gather_bounds(rows: int, group) -> Bounds:
    """Return every spatial rank's rows ``(first, end)`` from each one's chunk height (one small all-gather)."""
    _, size = spatial_rank(group)
    heights = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(heights, torch.tensor([rows], dtype=torch.int64), group=group)
    edges = [0]
    for height in heights:
        edges.append(edges[-1] + int(height))
    return tuple(zip(edges, edges[1:]))


def _wait(works, what: str, timeout: float) -> None:
    rank = dist.get_rank()
    for work in works:
        try:
            work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            raise RuntimeError(f"rank {rank}: {what} failed or timed out after {timeout:g} s ({reason})") from error


def _peer(group, index: int) -> int:
    return index if group is None else dist.get_global_rank(group, index)


def _exchange(plan: ExchangePlan, outgoing, incoming, group, timeout: float, what: str) -> None:
    """Send ``outgoing[i]`` for ``plan.sends[i]`` and receive ``incoming[i]`` for ``plan.receives[i]``, at once."""
    operations = [
        dist.P2POp(dist.isend, tensor.contiguous(), _peer(group, piece.peer), group, EXCHANGE_TAG)
        for piece, tensor in zip(plan.sends, outgoing)
    ]
    operations += [
        dist.P2POp(dist.irecv, tensor, _peer(group, piece.peer), group, EXCHANGE_TAG)
        for piece, tensor in zip(plan.receives, incoming)
    ]
    if operations:
        _wait(dist.batch_isend_irecv(operations), what, timeout)


class _Overlap(torch.autograd.Function):
    """Assemble the rows a layer needs from this rank's chunk and its neighbours'; backward returns the overlap's
    gradients to their owners, which add them in."""

    @staticmethod
    def forward(ctx, chunk, plan: ExchangePlan, group, timeout: float):
        ctx.plan, ctx.group, ctx.timeout, ctx.rows = plan, group, timeout, chunk.shape[-2]
        shape = list(chunk.shape)
        shape[-2] = plan.rows
        assembled = chunk.new_zeros(shape)
        for piece in plan.copies:
            assembled[..., piece.at : piece.at + piece.end - piece.first, :] = chunk[..., piece.first : piece.end, :]
        incoming = [assembled[..., p.at : p.at + p.end - p.first, :].clone() for p in plan.receives]
        outgoing = [chunk[..., p.first : p.end, :] for p in plan.sends]
        _exchange(plan, outgoing, incoming, group, timeout, "exchanging overlap rows")
        for piece, rows in zip(plan.receives, incoming):
            assembled[..., piece.at : piece.at + piece.end - piece.first, :] = rows
        return assembled

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        shape = list(grad.shape)
        shape[-2] = ctx.rows
        grad_chunk = grad.new_zeros(shape)
        for piece in plan.copies:
            grad_chunk[..., piece.first : piece.end, :] += grad[..., piece.at : piece.at + piece.end - piece.first, :]
        mirrored = ExchangePlan(plan.rows, plan.copies, receives=plan.sends, sends=plan.receives)
        outgoing = [grad[..., p.at : p.at + p.end - p.first, :] for p in plan.receives]
        incoming = [grad_chunk[..., p.first : p.end, :].clone() for p in plan.sends]
        _exchange(mirrored, outgoing, incoming, ctx.group, ctx.timeout, "returning overlap gradients")
        for piece, rows in zip(plan.sends, incoming):
            grad_chunk[..., piece.first : piece.end, :] += rows
        return grad_chunk, None, None, None


def _summed(tensor: torch.Tensor, group) -> torch.Tensor:
    """Return a copy of ``tensor`` summed over ``group``."""
    total = tensor.clone()
    dist.all_reduce(total, group=group)
    return total


class _Replicated(torch.autograd.Function):
    """A parameter every spatial rank holds whole: identity forward; backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, parameter, group):
        ctx.group = group
        return parameter.view_as(parameter)

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.group), None


class _SumOverGroup(_Replicated):
    """The sum of a tensor over the spatial group; its backward is the same sum of the gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _summed(tensor, group)


def replicated(parameter, group):
    """Return ``parameter`` for use in a spatially partitioned layer (its gradient summed over ``group``)."""
    return None if parameter is None else _Replicated.apply(parameter, group)


def overlap_rows(chunk: torch.Tensor, row_map: RowMap, group, circular: bool = False, timeout: float = 300.0):
    """Return ``(assembled, output bounds, height)``: the input rows this rank's outputs of a ``row_map`` layer
    need, every rank's output rows, and the image's input height.

    Refuses (``ValueError``) a split whose chunks are smaller than the overlap
    they must provide.
    """
    bounds = gather_bounds(chunk.shape[-2], group)
    height = bounds[-1][1]
    outputs = row_map.output_bounds(bounds, height)
    wants = tuple(row_map.needed_rows(first, end, height) for first, end in outputs)
    index, _ = spatial_rank(group)
    if circular and any(low < -height or high > 2 * height for low, high in wants):
        raise ValueError(f"circular padding reaches more than one image ({height} rows) past the edge")
    plan = plan_exchange(bounds, wants, height, index, circular)
    return _Overlap.apply(chunk, plan, group, timeout), outputs, height


def _check_padding(padding, padding_mode: str) -> None:
    """Refuse, in one line, padding a spatial convolution cannot do: by name, or other than zeros and circular."""
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r}: give the padding as numbers to a spatial convolution")
    if padding_mode not in ("zeros", "circular"):
        raise ValueError(f"padding_mode={padding_mode!r}: a spatial convolution pads with zeros or circular")


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class SpatialConv2d(nn.Conv2d):
    """``nn.Conv2d`` on a chunk of rows of each image, one chunk per rank of the spatial ``group``.

    Takes and returns chunks (``(batch, channels, rows, width)``); any
    kernel, stride, dilation and groups, uneven chunks, ``padding_mode``
    ``zeros`` or ``circular``.  Its parameters are the same as ``nn.Conv2d``'s
    (``load_state_dict`` from one works); their gradients are summed over
    the group.  Refuses, in one line, a chunk smaller than its overlap.
    """

    def __init__(self, *arguments, group=None, timeout: float = 300.0, **keywords):
        super().__init__(*arguments, **keywords)
        _check_padding(self.padding, self.padding_mode)
        self.group, self.timeout = group, timeout

    def row_map(self) -> RowMap:
        """Return how this layer maps rows along the split dimension."""
        return RowMap("conv", self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return spatial_conv2d(
            chunk,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.group,
            self.timeout,
        )


def spatial_conv2d(
    chunk: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    group=None,
    timeout: float = 300.0,
) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` of the image whose band of rows ``chunk`` is, on every process of ``group``.

    Returns this process's band of the output (``SpatialConv2d`` says which
    rows).  ``padding_mode`` is ``zeros`` or ``circular``; the gradients of
    ``weight`` and ``bias`` are summed over the group.  Refuses, in one line, a
    band smaller than the overlap it must provide.
    """
    _check_padding(padding, padding_mode)
    (stride_rows, stride_across), (pad_rows, pad_across) = _pair(stride), _pair(padding)
    (dilation_rows, dilation_across) = _pair(dilation)
    circular = padding_mode == "circular"
    row_map = RowMap("conv", weight.shape[-2], stride_rows, pad_rows, dilation_rows)
    assembled, _, _ = overlap_rows(chunk, row_map, group, circular, timeout)
    if pad_across:
        assembled = F.pad(assembled, (pad_across, pad_across, 0, 0), mode="circular" if circular else "constant")
    return F.conv2d(
        assembled,
        replicated(weight, group),
        replicated(bias, group),
        (stride_rows, stride_across),
        0,
        (dilation_rows, dilation_across),
        groups,
    )


class SpatialConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` on chunks of rows (zeros padding), computed by ``layerpipe.ops.conv_transpose2d``.

    Rank ``i`` computes the output rows anchored in its input rows
    (``stride`` of them per input row), from its rows and the neighbours'
    rows whose kernels reach them.  Parameters as ``nn.ConvTranspose2d``'s,
    their gradients summed over the group.
    """

    def __init__(self, *arguments, group=None, timeout: float = 300.0, **keywords):
        super().__init__(*arguments, **keywords)
        self.group, self.timeout = group, timeout

    def row_map(self) -> RowMap:
        """Return how this layer maps rows along the split dimension."""
        return RowMap(
            "transposed", self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0], self.output_padding[0]
        )

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        row_map = self.row_map()
        assembled, outputs, height = overlap_rows(chunk, row_map, self.group, timeout=self.timeout)
        first, end = outputs[spatial_rank(self.group)[0]]
        low, _ = row_map.needed_rows(first, end, height)
        weight = replicated(self.weight, self.group)
        if assembled.shape[-2]:
            local = conv_transpose2d(
                assembled,
                weight,
                None,
                self.stride,
                (0, self.padding[1]),
                (0, self.output_padding[1]),
                self.groups,
                self.dilation,
            )
        else:  # no input row reaches this band's outputs, which hold the bias alone; the weight stays in the
            # graph so that its gradient's sum over the group runs on every rank
            width = RowMap(
                "transposed",
                self.kernel_size[1],
                self.stride[1],
                self.padding[1],
                self.dilation[1],
                self.output_padding[1],
            ).output_height(chunk.shape[-1])
            # (and the overlap exchange, whose backward the bands before it wait for, stays in it too)
            local = (weight.sum() + assembled.sum()) * chunk.new_zeros(*chunk.shape[:-3], self.out_channels, 0, width)
        # local row u is the uncropped output row low·stride + u; output row o is the uncropped row o + padding
        out = _rows_with_zeros(local, first + self.padding[0] - low * self.stride[0], end - first)
        bias = replicated(self.bias, self.group)
        return out if bias is None else out + bias.view(1, -1, 1, 1)


def _rows_with_zeros(local: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Return rows ``start … start + rows`` of ``local``, zeros where it has none."""
    have = local.shape[-2]
    before, after = max(0, -start), max(0, start + rows - have)
    taken = local[..., max(0, start) : max(0, min(have, start + rows)), :]
    return F.pad(taken, (0, 0, before, after)) if before or after else taken


class SpatialGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` on chunks of rows: each group's mean and variance are summed over the spatial group."""

    def __init__(self, *arguments, group=None, **keywords):
        super().__init__(*arguments, **keywords)
        self.group = group

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        batch = chunk.shape[0]
        grouped = chunk.reshape(batch, self.num_groups, -1)
        count = torch.full((batch, self.num_groups), float(grouped.shape[-1]), dtype=chunk.dtype, device=chunk.device)
        # Two passes, as the whole-image layer does: E[x²] − E[x]² cancels badly in float32.
        totals = _SumOverGroup.apply(torch.stack([grouped.sum(-1), count]), self.group)
        mean = totals[0] / totals[1]
        variance = _SumOverGroup.apply((grouped - mean[..., None]).square().sum(-1), self.group) / totals[1]
        normalised = ((grouped - mean[..., None]) * torch.rsqrt(variance[..., None] + self.eps)).view_as(chunk)
        if not self.affine:
            return normalised
        shape = (1, -1) + (1,) * (chunk.dim() - 2)
        return normalised * replicated(self.weight, self.group).view(shape) + replicated(self.bias, self.group).view(
            shape
        )


ELEMENT_WISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity)
"""Layers that act on each value alone, so a chunk of rows needs no other rows (``SpatialBlock`` takes these)."""


class SpatialBlock(nn.Sequential):
    """Consecutive ``nn.Conv2d`` (zeros padding) and element-wise layers that exchange overlap rows once.

    The other way to pay for the overlap: instead of each convolution
    exchanging its own overlap, the block receives once the wider overlap
    its whole depth needs, and every rank recomputes its neighbours'
    boundary rows locally — fewer, larger messages for more arithmetic.
    Rows outside the image are set to zero between layers, as each layer
    would pad them.  Parameters as ``nn.Sequential(*layers)``'s, their
    gradients summed over the spatial ``group``.  Refuses other layers in one
    line.
    """

    def __init__(self, *layers: nn.Module, group=None, timeout: float = 300.0):
        for layer in layers:
            if isinstance(layer, nn.Conv2d) and not isinstance(layer, SpatialConv2d):
                if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                    raise ValueError(
                        f"SpatialBlock takes convolutions with numeric zeros padding, not "
                        f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
                    )
            elif not isinstance(layer, ELEMENT_WISE):
                raise ValueError(
                    f"SpatialBlock takes nn.Conv2d and element-wise layers "
                    f"({', '.join(kind.__name__ for kind in ELEMENT_WISE)}), not {type(layer).__name__}"
                )
        super().__init__(*layers)
        self.group, self.timeout = group, timeout

    def row_maps(self) -> list[RowMap]:
        """Return each layer's row map (an element-wise layer's is the identity)."""
        return [
            RowMap("conv", layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.dilation[0])
            if isinstance(layer, nn.Conv2d)
            else RowMap()
            for layer in self
        ]

    def plan(self, bounds: Bounds) -> tuple[list[int], list[tuple[tuple[int, int], ...]]]:
        """Return every layer's input height and, per layer, the rows each rank computes of its input
        (the last entry: of the block's output, each rank's own rows)."""
        heights, all_bounds = [bounds[-1][1]], [bounds]
        for row_map in self.row_maps():
            all_bounds.append(row_map.output_bounds(all_bounds[-1], heights[-1]))
            heights.append(row_map.output_height(heights[-1]))
        wanted = [all_bounds[-1]]
        for row_map, height in zip(reversed(self.row_maps()), reversed(heights[:-1])):
            wanted.insert(0, tuple(row_map.needed_rows(first, end, height) for first, end in wanted[0]))
        return heights, wanted

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        bounds = gather_bounds(chunk.shape[-2], self.group)
        heights, wanted = self.plan(bounds)
        index, _ = spatial_rank(self.group)
        plan = plan_exchange(bounds, wanted[0], heights[0], index)
        rows = _Overlap.apply(chunk, plan, self.group, self.timeout)
        for layer, height, (first, end) in zip(self, heights[1:], (part[index] for part in wanted[1:])):
            if isinstance(layer, nn.Conv2d):
                padded = F.pad(rows, (layer.padding[1], layer.padding[1], 0, 0)) if layer.padding[1] else rows
                rows = F.conv2d(
                    padded,
                    replicated(layer.weight, self.group),
                    replicated(layer.bias, self.group),
                    layer.stride,
                    0,
                    layer.dilation,
                    layer.groups,
                )
            else:
                rows = layer(rows)
            inside_first, inside_end = max(0, -first), min(end, height) - first  # rows within the image
            if inside_first or inside_end < end - first:  # the next layer pads with zeros there
                rows = F.pad(rows[..., inside_first:inside_end, :], (0, 0, inside_first, end - first - inside_end))
        return rows


SPATIAL_LAYERS = (SpatialConv2d, SpatialConvTranspose2d, SpatialGroupNorm, SpatialBlock)
"""The layers that run on chunks of rows; a ``Pipeline(..., spatial=S)`` hands each its stage's group."""
