"""Accelerator-style operators: N:M structured sparsity and transposed convolution without zero insertion.

See ``docs/operators.md`` for a worked example of each.
"""

from .sparse_linear import NMSparseLinear, sparsify
from .sparsity import Pattern, compress, decompose, decompress, nm_mask, parse_pattern, prune

__all__ = ["NMSparseLinear", "Pattern", "compress", "decompose", "decompress", "nm_mask", "parse_pattern", "prune",
           "sparsify"]
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, conv_transpose1d, conv_transpose2d  # noqa: E402

__all__ += ["ConvTranspose1d", "ConvTranspose2d", "conv_transpose1d", "conv_transpose2d"]
