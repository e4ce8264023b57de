"""A pipeline whose stages run on spatial groups: each process holds one band of rows of every image.

``Pipeline(..., spatial=S)``: every (replica, chunk) runs the same
programs; chunk ``i`` of stage ``s`` sends to chunk ``i`` of stage ``s + 1``.
The inputs' rows are split evenly (``split_rows``); the targets' rows
follow the rows the last stage's chunk computed; each chunk's loss is
weighted by its share of the rows and the step's loss is their sum over the
chunks, which is the whole images' loss for a loss that is a mean over rows
(``mse_loss``, ``l1_loss``, ``cross_entropy`` per pixel, with mean reduction).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..ops.spatial import SPATIAL_LAYERS, gather_bounds
from ..ops.spatial_rows import split_rows


def has_spatial_layers(layers) -> bool:
    """Return whether any of ``layers`` holds a spatially partitioned layer."""
    return any(isinstance(module, SPATIAL_LAYERS) for layer in layers for module in layer.modules())


def hand_group(modules, group) -> None:
    """Give every spatial layer inside ``modules`` the process group of its stage's chunks."""
    for module in modules:
        for inner in module.modules():
            if isinstance(inner, SPATIAL_LAYERS):
                inner.group = group


def rows_of(tensors: tuple[torch.Tensor, ...], parts: int, index: int) -> tuple[torch.Tensor, ...]:
    """Return chunk ``index`` of ``parts`` of every image tensor (3 or more dimensions, rows second to last)."""
    return tuple(
        tensor[..., slice(*split_rows(tensor.shape[-2], parts)[index]), :] if tensor.dim() >= 3 else tensor
        for tensor in tensors
    )


class ChunkLoss(nn.Module):
    """The user's loss on one chunk, weighted by the chunk's share of the rows (``weight``, set per run)."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn, self.weight = loss_fn, 1.0

    def forward(self, output, targets):
        return self.loss_fn(output, targets) * self.weight


def gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Return the whole images from every chunk's rows of ``tensor`` (collective over ``group``)."""
    bounds = gather_bounds(tensor.shape[-2], group)
    tallest = max(end - first for first, end in bounds)
    padded = torch.nn.functional.pad(tensor, (0, 0, 0, tallest - tensor.shape[-2])).contiguous()
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., : end - first, :] for part, (first, end) in zip(parts, bounds)], dim=-2)
