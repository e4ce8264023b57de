"""Accelerator-style operators: N:M structured sparsity, transposed convolution without zero insertion, and
spatially partitioned layers.

See ``docs/operators.md`` and ``docs/spatial.md``.
"""

from .sparse_linear import NMSparseLinear, sparsify
from .sparsity import Pattern, compress, decompose, decompress, nm_mask, parse_pattern, prune

__all__ = ["NMSparseLinear", "Pattern", "compress", "decompose", "decompress", "nm_mask", "parse_pattern", "prune",
           "sparsify"]
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, conv_transpose1d, conv_transpose2d  # noqa: E402

__all__ += ["ConvTranspose1d", "ConvTranspose2d", "conv_transpose1d", "conv_transpose2d"]
from .spatial import (SpatialBlock, SpatialConv2d, SpatialConvTranspose2d, SpatialGroupNorm,  # noqa: E402
                      spatial_conv2d)

__all__ += ["SpatialBlock", "SpatialConv2d", "SpatialConvTranspose2d", "SpatialGroupNorm", "spatial_conv2d"]
