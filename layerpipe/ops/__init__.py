"""Accelerator-style operators: N:M structured sparsity, transposed convolution without zero insertion, and
spatially partitioned layers.

See ``docs/operators.md`` and ``docs/spatial.md``.
"""

from .conv_transpose import ConvTranspose1d, ConvTranspose2d, conv_transpose1d, conv_transpose2d
from .sparse_linear import NMSparseLinear, sparsify
from .sparsity import Pattern, compress, decompose, decompress, nm_mask, parse_pattern, prune
from .spatial import SpatialBlock, SpatialConv2d, SpatialConvTranspose2d, SpatialGroupNorm, spatial_conv2d

__all__ = [
    "ConvTranspose1d",
    "ConvTranspose2d",
    "NMSparseLinear",
    "Pattern",
    "SpatialBlock",
    "SpatialConv2d",
    "SpatialConvTranspose2d",
    "SpatialGroupNorm",
    "compress",
    "conv_transpose1d",
    "conv_transpose2d",
    "decompose",
    "decompress",
    "nm_mask",
    "parse_pattern",
    "prune",
    "sparsify",
    "spatial_conv2d",
]
