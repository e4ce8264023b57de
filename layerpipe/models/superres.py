"""A small 2× super-resolution network: strided convolutions down, transposed convolutions up.

Its layers pass ``(features, low-resolution image)`` on, so the last one
adds a fixed bilinear enlargement of the input to what the network learned:
the network learns only the detail bilinear enlargement misses.  With
``spatial=True`` every layer is a spatial one (``layerpipe.ops.spatial``),
so each stage can run on chunks of rows; otherwise PyTorch's convolutions
and layerpipe's transposed convolution without zero insertion.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.conv_transpose import ConvTranspose2d
from ..ops.spatial import SpatialConv2d, SpatialConvTranspose2d
from .config import SuperResConfig


def _convolution(spatial: bool, *arguments, **keywords) -> nn.Module:
    return SpatialConv2d(*arguments, **keywords) if spatial else nn.Conv2d(*arguments, **keywords)


def _transposed(spatial: bool, *arguments, **keywords) -> nn.Module:
    return SpatialConvTranspose2d(*arguments, **keywords) if spatial else ConvTranspose2d(*arguments, **keywords)


class Head(nn.Module):
    """The low-resolution image to features; the image travels on beside them."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.convolution = _convolution(spatial, 3, channels, 3, padding=1)

    def forward(self, image):
        return torch.relu(self.convolution(image)), image


class Block(nn.Module):
    """One convolution (or transposed convolution) and a ReLU on the features."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, features, image):
        return torch.relu(self.layer(features)), image


class Tail(nn.Module):
    """Features to the 2× image: a convolution, plus the fixed bilinear enlargement of the input."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.convolution = _convolution(spatial, channels, 3, 3, padding=1)
        self.enlarge = _transposed(spatial, 3, 3, 4, stride=2, padding=1, groups=3, bias=False)
        taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
        with torch.no_grad():  # bilinear 2× enlargement, as a transposed convolution (zeros past the edges)
            self.enlarge.weight.copy_((taps[:, None] * taps[None, :]).expand(3, 1, 4, 4))
        self.enlarge.weight.requires_grad_(False)

    def forward(self, features, image):
        return self.convolution(features) + self.enlarge(image)


def superres_layers(config: SuperResConfig, seed: int = 0, spatial: bool = False) -> list[nn.Module]:
    """Return ``[Head, down, body, up, up, Tail]`` initialised from ``seed``: input ``(batch, 3, h, w)``, output
    ``(batch, 3, 2h, 2w)``."""
    torch.manual_seed(seed)
    width = config.channels
    return [
        Head(width, spatial),
        Block(_convolution(spatial, width, 2 * width, 3, stride=2, padding=1)),
        Block(_convolution(spatial, 2 * width, 2 * width, 3, padding=1)),
        Block(_transposed(spatial, 2 * width, width, 4, stride=2, padding=1)),
        Block(_transposed(spatial, width, width, 4, stride=2, padding=1)),
        Tail(width, spatial),
    ]
