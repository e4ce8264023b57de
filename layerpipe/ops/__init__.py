"""Accelerator-style operators: N:M structured sparsity, transposed convolution without zero insertion, and
spatially partitioned layers.

See ``docs/operators.md`` and ``docs/spatial.md``.  The operators import torch when first used, so
``layerpipe.ops.pattern`` (the ``N:M`` spelling and the sparse kernels' names) serves ``--help`` without it.
"""

_MODULES = {
    "conv_transpose": ("ConvTranspose1d", "ConvTranspose2d", "conv_transpose1d", "conv_transpose2d"),
    "sparse_linear": ("NMSparseLinear", "sparsify"),
    "sparsity": ("Pattern", "compress", "decompose", "decompress", "nm_mask", "parse_pattern", "prune"),
    "spatial": ("SpatialBlock", "SpatialConv2d", "SpatialConvTranspose2d", "SpatialGroupNorm", "spatial_conv2d"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
