"""Accelerator-style operators: N:M structured sparsity and transposed convolution without zero insertion.

See ``docs/operators.md`` for a worked example of each.
"""

from .sparse_linear import NMSparseLinear, sparsify
from .sparsity import Pattern, compress, decompose, decompress, nm_mask, parse_pattern, prune

__all__ = ["NMSparseLinear", "Pattern", "compress", "decompose", "decompress", "nm_mask", "parse_pattern", "prune",
           "sparsify"]
